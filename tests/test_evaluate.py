"""train/evaluate.py: metrics against hand computations, the CLI's files, calibration, fairness, compare."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets_fixtures import make_fairface, make_rafdb, make_utkface, make_vggface2

from softbio_hf import SoftBioModel
from train.data import prepare
from train.evaluate import load_model, main
from train.metrics import (
    classification_metrics,
    expected_calibration_error,
    group_accuracy,
    summarize,
    task_metrics,
)
from train.schema import IGNORE


def one_hot_logits(predicted: list[int], num_classes: int, scale: float = 30.0) -> np.ndarray:
    logits = np.zeros((len(predicted), num_classes), dtype=np.float32)
    logits[np.arange(len(predicted)), predicted] = scale
    return logits


# ------------------------------------------------------------------------------------ hand computations
def test_metrics_equal_a_hand_computation_with_an_absent_class_and_masked_rows():
    # 4 classes: class 2 is never predicted, class 3 is predicted but never true; two rows carry no label.
    labels = np.array([0, 0, 1, 1, 1, 2, IGNORE, IGNORE])
    predicted = [0, 1, 1, 1, 0, 3, 2, 2]
    metrics = task_metrics("emotion", one_hot_logits(predicted, 4), labels)
    assert metrics["n"] == 6  # the masked rows are not counted
    assert metrics["accuracy"] == pytest.approx(100 * 3 / 6)
    # recall: class 0 1/2, class 1 2/3, class 2 0/1; class 3 has no true rows and is left out
    assert metrics["balanced_accuracy"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 0) / 3)
    # F1 = 2 tp / (true + predicted): class 0 2/4, class 1 4/6, class 2 0/1, class 3 0/1 (predicted, never true)
    assert metrics["macro_f1"] == pytest.approx(100 * (2 / 4 + 4 / 6 + 0 + 0) / 4)
    assert "one_off_accuracy" not in metrics


def test_age_one_off_and_mae_of_the_expected_years():
    bin_years = [1.0, 6.0, 14.5, 24.5, 34.5, 44.5, 54.5, 64.5, 77.0]
    labels = np.array([3, 3, 0, 8, IGNORE])
    predicted = [3, 4, 2, 8, 0]
    exact = np.array([27.0, np.nan, 1.0, 80.0, 50.0])  # the second row has no exact age
    metrics = task_metrics("age", one_hot_logits(predicted, 9), labels, exact, bin_years)
    assert metrics["accuracy"] == pytest.approx(50.0)
    assert metrics["one_off_accuracy"] == pytest.approx(75.0)  # 3->4 is one off, 0->2 is two off
    # expected years are the predicted bins' ages (one-hot logits): |24.5-27|, |14.5-1|, |77-80|
    assert metrics["mae_years"] == pytest.approx((2.5 + 13.5 + 3.0) / 3, abs=1e-3)


def test_expected_calibration_error_by_hand():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4]])
    labels = np.array([0, 1, 0])
    # bin of 0.9: accuracy 1/2, confidence 0.9 -> gap 0.4 for 2 rows; bin of 0.6: accuracy 1 -> gap 0.4
    assert expected_calibration_error(probs, labels) == pytest.approx(40.0)
    # confidence 0.5, right once in two: perfectly calibrated
    assert expected_calibration_error(np.array([[0.5, 0.5], [0.5, 0.5]]), np.array([0, 1])) == pytest.approx(0.0)


def test_group_accuracy_names_the_worst_group_and_the_gap():
    correct = np.array([True, True, False, True, False, False])
    result = group_accuracy(correct, ["White", "White", "White", "Black", "Black", None])
    assert result["groups"] == {
        "Black": {"accuracy": 50.0, "n": 2},
        "White": {"accuracy": pytest.approx(200 / 3), "n": 3},
    }
    assert result["worst_group"] == "Black" and result["gap"] == pytest.approx(200 / 3 - 50)
    assert group_accuracy(correct, ["White"] * 6) is None  # one group is no comparison


def test_summary_follows_the_study_and_keeps_synthetic_ages_apart():
    def acc(value: float) -> dict:
        return {"accuracy": value}

    results = {
        "utkface": {"age": acc(60.0), "gender": acc(96.0)},
        "fairface": {"age": acc(64.0), "gender": acc(98.0)},
        "rafdb": {"emotion": acc(90.0)},
        "vggface2": {"age": acc(40.0), "gender": acc(95.0)},
    }
    summary = summarize(results)
    assert summary["age"] == pytest.approx(62.0)  # vggface2's synthetic ages are not averaged in
    assert summary["gender"] == pytest.approx((96 + 98 + 95) / 3)
    assert summary["emotion"] == pytest.approx(90.0)
    assert summary["overall"] == pytest.approx((62.0 + summary["gender"] + 90.0) / 3)
    assert summary["synthetic_age"] == {"vggface2": 40.0}
    assert classification_metrics(np.array([1]), np.array([1]), 2)["balanced_accuracy"] == 100.0


# ------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("benchmarks")
    folders = {}
    for name, make in (("utkface", make_utkface), ("fairface", make_fairface), ("rafdb", make_rafdb)):
        make(root / f"raw-{name}")
        prepare(name, root / f"raw-{name}", root / name, image_size=32)
        folders[name] = str(root / name)
    return folders


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def test_the_readme_command_scores_the_three_benchmarks_on_their_test_splits(prepared, tiny_clip_dir, tmp_path):
    """README's `evaluate --data data/utkface data/fairface data/rafdb` (default --split test); with VGGFace2
    prepared without ages (gender only), the summary follows the study: gender over all four, age without it."""
    make_vggface2(tmp_path / "raw-vgg")
    prepare("vggface2", tmp_path / "raw-vgg", tmp_path / "vggface2", image_size=32)
    data = [prepared["utkface"], prepared["fairface"], prepared["rafdb"], tmp_path / "vggface2"]
    assert run_cli("--model", f"clip:{tiny_clip_dir}", "--data", *data, "--out", tmp_path / "eval") == 0
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert report["split"] == "test"
    assert set(report["results"]) == {"utkface", "fairface", "rafdb", "vggface2"}
    assert report["results"]["fairface"]["age"]["n"] == 2  # FairFace's official val rows
    results, summary = report["results"], report["summary"]
    gender = [results[d]["gender"]["accuracy"] for d in ("utkface", "fairface", "vggface2")]
    assert summary["gender"] == pytest.approx(np.mean(gender))
    assert summary["age"] == pytest.approx(np.mean([results[d]["age"]["accuracy"] for d in ("utkface", "fairface")]))


def test_cli_writes_results_report_and_plots(prepared, tiny_clip_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    data = [prepared["utkface"], prepared["fairface"], prepared["rafdb"]]
    assert run_cli("--model", f"clip:{tiny_clip_dir}", "--data", *data, "--split", "train", "--out", out) == 0
    report = json.loads((out / "results.json").read_text())
    assert {"model", "split", "results", "summary", "fairness", "calibration"} <= set(report)
    assert report["split"] == "train" and report["model"] == f"clip:{tiny_clip_dir}"
    assert set(report["results"]) == {"utkface", "fairface", "rafdb"}
    assert set(report["results"]["utkface"]) == {"age", "gender"}  # emotion has no labels there: left out
    assert set(report["results"]["rafdb"]) == {"emotion"}
    assert any("no labelled rows" in note for note in report["notes"]["rafdb"])
    for metrics in report["results"]["utkface"].values():
        assert {"accuracy", "balanced_accuracy", "macro_f1", "n"} <= set(metrics)
    assert report["results"]["utkface"]["age"]["n"] == 12  # every labelled train row of the fixture
    assert "mae_years" in report["results"]["utkface"]["age"]  # UTKFace has exact ages ...
    assert "mae_years" not in report["results"]["fairface"]["age"]  # ... FairFace only bins
    summary = report["summary"]
    expected_age = np.mean([report["results"][d]["age"]["accuracy"] for d in ("utkface", "fairface")])
    assert summary["age"] == pytest.approx(expected_age)
    assert summary["emotion"] == pytest.approx(report["results"]["rafdb"]["emotion"]["accuracy"])
    # fairness only where the data has groups: races in UTKFace and FairFace, none in RAF-DB
    assert set(report["fairness"]) == {"utkface", "fairface"}
    assert set(report["fairness"]["utkface"]["age"]) == {"race", "gender"}
    assert set(report["fairness"]["fairface"]["gender"]) == {"race"}
    assert {"Black", "White"} <= set(report["fairness"]["utkface"]["age"]["race"]["groups"])
    assert set(report["calibration"]) == {"age", "gender", "emotion"}
    markdown = (out / "report.md").read_text()
    assert "| dataset | task | n | accuracy" in markdown and "## Fairness" in markdown
    plots = sorted(p.name for p in out.glob("*.png"))
    assert plots == sorted(report["plots"])
    assert {"confusion_utkface_age.png", "confusion_rafdb_emotion.png", "reliability_gender.png"} <= set(plots)
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    assert "| model | emotion | age* | gender | overall |" in capsys.readouterr().out


def test_clip_prefix_builds_the_same_model_as_from_clip(tiny_clip_dir):
    built = load_model(f"clip:{tiny_clip_dir}", device="cpu", dtype=torch.float32)
    reference = SoftBioModel.from_clip(tiny_clip_dir).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for task, logits in built(x).logits.items():
            torch.testing.assert_close(logits, reference(x).logits[task])


def test_calibration_lowers_the_nll_and_keeps_the_argmax(prepared, tiny_model, tmp_path):
    with torch.no_grad():  # a deliberately over-confident model: logits x 40
        for head in tiny_model.heads.values():
            head.classifier.weight.mul_(40)
            head.classifier.bias.mul_(40)
    tiny_model.save_pretrained(tmp_path / "overconfident")
    out = tmp_path / "eval"
    args = ("--data", prepared["utkface"], prepared["fairface"], "--split", "validation", "--out", out)
    assert run_cli("--model", tmp_path / "overconfident", *args, "--calibrate", "--dtype", "float32") == 0
    calibration = json.loads((out / "results.json").read_text())["calibration"]
    for task in ("age", "gender"):
        assert calibration[task]["temperature"] > 1  # over-confident: softened
        assert calibration[task]["nll_after"] < calibration[task]["nll_before"]
    calibrated = SoftBioModel.from_pretrained(out / "calibrated").eval()
    temperatures = calibrated.config.calibration["temperatures"]
    assert temperatures["age"] == pytest.approx(calibration["age"]["temperature"])
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, after = tiny_model.eval()(x).logits, calibrated(x).logits
    for task in ("age", "gender"):
        assert torch.equal(before[task].argmax(-1), after[task].argmax(-1))
        torch.testing.assert_close(after[task], before[task] / temperatures[task], rtol=1e-4, atol=1e-4)


def test_compare_prints_one_row_per_run_and_the_difference(tmp_path, capsys):
    runs = []
    for name, overall in (("zs", 69.61), ("lora", 84.07)):
        path = tmp_path / name / "results.json"
        path.parent.mkdir()
        summary = {"emotion": 66.57, "age": 47.36, "gender": 96.67, "overall": overall}
        path.write_text(json.dumps({"name": name, "results": {}, "summary": summary}))
        runs.append(path)
    assert run_cli("compare", *runs, "--baseline", "zs") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and lines[2].startswith("| zs |") and lines[3].startswith("| lora |")
    assert "84.07 (+14.46)" in lines[3]
    assert lines[5] == "lora vs zs: no paired test (not evaluated on the same rows with --bootstrap)"


def test_conformal_and_bootstrap_from_the_cli(prepared, tiny_model, tmp_path, capsys):
    """--conformal fits on the validation split, saves thresholds in config.calibration, reports test coverage;
    --bootstrap puts an interval beside every accuracy and rows.npz beside results.json."""
    tiny_model.save_pretrained(tmp_path / "model")
    out = tmp_path / "eval"
    data = (prepared["utkface"], prepared["fairface"])
    args = ("--model", tmp_path / "model", "--data", *data, "--out", out, "--dtype", "float32", "--bootstrap", 50)
    assert run_cli(*args, "--conformal", 0.8, "--class-conditional", "--calibration-split", "train") == 0
    report = json.loads((out / "results.json").read_text())
    conformal = SoftBioModel.from_pretrained(out / "calibrated").config.calibration["conformal"]
    assert conformal["level"] == 0.8 and conformal["class_conditional"] and conformal["fitted_on"] == "train"
    assert len(conformal["thresholds"]["age"]) == 9
    age = report["conformal"]["tasks"]["age"]
    assert (
        0 <= age["coverage"] <= 100
        and 0 <= age["mean_set_size"] <= 9
        and set(age["datasets"]) == set(report["results"])
    )
    low, high = report["results"]["utkface"]["gender"]["accuracy_ci"]
    assert low <= report["results"]["utkface"]["gender"]["accuracy"] <= high
    assert (
        report["summary"]["ci"]["overall"][0] <= report["summary"]["overall"] <= report["summary"]["ci"]["overall"][1]
    )
    fair = report["fairness"]["fairface"]["age"]["race"]
    assert "gap_ci" in fair and all("accuracy_ci" in g for g in fair["groups"].values())
    for group in fair["groups"].values():  # each group's interval is over that group's rows only
        assert 0 <= group["accuracy_ci"][0] <= group["accuracy"] <= group["accuracy_ci"][1] <= 100
    assert (out / "rows.npz").is_file()
    assert "## Conformal prediction sets" in (out / "report.md").read_text()
    assert run_cli(*args, "--overwrite", "--conformal", 1.5) == 2
    assert "--conformal 1.5" in capsys.readouterr().err


EXPORT_AND_EVALUATE = """
import sys
from softbio_hf.export import main as export
from train.evaluate import main as evaluate
model, root, *common = sys.argv[1:]
assert export(["--model", model, "--format", "onnx", "--out", root + "/fp32"]) == 0
int8 = ["--precision", "int8", "--calibration", common[1]]  # calibrated on the first --data folder's faces
assert export(["--model", model, "--out", root + "/int8", *int8]) == 0
for name, backend in (("fp32", "onnx"), ("int8", "onnx"), ("int8", "openvino")):
    out = ["--out", f"{root}/eval-{name}-{backend}"]
    assert evaluate(["--model", f"{root}/{name}", "--backend", backend, *common, *out]) == 0
