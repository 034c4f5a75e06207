"""Batch analysis throughput: `python -m softbio_hf.predict` on a folder of photos against the model alone on the
same number of face crops, in the same run. On a GPU the input side (decoding, detection, crops) should keep up,
so the command's images/s should be close to the model's.

    python -m bench.predict                      # ViT-L/14@336, random weights, 64 photos, detector none
    python -m bench.predict --tiny --photos 16   # a quick check of the script
    python -m bench.predict --device cuda --photos 512 --batch-size 64 --num-workers 8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def make_photos(folder: Path, count: int, side: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg")


def model_alone(pipe, count: int, batch_size: int) -> float:
    """Images/s of the forward pass alone on preprocessed crops (the same dtype and device as the command)."""
    import torch

    size = pipe.model.config.image_size
    crops = torch.randn(count, 3, size, size)
    with torch.inference_mode():
        pipe._forward({"pixel_values": crops[:batch_size], "face": None, "is_last": None})  # warm-up
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, count, batch_size):
            pipe._forward({"pixel_values": crops[i : i + batch_size], "face": None, "is_last": None})
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def preprocessing_rows(image_size: int, crops: int = 64, side: int = 200) -> list[dict]:
    """Face crops/s of one worker's input side: the image processor per crop (its float pixels), against the
    pipeline's uint8 crop (`face_pixels`) with the batch normalised at once (`normalize_pixels`)."""
    import numpy as np

    from softbio_hf import SoftBioConfig, image_processor_for
    from softbio_hf.pipeline_softbio import face_pixels, normalize_pixels

    config = SoftBioConfig(vision_config={"model_type": "clip_vision_model", "image_size": image_size})
    processor = image_processor_for(config)
    images = [np.random.default_rng(i).integers(0, 256, (side, side, 3), dtype=np.uint8) for i in range(crops)]

    def processor_path():
        return [processor(images=crop, return_tensors="pt")["pixel_values"] for crop in images]

    def pipeline_path():
        import torch

        return normalize_pixels(torch.cat([face_pixels(crop, image_size) for crop in images]), config)

    speeds = {}
    for name, path in (("processor", processor_path), ("pipeline", pipeline_path)):
        path()  # warm-up
        start = time.perf_counter()
        path()
        speeds[name] = crops / (time.perf_counter() - start)
    return [
        {
            "setting": f"crop preprocessing: image processor per crop ({side} px crops)",
            "images_per_s": speeds["processor"],
            "ratio_vs_baseline": 1.0,
        },
        {
            "setting": "crop preprocessing: uint8 crop per face, batch normalised at once (the pipeline's)",
            "images_per_s": speeds["pipeline"],
            "ratio_vs_baseline": speeds["pipeline"] / speeds["processor"],
        },
    ]


def run(tiny: bool, photos: int, batch_size: int, num_workers: int, device: str | None, dtype: str) -> dict:
    import torch

    from bench.speed import resolve_device
    from softbio_hf import SoftBioConfig, SoftBioModel
    from softbio_hf.batch_rows import load_pipeline
    from softbio_hf.predict import predict

    device = str(resolve_device(device))  # --device cuda without one: a clear message, not a traceback

    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 64,
        "patch_size": 8,
    }
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        torch.manual_seed(0)
        SoftBioModel(SoftBioConfig(vision_config=vision if tiny else None)).save_pretrained(work / "model")
        (work / "photos").mkdir()
        make_photos(work / "photos", photos, 256)
        options = {"batch_size": batch_size, "num_workers": num_workers, "device": device, "dtype": dtype}
        predict([str(work / "photos")], str(work / "model"), work / "warm.jsonl", detector="none", limit=2, **options)
        start = time.perf_counter()
        predict([str(work / "photos")], str(work / "model"), work / "faces.jsonl", detector="none", **options)
        command = photos / (time.perf_counter() - start)
        pipe = load_pipeline(str(work / "model"), device, dtype, "none")
        alone = model_alone(pipe, photos, batch_size)
    return {
        "device": str(pipe.device),
        "dtype": str(pipe.model.dtype).removeprefix("torch."),
        "backbone": "tiny" if tiny else "ViT-L/14@336 (random weights)",
        "rows": [
            {"setting": "model alone (preprocessed crops)", "images_per_s": alone, "ratio_vs_baseline": 1.0},
            {
                "setting": f"softbio_hf.predict (decode, crop, preprocess in {num_workers} workers)",
                "images_per_s": command,
                "ratio_vs_baseline": command / alone,
            },
            *preprocessing_rows(vision["image_size"] if tiny else 336),
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from softbio_hf.version import add_version_argument  # stdlib only: --version needs no torch

    add_version_argument(parser)
    parser.add_argument("--tiny", action="store_true", help="tiny backbone (a quick check of the script)")
    parser.add_argument("--photos", type=int, default=64, help="photos to analyse (default 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="faces per forward pass (default 16)")
    parser.add_argument("--num-workers", type=int, default=2, help="decode/detect processes (default 2)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")
    parser.add_argument("--json", default=None, help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    result = run(args.tiny, args.photos, args.batch_size, args.num_workers, args.device, args.dtype)
    print(f"{result['backbone']} on {result['device']} ({result['dtype']}), {args.photos} photos")
    print("| setting | images/s | vs its baseline |\n|---|---:|---:|")
    for row in result["rows"]:
        print(f"| {row['setting']} | {row['images_per_s']:.2f} | {row['ratio_vs_baseline']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
