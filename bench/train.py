"""Training speed: one optimizer step per method through train.train's own step (Run.train_step), on random
weights of the real architecture (no download), with images/s, peak memory, the ratio to the plain LoRA step
and an approximate share of the physical limit.

    python -m bench.train                                   # ViT-L/14@336, batch 64: for a GPU
    python -m bench.train --tiny --device cpu --batch-size 8 --steps 2   # checks the script on a CPU
    python -m bench.train --methods lora mtlora --json train.json

The limit is the best matmul rate measured in this run (bench.speed) over the step's FLOPs per image, counted
as the forward pass plus the backward work the method needs: none through a frozen backbone (lp), the last k
blocks twice over (ft), activation gradients through every block (adapters; their own weights are tiny).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("lp", "ft4", "lora", "dora", "loraplus", "mtlora")
TINY = {  # four blocks, so FT4 has its four
    "model_type": "clip_vision_model",
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "image_size": 64,
    "patch_size": 8,
}
# (setting name, config file, extra --set values): the study's rows, then the speed switches on LoRA.
SWITCHES = (
    ("lora + frozen weights in bf16", "lora", ["train.bf16_base=true"]),
    ("lora + gradient checkpointing", "lora", ["train.gradient_checkpointing=true"]),
    ("lora + frozen weights in bf16 + torch.compile", "lora", ["train.bf16_base=true", "train.compile=true"]),
)


def step_flops(config, method: dict, forward: float) -> float:
    layers = config.vision_config.num_hidden_layers
    if method["name"] == "lp":
        return forward
    if method["name"] == "ft":
        share = (method["last_k"] or 4) / layers
        return forward * (1 + 2 * share)
    return forward * 2  # adapters: gradients flow back through every block


def one_row(name: str, config_name: str, extra: list[str], args, forward_flops: float, limit_peak: float) -> dict:
    import torch

    from bench.speed import peak_memory_gb, reset_peak_memory, synchronize
    from softbio_hf import SoftBioConfig, SoftBioModel
    from train.config import load_config
    from train.loop import Run

    with tempfile.TemporaryDirectory() as out:
        settings = [
            f"train.batch_size={args.batch_size}",
            f"train.device={args.device or 'auto'}",
            f"train.mixed_precision={args.mixed_precision}",
            "data.train=[unused]",
            f"output_dir={out}",
            *extra,
        ]
        config = load_config(config_name, settings)
        base = SoftBioModel(
            SoftBioConfig(
                vision_config=TINY if args.tiny else None,
                pooling=config["model"]["pooling"],
                loss_weighting=config["loss"]["weighting"],
            )
        )
        run = Run(config)
        run.setup(base)
        run.prepare_step()
        device = run.accelerator.device
        size = run.core.config.image_size
        generator = torch.Generator().manual_seed(0)
        batch = {"pixel_values": torch.randn(args.batch_size, 3, size, size, generator=generator).to(device)}
        for task, labels in run.core.config.tasks.items():
            batch[task] = torch.randint(0, len(labels), (args.batch_size,), generator=generator).to(device)
        run.train_step([batch])  # warm-up (and compilation, where switched on)
        synchronize(device)
        reset_peak_memory(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            run.train_step([batch])
        synchronize(device)
        seconds = time.perf_counter() - start
        images_per_s = args.steps * args.batch_size / seconds
        limit = limit_peak / step_flops(run.core.config, config["method"], forward_flops)
        return {
            "setting": name,
            "images_per_s": images_per_s,
            "share_of_limit": images_per_s / limit,
            "peak_mem_gb": peak_memory_gb(device),
        }


def make_prepared(folder: Path, rows: int, side: int) -> Path:
    """A prepared dataset (train.data's schema, via its own `prepare`) of `rows` generated photos with labels."""
    import numpy as np
    from PIL import Image

    from train.data import prepare

    raw = folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["file_name,age,gender,emotion,split"]
    for i in range(rows):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(raw / f"{i:05d}.jpg")
        lines.append(f"{i:05d}.jpg,{20 + i % 50},{('female', 'male')[i % 2]},{('happy', 'sad')[i % 2]},train")
    (raw / "metadata.csv").write_text("\n".join(lines) + "\n")
    prepare("folder", raw, folder / "prepared", image_size=side)
    return folder / "prepared"


def loader_row(args, step_images_per_s: float) -> dict:
    """Images/s of train.train's own loader (prepared rows -> augmented, preprocessed batch) with the workers
    asked for, against the LoRA step: the loader should feed the step at least twice over."""
    from softbio_hf import SoftBioConfig, SoftBioModel
    from train.config import load_config
    from train.loop import Run

    with tempfile.TemporaryDirectory() as out:
        # A narrow model at the real resolution: the collator resizes to the model's input size, and the loader
        # never runs the model.
        vision = TINY if args.tiny else {**TINY, "image_size": 336, "patch_size": 14}
        data = make_prepared(Path(out) / "data", args.loader_rows, vision["image_size"])
        settings = [
            f"train.batch_size={args.batch_size}",
            "train.device=cpu",
            "train.mixed_precision=no",
            f"data.train=[{data}]",
            "data.eval=[]",
            f"data.num_workers={args.loader_workers}",
            f"output_dir={out}/run",
        ]
        run = Run(load_config("lora", settings))
        run.setup(SoftBioModel(SoftBioConfig(vision_config=vision)))
        run.prepare_training()
        batches = iter(run.loader)
        next(batches)  # workers started, first batch out
        count, start = 0, time.perf_counter()
        for batch in batches:
            count += len(batch["pixel_values"])
            if count >= args.loader_rows - args.batch_size:
                break
        images_per_s = count / (time.perf_counter() - start)
    return {
        "setting": f"data loader: prepared rows to augmented batches, {args.loader_workers} "
        + ("worker" if args.loader_workers == 1 else "workers"),
        "images_per_s": images_per_s,
        "share_of_limit": None,  # bound by decoding and augmentation, not by FLOPs
        "ratio_vs_baseline": images_per_s / step_images_per_s,
        "peak_mem_gb": None,
    }


def run(args) -> dict:
    import torch

    from bench.speed import PEAK_SIZE, matmul_peak, resolve_device, vision_flops_per_image
    from softbio_hf import SoftBioConfig
    from softbio_hf.pipeline_softbio import fast_bf16_available

    device = resolve_device(args.device)
    if args.mixed_precision == "auto":  # as train.train resolves it: every row below runs at the same precision
        args.mixed_precision = "bf16" if fast_bf16_available(device) else "no"
    forward = vision_flops_per_image(SoftBioConfig(vision_config=TINY if args.tiny else None))
    fast = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    size = PEAK_SIZE["tiny"] if args.tiny else None  # as bench.speed: emulated bf16 at 3072 takes minutes a matmul
    peak = max(matmul_peak(dtype, device, size) for dtype in {torch.float32, fast})
    switches = [s for s in SWITCHES if "lora" in args.methods and (args.compile or "train.compile=true" not in s[2])]
    if args.mixed_precision != "bf16":  # frozen bf16 weights need bf16 autocast
        switches = [s for s in switches if "train.bf16_base=true" not in s[2]]
    settings = [(name, name, []) for name in args.methods] + switches
    rows = [one_row(name, config, extra, args, forward, peak) for name, config, extra in settings]
    baseline = next((r["images_per_s"] for r in rows if r["setting"] == "lora"), rows[0]["images_per_s"])
    for row in rows:
        row["ratio_vs_baseline"] = row["images_per_s"] / baseline
    if args.loader_workers is not None:
        rows.append(loader_row(args, baseline))
    return {
        "device": str(device),
        "backbone": "tiny" if args.tiny else "ViT-L/14@336 (random weights)",
        "batch_size": args.batch_size,
        "peak_gflop_per_s": peak / 1e9,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from softbio_hf.version import add_version_argument  # stdlib only: --version needs no torch

    add_version_argument(parser)
    parser.add_argument("--tiny", action="store_true", help="tiny backbone (a quick check of the script)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="rows to measure")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch (default 64)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step (default 5)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--mixed-precision", default="auto", help="auto, bf16 or no (as train.mixed_precision)")
    parser.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip the compiled LoRA row (it compiles first)"
    )
    parser.add_argument(
        "--loader-workers",
        type=int,
        default=None,
        help="also time train.train's data loader (prepared rows to augmented batches) with this many workers, "
        "against the LoRA step; e.g. 14 on a 16-core GPU machine",
    )
    parser.add_argument("--loader-rows", type=int, default=1024, help="rows the loader row reads (default 1024)")
    parser.add_argument("--json", default=None, help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    result = run(args)
    print(f"{result['backbone']} on {result['device']}, batch {result['batch_size']}; matmul peak "
          f"{result['peak_gflop_per_s']:,.0f} GFLOP/s")  # fmt: skip
    print("| setting | images/s | share of limit (approx.) | vs lora | peak memory GB |\n|---|---:|---:|---:|---:|")
    for row in result["rows"]:
        share = "" if row["share_of_limit"] is None else f"{row['share_of_limit']:.0%}"
        memory = "" if row["peak_mem_gb"] is None else f"{row['peak_mem_gb']:.1f}"
        print(
            f"| {row['setting']} | {row['images_per_s']:.2f} | {share} | {row['ratio_vs_baseline']:.2f}x | {memory} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