"""


def numbers(tree, path=()) -> dict:
    """Every number of a results.json part, by its path."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in numbers(value, (*path, key)).items()}
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {path: tree}
    return {}


def test_an_export_is_evaluated_on_the_same_data_and_tables_as_the_torch_model(prepared, tiny_model, tmp_path):
    """train.evaluate --backend onnx|openvino: an fp32 export's tables are the torch model's (every number within
    0.01 points; the accuracies equal), an int8 export's are reported with the same tables and its precision."""
    import subprocess
    import sys

    tiny_model.save_pretrained(tmp_path / "model")
    common = ["--data", prepared["utkface"], prepared["rafdb"], "--split", "train", "--dtype", "float32"]
    common += ["--bootstrap", "0"]
    assert run_cli("--model", tmp_path / "model", *common, "--out", tmp_path / "eval-torch") == 0
    command = [sys.executable, "-c", EXPORT_AND_EVALUATE, str(tmp_path / "model"), str(tmp_path), *common]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)  # runtimes: a process of their own
    assert done.returncode == 0, done.stderr[-3000:]
    reports = {
        run: json.loads((tmp_path / f"eval-{run}" / "results.json").read_text())
        for run in ("torch", "fp32-onnx", "int8-onnx", "int8-openvino")
    }
    torch_numbers = numbers({key: reports["torch"][key] for key in ("results", "summary", "calibration")})
    fp32 = numbers({key: reports["fp32-onnx"][key] for key in ("results", "summary", "calibration")})
    assert fp32.keys() == torch_numbers.keys()
    for path, value in torch_numbers.items():
        assert fp32[path] == pytest.approx(value, abs=0.01), path
        if path[-1] in ("accuracy", "n"):
            assert fp32[path] == value, path
    assert reports["fp32-onnx"]["backend"] == {"name": "onnx", "precision": "fp32", "exact": True}
    for run in ("int8-onnx", "int8-openvino"):
        assert reports[run]["backend"]["precision"] == "int8"
        assert numbers(reports[run]["results"]).keys() == numbers(reports["torch"]["results"]).keys()
    manifest = json.loads((tmp_path / "int8" / "manifest.json").read_text())
    from datasets import load_from_disk

    faces = min(128, len(load_from_disk(prepared["utkface"])["train"]))  # --calibration's train split, up to 128
    assert manifest["precision"] == "int8" and manifest["quantization"]["calibration_faces"] == faces
    assert json.loads((tmp_path / "fp32" / "manifest.json").read_text())["precision"] == "fp32"


