"""Training, evaluation, the batch command and publishing, as an adversarial user would run them: no run ships
garbage, nothing is lost, every bad input is named before the work it would spoil (issue: hardening, round two)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from datasets_fixtures import face_like
from safetensors.torch import load_file, save_file
from synthetic import prepared_synthetic, run_settings
from tiny import TINY_VISION

from softbio_hf import SoftBioConfig, SoftBioModel
from train import evaluate as evaluate_cli
from train import hub, report
from train import train as train_cli
from train.checkpoints import BEST_WEIGHTS, TRAINER_STATE, checkpoints_in
from train.config import load_config
from train.data import features
from train.loop import Run
from train.schema import IGNORE

REPO = Path(__file__).resolve().parents[1]
GRACE = str(REPO / "examples" / "grace_hopper.jpg")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_synthetic(tmp_path_factory.mktemp("adversarial-runs"))


QUICK = {"train.max_steps": 8, "train.batch_size": 16, "train.warmup_steps": 1, "eval.every": 4, "checkpoint.every": 4}


def settings(data, backbone, out, **extra) -> list[str]:
    return run_settings(data, backbone, out, **{**QUICK, **extra})


def train(*args: str) -> int:
    return train_cli.main(list(args))


def prepared_with(path: Path, **columns) -> Path:
    """A prepared dataset (train, validation and test) whose label columns are given as they are."""
    rows = len(next(iter(columns.values())))
    table = {
        "age": [IGNORE] * rows,
        "gender": [IGNORE] * rows,
        "emotion": [IGNORE] * rows,
        "age_years": [None] * rows,
        "race": [None] * rows,
        "dataset": ["handmade"] * rows,
        "split": ["train"] * rows,
        **columns,
    }

    def jpeg(i):
        buffer = io.BytesIO()
        face_like(i, 16).save(buffer, format="JPEG")
        return {"bytes": buffer.getvalue(), "path": None}

    table["image"] = [jpeg(i) for i in range(rows)]
    part = Dataset.from_dict(table, features=features())
    DatasetDict({"train": part, "validation": part, "test": part}).save_to_disk(str(path))
    return path


# ------------------------------------------------------------------------------------ a diverged run
@pytest.mark.parametrize("setting", ["train.lr=.inf", "train.head_lr=.nan", "train.weight_decay=.inf"])
def test_non_finite_settings_are_refused(setting, tmp_path, capsys):
    assert train("--config", "lora", "--set", setting, f"output_dir={tmp_path / 'x'}") == 2
    assert "is not allowed" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_diverging_run_stops_at_the_first_non_finite_step_and_ships_nothing(data, tiny_clip_dir, tmp_path, capsys):
    out = tmp_path / "diverged"
    huge = {"train.lr": 1e30, "train.head_lr": 1e30, "train.max_grad_norm": "null", "train.warmup_steps": 0}
    assert train("--config", "lp", "--set", *settings(data, tiny_clip_dir, out, **huge)) == 2
    error = capsys.readouterr().err
    assert "the training loss is not finite at step" in error and "ships nothing" in error and "train.lr" in error
    assert not (out / "best").exists() and not (out / "eval").exists()
    if (out / BEST_WEIGHTS).exists():  # what a run keeps is finite, always
        assert all(torch.isfinite(t).all() for t in load_file(str(out / BEST_WEIGHTS)).values())


def test_evaluation_refuses_non_finite_logits(tiny_model, data, tmp_path, capsys):
    with torch.no_grad():
        tiny_model.heads["age"].classifier.weight.fill_(float("nan"))
    tiny_model.save_pretrained(tmp_path / "nan-model")
    assert (
        evaluate_cli.main(["--model", str(tmp_path / "nan-model"), "--data", str(data), "--out", str(tmp_path / "e")])
        == 2
    )
    assert "non-finite age logits" in capsys.readouterr().err
    assert not (tmp_path / "e" / "results.json").exists()


def test_results_json_is_strict_json_whatever_a_metric_is():
    text = report.strict_json({"summary": {"overall": float("nan"), "age": float("inf"), "gender": 97.5}})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
        "summary": {"overall": None, "age": None, "gender": 97.5}
    }


def good_results(tasks=("age", "gender", "emotion")) -> dict:
    metrics = {"n": 10, "accuracy": 80.0, "balanced_accuracy": 75.0, "macro_f1": 70.0, "ece": 3.0}
    return {
        "model": "m",
        "split": "test",
        "tasks": {t: list(SoftBioConfig().tasks[t]) for t in tasks},
        "results": {"utkface": {t: dict(metrics) for t in tasks}},
        "summary": {"emotion": 80.0, "age": 80.0, "gender": 80.0, "overall": 80.0},
    }


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: r.pop("summary"), r"no \['summary'\]"),
        (lambda r: r["summary"].update(overall=None), r"summary.overall is None, not a score"),
        (lambda r: r["summary"].update(overall=float("nan")), r"summary.overall is nan"),
        (lambda r: r["results"]["utkface"]["age"].pop("macro_f1"), r"results.utkface.age has no finite macro_f1"),
        (lambda r: r["results"]["utkface"]["gender"].pop("ece"), r"results.utkface.gender has no finite ece"),
    ],
)
def test_compare_and_push_refuse_a_results_json_without_finite_scores(damage, message, tiny_model, tmp_path, capsys):
    report = good_results()
    damage(report)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(report))  # json writes NaN bare: as a broken file would have it
    assert evaluate_cli.main(["compare", str(path)]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    tiny_model.save_pretrained(tmp_path / "m")
    argv = ["push", "--model", str(tmp_path / "m"), "--repo-id", "me/x", "--results", str(path), "--dry-run"]
    assert hub.main([*argv, "--out", str(tmp_path / "preview")]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_push_refuses_the_results_of_a_model_with_other_tasks(tiny_model, tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(good_results(tasks=("age", "gender"))))
    tiny_model.save_pretrained(tmp_path / "m")
    argv = ["push", "--model", str(tmp_path / "m"), "--repo-id", "me/x", "--results", str(path), "--dry-run"]
    assert hub.main([*argv, "--out", str(tmp_path / "preview")]) == 2
    assert "of a model with the tasks ['age', 'gender']" in capsys.readouterr().err


@pytest.mark.parametrize("repo_id", ["../../etc/x", "me/a b<script>", "me/x/y", "me/x--y"])
def test_a_repo_id_that_the_hub_would_refuse_is_refused_in_the_dry_run_too(repo_id, tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "m")
    argv = ["push", "--model", str(tmp_path / "m"), "--repo-id", repo_id, "--dry-run", "--out", str(tmp_path / "p")]
    assert hub.main(argv) == 2
    assert "is not a Hub repo id" in capsys.readouterr().err and not (tmp_path / "p").exists()


def test_an_offline_push_with_a_token_says_the_hub_is_out_of_reach(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_x"}
    argv = ["-m", "train.hub", "push", "--model", str(tmp_path / "m"), "--repo-id", "me/x"]
    result = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Could not reach the Hugging Face Hub" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------- nothing is lost
def hold(path: Path) -> subprocess.Popen:
    """Another process holding `path`'s lock, as a running command would; killed, it lets go."""
    code = (
        "import sys, time; from pathlib import Path; from softbio_hf.safe_files import lock_exclusively\n"
        "held = lock_exclusively(Path(sys.argv[1])); print('held' if held else 'taken', flush=True); time.sleep(60)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True, env=os.environ
    )
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_predict_on_the_same_out_is_refused_while_the_first_runs(tiny_model, tmp_path, capsys):
    from softbio_hf.predict import main as predict

    tiny_model.save_pretrained(tmp_path / "m")
    out = tmp_path / "faces.csv"
    first = hold(out.with_name("faces.csv.lock"))
    try:
        argv = [GRACE, "--model", str(tmp_path / "m"), "--out", str(out), "--detector", "haar", "--num-workers", "0"]
        assert predict([*argv, "--resume"]) == 2 and predict(argv) == 2
        assert "being written by another run" in capsys.readouterr().err
    finally:
        first.kill()
        first.wait()
    assert predict(argv) == 0 and len(out.read_text().splitlines()) == 2  # a killed run leaves no stuck lock


