"""Inference speed: our path (bf16 where fast, SDPA, batched) against the naive one (fp32, eager, one image
at a time), on the same machine in the same run, with the share of the physical limit.

    python -m bench.speed                 # ViT-L/14@336 with random weights (no download); CPU: about 2 minutes
    python -m bench.speed --tiny          # a tiny backbone: checks the script, numbers mean little
    python -m bench.speed --json out.json --device cuda

The limit is the machine's best matmul rate divided by the analytic FLOPs per image: the fastest kernels it has
(torch's and, with --backends openvino, OpenVINO's; fp32 and bf16 where native), large matmuls, the best of several
timed trials in this run. Every row is a share of it; int8 rows (--int8) are shares of the int8 limit (the best of
those and OpenVINO's int8 matmul). A share above 100% means the limit is wrong: flagged, not shown. The pipeline
over --many photos (decoding and detection overlapped with the forward pass, faces batched across photos) is
compared with the model-alone row of its backend; single-photo latency (p50) is reported apart, with detection's
share for each detector.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TINY = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 64,
    "patch_size": 8,
}
NAIVE = "naive: fp32, eager attention, one image at a time"
PHOTO = Path(__file__).resolve().parents[1] / "examples" / "astronaut.jpg"  # one face
PEAK_TRIALS = 5
PEAK_SECONDS = 0.5  # each trial runs matmuls for at least this long: one short matmul is too noisy to divide by
PEAK_SIZE = {"cuda": 8192, "cpu": 3072, "tiny": 512}  # large enough to keep AMX / AVX-512 tiles busy
CPU_FEATURES = {  # what /proc/cpuinfo's flags say about the kernels a CPU can run fast
    "avx2": ("avx2",),
    "avx512": ("avx512f",),
    "avx512_vnni": ("avx512_vnni",),
    "avx512_bf16": ("avx512_bf16",),
    "amx_bf16": ("amx_bf16",),
    "amx_int8": ("amx_int8",),
}


def vision_flops_per_image(config) -> float:
    """Analytic forward FLOPs of the vision tower (a multiply-add counts 2): 381.9 G for ViT-L/14@336."""
    vision = config.vision_config
    patches = (config.image_size // vision.patch_size) ** 2
    tokens, width, mlp = patches + 1, vision.hidden_size, vision.intermediate_size
    per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 2 * 2 * tokens * tokens * width
    patch_embedding = 2 * patches * (vision.num_channels * vision.patch_size**2) * width
    return vision.num_hidden_layers * per_layer + patch_embedding


def matmul_peak(dtype, device, size: int | None = None) -> float:
    """The best FLOP/s of torch's square matmuls in `dtype` over several timed trials: the practical peak."""
    import torch

    size = size or PEAK_SIZE[device.type]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def once() -> None:
        torch.mm(a, b)
        synchronize(device)

    return best_rate(once, 2 * size**3)


def best_rate(once, flops: float) -> float:
    """FLOP/s of `once()` (`flops` each), after a warm-up call: the best of PEAK_TRIALS trials, each at least
    PEAK_SECONDS long."""
    once()
    best = 0.0
    for _ in range(PEAK_TRIALS):
        count, start = 0, time.perf_counter()
        while True:
            once()
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= PEAK_SECONDS:
                break
        best = max(best, flops * count / elapsed)
    return best


def openvino_matmul_peak(precision: str, size: int) -> float:
    """OpenVINO's (oneDNN's) square matmul rate on the CPU: 'fp32', 'bf16' (its bf16 kernels, AVX512-BF16 / AMX),
    or 'int8' (both operands through FakeQuantize: its int8 kernels, VNNI / AMX-INT8)."""
    import numpy as np
    import openvino
    from openvino import opset13 as ops

    parameter = ops.parameter([size, size], openvino.Type.f32)
    data, weights = parameter, ops.constant(np.random.default_rng(0).standard_normal((size, size)).astype(np.float32))
    if precision == "int8":
        low, high = ops.constant(np.float32(-4)), ops.constant(np.float32(4))
        data, weights = (ops.fake_quantize(node, low, high, low, high, 256) for node in (data, weights))
    model = openvino.Model([ops.matmul(data, weights, False, False)], [parameter])
    hint = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
    request = openvino.Core().compile_model(model, "CPU", hint).create_infer_request()
    x = np.random.default_rng(1).standard_normal((size, size)).astype(np.float32)
    return best_rate(lambda: request.infer({0: x}), 2 * size**3)