# ------------------------------------------------------------------------------------------ bad input
def test_a_folder_that_is_not_prepared_names_the_command(tmp_path, tiny_clip_dir, capsys):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "photo.jpg").write_bytes(b"x")
    assert run_cli("--model", f"clip:{tiny_clip_dir}", "--data", tmp_path / "raw", "--out", tmp_path / "eval") == 2
    error = capsys.readouterr().err
    assert "not a prepared dataset" in error and "photo.jpg" in error and "python -m train.data prepare" in error


def test_a_missing_split_is_named(prepared, tiny_clip_dir, tmp_path, capsys):
    args = ("--data", prepared["rafdb"], "--split", "val", "--out", tmp_path / "eval")  # never outputs/ here
    assert run_cli("--model", f"clip:{tiny_clip_dir}", *args) == 2
    error = capsys.readouterr().err
    assert "no 'val' split" in error and "['test', 'train', 'validation']" in error


def test_a_model_with_other_labels_is_refused(prepared, tiny_config, tmp_path, capsys):
    from softbio_hf import SoftBioConfig

    config = SoftBioConfig(
        vision_config=tiny_config.vision_config.to_dict(),
        projection_dim=16,
        tasks={"gender": ["female", "male"]},
    )
    SoftBioModel(config).save_pretrained(tmp_path / "swapped")
    args = ("--data", prepared["fairface"], "--split", "train", "--out", tmp_path / "eval")
    assert run_cli("--model", tmp_path / "swapped", *args) == 2
    error = capsys.readouterr().err
    assert "'gender'" in error and "['female', 'male']" in error and "['male', 'female']" in error


