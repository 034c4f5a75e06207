"""Inference speed: our path (bf16 where fast, SDPA, batched) against the naive one (fp32, eager, one image
at a time), on the same machine in the same run, with the share of the physical limit (FLOPs / peak).

    python -m bench.speed                 # ViT-L/14@336 with random weights (no download); CPU: ~1 minute
    python -m bench.speed --tiny          # a tiny backbone: checks the script, numbers mean little
    python -m bench.speed --json out.json

Peak is measured here with a large matmul in each dtype; the limit in images/s is peak / FLOPs per image.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from softbio_hf import SoftBioConfig, SoftBioModel
from softbio_hf.pipeline_softbio import resolve_dtype

TINY = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 64,
    "patch_size": 8,
}


def vision_flops_per_image(config: SoftBioConfig) -> float:
    """Analytic forward FLOPs of the vision tower (a multiply-add counts 2): 381.9 G for ViT-L/14@336."""
    vision = config.vision_config
    patches = (config.image_size // vision.patch_size) ** 2
    tokens, width, mlp = patches + 1, vision.hidden_size, vision.intermediate_size
    per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 2 * 2 * tokens * tokens * width
    patch_embedding = 2 * patches * (vision.num_channels * vision.patch_size**2) * width
    return vision.num_hidden_layers * per_layer + patch_embedding


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of a square matmul in `dtype` (the practical peak for this machine)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def images_per_second(model, images: torch.Tensor, batch_size: int, device: torch.device) -> float:
    model(images[:batch_size].to(device, model.dtype))  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        model(images[i : i + batch_size].to(device, model.dtype))
    synchronize(device)
    return len(images) / (time.perf_counter() - start)


def build(config: SoftBioConfig, attention: str, dtype: torch.dtype, device: torch.device) -> SoftBioModel:
    torch.manual_seed(0)
    model = SoftBioModel(config).eval()
    model.backbone.set_attn_implementation(attention)
    return model.to(device=device, dtype=dtype)


def run(tiny: bool = False, images: int = 8, batch_size: int = 8, device: str | None = None) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vision = {"model_type": "clip_vision_model", **TINY} if tiny else None
    config = SoftBioConfig(vision_config=vision, projection_dim=32 if tiny else 768)
    fast_dtype = resolve_dtype("auto", device)
    pixels = torch.randn(images, 3, config.image_size, config.image_size)
    flops = vision_flops_per_image(config)
    rows = []
    for name, attention, dtype, batch in (
        ("naive: fp32, eager attention, one image at a time", "eager", torch.float32, 1),
        (f"ours: {str(fast_dtype).removeprefix('torch.')}, SDPA, batch {batch_size}", "sdpa", fast_dtype, batch_size),
    ):
        model = build(config, attention, dtype, device)
        speed = images_per_second(model, pixels, batch, device)
        limit = matmul_peak(dtype, device) / flops
        rows.append({"setting": name, "images_per_s": speed, "limit_images_per_s": limit, "share": speed / limit})
        del model
    return {
        "device": str(device),
        "backbone": "tiny" if tiny else "ViT-L/14@336 (random weights)",
        "gflop_per_image": flops / 1e9,
        "rows": rows,
        "speedup": rows[1]["images_per_s"] / rows[0]["images_per_s"],
    }


def markdown(result: dict) -> str:
    lines = [
        f"{result['backbone']} on {result['device']}, {result['gflop_per_image']:.1f} GFLOP per image",
        "",
        "| setting | images/s | limit images/s | share of limit |",
        "|---|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['setting']} | {row['images_per_s']:.3f} | {row['limit_images_per_s']:.3f} | {row['share']:.0%} |"
        )
    lines += ["", f"speed-up of ours over naive: {result['speedup']:.2f}x"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    main()