def test_two_resumed_predicts_after_the_lock_file_is_deleted_are_refused(tiny_model, tmp_path, capsys):
    from softbio_hf.predict import main as predict

    tiny_model.save_pretrained(tmp_path / "m")
    out = tmp_path / "faces.csv"
    code = (  # the first run, holding --out through the command's own claim
        "import sys, time; from pathlib import Path; from softbio_hf.predict import holding\n"
        "with holding(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)"
    )
    first = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        out.with_name("faces.csv.lock").unlink()
        argv = [GRACE, "--model", str(tmp_path / "m"), "--out", str(out), "--detector", "haar", "--num-workers", "0"]
        assert predict([*argv, "--resume"]) == 2
        error = capsys.readouterr().err
        assert "faces.csv.lock was deleted or replaced while another run still holds it" in error
        assert "Traceback" not in error and not out.exists() and not out.with_name("faces.csv.parts").exists()
    finally:
        first.kill()
        first.wait()


def test_a_second_predict_writing_the_same_tracks_table_is_refused(tiny_model, tmp_path, capsys):
    from softbio_hf.predict import main as predict

    tiny_model.save_pretrained(tmp_path / "m")
    tracks = tmp_path / "tracks.csv"
    first = hold(tracks.with_name("tracks.csv.lock"))  # another run, writing its faces elsewhere, holds it
    try:
        argv = [GRACE, "--model", str(tmp_path / "m"), "--out", str(tmp_path / "mine.csv"), "--tracks", str(tracks)]
        assert predict([*argv, "--detector", "haar", "--num-workers", "0"]) == 2
        assert f"--tracks {tracks} is being written by another run" in capsys.readouterr().err
    finally:
        first.kill()
        first.wait()
    assert not (tmp_path / "mine.csv").exists()