def test_an_unloadable_model_says_what_to_pass(prepared, tmp_path, capsys):
    args = ("--data", prepared["rafdb"], "--split", "train", "--out", tmp_path / "eval")
    assert run_cli("--model", tmp_path / "nothing-here", *args) == 2
    assert "clip:ID_OR_FOLDER" in capsys.readouterr().err


def test_a_calibration_split_too_small_for_the_level_is_said_and_not_saved(prepared, tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "model")
    out = tmp_path / "eval"
    args = ("--model", tmp_path / "model", "--data", prepared["utkface"], "--out", out, "--dtype", "float32")
    assert run_cli(*args, "--bootstrap", 0, "--limit", 5, "--conformal", 0.9, "--calibration-split", "train") == 0
    error = capsys.readouterr().err
    assert "is too small for level 0.9" in error and "The smallest split that fits holds 9 labelled rows" in error
    assert "calibration.conformal.too_small in its config.json" in error
    conformal = json.loads((out / "results.json").read_text())["conformal"]
    assert {entry["task"]: (entry["rows"], entry["needed"]) for entry in conformal["too_small"]}["age"] == (5, 9)
    assert "**Warning:** the calibration split 'train' is too small" in (out / "report.md").read_text()
    saved = SoftBioModel.from_pretrained(out / "calibrated").config.calibration["conformal"]
    assert saved["too_small"] == conformal["too_small"]  # never shipped as if fitted


