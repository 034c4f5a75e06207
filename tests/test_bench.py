"""The benchmark scripts run and their analytic numbers match the reference anchors (no timing assertions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.speed import markdown, run, vision_flops_per_image
from softbio_hf import SoftBioConfig

REPO = Path(__file__).resolve().parents[1]


def test_flops_formula_matches_the_vit_l_336_anchor():
    assert vision_flops_per_image(SoftBioConfig()) / 1e9 == pytest.approx(381.9, abs=0.1)


def test_speed_bench_runs_on_a_tiny_backbone():
    result = run(tiny=True, images=2, batch_size=2, device="cpu")
    assert [row["setting"].split(":")[0] for row in result["rows"]] == ["naive", "ours"]
    for row in result["rows"]:
        assert set(row) == {"setting", "images_per_s", "share_of_limit", "ratio_vs_baseline", "peak_mem_gb"}
        # one limit for every row: the best dtype's peak over FLOPs per image
        assert row["share_of_limit"] == pytest.approx(row["images_per_s"] / result["limit_images_per_s"])
    best_peak = max(result["peak_gflop_per_s"].values()) * 1e9
    assert result["limit_images_per_s"] == pytest.approx(best_peak / (result["gflop_per_image"] * 1e9))
    assert result["rows"][0]["ratio_vs_baseline"] == 1.0
    assert "| setting | images/s | share of limit | vs naive |" in markdown(result)


def test_cuda_without_a_gpu_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="no CUDA device"):
        run(tiny=True, images=1, batch_size=1, device="cuda")


@pytest.mark.parametrize(
    "module",
    ["train.data", "train.evaluate", "train.train", "train.hub", "bench.speed", "bench.parameters", "bench.predict",
     "bench.train", "app"],
)  # fmt: skip
def test_help_answers_without_heavy_imports(module):
    """--help parses before torch, transformers or datasets are imported (they take seconds)."""
    import subprocess
    import sys

    run = f"runpy.run_path('{REPO / 'app.py'}', run_name='__main__')" if module == "app" else (
        f"runpy.run_module('{module}', run_name='__main__')"
    )  # fmt: skip
    code = (
        f"import runpy, sys; sys.argv = ['{module}', '--help']\n"
        f"try:\n    {run}\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'gradio') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "usage:" in result.stdout and "HEAVY []" in result.stdout, result.stdout[-500:] + result.stderr[-500:]


def test_predict_bench_compares_the_command_with_the_model_alone():
    from bench.predict import run as run_predict

    result = run_predict(tiny=True, photos=6, batch_size=4, num_workers=1, device="cpu", dtype="float32")
    alone, command = result["rows"]
    assert alone["ratio_vs_baseline"] == 1.0 and command["images_per_s"] > 0
    assert command["ratio_vs_baseline"] == pytest.approx(command["images_per_s"] / alone["images_per_s"])


def test_train_bench_times_the_real_step_per_method():
    import argparse

    from bench.train import run as run_train

    args = argparse.Namespace(
        tiny=True, methods=["lp", "lora"], batch_size=4, steps=1, device="cpu", mixed_precision="no", json=None
    )
    result = run_train(args)
    names = [row["setting"] for row in result["rows"]]
    assert names == ["lp", "lora", "lora + gradient checkpointing"]  # bf16 weights need bf16 autocast: left out
    for row in result["rows"]:
        assert set(row) == {"setting", "images_per_s", "share_of_limit", "ratio_vs_baseline", "peak_mem_gb"}
        assert row["images_per_s"] > 0 and 0 < row["share_of_limit"] < 1
    assert result["rows"][1]["ratio_vs_baseline"] == 1.0
