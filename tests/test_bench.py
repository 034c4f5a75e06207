"""The benchmark scripts run and their analytic numbers match the reference anchors (no timing assertions)."""

from __future__ import annotations

import pytest

from bench.speed import markdown, run, vision_flops_per_image
from softbio_hf import SoftBioConfig


def test_flops_formula_matches_the_vit_l_336_anchor():
    assert vision_flops_per_image(SoftBioConfig()) / 1e9 == pytest.approx(381.9, abs=0.1)


def test_speed_bench_runs_on_a_tiny_backbone():
    result = run(tiny=True, images=2, batch_size=2, device="cpu")
    assert [row["setting"].split(":")[0] for row in result["rows"]] == ["naive", "ours"]
    assert all(row["images_per_s"] > 0 and row["limit_images_per_s"] > 0 for row in result["rows"])
    assert "speed-up of ours over naive" in markdown(result)