def test_overwrite_keeps_the_old_table_until_a_new_one_replaces_it(tiny_model, tmp_path, capsys):
    from softbio_hf.predict import main as predict

    tiny_model.save_pretrained(tmp_path / "m")
    out = tmp_path / "faces.csv"
    argv = [GRACE, "--out", str(out), "--detector", "haar", "--num-workers", "0"]
    assert predict([*argv, "--model", str(tmp_path / "m")]) == 0
    table = out.read_text()
    assert predict([*argv, "--model", str(tmp_path / "no-such-model"), "--overwrite"]) == 2
    assert out.read_text() == table  # the model failed to load: the old table is still there
    (tmp_path / "folder.csv").mkdir()
    assert predict([GRACE, "--model", str(tmp_path / "m"), "--out", str(tmp_path / "folder.csv"), "--overwrite"]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_a_non_empty_output_dir_is_refused_without_resume_or_overwrite(data, tiny_clip_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--config", "lp", "--set", *settings(data, tiny_clip_dir, out)) == 0
    (out / "config.yaml").write_text("mine: keep me\n")  # the run's config, marked to tell it from a new one
    assert train("--config", "lp", "--set", *settings(data, tiny_clip_dir, out)) == 2  # a finished run
    assert "already holds a run (best, best_trainable.safetensors, checkpoints" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == "mine: keep me\n"
    assert train("--config", "lp", "--overwrite", "--set", *settings(data, tiny_clip_dir, out)) == 0
    assert (out / "best").is_dir() and "mine" not in (out / "config.yaml").read_text()


def test_two_runs_on_one_output_dir_do_not_interleave(data, tiny_clip_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    first = hold(out / ".lock")
    try:
        assert train("--config", "lp", "--set", *settings(data, tiny_clip_dir, out)) == 2
        assert "in use by another training run" in capsys.readouterr().err
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize("damage", ["trainer_state", "weights", "partial"])
def test_resume_skips_a_damaged_checkpoint_and_continues_from_the_newest_intact_one(
    damage, data, tiny_clip_dir, tmp_path, capsys
):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    steps = {"train.max_steps": 8, "checkpoint.keep": 3}
    assert train("--config", "lp", "--set", *settings(data, tiny_clip_dir, straight, **steps)) == 0

    def stop_at_8(step):
        if step == 8:
            raise RuntimeError("killed")

    config = load_config("lp", settings(data, tiny_clip_dir, broken, **steps))
    with pytest.raises(RuntimeError, match="killed"):
        train_cli.run_training(config, on_step=stop_at_8)
    checkpoints = broken / "checkpoints"
    newest = checkpoints / "step-0000008"
    if damage == "trainer_state":
        text = (newest / TRAINER_STATE).read_text()
        (newest / TRAINER_STATE).write_text(text[: len(text) // 2])  # torn mid-write
    elif damage == "weights":
        weights = next(newest.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:-100])
    else:  # a save killed before it finished: never a checkpoint
        newest.rename(checkpoints / "step-0000008.partial")
    capsys.readouterr()
    assert train("--config", "lp", "--resume", "--set", *settings(data, tiny_clip_dir, broken, **steps)) == 0
    error = capsys.readouterr().err
    if damage != "partial":
        assert f"skipping the checkpoint {newest}" in error
    assert "resuming from" in error and "step-0000004" in error
    expected, resumed = (
        load_file(str(straight / "best_trainable.safetensors")),
        load_file(str(broken / "best_trainable.safetensors")),
    )
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name  # the same run as one never killed


def test_the_best_weights_follow_the_checkpoint_that_resume_continues_from(data, tiny_clip_dir, tmp_path):
    """Best weights written after the last checkpoint (a later validation), then a kill: --resume continues from the
    checkpoint, so the best weights kept beside the checkpoints must be that checkpoint's again."""
    out = tmp_path / "run"
    config = load_config("lp", settings(data, tiny_clip_dir, out))

    def stop_at_6(step):
        if step == 6:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        train_cli.run_training(config, on_step=stop_at_6)
    checkpoint = checkpoints_in(out)[-1]
    kept = (checkpoint / BEST_WEIGHTS).read_bytes()
    later = {name: value + 1 for name, value in load_file(str(out / BEST_WEIGHTS)).items()}
    save_file(later, str(out / BEST_WEIGHTS))  # as a validation after the checkpoint would leave them
    run = Run(config, resume=True)
    try:
        run.setup()
        run.prepare_training()
        run.restore(run.resume_from)
    finally:
        run.lock.close()
    assert run.step == 4 and (out / BEST_WEIGHTS).read_bytes() == kept


def test_a_disk_that_fills_up_while_saving_says_so(data, tiny_clip_dir, tmp_path, capsys, monkeypatch):
    from accelerate import Accelerator

    def full(self, folder, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 512")

    monkeypatch.setattr(Accelerator, "save_state", full)
    out = tmp_path / "run"
    assert train("--config", "lp", "--set", *settings(data, tiny_clip_dir, out)) == 2
    error = capsys.readouterr().err
    assert "disk full at" in error and "--resume" in error and "Traceback" not in error
    assert not checkpoints_in(out)


# ------------------------------------------------------------------------- checks that come first
@pytest.mark.parametrize(("value", "shown"), [(20, "holds 20"), (-1, "holds -1")])
def test_labels_out_of_range_are_named_when_the_data_is_opened(value, shown, tiny_clip_dir, tmp_path, capsys):
    bad = prepared_with(tmp_path / "bad", emotion=[3, 1, value, 0])
    never = "someone/a-backbone-that-would-take-minutes"  # the data is checked before the model is built
    out = tmp_path / "run"
    assert train("--config", "lp", "--set", f"data.train=[{bad}]", f"model.backbone={never}", f"output_dir={out}") == 2
    error = capsys.readouterr().err
    assert f"column 'emotion' {shown}" in error and "allowed are 0..6" in error and str(bad) in error
    assert (
        evaluate_cli.main(["--model", f"clip:{tiny_clip_dir}", "--data", str(bad), "--out", str(tmp_path / "e")]) == 2
    )
    assert f"column 'emotion' {shown}" in capsys.readouterr().err


def test_push_to_hub_without_a_token_is_said_before_training(data, tiny_clip_dir, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # a machine where nobody logged in
    out = tmp_path / "run"
    assert train("--config", "lp", "--push-to-hub", "me/x", "--set", *settings(data, tiny_clip_dir, out)) == 2
    assert "needs a Hugging Face token" in capsys.readouterr().err and not out.exists()


def test_train_push_failure_prints_the_command_to_retry(data, tiny_clip_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setattr(hub, "push_model", lambda *a, **k: (_ for _ in ()).throw(hub.HubError("upload refused")))
    out = tmp_path / "run"
    config = load_config("lp", settings(data, tiny_clip_dir, out))
    with pytest.raises(
        hub.HubError, match=r"push it again with: python -m train.hub push --model .*best --repo-id me/x"
    ):
        train_cli.run_training(config, push_to_hub="me/x")
    assert (out / "best").is_dir()


def test_evaluate_checks_its_out_and_options_before_any_inference(data, tiny_clip_dir, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    common = ["--model", f"clip:{tiny_clip_dir}", "--data", str(data)]
    assert evaluate_cli.main([*common, "--out", str(tmp_path / "a-file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert evaluate_cli.main([*common, "--out", str(tmp_path / "e"), "--num-workers", "-1"]) == 2
    assert "--num-workers at least 0" in capsys.readouterr().err


def test_an_unwritable_evaluate_out_fails_before_anything_is_read(tiny_clip_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    missing = tmp_path / "no-such-data"  # were --data read first, this would be the error
    code = (
        "import sys; from train.evaluate import main; "
        f"sys.exit(main(['--model', 'clip:{tiny_clip_dir}', '--data', '{missing}', '--out', '{locked / 'e'}']))"
    )
    # root ignores file modes: drop its override capabilities, as the data tests do
    command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c", code]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=os.environ)
    assert result.returncode == 2 and "cannot be written" in result.stderr, result.stderr[-1500:]
    assert "no such folder" not in result.stderr


# ------------------------------------------------------------------ clear messages instead of tracebacks
def write_config(tmp_path, text: str | bytes) -> Path:
    path = tmp_path / "mine.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("method: lora\n", "'method' is a section, so it holds keys, not 'lora'; write it as\nmethod:\n  name: lora"),
        ("method:\n  name: lora\n  rank: 8\n  rank: 16\n", "the key 'rank' is given twice (line 4)"),
        ("method:\n  name: lora\n# caf\xe9\n".encode("latin-1"), "is not UTF-8 text"),
        ("loss:\n  task_weights: {foo: 1}\n", "loss.task_weights={'foo': 1} is not allowed"),
        ("loss:\n  task_weights: {age: -1}\n", "loss.task_weights={'age': -1} is not allowed"),
    ],
)
def test_config_files_get_messages_that_say_what_to_write(text, message, tmp_path, capsys):
    assert train("--config", str(write_config(tmp_path, text)), "--set", f"output_dir={tmp_path / 'o'}") == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_an_output_dir_that_is_a_file_or_read_only_is_named(data, tiny_clip_dir, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    assert train("--config", "lp", "--set", *settings(data, tiny_clip_dir, tmp_path / "a-file")) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"drop": "image"}, "training needs 'image'"),
        ({"empty": True}, "cannot be loaded as a prepared dataset"),
        ({"missing": True}, "is not there. Prepare it first"),
        ({"no_train": True}, "has no 'train' split"),
    ],
)
def test_training_data_problems_are_named_before_the_model_is_built(columns, message, tmp_path, capsys):
    folder = tmp_path / "data"
    if not columns.get("missing"):
        prepared_with(folder, gender=[0, 1, 1, 0])
        loaded = __import__("datasets").load_from_disk(str(folder))
        if "drop" in columns:
            loaded = DatasetDict({k: v.remove_columns(columns["drop"]) for k, v in loaded.items()})
        if "empty" in columns:
            loaded = DatasetDict({k: v.select([]) for k, v in loaded.items()})
        if "no_train" in columns:
            loaded = DatasetDict({"test": loaded["test"]})
        loaded.save_to_disk(str(tmp_path / "data2"))
        folder = tmp_path / "data2"
    never = "someone/a-backbone-that-would-take-minutes"
    argv = [
        "--config",
        "lp",
        "--set",
        f"data.train=[{folder}]",
        f"model.backbone={never}",
        f"output_dir={tmp_path / 'o'}",
    ]
    assert train(*argv) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error and "backbone" not in error, error


def test_a_64_megapixel_refusal_names_an_option_that_exists(tmp_path):
    from PIL import Image
    from transformers import pipeline

    big = tmp_path / "big.png"
    Image.new("1", (8200, 8200)).save(big)  # a tiny file that decodes to 67 Mpx
    torch.manual_seed(0)
    model = SoftBioModel(SoftBioConfig(vision_config={"model_type": "clip_vision_model", **TINY_VISION}))
    pipe = pipeline("soft-biometrics", model=model, dtype="float32")
    with pytest.raises(ValueError, match=r"pipe\(image, max_pixels=N\)"):
        pipe(str(big), detector="none")
    faces = pipe(str(big), detector="none", max_pixels=70_000_000)  # the option is taken, not swallowed
    assert len(faces) == 1
    with pytest.raises(ValueError, match=r"max_pixels=0"):
        pipe(GRACE, max_pixels=0)


def test_a_refused_connection_is_not_called_a_timeout():
    from softbio_hf import load_image

    with pytest.raises(ValueError) as refused:
        load_image("http://127.0.0.1:9/photo.jpg", timeout=10)
    assert "refused" in str(refused.value).lower() and "within 10s" not in str(refused.value)


def test_a_train_split_missing_names_the_split_once_and_the_right_advice(tmp_path):
    from train.data import load_prepared

    prepared_with(tmp_path / "d", gender=[0, 1])
    only_test = __import__("datasets").load_from_disk(str(tmp_path / "d"))
    DatasetDict({"validation": only_test["validation"]}).save_to_disk(str(tmp_path / "v"))
    with pytest.raises(ValueError) as error:
        load_prepared([tmp_path / "v"], "train")
    text = str(error.value)
    assert "has no 'train' split (it has ['validation'])" in text and ".." not in text
    assert "leave it out of this list" in text


def test_nothing_unexpected_is_left_in_the_run_folder(data, tiny_clip_dir, tmp_path):
    out = tmp_path / "run"
    assert train("--config", "lp", "--set", *settings(data, tiny_clip_dir, out)) == 0
    names = {p.name for p in out.iterdir()}
    assert not [n for n in names if n.endswith((".partial", ".writing"))], names
    assert np.isfinite(json.loads((out / "summary.json").read_text())["best_validation_overall"])