def cpu_features() -> dict[str, bool]:
    """The CPU's fast-kernel features from /proc/cpuinfo's flags (empty where it cannot be read)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return {name: any(flag in flags for flag in names) for name, names in CPU_FEATURES.items()}


def kernel_peaks(device, dtypes, size: int, backends, int8: bool) -> dict[str, float]:
    """FLOP/s of the fastest kernels measured: torch's in each dtype; OpenVINO's fp32, bf16 (where native) and
    int8 (with --int8) when it is among the backends. Keys: 'torch float32', 'openvino int8', ..."""
    import torch

    peaks = {f"torch {short(d)}": matmul_peak(d, device, size) for d in dtypes}
    if device.type == "cpu" and "openvino" in backends:
        native_bf16 = torch.bfloat16 in dtypes
        for precision in ("fp32", *(["bf16"] if native_bf16 else []), *(["int8"] if int8 else [])):
            peaks[f"openvino {precision}"] = openvino_matmul_peak(precision, size)
    return peaks


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def images_per_second(forward, images, batch_size: int, device) -> tuple[float, dict]:
    """Images/s of `forward` (a batch in, logits per task out) over `images` in batches, after one warm-up
    batch; and the probabilities it gave every image (for the agreement with the fp32 path)."""
    import torch

    with torch.inference_mode():
        forward(images[:batch_size])  # warm-up
        synchronize(device)
        start = time.perf_counter()
        logits = [forward(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        synchronize(device)
        seconds = time.perf_counter() - start
    return len(images) / seconds, {t: torch.cat([b[t] for b in logits]).float().softmax(-1).cpu() for t in logits[0]}


def halving_on_oom(measure, batch_size: int):
    """`measure(batch_size)`, and again at half the batch while it does not fit in memory (saying so)."""
    import torch

    while True:
        try:
            return measure(batch_size), batch_size
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            print(f"batch {batch_size} does not fit in memory: retrying with {batch_size // 2}", file=sys.stderr)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            batch_size //= 2


def reset_peak_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux: writing 5 to clear_refs resets the peak resident set (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gb(device) -> float:
    """CUDA: the largest allocation since the last reset. CPU: the process's peak resident set since the reset
    (since the start where it cannot be reset)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1e6
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def build(config, attention: str, dtype, device):
    import torch

    from softbio_hf import SoftBioModel

    torch.manual_seed(0)
    model = SoftBioModel(config).eval()
    model.backbone.set_attn_implementation(attention)
    return model.to(device=device, dtype=dtype)


def resolve_device(name: str | None):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but this machine has no CUDA device; use --device cpu.")
    if name not in (None, "cpu", "cuda"):
        raise SystemExit(f"error: --device {name!r}: use cpu or cuda.")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_fast_dtype(name: str, device):
    """Our path's dtype: auto (bf16 where the hardware runs it natively), or one the device supports."""
    import torch

    from softbio_hf.pipeline_softbio import resolve_dtype

    supported = ("auto", "bfloat16", "float16", "float32") if device.type == "cuda" else ("auto", "bfloat16", "float32")
    if name not in supported:
        raise SystemExit(f"error: --dtype {name!r} on {device.type}: use one of {', '.join(supported)}.")
    return resolve_dtype(name, device) if name == "auto" else getattr(torch, name)


