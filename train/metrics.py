"""The metrics' maths, on numpy arrays: accuracy, balanced accuracy, macro F1, 1-off, MAE, ECE and reliability,
per-group accuracy, the study's summary row, and temperature fitting. No model and no files here: the one
implementation that evaluation, training's validation and the reports share. Accuracies, F1 and ECE in percent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from train.schema import IGNORE, SYNTHETIC_AGE_DATASETS

ECE_BINS = 15


SUMMARY_TASKS = ("emotion", "age", "gender")  # the study's Table 4.11 column order


FAIRNESS_MIN_GROUPS = 2


MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, Any]:
    """
    Accuracy, balanced accuracy (mean recall over the classes present in y_true) and macro F1 (over the classes
    present in y_true or y_pred, as scikit-learn does), in percent; n rows.
    """
    matrix = confusion_matrix(y_true, y_pred, num_classes)
    true_counts, pred_counts, hits = matrix.sum(1), matrix.sum(0), np.diag(matrix)
    present = true_counts > 0
    recall = hits[present] / true_counts[present]
    scored = present | (pred_counts > 0)
    f1 = 2 * hits[scored] / (true_counts[scored] + pred_counts[scored])
    return {
        "accuracy": 100 * float(hits.sum() / len(y_true)),
        "balanced_accuracy": 100 * float(recall.mean()),
        "macro_f1": 100 * float(f1.mean()),
        "n": len(y_true),
    }


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Confidence (top probability) in `bins` equal-width bins: mean confidence, accuracy and count per bin."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        rows.append(
            {
                "lower": b / bins,
                "upper": (b + 1) / bins,
                "confidence": float(confidence[inside].mean()) if count else float("nan"),
                "accuracy": float(correct[inside].mean()) if count else float("nan"),
                "count": count,
            }
        )
    return rows


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE in percent: sum over bins of (rows in bin / rows) x |accuracy - mean confidence|."""
    total = len(labels)
    gaps = [r["count"] / total * abs(r["accuracy"] - r["confidence"]) for r in reliability_bins(probs, labels, bins)]
    return 100 * float(sum(g for g in gaps if not math.isnan(g)))


def task_metrics(
    task: str,
    logits: np.ndarray,
    labels: np.ndarray,
    age_years: np.ndarray | None = None,
    bin_years=None,
    bin_labels=None,
) -> dict[str, Any] | None:
    """Metrics over the rows labelled for `task` (None when there are none): see classification_metrics;
    age adds one-bin-off accuracy and, where rows carry exact ages, the MAE of the years the pipeline reports
    (`expected_age_years`, given the bins' representative ages and labels)."""
    labelled = labels != IGNORE
    if not labelled.any():
        return None
    logits, labels = logits[labelled], labels[labelled]
    predicted = logits.argmax(axis=1)
    metrics = classification_metrics(labels, predicted, logits.shape[1])
    probs = softmax(logits)
    if task == "age":
        metrics["one_off_accuracy"] = 100 * float((np.abs(predicted - labels) <= 1).mean())
        if age_years is not None and bin_years is not None:
            exact = age_years[labelled]
            known = ~np.isnan(exact)
            if known.any():
                import torch

                from softbio_hf.modeling_softbio import expected_age_years

                expected = expected_age_years(torch.from_numpy(probs[known]), bin_years, bin_labels).numpy()
                metrics["mae_years"] = float(np.abs(expected - exact[known]).mean())
    metrics["ece"] = expected_calibration_error(probs, labels)
    metrics["nll"] = negative_log_likelihood(logits, labels)
    return metrics


def group_accuracy(correct: np.ndarray, groups: Sequence[Any]) -> dict[str, Any] | None:
    """Accuracy per group, the worst group and the largest gap; None with fewer than two groups."""
    table: dict[str, dict[str, Any]] = {}
    for group in sorted({g for g in groups if g is not None}, key=str):
        inside = np.array([g == group for g in groups])
        table[str(group)] = {"accuracy": 100 * float(correct[inside].mean()), "n": int(inside.sum())}
    if len(table) < FAIRNESS_MIN_GROUPS:
        return None
    worst = min(table, key=lambda g: table[g]["accuracy"])
    best = max(table, key=lambda g: table[g]["accuracy"])
    return {
        "groups": table,
        "worst_group": worst,
        "worst_accuracy": table[worst]["accuracy"],
        "gap": table[best]["accuracy"] - table[worst]["accuracy"],
    }


@dataclass
class Predictions:
    """One dataset's logits and labels per task, in dataset order, with the columns fairness and MAE need."""

    logits: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    age_years: np.ndarray
    race: list[str | None]
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.age_years)


