"""Training, evaluation and configs, third hardening round: long jobs never lose work, nothing is deleted that is
not ours, every failure named. Real signals, real torn files, real two-process runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from synthetic import prepared_synthetic, run_settings

from train import train as train_cli
from train.checkpoints import BEST_WEIGHTS, Interrupted, checkpoint_state, checkpoints_in
from train.config import load_config
from train.evaluate import main as evaluate_main
from train.train import run_training

REPO = Path(__file__).resolve().parents[1]
QUICK = {"train.max_steps": 8, "train.batch_size": 16, "train.warmup_steps": 1, "eval.every": 0, "checkpoint.every": 4}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_synthetic(tmp_path_factory.mktemp("hardening"))


def settings(data, backbone, out, **extra) -> list[str]:
    return run_settings(data, backbone, out, **{**QUICK, **extra})


def config(data, backbone, out, method: str = "lora", **extra):
    return load_config(method, settings(data, backbone, out, **extra))


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / BEST_WEIGHTS))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


def command_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def signalled_training(args: list[str], sign: Path, signal_number: int, settle: float = 1.0) -> tuple[str, int]:
    """`python -m train.train --config lp` sent `signal_number` once `sign` exists (and `settle` seconds more):
    its stderr and exit code."""
    process = subprocess.Popen(
        [sys.executable, "-m", "train.train", "--config", "lp", "--set", *args],
        cwd=REPO,
        env=command_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not sign.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(settle)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=300)
    return stderr, process.returncode


# ---------------------------------------------------------------------------------------------- signals
def test_sigterm_stops_after_the_step_with_a_checkpoint_that_resumes_to_the_straight_weights(
    data, tiny_clip_dir, tmp_path
):
    run_training(config(data, tiny_clip_dir, tmp_path / "straight"))

    def preempted(step: int) -> None:
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, as Slurm or Kubernetes send it

    with pytest.raises(Interrupted) as stop:
        run_training(config(data, tiny_clip_dir, tmp_path / "preempted"), on_step=preempted)
    assert stop.value.signal_name == "SIGTERM" and stop.value.exit_code == 143
    assert stop.value.step == 6 and stop.value.folder.name == "step-0000006"
    checkpoint_state(stop.value.folder)  # intact
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the run's only
    run_training(config(data, tiny_clip_dir, tmp_path / "preempted"), resume=True)
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "preempted"))


def test_the_command_answers_sigterm_with_its_exit_code_and_the_resume_line(data, tiny_clip_dir, tmp_path):
    out = tmp_path / "run"
    args = settings(data, tiny_clip_dir, out, **{"train.max_steps": 100000, "checkpoint.every": 0})
    stderr, code = signalled_training(args, out / "logs", signal.SIGTERM)  # the loop has begun once logs exist
    assert code == 143, stderr[-2000:]
    assert "SIGTERM: stopped at step" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert checkpoints_in(out), "a checkpoint to continue from"
    checkpoint_state(checkpoints_in(out)[-1])


def test_ctrl_c_while_starting_up_is_a_message_not_a_traceback(data, tiny_clip_dir, tmp_path):
    out = tmp_path / "run"
    # output_dir claimed: start-up is under way, the training loop not yet
    stderr, code = signalled_training(settings(data, tiny_clip_dir, out), out / ".lock", signal.SIGINT, settle=0.0)
    assert code == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "interrupted before training began" in stderr or "SIGINT: stopped at step" in stderr


# ------------------------------------------------------------------------------------------ two processes
def test_two_processes_checkpointing_every_step_finish_five_times_in_five(data, tiny_clip_dir, tmp_path):
    extra = {"train.max_steps": 4, "train.batch_size": 8, "checkpoint.every": 1, "checkpoint.keep": 10}
    for attempt in range(5):
        out = tmp_path / f"two-{attempt}"
        args = ["--config", "lp", "--set", *settings(data, tiny_clip_dir, out, **extra)]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "train.train", *args]
        result = subprocess.run(command, cwd=REPO, env=command_env(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (attempt, result.stderr[-3000:])
        saved = checkpoints_in(out)
        assert [p.name for p in saved] == [f"step-{s:07d}" for s in range(1, 5)]
        for folder in saved:
            assert sorted(p.name for p in folder.glob("random_states_*.pkl")) == [
                "random_states_0.pkl",
                "random_states_1.pkl",
            ]
            checkpoint_state(folder)
        assert not list((out / "checkpoints").glob("*.partial"))


# ----------------------------------------------------------------------------------------- torn files
def test_a_torn_optimizer_state_is_skipped_for_the_older_intact_checkpoint(data, tiny_clip_dir, tmp_path, capsys):
    out = tmp_path / "run"
    extra = {"checkpoint.every": 2, "checkpoint.keep": 3}
    run_training(config(data, tiny_clip_dir, out, **extra))
    newest = checkpoints_in(out)[-1]
    optimizer = newest / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])  # torn mid-write
    with pytest.raises(ValueError, match=r"optimizer\.bin is damaged"):
        checkpoint_state(newest)
    assert train_cli.main(["--config", "lora", "--resume", "--set", *settings(data, tiny_clip_dir, out, **extra)]) == 0
    error = capsys.readouterr().err
    assert f"skipping the checkpoint {newest}: optimizer.bin is damaged" in error


def test_a_full_disk_while_safetensors_writes_says_so(data, tiny_clip_dir, tmp_path, capsys, monkeypatch):
    import accelerate.utils.other
    import safetensors

    def full(*_args, **_kwargs):
        # what safetensors' Rust writer raises on ENOSPC (no small full file system can be mounted here)
        message = 'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        raise safetensors.SafetensorError(f"Error while serializing: {message}")

    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", full)  # where accelerate's save_state calls it
    out = tmp_path / "run"
    assert train_cli.main(["--config", "lp", "--set", *settings(data, tiny_clip_dir, out)]) == 2
    error = capsys.readouterr().err
    assert "disk full at" in error and "--resume" in error and "Traceback" not in error


# -------------------------------------------------------------------------------------- output folders
def test_overwrite_never_deletes_a_folder_that_held_no_run(data, tiny_clip_dir, tmp_path, capsys):
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "thesis.docx").write_text("years of work")
    (documents / "config.yaml").write_text("mine")
    code = train_cli.main(["--config", "lp", "--overwrite", "--set", *settings(data, tiny_clip_dir, documents)])
    assert code == 2
    error = capsys.readouterr().err
    assert "holds files that no training run wrote (thesis.docx)" in error and "nothing was deleted" in error
    assert sorted(p.name for p in documents.iterdir()) == ["config.yaml", "thesis.docx"]


def test_overwrite_refuses_a_folder_of_ones_own_files_named_like_a_runs(data, tiny_clip_dir, tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "logs").mkdir(parents=True)
    (mine / "eval").mkdir()
    (mine / "config.yaml").write_text("hand written")
    (mine / "logs" / "notes.txt").write_text("notes")
    (mine / "eval" / "human-ratings.csv").write_text("ratings")
    code = train_cli.main(["--config", "lp", "--overwrite", "--set", *settings(data, tiny_clip_dir, mine)])
    assert code == 2
    error = capsys.readouterr().err
    assert "config.yaml, eval, logs but no run marker (.softbio-run.json)" in error and "nothing was deleted" in error
    assert (mine / "config.yaml").read_text() == "hand written"
    assert (mine / "logs" / "notes.txt").exists() and (mine / "eval" / "human-ratings.csv").exists()


def test_a_deleted_lock_never_lets_overwrite_empty_a_live_runs_folder(data, tiny_clip_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = (  # run A: the training run's own claim on output_dir, then its first files; it keeps running
        "import sys, time; from pathlib import Path; from train.checkpoints import claim_output_dir\n"
        "out = Path(sys.argv[1]); lock = claim_output_dir(out, None, False)\n"
        "(out / 'config.yaml').write_text('run A'); (out / 'checkpoints').mkdir()\n"
        "print('held', flush=True); time.sleep(60)"
    )
    first = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        (out / ".lock").unlink()
        assert train_cli.main(["--config", "lp", "--overwrite", "--set", *settings(data, tiny_clip_dir, out)]) == 2
        error = capsys.readouterr().err
        assert "in use by another training run" in error and ".lock was deleted or replaced" in error
        assert (out / "config.yaml").read_text() == "run A" and (out / "checkpoints").is_dir()
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize(("value", "shown"), [("", "None"), ("''", "''"), ("' '", "' '")])
def test_an_empty_output_dir_setting_is_refused(value, shown, capsys):
    assert train_cli.main(["--config", "lp", "--set", f"output_dir={value}", "data.train=[x]"]) == 2
    assert f"output_dir={shown} is not allowed" in capsys.readouterr().err


def test_evaluate_refuses_to_overwrite_an_earlier_evaluation_without_overwrite(data, tiny_clip_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    common = ["--model", f"clip:{tiny_clip_dir}", "--data", str(data), "--out", str(out), "--limit", "4"]
    assert evaluate_main(common) == 0
    first = (out / "results.json").read_text()
    (out / "results.json").write_text(first.replace('"split"', '"split_marker": 1, "split"', 1))
    assert evaluate_main(common) == 2
    assert "holds an earlier evaluation" in capsys.readouterr().err
    assert "split_marker" in (out / "results.json").read_text()  # untouched
    assert evaluate_main([*common, "--overwrite"]) == 0
    assert "split_marker" not in (out / "results.json").read_text()


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_evaluate_and_train_name_an_out_that_is_a_file_or_under_one(where, data, tiny_clip_dir, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "a-file" if where == "file" else tmp_path / "a-file" / "below"
    assert evaluate_main(["--model", f"clip:{tiny_clip_dir}", "--data", str(data), "--out", str(out)]) == 2
    assert "--out" in (error := capsys.readouterr().err) and "Traceback" not in error
    assert train_cli.main(["--config", "lp", "--set", *settings(data, tiny_clip_dir, out)]) == 2
    assert "output_dir" in (error := capsys.readouterr().err) and "Traceback" not in error


# ----------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_a_seed_numpy_cannot_take_is_refused(seed, capsys):
    assert train_cli.main(["--config", "lp", "--set", f"train.seed={seed}", "data.train=[x]"]) == 2
    assert "train.seed" in (error := capsys.readouterr().err) and "4294967295" in error


def test_pooling_heads_not_dividing_the_backbone_width_is_a_message(data, tiny_clip_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = train_cli.main(["--config", "lp", "--set", *settings(data, tiny_clip_dir, out), "model.pooling_heads=3"])
    assert code == 2
    error = capsys.readouterr().err
    assert "SoftBioConfig.pooling_heads=3 must divide the backbone width" in error and "Traceback" not in error


def test_yaml_merge_keys_are_taken_and_extension_keys_dropped(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "x-common: &common\n  lr: 3.0e-4\n  max_steps: 7\n"
        "method:\n  name: lp\n"
        "train:\n  <<: *common\n  max_steps: 9\n"  # a key written here overrides the merged one
        "data:\n  train: [somewhere]\n"
    )
    loaded = load_config(path)
    assert loaded["train"]["lr"] == 3e-4 and loaded["train"]["max_steps"] == 9


def test_yaml_nested_beyond_reason_is_a_message(tmp_path, capsys):
    path = tmp_path / "deep.yaml"
    path.write_text("method:\n  name: " + "[" * 5000 + "]" * 5000 + "\n")
    assert train_cli.main(["--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert "nested too deeply" in error and "Traceback" not in error


def test_the_log_variances_train_at_their_own_rate(tiny_clip_dir, data, tmp_path):
    from train.loop import Run

    run = Run(config(data, tiny_clip_dir, tmp_path / "run", method="ft4", **{"train.lr": 1e-5, "method.last_k": 1}))
    try:
        run.setup()
        run.prepare_step()
    finally:
        run.lock.close()
    rates = {group["name"]: group["lr"] for group in run.optimizer.param_groups}
    # warmup scales every group alike: the ratio is what the config says
    assert rates["loss_weights_no_decay"] / rates["backbone"] == pytest.approx(1e-3 / 1e-5)


# ---------------------------------------------------------------------------------------------- extras
def test_commands_name_the_train_extra_when_datasets_is_missing(tmp_path):
    script = (
        "import sys\nsys.modules['datasets'] = None\n"
        "from train.evaluate import main as evaluate\nfrom train.data import main as data\n"
        f"print(evaluate(['--model', 'm', '--data', 'd', '--out', {str(tmp_path / 'o')!r}]))\n"
        "print(data(['stats', 'd']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=command_env(), capture_output=True, text=True, timeout=300
    )
    assert result.stdout.split() == ["2", "2"], result.stderr[-2000:]
    assert result.stderr.count("pip install 'softbio[train]'") == 2 and "Traceback" not in result.stderr


def test_an_unmerged_adapter_without_peft_names_the_train_extra(tmp_path):
    script = (
        "import sys\nsys.modules['peft'] = None\nsys.modules['peft.tuners.lora'] = None\n"
        "from softbio_hf.methods import install_adapter_layers\n"
        "try:\n    install_adapter_layers(object(), {'method': 'lora'})\n"
        "except ImportError as error:\n    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=command_env(), capture_output=True, text=True, timeout=300
    )
    assert "pip install 'softbio[train]'" in result.stdout, (result.stdout, result.stderr[-2000:])


def test_summary_json_of_a_finished_run_is_strict(data, tiny_clip_dir, tmp_path):
    out = tmp_path / "run"
    run_training(config(data, tiny_clip_dir, out, method="lp"))
    json.loads((out / "summary.json").read_text())
    assert not [p.name for p in out.iterdir() if ".partial" in p.name or ".writing" in p.name]


# ------------------------------------------------------------------------------------------- VGGFace2
def test_a_vggface2_subset_keeps_n_images_per_identity_the_same_on_every_run(tmp_path, capsys):
    from datasets import load_from_disk
    from datasets_fixtures import make_vggface2

    from train.data import main as data_main
    from train.readers import SkipReport, read_vggface2

    make_vggface2(tmp_path / "raw")
    rows = read_vggface2(tmp_path / "raw", SkipReport(), per_identity=1)
    folders = sorted(str(Path(row["source"]).parent.relative_to(tmp_path / "raw")) for row in rows)
    # of 3, 2 and 1 train images and 1 test image per identity, one each
    assert folders == ["test/n000002", "train/n000001", "train/n000002", "train/n000003"]
    again = read_vggface2(tmp_path / "raw", SkipReport(), per_identity=1)
    assert [row["source"] for row in again] == [row["source"] for row in rows]
    one = read_vggface2(tmp_path / "raw", SkipReport(), identities=1)
    kept = {(Path(r["source"]).parent.parent.name, Path(r["source"]).parent.name) for r in one}
    assert sorted(split for split, _ in kept) == ["test", "train"]  # one identity of each split, all its images
    out = tmp_path / "subset"
    assert data_main(["prepare", "--dataset", "vggface2", "--root", str(tmp_path / "raw"), "--out", str(out),
                      "--per-identity", "1", "--image-size", "32"]) == 0  # fmt: skip
    splits = load_from_disk(str(out))
    assert sum(len(splits[name]) for name in splits) == 4
    assert data_main(["prepare", "--dataset", "vggface2", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "z"),
                      "--identities", "0"]) == 2  # fmt: skip
    assert "--identities 0: give a number of at least 1" in capsys.readouterr().err
    assert data_main(["prepare", "--dataset", "utkface", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "u"),
                      "--per-identity", "2"]) == 2  # fmt: skip
    assert "use them with vggface2" in capsys.readouterr().err


def test_prepare_and_export_name_an_out_under_a_file_before_any_work(tmp_path, capsys):
    from softbio_hf.export import main as export_main
    from train.data import main as data_main

    (tmp_path / "a-file").write_text("x")
    (tmp_path / "raw").mkdir()
    below = str(tmp_path / "a-file" / "below")
    assert data_main(["prepare", "--dataset", "utkface", "--root", str(tmp_path / "raw"), "--out", below]) == 2
    assert f"{tmp_path / 'a-file'} is a file, not a folder" in capsys.readouterr().err
    # the model is never loaded: the bogus id would otherwise be the error
    assert export_main(["--model", "no/such-model", "--out", below]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path / 'a-file'} is a file, not a folder" in error and "no/such-model" not in error


def test_the_command_ships_a_best_folder_that_loads_as_remote_code(data, tiny_clip_dir, tmp_path):
    """Under `python -m train.train` the package defers its registration (fast --help), yet the saved checkpoint
    must still carry auto_map and our code, as in a process that imported softbio_hf first."""
    out = tmp_path / "run"
    args = settings(data, tiny_clip_dir, out, **{"train.max_steps": 2, "checkpoint.every": 0})
    result = subprocess.run(
        [sys.executable, "-m", "train.train", "--config", "lp", "--set", *args],
        cwd=REPO,
        env=command_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_softbio.SoftBioModel"
    assert (out / "best" / "modeling_softbio.py").is_file() and (out / "best" / "pipeline_softbio.py").is_file()