def test_a_bootstrap_beyond_the_cap_is_refused_before_any_work(capsys):
    assert run_cli("--model", "never-loaded", "--data", "nowhere", "--bootstrap", 10_000_000) == 2
    error = capsys.readouterr().err
    assert "--bootstrap 10000000: give 0 (no intervals) to 10,000 replicates" in error


def test_ctrl_c_during_the_bootstrap_is_a_message_not_a_traceback(prepared, tiny_model, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    tiny_model.save_pretrained(tmp_path / "model")
    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "train.evaluate", "--model", str(tmp_path / "model"), "--data"]
    command += [prepared["utkface"], "--out", str(tmp_path / "eval"), "--bootstrap", "10000", "--num-workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=repo, env=env, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "utkface" not in seen and process.poll() is None:  # the progress bar: inside the command, not its imports
        seen += process.stderr.read(1)
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=300)  # a bound to catch a hang, not a timing
    assert process.returncode == 130, seen + rest
    assert "interrupted: stopped before writing results.json" in rest and "Traceback" not in seen + rest
    assert not (tmp_path / "eval" / "results.json").exists()


def test_a_tiny_build_and_its_evaluation_print_no_warning_that_is_not_ours(prepared, tmp_path):
    """The offline route as a newcomer runs it (`python -m softbio_hf.tiny`, then train.evaluate on it): no
    library warning that says nothing to act on (the pipeline registered twice, among them)."""
    import os
    import subprocess
    import sys

    from noise import foreign_warnings

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}

    def command(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr

    built = command("softbio_hf.tiny", "tiny")
    assert foreign_warnings(built) == [] and "already registered" not in built, built[-3000:]
    evaluated = command(
        "train.evaluate", "--model", "tiny/softbio", "--data", prepared["utkface"], "--split", "train", "--out", "eval"
    )
    assert foreign_warnings(evaluated) == [], evaluated[-3000:]