def dataset_results(predictions: Predictions, config) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Per-task metrics and fairness tables of one dataset, plus notes on what was left out."""
    results, fairness, notes = {}, {}, []
    gender = predictions.labels.get("gender")
    for task, logits in predictions.logits.items():
        labels = predictions.labels[task]
        metrics = task_metrics(task, logits, labels, predictions.age_years, config.age_years, config.tasks[task])
        if metrics is None:
            notes.append(f"{task}: no labelled rows, left out")
            continue
        results[task] = metrics
        labelled = labels != IGNORE
        correct = logits[labelled].argmax(axis=1) == labels[labelled]
        by_group = {}
        races = [r for r, keep in zip(predictions.race, labelled, strict=True) if keep]
        if any(races):
            by_group["race"] = group_accuracy(correct, races)
        if gender is not None and task != "gender":
            genders = [config.tasks["gender"][g] if g != IGNORE else None for g in gender[labelled]]
            if any(genders):
                by_group["gender"] = group_accuracy(correct, genders)
        by_group = {k: v for k, v in by_group.items() if v is not None}
        if by_group:
            fairness[task] = by_group
    return results, fairness, notes


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarize(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """
    The study's Table 4.11 row: emotion, age averaged over the datasets with real ages, gender averaged over the
    datasets, overall the mean of those three (of the ones available). Synthetic ages are reported apart.
    """

    def accuracies(task: str, keep=lambda name: True) -> list[float]:
        return [r[task]["accuracy"] for name, r in results.items() if task in r and keep(name)]

    summary: dict[str, Any] = {
        "emotion": _mean(accuracies("emotion")),
        "age": _mean(accuracies("age", lambda name: name not in SYNTHETIC_AGE_DATASETS)),
        "gender": _mean(accuracies("gender")),
    }
    available = [summary[t] for t in SUMMARY_TASKS if summary[t] is not None]
    summary["overall"] = _mean(available)
    synthetic = {n: r["age"]["accuracy"] for n, r in results.items() if "age" in r and n in SYNTHETIC_AGE_DATASETS}
    if synthetic:
        summary["synthetic_age"] = synthetic
    return summary


def calibration_table(predictions: Mapping[str, Predictions], temperatures: Mapping[str, float] | None = None):
    """ECE per task over all datasets pooled; with temperatures, before and after dividing the logits by them."""
    table = {}
    for task in {t for p in predictions.values() for t in p.logits}:
        logits, labels = pooled(predictions, task)
        if not len(labels):
            continue
        row = {"ece": expected_calibration_error(softmax(logits), labels), "n": len(labels)}
        if temperatures and task in temperatures:
            scaled = logits / temperatures[task]
            row.update(
                temperature=float(temperatures[task]),
                ece_after=expected_calibration_error(softmax(scaled), labels),
                nll_before=negative_log_likelihood(logits, labels),
                nll_after=negative_log_likelihood(scaled, labels),
            )
        table[task] = row
    return dict(sorted(table.items()))


def pooled(predictions: Mapping[str, Predictions], task: str) -> tuple[np.ndarray, np.ndarray]:
    """One task's labelled logits and labels over all datasets."""
    logits, labels = [], []
    for p in predictions.values():
        if task in p.labels:
            keep = p.labels[task] != IGNORE
            logits.append(p.logits[task][keep])
            labels.append(p.labels[task][keep])
    if not logits:
        return np.zeros((0, 1), np.float32), np.zeros(0, np.int64)
    return np.concatenate(logits), np.concatenate(labels)


def build_results(predictions: Mapping[str, Predictions], config, temperatures=None) -> dict[str, Any]:
    """results / summary / fairness / calibration / notes for predictions of several datasets."""
    results, fairness, notes = {}, {}, {}
    for name, preds in predictions.items():
        results[name], fair, dataset_notes = dataset_results(preds, config)
        if fair:
            fairness[name] = fair
        if dataset_notes or preds.notes:
            notes[name] = preds.notes + dataset_notes
    return {
        "results": results,
        "summary": summarize(results),
        "fairness": fairness,
        "calibration": calibration_table(predictions, temperatures),
        "notes": notes,
    }


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) (LBFGS on log T)."""
    import torch

    x = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    # A head that is no better than chance drives T to infinity; a bounded T keeps the saved weights usable.
    return min(max(temperature, MIN_TEMPERATURE), MAX_TEMPERATURE) if math.isfinite(temperature) else 1.0


def fit_temperatures(predictions: Mapping[str, Predictions]) -> dict[str, float]:
    tasks = sorted({t for p in predictions.values() for t in p.logits})
    fitted = {}
    for task in tasks:
        logits, labels = pooled(predictions, task)
        if len(labels):
            fitted[task] = fit_temperature(logits, labels)
    return fitted
