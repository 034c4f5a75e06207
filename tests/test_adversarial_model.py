"""The model and its config against bad input: a clear error naming the input and the fix, never a silent guess."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from serving import app_run_to_exit
from tiny import TINY_VISION

from softbio_hf import SoftBioConfig, SoftBioModel

VISION = {"model_type": "clip_vision_model", **TINY_VISION}
REPO = Path(__file__).resolve().parents[1]


def pixels(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"gender": torch.tensor([0.9, 0.0])}, r"'gender' must be class ids \(whole numbers\), got \[0\.89"),
        ({"gender": torch.tensor([0, 1, 1])}, r"'gender' have 3 entries for a batch of 2 images"),
        ({"age": torch.tensor(3)}, r"'age' have 1 entries for a batch of 2"),
    ],
)
def test_bad_labels_are_named(tiny_model, labels, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(pixels(), **labels)


def test_whole_number_float_labels_are_accepted(tiny_model):
    out = tiny_model(pixels(), gender=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out.loss, tiny_model(pixels(), gender=torch.tensor([1, 0])).loss)


def test_an_empty_batch_is_named(tiny_model):
    with pytest.raises(ValueError, match=r"pixel_values has shape \[0, 3, 32, 32\]"):
        tiny_model(torch.zeros(0, 3, 32, 32))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"vision_config": {**VISION, "image_size": -32}}, r"vision_config.image_size=-32 must be a positive"),
        ({"vision_config": {**VISION, "patch_size": 0}}, r"vision_config.patch_size=0"),
        ({"projection_dim": -4}, r"projection_dim=-4"),
        ({"tasks": {"gender": ["male", 1]}}, r"labels must be non-empty strings"),
        ({"tasks": {"gender": ["male", ""]}}, r"labels must be non-empty strings"),
        ({"adapter": {"method": "lora", "rank": 4}}, r"adapter for 'lora' lacks \['alpha', 'dropout'"),
        ({"adapter": "lora"}, r"must be a dict with a 'method'"),
    ],
)
def test_config_values_are_validated_with_the_key_named(overrides, message):
    settings = {"vision_config": VISION, "projection_dim": 16, **overrides}
    with pytest.raises(ValueError, match=message):
        SoftBioConfig(**settings)


def test_pickled_weights_are_refused_with_how_to_convert(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    state = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "ckpt" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pickled weights .* safetensors only.*save_file"):
        SoftBioModel.from_pretrained(tmp_path / "ckpt")


def test_the_demo_reports_a_broken_checkpoint_without_a_traceback(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "broken")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"\x00" * 64)  # truncated, corrupt
    result = app_run_to_exit(REPO / "app.py", "--model", str(tmp_path / "broken"))
    assert result.returncode == 2
    assert "Could not load the softbio checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_a_task_without_trained_weights_loads_as_transformers_does_and_is_refused_where_served(
    tiny_model, tmp_path, capsys
):
    import json

    from transformers import pipeline

    from softbio_hf.predict import main as predict_main
    from train.hub import HubError, stage_model

    tiny_model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["tasks"]["smile"] = ["no", "yes"]  # a task added by hand: no weights were ever trained for it
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    # transformers' convention: load, initialise what is missing, warn, and report it
    grown, info = SoftBioModel.from_pretrained(tmp_path / "ckpt", output_loading_info=True)
    assert "heads.smile.classifier.weight" in info["missing_keys"]  # the load report names it
    assert torch.isfinite(grown.heads["smile"].classifier.weight).all()
    assert grown.heads["smile"].classifier.weight.abs().sum() > 0 and grown.untrained_heads == ["smile"]
    # ... and where predictions are served or published, it is refused, naming the task and the way out
    refusal = r"no weights for the head of task\(s\) \['smile'\].*allow_new_heads=True"
    with pytest.raises(ValueError, match=refusal):
        pipeline("soft-biometrics", model=str(tmp_path / "ckpt"))
    assert (
        predict_main(
            [
                str(REPO / "examples" / "grace_hopper.jpg"),
                "--model",
                str(tmp_path / "ckpt"),
                "--out",
                str(tmp_path / "rows.csv"),
                "--detector",
                "haar",
            ]
        )
        == 2
    )
    assert "['smile']" in capsys.readouterr().err and not (tmp_path / "rows.csv").exists()
    with pytest.raises(HubError, match=refusal):
        stage_model(tmp_path / "ckpt", tmp_path / "staged", "me/x", None, merge=False)
    result = app_run_to_exit(REPO / "app.py", "--model", str(tmp_path / "ckpt"))
    assert result.returncode == 2 and "['smile']" in result.stderr and "Traceback" not in result.stderr
    # the escape hatch: asked for, the heads are there to train (or to use knowingly)
    knowingly = SoftBioModel.from_pretrained(tmp_path / "ckpt", allow_new_heads=True)
    assert knowingly.untrained_heads == []
    assert pipeline("soft-biometrics", model=knowingly)(REPO / "examples" / "grace_hopper.jpg", detector="haar")


def damage(folder: Path, how: str) -> Path:
    """A checkpoint as a cut-short copy or download leaves it; returns the file that is damaged."""
    if how == "truncated weights":
        path = folder / "model.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path = folder / "config.json"
        path.write_text(path.read_text()[:40])
    return path


@pytest.mark.parametrize("how", ["truncated weights", "config not JSON"])
def test_a_damaged_checkpoint_is_named_with_the_fix_wherever_it_is_loaded(tiny_model, tmp_path, capsys, how):
    from transformers import pipeline

    from softbio_hf.checkpoint_files import CheckpointFileError
    from softbio_hf.predict import main as predict_main
    from train.hub import main as hub_main

    tiny_model.save_pretrained(tmp_path / "ckpt")
    damaged = str(damage(tmp_path / "ckpt", how))
    fix = "save the checkpoint again"
    with pytest.raises(CheckpointFileError, match="save the checkpoint again") as raised:
        SoftBioModel.from_pretrained(tmp_path / "ckpt")
    assert damaged in str(raised.value)
    if how == "truncated weights":  # pipeline() reads config.json itself first: transformers names that file
        with pytest.raises(CheckpointFileError, match=fix) as raised:
            pipeline("soft-biometrics", model=str(tmp_path / "ckpt"))
        assert damaged in str(raised.value) and "Traceback" not in str(raised.value)
    photo = str(REPO / "examples" / "grace_hopper.jpg")
    assert predict_main([photo, "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "f.csv")]) == 2
    error = capsys.readouterr().err
    assert damaged in error and fix in error and "Traceback" not in error
    push = ["push", "--model", str(tmp_path / "ckpt"), "--repo-id", "me/x", "--dry-run", "--out", str(tmp_path / "o")]
    assert hub_main(push) == 2
    error = capsys.readouterr().err
    assert damaged in error and fix in error and "Traceback" not in error
