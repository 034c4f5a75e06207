"""Inference speed: our path (bf16 where fast, SDPA, batched) against the naive one (fp32, eager, one image
at a time), on the same machine in the same run, with the share of the physical limit.

    python -m bench.speed                 # ViT-L/14@336 with random weights (no download); CPU: about 2 minutes
    python -m bench.speed --tiny          # a tiny backbone: checks the script, numbers mean little
    python -m bench.speed --json out.json --device cuda

The limit is the machine's best matmul rate (the fastest dtype, best of several timed runs of large matmuls,
measured in this run) divided by the analytic FLOPs per image; every row is a share of that one limit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time
from pathlib import Path

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


def vision_flops_per_image(config) -> float:
    """Analytic forward FLOPs of the vision tower (a multiply-add counts 2): 381.9 G for ViT-L/14@336."""
    vision = config.vision_config
    patches = (config.image_size // vision.patch_size) ** 2
    tokens, width, mlp = patches + 1, vision.hidden_size, vision.intermediate_size
    per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 2 * 2 * tokens * tokens * width
    patch_embedding = 2 * patches * (vision.num_channels * vision.patch_size**2) * width
    return vision.num_hidden_layers * per_layer + patch_embedding


def matmul_peak(dtype, device, size: int | None = None) -> float:
    """The best FLOP/s of square matmuls in `dtype` over several timed trials: the practical peak."""
    import torch

    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    synchronize(device)
    best = 0.0
    for _ in range(PEAK_TRIALS):
        count, start = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            count += 1
            synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed >= PEAK_SECONDS:
                break
        best = max(best, 2 * size**3 * count / elapsed)
    return best


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

    def __init__(self, device, limit: float):
        self.device, self.limit = device, limit
        self.rows: list[dict] = []
        self.probs: dict[str, dict] = {}

    def speed_of(self, setting: str) -> float:
        return next(row["images_per_s"] for row in self.rows if row["setting"] == setting)

    def add(self, setting: str, measure, batch: int = 1, baseline: str | None = None, reference: str | None = None):
        """`measure(batch)` gives images/s (and probabilities, or None); `{batch}` in the name is the batch that
        fitted. Returns the row's final name."""
        reset_peak_memory(self.device)
        (speed, probs), used = halving_on_oom(measure, batch)
        setting = setting.format(batch=used)
        row = {
            "setting": setting,
            "images_per_s": speed,
            "share_of_limit": speed / self.limit,
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
    peaks = {short(d): matmul_peak(d, device) for d in {torch.float32, fast}}
    table = Table(device, max(peaks.values()) / flops)

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
    table.add(
        f"ours: {short(fast)}, SDPA, batch {{batch}}",
        model_measure(ours, lambda x: ours(pixel_values=x).logits),
        batch_size,
        naive_row,
        naive_row,
    )
    compile_seconds: dict[str, float] = {}
    if compile:
        pipe = pipeline("soft-biometrics", model=ours, device=device, dtype=fast)

        def compiled_measure(size: int):  # the pipeline's own compiled path, compiled for the batch measured
            compile_seconds[f"batch {size}"] = pipe.compile(size)
            return model_measure(ours, pipe.classify)(size)

        table.add(
            f"ours compiled: {short(fast)}, SDPA, torch.compile (frozen weights), batch {{batch}}",
            compiled_measure,
            batch_size,
            naive_row,
            naive_row,
        )
        compile_seconds["batch 1"] = pipe.compile(1)  # the pipeline passes one face of one photo at a time
        table.add(
            f"pipeline, ours: {short(fast)}, SDPA, compiled (photo of one face, detection included)",
            lambda _: (pipeline_photos_per_second(pipe, photo, photos), None),
            baseline=naive_pipeline,
        )
    export_seconds = (
        exported_rows(
            table, config, backends, pixels, photo, photos, batch_size, device, fast, naive_row, naive_pipeline
        )
        if backends
        else {}
    )
    return {
        "device": str(device),
        "cpu": cpu_description(),
        "export_seconds": export_seconds,
        "backbone": "tiny" if tiny else "ViT-L/14@336 (random weights)",
        "gflop_per_image": flops / 1e9,
        "peak_gflop_per_s": {d: peak / 1e9 for d, peak in peaks.items()},
        "limit_images_per_s": table.limit,
        "compile_seconds": compile_seconds,
        "rows": table.rows,
    }


def markdown(result: dict) -> str:
    peaks = ", ".join(f"{dtype} {value:,.0f}" for dtype, value in result["peak_gflop_per_s"].items())
    compiled = ", ".join(f"{k} {v:.1f} s" for k, v in result["compile_seconds"].items()) or "not measured"
    lines = [
        f"{result['backbone']} on {result['device']}, {result['gflop_per_image']:.1f} GFLOP per image; matmul peak "
        f"GFLOP/s {peaks}; limit {result['limit_images_per_s']:.3f} images/s; compilation {compiled}",
        f"CPU: {result['cpu']}"
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
            f"{row['share_of_limit']:.0%} | {row['ratio_vs_baseline']:.2f}x | {agree} | {gap} | "
            f"{row['peak_mem_gb']:.1f} |"
        )
    return "\n".join(lines)


def exported_rows(table, config, backends, pixels, photo, photos, batch_size, device, fast, naive_row, naive_pipeline):
    """Rows for the exported backends (python -m softbio_hf.export of the same weights): the model alone and the
    whole pipeline, each against the naive rows; OpenVINO also at its own precision where the CPU has bf16."""
    import tempfile

    import torch
    from transformers import pipeline

    from softbio_hf.export import export

    if device.type != "cpu":
        raise SystemExit("error: --backends run on the CPU; use --device cpu.")
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="softbio-bench-export-") as folder:
        model = build(config, "sdpa", torch.float32, device)
        model.save_pretrained(folder)
        for backend in backends:
            started = time.perf_counter()
            export(model, folder, [backend], checkpoint=folder)  # beside the weights just saved there
            seconds[backend] = round(time.perf_counter() - started, 1)
            precisions = ["float32"] + (["auto"] if backend == "openvino" and fast == torch.bfloat16 else [])
            for dtype in precisions:
                pipe = pipeline("soft-biometrics", model=folder, device=device, dtype="float32", backend=backend)
                if dtype == "auto":  # OpenVINO's own choice: bf16 on CPUs that have it
                    pipe.exported = pipe.load_exported(backend, "auto")
                label = f"{backend}, {'fp32' if dtype == 'float32' else 'its default precision (bf16)'}"
                forward = pipe.classify
                table.add(
                    f"{label}, batch {{batch}}",
                    lambda size, forward=forward: images_per_second(forward, pixels, size, device),
                    batch_size,
                    naive_row,
                    naive_row,
                )
                table.add(
                    f"pipeline, {label} (photo of one face, detection included)",
                    lambda _, pipe=pipe: (pipeline_photos_per_second(pipe, photo, photos), None),
                    baseline=naive_pipeline,
                )
    return seconds


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
    parser.add_argument("--json", default=None, help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    if min(args.images, args.batch_size, args.photos) < 1:
        parser.error("--images, --batch-size and --photos must be at least 1")
    result = run(
        args.tiny,
        args.images,
        args.batch_size,
        args.device,
        args.dtype,
        args.compile,
        args.photos,
        tuple(args.backends),
    )
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    sys.exit(main())