def short(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def agreement(reference: dict, other: dict) -> dict:
    """Share of (image, task) pairs with the fp32 path's top label, and the largest probability difference."""
    import torch

    same = torch.cat([(reference[t].argmax(-1) == other[t].argmax(-1)).float() for t in reference])
    gap = max(float((reference[t] - other[t]).abs().max()) for t in reference)
    return {"top_label_agreement": float(same.mean()), "max_prob_diff": gap}


def pipeline_many_photos_per_second(pipe, paths: list[str], batch_size: int) -> float:
    """Photos/s of the pipeline over a list of photo files (one face each): decoding and detection of the next
    photos overlapped with the forward pass, faces batched across photos (`batch_size` per pass)."""
    pipe(paths[:2], batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    answers = pipe(paths, batch_size=batch_size)
    seconds = time.perf_counter() - start
    if any(len(faces) != 1 for faces in answers):
        raise SystemExit(f"error: {PHOTO} should give exactly one face to the benchmark.")
    return len(paths) / seconds


def single_photo_latency(pipe, photo, count: int) -> list[dict]:
    """p50 seconds of one photo through the pipeline, and of its detection alone, for each detector this machine
    has (YuNet needs its model file: offline, Haar only)."""
    import numpy as np

    from softbio_hf.faces import DETECTION_MAX_SIDE, detect_faces, make_detector

    rows = []
    for name in ("haar", "yunet"):
        try:
            detector = make_detector(name)
        except (FileNotFoundError, ImportError, ValueError, OSError):
            continue
        pipe(photo, detector=name)  # warm-up
        total, detection = [], []
        for _ in range(max(count, 5)):
            start = time.perf_counter()
            pipe(photo, detector=name)
            total.append(time.perf_counter() - start)
            start = time.perf_counter()
            detect_faces(detector, photo, max_side=DETECTION_MAX_SIDE)
            detection.append(time.perf_counter() - start)
        p50, detection_p50 = float(np.median(total)), float(np.median(detection))
        # the share from each run's own pair (detection timed right after its pipeline call): steadier under load
        share = float(np.median(np.array(detection) / np.array(total)))
        rows.append({"detector": name, "p50_s": p50, "detection_p50_s": detection_p50, "detection_share": share})
    return rows


def pipeline_photos_per_second(pipe, photo, count: int) -> float:
    """Photos/s of the whole pipeline on a photo of one face: detection, crop, preprocessing, model, results."""
    pipe(photo)  # warm-up: the detector, and the model's first pass
    start = time.perf_counter()
    for _ in range(count):
        if len(pipe(photo)) != 1:
            raise SystemExit(f"error: {PHOTO} should give exactly one face to the benchmark.")
    return count / (time.perf_counter() - start)


class Table:
    """Rows measured one after another; each row's ratio is against a named baseline row of the same run."""

    def __init__(self, device, limit: float, int8_limit: float | None = None):
        self.device, self.limit, self.int8_limit = device, limit, int8_limit or limit
        self.rows: list[dict] = []
        self.probs: dict[str, dict] = {}
        self.wrong_limit: list[str] = []  # rows faster than their limit: the limit is not the machine's peak

    def speed_of(self, setting: str) -> float:
        return next(row["images_per_s"] for row in self.rows if row["setting"] == setting)

    def add(
        self,
        setting: str,
        measure,
        batch: int = 1,
        baseline: str | None = None,
        reference: str | None = None,
        int8: bool = False,
    ):
        """`measure(batch)` gives images/s (and probabilities, or None); `{batch}` in the name is the batch that
        fitted. An int8 row's share is of the int8 limit. Returns the row's final name."""
        reset_peak_memory(self.device)
        (speed, probs), used = halving_on_oom(measure, batch)
        setting = setting.format(batch=used)
        share = speed / (self.int8_limit if int8 else self.limit)
        if share > 1:  # faster than the "peak": a kernel faster than those measured exists; never shown as >100%
            self.wrong_limit.append(setting)
        row = {
            "setting": setting,
            "images_per_s": speed,
            "share_of_limit": share if share <= 1 else None,
            "limit": "int8" if int8 else "float",
            "ratio_vs_baseline": speed / self.speed_of(baseline) if baseline else 1.0,
            "peak_mem_gb": peak_memory_gb(self.device),
            "baseline": baseline or setting,
        }
        if probs is not None:
            self.probs[setting] = probs
            if reference:
                row.update(agreement(self.probs[reference], probs))
        self.rows.append(row)
        return setting


def run(
    tiny: bool = False,
    images: int = 8,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "auto",
    compile: bool = True,
    photos: int = 4,
    backends: tuple[str, ...] = (),
    many: int | None = None,
    int8: bool = False,
    peak_size: int | None = None,
) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import pipeline

    from softbio_hf import SoftBioConfig

    device = resolve_device(device)
    fast = resolve_fast_dtype(dtype, device)
    vision = {"model_type": "clip_vision_model", **TINY} if tiny else None
    config = SoftBioConfig(vision_config=vision, projection_dim=32 if tiny else 768)
    pixels = torch.randn(images, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
    photo = np.asarray(Image.open(PHOTO).convert("RGB"))
    flops = vision_flops_per_image(config)
    size = peak_size or PEAK_SIZE["tiny" if tiny else device.type]
    peaks = kernel_peaks(device, sorted({torch.float32, fast}, key=str), size, backends, int8)
    float_peak = max(value for kernel, value in peaks.items() if not kernel.endswith("int8"))
    table = Table(device, float_peak / flops, max(peaks.values()) / flops)
    paths = [str(PHOTO)] * (many or (8 if tiny else 64))  # files: decoding is part of the pipeline's work
    over = f"pipeline over {len(paths)} photos"

    def many_measure(pipe):
        return lambda size: (pipeline_many_photos_per_second(pipe, paths, size), None)

    def model_measure(model, forward):
        return lambda size: images_per_second(forward, pixels.to(device, model.dtype), size, device)

    def naive_rows() -> tuple[str, str]:  # a function, so the fp32 model is freed before our rows' memory
        naive = build(config, "eager", torch.float32, device)
        model_row = table.add(NAIVE, model_measure(naive, lambda x: naive(pixel_values=x).logits))
        naive_pipe = pipeline("soft-biometrics", model=naive, device=device, dtype="float32")
        pipeline_row = table.add(
            "pipeline, naive: fp32, eager attention (photo of one face, detection included)",
            lambda _: (pipeline_photos_per_second(naive_pipe, photo, photos), None),
        )
        return model_row, pipeline_row

    naive_row, naive_pipeline = naive_rows()

    ours = build(config, "sdpa", fast, device)
    ours_row = table.add(
        f"ours: {short(fast)}, SDPA, batch {{batch}}",
        model_measure(ours, lambda x: ours(pixel_values=x).logits),
        batch_size,
        naive_row,
        naive_row,
    )
    pipe = pipeline("soft-biometrics", model=ours, device=device, dtype=fast)
    table.add(f"{over}, ours: {short(fast)}, SDPA, batch {{batch}}", many_measure(pipe), batch_size, ours_row)
    latency = [{"pipeline": f"ours: {short(fast)}, SDPA", **row} for row in single_photo_latency(pipe, photo, photos)]
    compile_seconds: dict[str, float] = {}
    if compile:

        def compiled_measure(size: int):  # the pipeline's own compiled path, compiled for the batch measured
            compile_seconds[f"batch {size}"] = pipe.compile(size)
            return model_measure(ours, pipe.classify)(size)

        compiled_row = table.add(
            f"ours compiled: {short(fast)}, SDPA, torch.compile (frozen weights), batch {{batch}}",
            compiled_measure,
            batch_size,
            naive_row,
            naive_row,
        )
        table.add(  # at the batch just compiled: no compilation more
            f"{over}, ours compiled: {short(fast)}, batch {pipe.compiled_batch_size}",
            many_measure(pipe),
            pipe.compiled_batch_size,
            compiled_row,
        )
        compile_seconds["batch 1"] = pipe.compile(1)  # the pipeline passes one face of one photo at a time
        table.add(
            f"pipeline, ours: {short(fast)}, SDPA, compiled (photo of one face, detection included)",
            lambda _: (pipeline_photos_per_second(pipe, photo, photos), None),
            baseline=naive_pipeline,
        )
    measured = Measured(table, pixels, photo, photos, paths, batch_size, device, naive_row, naive_pipeline)
    export_seconds = exported_rows(measured, config, backends, fast, int8, latency) if backends else {}
    return {
        "device": str(device),
        "cpu": cpu_description(),
        "cpu_features": cpu_features(),
        "export_seconds": export_seconds,
        "backbone": "tiny" if tiny else "ViT-L/14@336 (random weights)",
        "gflop_per_image": flops / 1e9,
        "peak_matmul_size": size,
        "peak_gflop_per_s": {kernel: peak / 1e9 for kernel, peak in peaks.items()},
        "limit_images_per_s": table.limit,
        "int8_limit_images_per_s": table.int8_limit,
        "wrong_limit": table.wrong_limit,
        "compile_seconds": compile_seconds,
        "rows": table.rows,
        "latency": latency,
    }


def markdown(result: dict) -> str:
    peaks = ", ".join(f"{dtype} {value:,.0f}" for dtype, value in result["peak_gflop_per_s"].items())
    compiled = ", ".join(f"{k} {v:.1f} s" for k, v in result["compile_seconds"].items()) or "not measured"
    lines = [
        f"{result['backbone']} on {result['device']}, {result['gflop_per_image']:.1f} GFLOP per image; matmul peak "
        f"GFLOP/s {peaks} (square {result['peak_matmul_size']}); limit {result['limit_images_per_s']:.3f} images/s, "
        f"int8 limit {result['int8_limit_images_per_s']:.3f}; compilation {compiled}",
        f"CPU: {result['cpu']}; features: {', '.join(k for k, v in result['cpu_features'].items() if v) or 'none'}"
        + (
            f"; export {', '.join(f'{k} {v} s' for k, v in result['export_seconds'].items())}"
            if result["export_seconds"]
            else ""
        ),
        "",
        "| setting | images/s | s per image | share of limit | vs naive | same top label as fp32 | largest prob. "
        "difference | peak memory GB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        agree = f"{row['top_label_agreement']:.0%}" if "top_label_agreement" in row else ""
        gap = f"{row['max_prob_diff']:.4f}" if "max_prob_diff" in row else ""
        lines.append(
            f"| {row['setting']} | {row['images_per_s']:.3f} | {1 / row['images_per_s']:.3f} | "
            f"{share(row)} | {row['ratio_vs_baseline']:.2f}x | {agree} | {gap} | "
            f"{row['peak_mem_gb']:.1f} |"
        )
    if result["wrong_limit"]:
        lines += ["", f"WRONG LIMIT: faster than the measured peak: {'; '.join(result['wrong_limit'])}"]
    lines += ["", "| single photo, one face | detector | p50 s | detection p50 s | detection's share |"]
    lines += ["|---|---|---:|---:|---:|"]
    for row in result["latency"]:
        lines.append(
            f"| {row['pipeline']} | {row['detector']} | {row['p50_s']:.3f} | {row['detection_p50_s']:.3f} | "
            f"{row['detection_share']:.0%} |"
        )
    return "\n".join(lines)


def share(row: dict) -> str:
    """A row's share of its limit; a share over 100% is not shown: the limit was wrong."""
    if row["share_of_limit"] is None:
        return "wrong limit"
    return f"{row['share_of_limit']:.0%}" + (" of int8" if row.get("limit") == "int8" else "")


@dataclass
class Measured:
    """What every exported backend's rows are measured on, and against."""

    table: Table
    pixels: Any
    photo: Any
    photos: int
    paths: list[str]
    batch_size: int
    device: Any
    naive_row: str
    naive_pipeline: str


def exported_rows(measured: Measured, config, backends, fast, int8: bool, latency: list[dict]) -> dict[str, float]:
    """Rows for the exported backends (python -m softbio_hf.export of the same weights): the model alone, the
    pipeline over many photos against it, and one photo at a time against the naive pipeline; OpenVINO also at its
    own precision where the CPU has bf16; with `int8`, the int8 export (calibrated on the example photos' faces),
    its agreement with fp32 and its share of the int8 limit."""
    import tempfile

    import torch

    from softbio_hf.export import export

    if measured.device.type != "cpu":
        raise SystemExit("error: --backends run on the CPU; use --device cpu.")
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="softbio-bench-export-") as folder:
        model = build(config, "sdpa", torch.float32, measured.device)
        model.save_pretrained(folder)
        faces = None
        if int8:
            from softbio_hf.quantize import calibration_faces

            faces = calibration_faces([str(PHOTO.parent)], config.image_size)
        for backend in backends:
            started = time.perf_counter()
            export(model, folder, [backend], checkpoint=folder)  # beside the weights just saved there
            seconds[backend] = round(time.perf_counter() - started, 1)
            precisions = ["float32"] + (["auto"] if backend == "openvino" and fast == torch.bfloat16 else [])
            for dtype in precisions:
                label = f"{backend}, {'fp32' if dtype == 'float32' else 'its default precision (bf16)'}"
                pipe = backend_rows(measured, folder, backend, dtype, label)
                if dtype == "float32":
                    latency += [{"pipeline": label, **row} for row in single_photo_latency(pipe, measured.photo, 5)]
            if int8:  # an export of its own, served from its folder alone
                started = time.perf_counter()
                export(model, f"{folder}/int8-{backend}", [backend], calibration_faces=faces)
                seconds[f"{backend} int8"] = round(time.perf_counter() - started, 1)
                backend_rows(measured, f"{folder}/int8-{backend}", backend, "float32", f"{backend}, int8", int8=True)
    return seconds


def backend_rows(measured: Measured, folder: str, backend: str, dtype: str, label: str, int8: bool = False):
    """The model-alone row of one export at one precision, the pipeline over many photos against it, and the
    pipeline one photo at a time against the naive pipeline. Returns the pipeline."""
    from transformers import pipeline

    table = measured.table
    pipe = pipeline("soft-biometrics", model=folder, device=measured.device, dtype=dtype, backend=backend)
    model_row = table.add(
        f"{label}, batch {{batch}}",
        lambda size: images_per_second(pipe.classify, measured.pixels, size, measured.device),
        measured.batch_size,
        measured.naive_row,
        measured.naive_row,
        int8=int8,
    )
    table.add(
        f"pipeline over {len(measured.paths)} photos, {label}, batch {{batch}}",
        lambda size: (pipeline_many_photos_per_second(pipe, measured.paths, size), None),
        measured.batch_size,
        model_row,
        int8=int8,
    )
    table.add(
        f"pipeline, {label} (photo of one face, detection included)",
        lambda _: (pipeline_photos_per_second(pipe, measured.photo, measured.photos), None),
        baseline=measured.naive_pipeline,
        int8=int8,
    )
    return pipe


def cpu_description() -> str:
    """The CPU the run measured: vendor and model, and whether it has AVX-512 and native bf16."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return (
        f"{name}; AVX-512 {'yes' if 'avx512f' in flags else 'no'}; "
        f"native bf16 {'yes' if flags & {'avx512_bf16', 'amx_bf16'} else 'no'}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.speed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from softbio_hf.version import add_version_argument  # stdlib only: --version needs no torch

    add_version_argument(parser)
    parser.add_argument("--tiny", action="store_true", help="tiny backbone (a quick check of the script)")
    parser.add_argument("--images", type=int, default=8, help="images per model row (default 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of our model rows (default 8)")
    parser.add_argument("--photos", type=int, default=4, help="timed photos per pipeline row (default 4)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--dtype", default="auto", help="our rows' dtype: auto (bf16 where native), bfloat16, float32; float16 on cuda"
    )
    parser.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip the compiled rows (each compiles for ~20 s)"
    )
    parser.add_argument(
        "--backends",
        nargs="*",
        default=[],
        choices=("onnx", "openvino"),
        help="also measure the exported model in these runtimes (CPU; exports the same weights first)",
    )
    parser.add_argument(
        "--many", type=int, default=None, help="photos in the pipeline-over-many rows (default 64; --tiny 8)"
    )
    parser.add_argument("--int8", action="store_true", help="also an int8 export per backend (with --backends)")
    parser.add_argument("--peak-size", type=int, default=None, help="side of the peak's square matmuls")
    parser.add_argument("--json", default=None, help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    if min(args.images, args.batch_size, args.photos, args.many or 1, args.peak_size or 1) < 1:
        parser.error("--images, --batch-size, --photos, --many and --peak-size must be at least 1")
    if args.int8 and not args.backends:
        parser.error("--int8 measures int8 exports: name their --backends (onnx, openvino)")
    result = run(
        args.tiny,
        args.images,
        args.batch_size,
        args.device,
        args.dtype,
        args.compile,
        args.photos,
        tuple(args.backends),
        args.many,
        args.int8,
        args.peak_size,
    )
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    sys.exit(main())
