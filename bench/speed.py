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


def images_per_second(model, images, batch_size: int, device) -> float:
    import torch

    with torch.inference_mode():
        model(images[:batch_size].to(device, model.dtype))  # warm-up
        synchronize(device)
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            model(images[i : i + batch_size].to(device, model.dtype))
        synchronize(device)
    return len(images) / (time.perf_counter() - start)


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


def run(tiny: bool = False, images: int = 8, batch_size: int = 8, device: str | None = None) -> dict:
    import torch

    from softbio_hf import SoftBioConfig
    from softbio_hf.pipeline_softbio import resolve_dtype

    device = resolve_device(device)
    vision = {"model_type": "clip_vision_model", **TINY} if tiny else None
    config = SoftBioConfig(vision_config=vision, projection_dim=32 if tiny else 768)
    fast_dtype = resolve_dtype("auto", device)
    pixels = torch.randn(images, 3, config.image_size, config.image_size)
    flops = vision_flops_per_image(config)
    peaks = {str(dtype).removeprefix("torch."): matmul_peak(dtype, device) for dtype in {torch.float32, fast_dtype}}
    limit = max(peaks.values()) / flops
    rows = []
    for name, attention, dtype, batch in (
        ("naive: fp32, eager attention, one image at a time", "eager", torch.float32, 1),
        (f"ours: {str(fast_dtype).removeprefix('torch.')}, SDPA, batch {batch_size}", "sdpa", fast_dtype, batch_size),
    ):
        reset_peak_memory(device)
        model = build(config, attention, dtype, device)
        speed = images_per_second(model, pixels, batch, device)
        rows.append(
            {
                "setting": name,
                "images_per_s": speed,
                "share_of_limit": speed / limit,
                "ratio_vs_baseline": speed / rows[0]["images_per_s"] if rows else 1.0,
                "peak_mem_gb": peak_memory_gb(device),
            }
        )
        del model
    return {
        "device": str(device),
        "backbone": "tiny" if tiny else "ViT-L/14@336 (random weights)",
        "gflop_per_image": flops / 1e9,
        "peak_gflop_per_s": {dtype: peak / 1e9 for dtype, peak in peaks.items()},
        "limit_images_per_s": limit,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    peaks = ", ".join(f"{dtype} {value:,.0f}" for dtype, value in result["peak_gflop_per_s"].items())
    lines = [
        f"{result['backbone']} on {result['device']}, {result['gflop_per_image']:.1f} GFLOP per image; matmul peak "
        f"GFLOP/s {peaks}; limit {result['limit_images_per_s']:.3f} images/s",
        "",
        "| setting | images/s | share of limit | vs naive | peak memory GB |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['setting']} | {row['images_per_s']:.3f} | {row['share_of_limit']:.0%} | "
            f"{row['ratio_vs_baseline']:.2f}x | {row['peak_mem_gb']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.speed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny backbone (a quick check of the script)")
    parser.add_argument("--images", type=int, default=8, help="images per setting (default 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of our path (default 8)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--json", default=None, help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    result = run(args.tiny, args.images, args.batch_size, args.device)
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    sys.exit(main())
