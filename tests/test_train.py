"""train/train.py on a learnable synthetic dataset with a tiny random CLIP: learning, resume, two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from remote import run_without_softbio
from safetensors.torch import load_file
from synthetic import make_synthetic_folder
from synthetic import run_settings as settings

from train.build import build_model
from train.checkpoints import BEST_WEIGHTS, Interrupted
from train.config import load_config
from train.data import prepare
from train.sampling import training_draw
from train.train import main, run_training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_folder(root / "raw")
    prepare("folder", root / "raw", root / "prepared", image_size=32)
    return root / "prepared"


def trained(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / BEST_WEIGHTS))


@pytest.fixture(scope="module")
def runs(synthetic, tiny_clip_dir, tmp_path_factory):
    """lp, lora and mtlora trained once for the module (about 5 s each)."""
    folders = {}
    for method in ("lp", "lora", "mtlora"):
        out = tmp_path_factory.mktemp(f"run-{method}")
        config = load_config(method, settings(synthetic, tiny_clip_dir, out))
        run_training(config)
        folders[method] = out
    return folders


@pytest.mark.parametrize("method", ["lp", "lora", "mtlora"])
def test_methods_learn_every_task_well_above_chance(runs, method):
    out = runs[method]
    results = json.loads((out / "eval" / "results.json").read_text())["results"]
    accuracy = {task: metrics["accuracy"] for task, metrics in next(iter(results.values())).items()}
    # chance: gender 50%, age 33% and emotion 33% (three classes of each are used)
    assert accuracy["gender"] >= 90, accuracy
    assert accuracy["age"] >= 70, accuracy
    assert accuracy["emotion"] >= 55, accuracy
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 150 and summary["untrained_heads"] == [] and summary["processes"] == 1
    assert summary["label_coverage"]["emotion"] < summary["label_coverage"]["gender"]  # emotion is sparse
    assert (out / "best" / "model.safetensors").is_file() and (out / "training_curves.png").is_file()
    assert (out / "eval" / "report.md").is_file() and (out / "config.yaml").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*")), "TensorBoard logs"
    assert len(list((out / "checkpoints").iterdir())) == 2  # checkpoint.keep


def test_best_loads_as_remote_code_and_gives_the_training_time_logits(runs, tmp_path):
    out = runs["mtlora"]
    config = load_config(out / "config.yaml")
    training_time = build_model(config)  # unmerged adapters, as during training
    training_time.load_state_dict(trained(out), strict=False)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = training_time.eval()(x).logits
    shipped = run_without_softbio(tmp_path, out / "best", x)
    for task, logits in expected.items():
        torch.testing.assert_close(shipped[task], logits, rtol=1e-4, atol=1e-4)


def test_a_killed_run_and_an_interrupted_one_resume_to_the_same_weights(synthetic, tiny_clip_dir, tmp_path):
    def config(name):
        extra = {"train.max_steps": 10, "checkpoint.every": 4, "eval.every": 0, "data.num_workers": 2}
        return load_config("lora", settings(synthetic, tiny_clip_dir, tmp_path / name, **extra))

    run_training(config("straight"))
    straight = trained(tmp_path / "straight")

    def crash(step):
        if step == 7:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        run_training(config("killed"), on_step=crash)
    assert [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()] == ["step-0000004"]
    run_training(config("killed"), resume=True)  # continues at step 4 with the same data, lr and RNG
    resumed = trained(tmp_path / "killed")

    def ctrl_c(step):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted) as stop:
        run_training(config("interrupted"), on_step=ctrl_c)
    assert stop.value.step == 6 and stop.value.folder.name == "step-0000006"  # written on the way out
    run_training(config("interrupted"), resume=True)
    interrupted = trained(tmp_path / "interrupted")
    assert set(straight) == set(resumed) == set(interrupted)
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name
        assert torch.equal(interrupted[name], value), name


def test_two_processes_match_one_with_the_same_global_batch(synthetic, tiny_clip_dir, tmp_path):
    extra = {"train.max_steps": 12, "train.batch_size": 8, "eval.every": 6, "checkpoint.every": 0}
    args = ["--config", "lora", "--set", *settings(synthetic, tiny_clip_dir, tmp_path / "two", **extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "train.train", *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    one = load_config("lora", settings(synthetic, tiny_clip_dir, tmp_path / "one", **extra))
    run_training(one)
    # the draw holds steps in which one process's half of the batch has no emotion label at all
    from datasets import load_from_disk

    emotion = np.asarray(load_from_disk(str(synthetic))["train"]["emotion"])[
        training_draw(load_from_disk(str(synthetic))["train"], one)
    ].reshape(12, 2, 4)
    lacking = ((emotion != -100).sum(axis=2) == 0) & ((emotion != -100).sum(axis=(1, 2)) > 0)[:, None]
    assert lacking.any()
    # validation under two processes (gather_for_metrics) scores exactly the rows one process scores
    histories = [json.loads((tmp_path / run / "summary.json").read_text())["validation"] for run in ("one", "two")]
    assert len(histories[0]) == len(histories[1]) == 2
    for one, two in zip(*histories, strict=True):
        assert one == pytest.approx(two)
    single, double = trained(tmp_path / "one"), trained(tmp_path / "two")
    # Reductions add in another order on two processes; Adam divides by the gradient's size, so a weight whose
    # gradient is about zero can move by a float-noise fraction of one step (lr 2e-4): half a step is the bound.
    differences = torch.cat([(double[name] - value).abs().flatten() for name, value in single.items()])
    assert differences.max() < 1e-4 and differences.mean() < 1e-6, (differences.max(), differences.mean())


def test_a_task_without_training_labels_is_left_untrained_and_other_sizes_resized(tiny_clip_dir, tmp_path, capsys):
    make_synthetic_folder(tmp_path / "raw", rows=60, emotion_share=0.0)
    prepare("folder", tmp_path / "raw", tmp_path / "data", image_size=40)  # the model takes 32 px
    # linear heads: an untrained one keeps its zero-shot weights, which a fresh build reproduces
    extra = {"train.max_steps": 5, "data.eval": "[]", "checkpoint.every": 0, "model.head_hidden_size": 0}
    config = load_config("lp", settings(tmp_path / "data", tiny_clip_dir, tmp_path / "run", **extra))
    summary = run_training(config)
    assert summary["untrained_heads"] == ["emotion"]
    warnings = capsys.readouterr().err
    assert "no training row is labelled for ['emotion']" in warnings
    assert "prepared at 40 px" in warnings and "resized on the fly" in warnings
    from softbio_hf import SoftBioModel

    fresh, shipped = build_model(config), SoftBioModel.from_pretrained(tmp_path / "run" / "best")
    assert "heads.emotion.classifier.weight" not in trained(tmp_path / "run")  # never in the optimizer
    assert torch.equal(shipped.heads["emotion"].classifier.weight, fresh.heads["emotion"].classifier.weight)
    assert not torch.equal(shipped.heads["gender"].classifier.weight, fresh.heads["gender"].classifier.weight)


def test_zero_shot_row_is_evaluation_only(synthetic, tiny_clip_dir, tmp_path):
    from softbio_hf import SoftBioModel

    summary = run_training(load_config("zs", settings(synthetic, tiny_clip_dir, tmp_path / "zs")))
    assert summary["steps"] == 0 and set(summary["test"]) >= {"age", "gender", "emotion", "overall"}
    shipped = SoftBioModel.from_pretrained(tmp_path / "zs" / "best").eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = SoftBioModel.from_clip(tiny_clip_dir).eval()(x).logits
        for task, logits in shipped(x).logits.items():
            torch.testing.assert_close(logits, expected[task])
    with pytest.raises(ValueError, match=r"model\.pooling=cls"):
        build_model(load_config("zs", ["model.pooling=attention"]))


def test_the_heads_width_is_a_training_setting(synthetic, tiny_clip_dir, tmp_path, capsys):
    from softbio_hf import SoftBioModel

    out = tmp_path / "mlp256"
    assert (
        main(["--config", "lp", "--set", *settings(synthetic, tiny_clip_dir, out, **{"model.head_hidden_size": 256})])
        == 0
    )
    console = capsys.readouterr().out  # each validation is printed, not only logged
    assert __import__("re").search(r"step 50: validation overall \d+\.\d\d \(emotion [\d.]+, age", console), console
    shipped = SoftBioModel.from_pretrained(out / "best")
    assert shipped.config.head_hidden_size == 256
    assert all(head.hidden[0].out_features == 256 for head in shipped.heads.values())
    results = json.loads((out / "eval" / "results.json").read_text())["results"]
    accuracy = {task: metrics["accuracy"] for task, metrics in next(iter(results.values())).items()}
    assert accuracy["gender"] >= 90 and accuracy["age"] >= 70, accuracy  # MLP heads learn too
    linear = load_config("lp", settings(synthetic, tiny_clip_dir, tmp_path / "x", **{"model.head_hidden_size": 0}))
    assert isinstance(build_model(linear).heads["age"].hidden, torch.nn.Identity)
    # zero-shot heads are text embeddings: linear only, said before any work
    refused = ["model.head_hidden_size=64", f"model.backbone={tiny_clip_dir}", f"output_dir={tmp_path / 'zs'}"]
    assert main(["--config", "zs", "--set", *refused]) == 2  # its output_dir under tmp_path: never runs/zs/
    assert "zero-shot heads are CLIP text embeddings" in capsys.readouterr().err


def test_several_runs_in_one_process_each_choose_their_precision(synthetic, tiny_clip_dir, tmp_path):
    for name, precision in (("first", "bf16"), ("second", "no")):  # accelerate's state is process-wide
        extra = {"train.max_steps": 2, "train.mixed_precision": precision, "eval.every": 0, "checkpoint.every": 0}
        summary = run_training(load_config("lp", settings(synthetic, tiny_clip_dir, tmp_path / name, **extra)))
        assert summary["steps"] == 2


# ------------------------------------------------------------------------------------------ bad config
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_step=10", "Did you mean 'train.max_steps'"),
        ("trian.lr=1.0e-3", "Did you mean 'train.lr'"),
        ("train.batch_size=abc", "train.batch_size='abc' is not allowed: use an integer > 0"),
        ("train.lr=-1", "train.lr=-1 is not allowed: use a number > 0"),
        ("method.name=qlora", "method.name='qlora' is not allowed: use one of"),
        ("loss.label_smoothing=1.5", "loss.label_smoothing=1.5"),
        ("train.max_steps", "write key=value"),
    ],
)
def test_bad_config_fails_before_any_work(override, message, capsys, tmp_path):
    assert main(["--config", "lora", "--set", override, f"output_dir={tmp_path / 'never'}"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_unknown_key_in_a_yaml_file_is_named(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("method:\n  name: lora\n  rnak: 8\n")
    assert main(["--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert "'method.rnak'" in error and str(path) in error and "'method.rank'" in error


def test_yaml_numbers_written_the_short_way_are_numbers():
    config = load_config("lora", ["train.lr=1e-4", "train.mixed_precision=no", "data.train=[x]"])
    assert config["train"]["lr"] == pytest.approx(1e-4) and config["train"]["mixed_precision"] == "no"


@pytest.mark.parametrize(
    "switch", [["train.bf16_base=true"], ["train.gradient_checkpointing=true"], ["train.compile=true"]]
)
def test_each_speed_switch_takes_the_plain_steps_within_bf16_tolerance(switch, tmp_path):
    """Frozen weights in bf16, checkpointing and torch.compile change how a step runs, not what it computes."""
    from tiny import TINY_VISION

    from softbio_hf import SoftBioConfig, SoftBioModel
    from train.loop import Run

    def three_steps(extra: list[str], out) -> tuple[list[float], dict[str, torch.Tensor]]:
        base_settings = ["train.batch_size=8", "train.device=cpu", "train.mixed_precision=bf16", "train.lr=0.01"]
        config = load_config("lora", [*base_settings, "data.train=[unused]", f"output_dir={out}", *extra])
        torch.manual_seed(0)
        run = Run(config)
        run.setup(SoftBioModel(SoftBioConfig(vision_config={"model_type": "clip_vision_model", **TINY_VISION})))
        run.prepare_step()
        generator = torch.Generator().manual_seed(1)
        size = run.core.config.image_size
        batch = {"pixel_values": torch.randn(8, 3, size, size, generator=generator)}
        for task, labels in run.core.config.tasks.items():
            batch[task] = torch.randint(0, len(labels), (8,), generator=generator)
        losses = [run.train_step([batch])["loss"] for _ in range(3)]
        trainable = {n: p.detach().float().clone() for n, p in run.core.named_parameters() if p.requires_grad}
        return losses, trainable

    plain_losses, plain = three_steps([], tmp_path / "plain")
    losses, weights = three_steps(switch, tmp_path / "switch")
    assert losses[2] < losses[0]  # it learns the batch
    assert losses == pytest.approx(plain_losses, rel=3e-2)
    assert weights.keys() == plain.keys()
    for name, value in weights.items():
        assert torch.allclose(value, plain[name], atol=3e-3, rtol=3e-2), name


def test_a_batch_that_does_not_fit_stops_with_the_settings_that_fit(
    synthetic, tiny_clip_dir, tmp_path, capsys, monkeypatch
):
    from train.loop import Run

    def out_of_memory(self, batches):  # what a too large batch raises on a GPU
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    monkeypatch.setattr(Run, "train_step", out_of_memory)
    code = main(["--config", "lp", "--set", *settings(synthetic, tiny_clip_dir, tmp_path / "run")])
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error
    assert "train.batch_size=32 does not fit in cpu memory" in error
    assert "train.batch_size=16 and train.grad_accum=2" in error
