"""The batch command's Ray engine against its local engine, on the same photos and model, in the same run: photos/s
end to end (listing, reading, decoding, the model, writing) for the local command, Ray with one actor and Ray with
two, on a small model (where the model costs something) and on a tiny one (where it costs nothing, so what is left
is the engine's own overhead: actor start-up, moving bytes through the object store, writing parts).

    python -m bench.ray_engine                     # 48 photos, small and tiny models
    python -m bench.ray_engine --photos 12 --json ray.json

A cluster's Ray start-up (ray.init) is timed apart and left out of the rates: a cluster is started once, not per
job. Each run's actors do start inside it (they load the model), as they would per job.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

SMALL = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 8}
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


def make_model(folder: Path, sizes: dict) -> None:
    import torch

    from softbio_hf import SoftBioConfig, SoftBioModel

    torch.manual_seed(0)
    vision = {"model_type": "clip_vision_model", "image_size": 112, "patch_size": 16, **sizes}
    SoftBioModel(SoftBioConfig(vision_config=vision)).save_pretrained(folder)


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(work: Path, model: Path, photos: int) -> list[dict]:
    """Photos/s of each engine on `photos` photos (detector none: each photo is one face crop, all model work)."""
    from softbio_hf.predict import predict
    from softbio_hf.predict_ray import predict_ray

    options = {"detector": "none", "dtype": "float32", "batch_size": 16}
    inputs = [str(work / "photos")]
    local = timed(lambda: predict(inputs, str(model), work / f"{model.name}-local.parquet", num_workers=1, **options))
    rows = [{"engine": "local command (1 decode worker)", "photos_per_s": photos / local, "ratio_vs_local": 1.0}]
    for actors in (1, 2):
        out = str(work / f"{model.name}-ray-{actors}")
        run = {"actors": (actors, actors), "photos_per_task": 4}  # several batches: every actor gets work
        seconds = timed(lambda out=out, run=run: predict_ray(inputs, str(model), out, **run, **options))
        rows.append(
            {"engine": f"ray, {actors} actor(s)", "photos_per_s": photos / seconds, "ratio_vs_local": local / seconds}
        )
    return rows


def run(photos: int) -> dict:
    import ray

    from bench.predict import make_photos
    from bench.speed import cpu_description

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        (work / "photos").mkdir()
        make_photos(work / "photos", photos, 160)
        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - start
        try:
            result = {"cpu": cpu_description(), "photos": photos, "ray_init_s": ray_start, "models": {}}
            for name, sizes in (("small", SMALL), ("tiny", TINY)):
                make_model(work / name, sizes)
                result["models"][name] = measure(work, work / name, photos)
        finally:
            ray.shutdown()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ray_engine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from softbio_hf.version import add_version_argument  # stdlib only: --version needs no torch

    add_version_argument(parser)
    parser.add_argument("--photos", type=int, default=48, help="photos per engine (default 48)")
    parser.add_argument("--json", default=None, help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    result = run(args.photos)
    print(f"CPU: {result['cpu']}; {args.photos} photos; ray.init {result['ray_init_s']:.1f} s (not counted)")
    for name, rows in result["models"].items():
        print(f"\n{name} model\n| engine | photos/s | vs local |\n|---|---:|---:|")
        for row in rows:
            print(f"| {row['engine']} | {row['photos_per_s']:.2f} | {row['ratio_vs_local']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
