"""Honest uncertainty: conformal sets keep their coverage and match crepes; bootstrap intervals cover the truth;
compare tells a real difference from noise; the pipeline, the batch command and evaluate carry the sets."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
from crepes import ConformalClassifier

from softbio_hf.conformal import conformity_scores, label_set, prediction_sets
from train.evaluate import main
from train.report import write_outcomes
from train.uncertainty import draw_accuracies, fit_thresholds, interval

LEVEL = 0.9
K = 9


def known_model(rng: np.random.Generator, n: int, prior: np.ndarray | None = None):
    """Probabilities from random logits and labels drawn FROM those probabilities (the model is exactly right),
    optionally reweighted by a class prior so some classes are rare."""
    probs = np.exp(rng.normal(0, 1.5, size=(n, K)) + (0 if prior is None else np.log(prior)))
    probs /= probs.sum(axis=1, keepdims=True)
    labels = (probs.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1)
    return probs, np.minimum(labels, K - 1)


def covered(probs, labels, thresholds, score) -> np.ndarray:
    calibration = {"conformal": {"score": score, "thresholds": {"age": thresholds}}}
    inside = prediction_sets(probs, calibration, "age")
    return inside[np.arange(len(labels)), labels]


def tolerance(n_cal: float, n_test: float, seeds: int) -> float:
    """4 standard deviations of the mean coverage over seeds (calibration and test draws are both binomial)."""
    return 4 * math.sqrt(LEVEL * (1 - LEVEL) * (1 / (n_cal + 2) + 1 / n_test) / seeds)


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_marginal_coverage_is_the_level_over_many_seeds(score):
    seeds, n_cal, n_test = 200, 300, 1000
    rates = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        cal_p, cal_y = known_model(rng, n_cal)
        test_p, test_y = known_model(rng, n_test)
        rates.append(covered(test_p, test_y, fit_thresholds(cal_p, cal_y, LEVEL, score, False), score).mean())
    # Split conformal: LEVEL <= E[coverage] <= LEVEL + 1/(n+1)
    slack = tolerance(n_cal, n_test, seeds)
    assert LEVEL - slack <= np.mean(rates) <= LEVEL + 1 / (n_cal + 1) + slack


def test_class_conditional_coverage_holds_for_each_class_where_the_marginal_one_does_not():
    prior = np.array([0.02, 0.04, 0.1, 0.2, 0.2, 0.2, 0.14, 0.06, 0.04])  # rare youngest and oldest groups
    seeds, n_cal, n_test = 150, 2000, 4000
    per_class, marginal_rare = np.zeros((seeds, K)), []
    for seed in range(seeds):
        rng = np.random.default_rng(1000 + seed)
        cal_p, cal_y = known_model(rng, n_cal, prior)
        test_p, test_y = known_model(rng, n_test, prior)
        hit = covered(test_p, test_y, fit_thresholds(cal_p, cal_y, LEVEL, "lac", True), "lac")
        per_class[seed] = [hit[test_y == c].mean() for c in range(K)]
        marginal = covered(test_p, test_y, fit_thresholds(cal_p, cal_y, LEVEL, "lac", False), "lac")
        marginal_rare.append(marginal[test_y == 0].mean())
    for c in range(K):
        n_c = prior[c] * n_cal
        slack = tolerance(n_c, prior[c] * n_test, seeds)
        assert LEVEL - slack <= per_class[:, c].mean() <= LEVEL + 1 / (n_c + 1) + slack, c
    assert np.mean(marginal_rare) < LEVEL - 0.05  # why Mondrian: on average is not for every group


def on_the_boundary(n: int) -> bool:
    """(n+1) x level is a whole number: there crepes (p-value >= 1 - level) admits one more order statistic than
    the textbook rank ceil((n+1) level) that we and MAPIE use; both keep the guarantee."""
    return abs((n + 1) * LEVEL - round((n + 1) * LEVEL)) < 1e-9


@pytest.mark.parametrize("score", ["lac", "aps"])
@pytest.mark.parametrize("class_conditional", [False, True])
def test_sets_and_thresholds_equal_crepes(score, class_conditional):
    rng = np.random.default_rng(7)
    cal_p, cal_y = known_model(rng, 400)
    test_p, _ = known_model(rng, 300)
    thresholds = fit_thresholds(cal_p, cal_y, LEVEL, score, class_conditional)
    ours = prediction_sets(test_p, {"conformal": {"score": score, "thresholds": {"age": thresholds}}}, "age")
    cal_scores = conformity_scores(cal_p, score)[np.arange(len(cal_y)), cal_y]
    test_scores = conformity_scores(test_p, score)
    reference = ConformalClassifier().fit(cal_scores, bins=cal_y if class_conditional else None)
    compared = 0
    for c in range(K):  # Mondrian over the label: each candidate label is judged among its own class's rows
        pool = np.sort(cal_scores[cal_y == c] if class_conditional else cal_scores)
        bins = (lambda rows, c=c: np.full(rows, c)) if class_conditional else (lambda rows: None)
        theirs = reference.predict_set(
            test_scores[:, c : c + 1], bins=bins(len(test_p)), confidence=LEVEL, smoothing=False
        )
        admitted = reference.predict_p(pool[:, None], bins=bins(len(pool)), smoothing=False)[:, 0] >= 1 - LEVEL
        rank = math.ceil((len(pool) + 1) * LEVEL - 1e-9)
        if on_the_boundary(len(pool)):
            assert pool[admitted].max() == pool[rank]  # crepes' convention: the next order statistic
            continue
        np.testing.assert_array_equal(ours[:, c], theirs[:, 0].astype(bool))
        assert thresholds[c] == pool[admitted].max()
        compared += 1
    assert compared >= K - 2
    if not class_conditional:
        np.testing.assert_array_equal(
            ours.sum(axis=1), reference.predict_set(test_scores, confidence=LEVEL, smoothing=False).sum(1)
        )


def test_too_few_calibration_rows_give_every_label_not_a_false_promise():
    probs, labels = known_model(np.random.default_rng(0), 5)
    assert fit_thresholds(probs, labels, LEVEL, "lac", False) == [None] * K
    sets = prediction_sets(probs, {"conformal": {"score": "lac", "thresholds": {"age": [None] * K}}}, "age")
    assert sets.all()


def test_label_set_is_ordered_by_probability_and_absent_without_thresholds():
    calibration = {"conformal": {"score": "lac", "thresholds": {"gender": [0.7, 0.7]}}}
    assert label_set([0.4, 0.6], ["male", "female"], calibration, "gender") == ["female", "male"]
    assert label_set([0.1, 0.9], ["male", "female"], calibration, "gender") == ["female"]
    assert label_set([0.1, 0.9], ["male", "female"], None, "gender") is None
    assert label_set([0.1, 0.9], ["male", "female"], calibration, "age") is None
    with pytest.raises(ValueError, match="--conformal"):
        prediction_sets(np.ones((1, 3)) / 3, calibration, "gender")


def test_the_set_module_imports_neither_torch_nor_transformers():
    code = (
        "import importlib.util, sys; spec = importlib.util.spec_from_file_location('c', 'softbio_hf/conformal.py');"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec));"
        "assert not {'torch', 'transformers'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------- bootstrap


def test_the_bootstrap_interval_covers_the_true_accuracy_at_its_level():
    seeds, n, truth = 200, 300, 0.72
    hits = 0
    for seed in range(seeds):
        outcome = (np.random.default_rng(seed).random(n) < truth).astype(np.int8)
        drawn = draw_accuracies([{"d": {"gender": outcome}}], 500, seed)[0]["d"]["gender"]
        low, high = interval(drawn)
        hits += low <= 100 * truth <= high
    assert abs(hits / seeds - 0.95) < 4 * math.sqrt(0.95 * 0.05 / seeds) + 0.01


def write_run(folder, outcome: np.ndarray) -> str:
    folder.mkdir()
    accuracy = 100 * float(outcome.mean())
    summary = {"emotion": None, "age": None, "gender": accuracy, "overall": accuracy}
    (folder / "results.json").write_text(json.dumps({"name": folder.name, "results": {}, "summary": summary}))
    write_outcomes(folder, {"utkface": {"gender": outcome}})
    return str(folder / "results.json")


def test_compare_flags_a_real_difference_and_not_noise(tmp_path, capsys):
    rng = np.random.default_rng(3)
    n = 2000
    base = (rng.random(n) < 0.75).astype(np.int8)
    better = np.where(rng.random(n) < 0.3, 1, base).astype(np.int8)  # fixes ~30% of the errors: +7.5 points
    noisy = base.copy()
    right, wrong = np.flatnonzero(base == 1), np.flatnonzero(base == 0)
    noisy[rng.choice(right[1:], 15, replace=False)] = 0  # 15 rows change each way: a rerun's disagreement, no gain
    noisy[rng.choice(wrong[1:], 15, replace=False)] = 1
    base[0] = -1  # an unlabelled row, the same in every run
    better[0], noisy[0] = -1, -1
    runs = [write_run(tmp_path / name, o) for name, o in (("zs", base), ("lora", better), ("rerun", noisy))]
    assert main(["compare", *runs, "--baseline", "zs"]) == 0
    out = capsys.readouterr().out
    assert "lora vs zs" in out and "a real difference" in out.split("lora vs zs")[1].splitlines()[0]
    assert "within noise" in out.split("rerun vs zs")[1].splitlines()[0]


# ------------------------------------------------------------------------------- the pipeline and the batch table


def test_the_pipeline_returns_the_set_only_when_the_model_holds_thresholds(tiny_model, tmp_path):
    from transformers import pipeline

    import softbio_hf  # noqa: F401  registers the task

    face = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    plain = pipeline("soft-biometrics", model=tiny_model, dtype="float32")(face, detector="none")[0]
    assert all("set" not in plain[task] for task in ("age", "gender", "emotion"))
    thresholds = {"age": [0.95] * 9, "gender": [1.0, 1.0]}  # gender: every label; age: p >= 0.05
    tiny_model.config.calibration = {"conformal": {"level": 0.9, "score": "lac", "thresholds": thresholds}}
    tiny_model.save_pretrained(tmp_path / "with-sets")
    from softbio_hf import SoftBioModel

    loaded = SoftBioModel.from_pretrained(tmp_path / "with-sets")  # the thresholds travel in config.json
    record = pipeline("soft-biometrics", model=loaded, dtype="float32")(face, detector="none")[0]
    assert record["gender"]["set"] == sorted(record["gender"]["scores"], key=record["gender"]["scores"].get)[::-1]
    expected = [label for label, p in record["age"]["scores"].items() if p >= 0.05 - 1e-4]
    assert set(record["age"]["set"]) == set(expected) and record["age"]["set"][0] == record["age"]["label"]
    assert "set" not in record["emotion"]


def test_the_batch_table_has_a_set_column_per_task_with_thresholds():
    from softbio_hf.batch_rows import columns, rows_for

    tasks = {"age": ["0-2", "3-9"], "gender": ["male", "female"]}
    names = columns(tasks, probabilities=False, sets=["gender"])
    assert "gender_set" in names and "age_set" not in names
    record = {
        "box": {"xmin": 0, "ymin": 0, "xmax": 1, "ymax": 1},
        "detection_score": 1.0,
        "age": {"label": "3-9", "score": 0.6, "scores": {}},
        "gender": {"label": "female", "score": 0.55, "scores": {}, "set": ["female", "male"]},
    }
    row = rows_for({"index": 0, "key": "a.jpg"}, [record], tasks, probabilities=False)[0]
    assert row["gender_set"] == "female|male" and "age_set" not in row


# ------------------------------------------------------------------------------- thresholds checked at load
BAD_CONFORMAL = {
    "NaN": ({"score": "lac", "thresholds": {"gender": [float("nan"), 0.5]}}, "holds nan"),
    "above 1": ({"score": "lac", "thresholds": {"gender": [1.5, 1.5]}}, "holds 1.5"),
    "wrong length": ({"score": "lac", "thresholds": {"gender": [0.5, 0.5, 0.5]}}, "one threshold per label (2)"),
    "no score": ({"thresholds": {"gender": [0.5, 0.5]}}, "score is None"),
    "unknown task": ({"score": "aps", "thresholds": {"race": [0.5, 0.5]}}, "names 'race', not a task"),
}


@pytest.mark.parametrize("case", list(BAD_CONFORMAL))
def test_thresholds_that_would_answer_wrongly_are_refused_when_the_model_loads(case, tiny_model, tmp_path):
    from softbio_hf import SoftBioModel
    from softbio_hf.batch_rows import load_model

    conformal, said = BAD_CONFORMAL[case]
    tiny_model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "calibration": {"conformal": {"level": 0.9, **conformal}}}))
    with pytest.raises(ValueError, match=r"config\.json: calibration\.conformal") as raised:
        SoftBioModel.from_pretrained(tmp_path / "m")
    assert said in str(raised.value) and "python -m train.evaluate" in str(raised.value)
    with pytest.raises(ValueError, match=re.escape(f"--model {tmp_path / 'm'}")):  # batch command, evaluate, server
        load_model(str(tmp_path / "m"))


@pytest.mark.parametrize("case", list(BAD_CONFORMAL))
def test_an_exports_manifest_with_such_thresholds_is_refused_naming_it(case, tmp_path):
    from softbio_hf.runtimes import ExportInvalid, answer_digest, read_manifest

    conformal, said = BAD_CONFORMAL[case]
    manifest = {"formats": ["onnx"], "tasks": ["gender"], "labels": {"gender": ["male", "female"]}, "image_size": 8}
    manifest |= {"image_mean": [0, 0, 0], "image_std": [1, 1, 1], "batch": "dynamic", "digests": {}}
    bad = {**manifest, "calibration": {"conformal": conformal}}  # as an export would write it: its digest fits
    (tmp_path / "manifest.json").write_text(json.dumps({**bad, "answer_digest": answer_digest(bad)}))
    said_first = re.escape(f"{tmp_path / 'manifest.json'}: calibration.conformal")
    with pytest.raises(ExportInvalid, match=said_first) as raised:
        read_manifest(tmp_path)  # what the light runtime, the server and pipeline(backend=...) read first
    assert said in str(raised.value)
    fine = {**manifest, "calibration": {"conformal": {}}}
    (tmp_path / "manifest.json").write_text(json.dumps({**fine, "answer_digest": answer_digest(fine)}))
    assert read_manifest(tmp_path)["tasks"] == ["gender"]  # no thresholds: no sets, as before


@pytest.mark.parametrize("damage", ["torn", "foreign"])
def test_compare_names_a_torn_rows_file(damage, tmp_path, capsys):
    outcome = (np.random.default_rng(0).random(200) < 0.7).astype(np.int8)
    runs = [write_run(tmp_path / name, outcome) for name in ("zs", "lora")]
    rows = tmp_path / "lora" / "rows.npz"
    rows.write_bytes(rows.read_bytes()[: rows.stat().st_size // 2] if damage == "torn" else b"not a zip archive")
    assert main(["compare", *runs]) == 2
    error = capsys.readouterr().err
    assert f"{rows} is damaged" in error and "--bootstrap N" in error and "Traceback" not in error
