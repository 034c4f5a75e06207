"""Evaluate softbio models on prepared benchmarks: the study's tables, per-group fairness and calibration.

    python -m train.evaluate --model runs/lora/best --data data/utkface data/fairface data/rafdb --out runs/lora/eval
    python -m train.evaluate --model clip:openai/clip-vit-large-patch14-336 --data data/rafdb   # the ZS row
    python -m train.evaluate compare runs/zs/eval/results.json runs/lora/eval/results.json --baseline zs

The metrics here are the only implementation: training validates and picks its best checkpoint with
`evaluate_datasets` and `summarize` from this module. Accuracies, F1 and ECE are in percent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from train.data import is_finite_number

IGNORE = -100
ECE_BINS = 15
SUMMARY_TASKS = ("emotion", "age", "gender")  # the study's Table 4.11 column order
FAIRNESS_MIN_GROUPS = 2
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
PREPARE_HINT = "python -m train.data prepare --dataset NAME --root DATASET_FOLDER --out {path}"


class EvaluationError(ValueError):
    """A user error (bad folder, incompatible model, bad option): reported without a traceback, exit code 2."""


# ------------------------------------------------------------------------------------------- metrics
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


# ---------------------------------------------------------------------------------------- predictions
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


def data_tasks() -> dict[str, tuple[str, ...]]:
    from train.data import task_labels

    return task_labels()


def evaluated_tasks(config) -> list[str]:
    """The model's tasks that the unified schema labels; refuses a model whose label order differs from it."""
    schema = data_tasks()
    problems = [
        f"{task!r}: the model's labels are {labels}, the data's are {list(schema[task])}"
        for task, labels in config.tasks.items()
        if task in schema and list(labels) != list(schema[task])
    ]
    if problems:
        raise EvaluationError(
            "The model's label lists differ from the prepared data's (same names in the same order are needed): "
            + "; ".join(problems)
            + ". Evaluate a model trained on the canonical labels, or re-map its heads first."
        )
    return [task for task in config.tasks if task in schema]


def predict(
    model,
    dataset,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    accelerator=None,
    desc: str = "evaluate",
) -> Predictions:
    """
    Logits of every row of `dataset` (one split in the unified schema). Under an `accelerate.Accelerator` the
    rows are shared between processes and collected with `gather_for_metrics` (none twice, none lost); every
    process gets the full predictions.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from softbio_hf import image_processor_for
    from train.data import SoftBioCollator

    core = accelerator.unwrap_model(model) if accelerator is not None else model
    tasks = evaluated_tasks(core.config)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=SoftBioCollator(image_processor_for(core.config)),
        num_workers=num_workers,
        persistent_workers=False,
    )
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader, device_placement=True)
    device, dtype = core.device, core.dtype
    logits: dict[str, list[np.ndarray]] = {task: [] for task in tasks}
    labels: dict[str, list[np.ndarray]] = {task: [] for task in tasks}
    was_training = model.training
    model.eval()
    main = accelerator is None or accelerator.is_main_process
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        for batch in tqdm(loader, desc=desc, unit="batch", disable=not main, leave=False):
            pixel_values = batch["pixel_values"].to(device=device, dtype=dtype)
            out = {task: value.float() for task, value in model(pixel_values=pixel_values).logits.items()}
            batch_labels = {task: batch[task].to(device) for task in tasks}
            if accelerator is not None:
                out, batch_labels = accelerator.gather_for_metrics((out, batch_labels))
            for task in tasks:
                logits[task].append(out[task].cpu().numpy())
                labels[task].append(batch_labels[task].cpu().numpy())
    model.train(was_training)
    gathered = sum(len(chunk) for chunk in next(iter(labels.values()), []))
    if tasks and gathered != len(dataset):  # gather_for_metrics must drop the padding of the last batch
        raise RuntimeError(f"{desc}: gathered {gathered} predictions for {len(dataset)} rows.")
    width = {task: len(core.config.tasks[task]) for task in tasks}
    for task, chunks in logits.items():
        broken = sum(int((~np.isfinite(chunk)).any(axis=1).sum()) for chunk in chunks)
        if broken:  # argmax would score them as class 0: a diverged model would get a number
            raise EvaluationError(
                f"{desc}: the model gives non-finite {task} logits for {broken} of {len(dataset)} rows; its weights "
                "are broken (a diverged training run?). Evaluate another checkpoint, or train again with a lower "
                "learning rate."
            )
    years = np.array([np.nan if y is None else y for y in dataset["age_years"]], dtype=np.float64)
    return Predictions(
        logits={t: np.concatenate(v) if v else np.zeros((0, width[t]), np.float32) for t, v in logits.items()},
        labels={t: np.concatenate(v) if v else np.zeros(0, np.int64) for t, v in labels.items()},
        age_years=years,
        race=list(dataset["race"]),
    )


# ------------------------------------------------------------------------------------------- results
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
    from train.data import SYNTHETIC_AGE_DATASETS

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


def evaluate_datasets(
    model, datasets: Mapping[str, Any], *, batch_size: int = 64, num_workers: int = 0, accelerator=None
) -> dict[str, Any]:
    """What training calls on its validation sets: model + {name: split} -> the same dictionary as results.json."""
    predictions = {
        name: predict(
            model, data, batch_size=batch_size, num_workers=num_workers, accelerator=accelerator, desc=f"eval {name}"
        )
        for name, data in datasets.items()
    }
    core = accelerator.unwrap_model(model) if accelerator is not None else model
    return build_results(predictions, core.config)


# ------------------------------------------------------------------------------------------ calibration
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


def apply_temperatures(model, temperatures: Mapping[str, float], fitted_on: str) -> None:
    """
    Fold T into each head's last linear layer (weights and bias / T): the logits become logits / T, so the
    saved model's probabilities are calibrated with no change at inference time. Recorded in the config.
    """
    import torch

    previous = (model.config.calibration or {}).get("temperatures", {})
    with torch.no_grad():
        for task, temperature in temperatures.items():
            classifier = model.heads[task].classifier
            classifier.weight.div_(temperature)
            classifier.bias.div_(temperature)
    combined = {t: previous.get(t, 1.0) * temperatures.get(t, 1.0) for t in sorted(set(previous) | set(temperatures))}
    model.config.calibration = {"temperatures": combined, "fitted_on": fitted_on}


# ------------------------------------------------------------------------------------- loading inputs
def open_split(path: str | Path, split: str, limit: int | None = None):
    """One split of a folder written by `python -m train.data prepare`, with errors that say what to do."""
    from datasets import DatasetDict, load_from_disk

    path = Path(path)
    hint = PREPARE_HINT.format(path=path)
    if not path.is_dir():
        raise EvaluationError(f"--data {path}: no such folder. Make one with: {hint}")
    try:
        loaded = load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as error:
        contents = sorted(p.name for p in path.iterdir())[:10]
        raise EvaluationError(
            f"--data {path} is not a prepared dataset (it holds {contents or 'nothing'}; {error}). "
            f"Make one with: {hint}"
        ) from error
    if not isinstance(loaded, DatasetDict):
        raise EvaluationError(f"--data {path} holds a single dataset, not the splits prepare writes. Re-run: {hint}")
    if split not in loaded:
        raise EvaluationError(
            f"--data {path} has no {split!r} split; it has {sorted(loaded)}. Choose one with --split, or re-run: {hint}"
        )
    data = loaded[split]
    missing = {"image", "age", "gender", "emotion", "age_years", "race", "dataset"} - set(data.column_names)
    if missing:
        raise EvaluationError(
            f"--data {path} lacks the columns {sorted(missing)} of the unified schema; re-run: {hint}"
        )
    from train.data import check_labels

    try:
        check_labels(data, str(path))
    except ValueError as error:
        raise EvaluationError(f"--data {error}") from None
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    return data


def dataset_name(data, path: Path, taken: set[str]) -> str:
    names = data.unique("dataset") if len(data) else []
    name = names[0] if len(names) == 1 else path.name
    return path.name if name in taken else name


def load_model(spec: str, *, device: str, dtype):
    """A softbio checkpoint (folder or Hub id), or `clip:ID_OR_FOLDER`: the zero-shot model built by from_clip."""
    from softbio_hf.predict import load_model as load_named_model  # the one reading of --model

    try:
        model = load_named_model(spec)
    except ValueError as error:
        raise EvaluationError(str(error)) from error
    return model.to(device=device, dtype=dtype).eval()


def resolve_device(name: str | None) -> str:
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise EvaluationError("--device cuda: this machine has no CUDA device; use --device cpu.")
    if name not in ("cpu", "cuda"):
        raise EvaluationError(f"--device {name!r}: use cpu or cuda.")
    return name


# ------------------------------------------------------------------------------------------- writing
def percent(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_table(rows: Sequence[tuple[str, Mapping[str, Any]]], baseline: str | None = None) -> str:
    """Markdown Table 4.11: one row per run; with a baseline, each cell also shows the difference to it."""
    base = dict(rows).get(baseline) if baseline else None
    lines = ["| model | emotion | age* | gender | overall |", "|---|---:|---:|---:|---:|"]
    for name, summary in rows:
        cells = []
        for key in (*SUMMARY_TASKS, "overall"):
            cell = percent(summary.get(key))
            if base is not None and name != baseline and summary.get(key) is not None and base.get(key) is not None:
                cell += f" ({summary[key] - base[key]:+.2f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_dataset_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    lines = [
        "| dataset | task | n | accuracy | balanced acc. | macro F1 | 1-off | MAE (years) | ECE |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, tasks in results.items():
        for task, m in tasks.items():
            mae = f"{m['mae_years']:.2f}" if "mae_years" in m else "-"
            lines.append(
                f"| {name} | {task} | {m['n']:,} | {percent(m['accuracy'])} | {percent(m['balanced_accuracy'])} | "
                f"{percent(m['macro_f1'])} | {percent(m.get('one_off_accuracy'))} | {mae} | {percent(m['ece'])} |"
            )
    return "\n".join(lines)


def fairness_table(fairness: Mapping[str, Any]) -> str:
    lines = ["| dataset | task | by | accuracy per group (n) | worst | gap |", "|---|---|---|---|---|---:|"]
    for name, tasks in fairness.items():
        for task, by in tasks.items():
            for kind, entry in by.items():
                groups = ", ".join(f"{g} {v['accuracy']:.1f} ({v['n']})" for g, v in entry["groups"].items())
                lines.append(
                    f"| {name} | {task} | {kind} | {groups} | {entry['worst_group']} "
                    f"({entry['worst_accuracy']:.1f}) | {entry['gap']:.2f} |"
                )
    return "\n".join(lines)


def calibration_markdown(calibration: Mapping[str, Any]) -> str:
    lines = [
        "| task | n | ECE % | temperature | ECE % after | NLL before | NLL after |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for task, row in calibration.items():
        lines.append(
            f"| {task} | {row['n']:,} | {row['ece']:.2f} | {percent(row.get('temperature'), 3)} | "
            f"{percent(row.get('ece_after'))} | {percent(row.get('nll_before'), 4)} | "
            f"{percent(row.get('nll_after'), 4)} |"
        )
    return "\n".join(lines)


def write_report(out: Path, report: Mapping[str, Any], plots: Sequence[str]) -> None:
    from train.data import SYNTHETIC_AGE_DATASETS

    summary = report["summary"]
    synthetic = summary.get("synthetic_age") or {}
    lines = [
        f"# Evaluation of `{report['model']}` on the {report['split']} split",
        "",
        "## Summary (accuracy %, as the study's Table 4.11)",
        "",
        summary_table([(report.get("name") or "model", summary)]),
        "",
        "\\* age averaged over the datasets with real ages; synthetic ages ("
        + ", ".join(sorted(SYNTHETIC_AGE_DATASETS))
        + ") are reported apart"
        + (": " + ", ".join(f"{k} {v:.2f}" for k, v in synthetic.items()) if synthetic else "")
        + ". Overall is the mean of the task columns.",
        "",
        "## Per dataset (as Table 4.12)",
        "",
        per_dataset_table(report["results"]),
        "",
        "Balanced accuracy is the mean recall over the classes present; macro F1 averages over the classes present "
        "in the labels or the predictions; 1-off counts an age bin next to the true one as right; MAE compares the "
        "age in years the model reports (the expected age over the bins, kept within the predicted bin) with the "
        "exact age, where the data has it. ECE: 15 confidence bins.",
        "",
        "## Fairness: accuracy per group",
        "",
        fairness_table(report["fairness"]) if report["fairness"] else "No dataset here carries race or gender groups.",
        "",
        "## Calibration",
        "",
        calibration_markdown(report["calibration"]),
        "",
    ]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {name}: {note}" for name, notes in report["notes"].items() for note in notes]
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    (out / "report.md").write_text("\n".join(lines))


def write_plots(out: Path, predictions: Mapping[str, Predictions], config, temperatures=None) -> list[str]:
    """A row-normalised confusion matrix per dataset and task, and a reliability diagram per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, preds in predictions.items():
        for task, logits in preds.logits.items():
            labelled = preds.labels[task] != IGNORE
            if not labelled.any():
                continue
            labels = config.tasks[task]
            matrix = confusion_matrix(preds.labels[task][labelled], logits[labelled].argmax(1), len(labels))
            normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
            size = 2.2 + 0.55 * len(labels)
            fig, ax = plt.subplots(figsize=(size, size))
            ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
            for (i, j), value in np.ndenumerate(normalised):
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value > 0.5 else "black",
                )
            ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
            ax.set_yticks(range(len(labels)), labels)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title(f"{name} {task} (n={int(labelled.sum())})")
            fig.tight_layout()
            file = f"confusion_{name}_{task}.png"
            fig.savefig(out / file, dpi=110)
            plt.close(fig)
            written.append(file)
    for task in sorted({t for p in predictions.values() for t in p.logits}):
        logits, labels = pooled(predictions, task)
        if not len(labels):
            continue
        fig, ax = plt.subplots(figsize=(4.2, 4.2))
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
        curves = [("model", logits)]
        if temperatures and task in temperatures:
            curves.append((f"T={temperatures[task]:.2f}", logits / temperatures[task]))
        for label, values in curves:
            probs = softmax(values)
            bins = [b for b in reliability_bins(probs, labels) if b["count"]]
            ece = expected_calibration_error(probs, labels)
            ax.plot(
                [b["confidence"] for b in bins],
                [b["accuracy"] for b in bins],
                marker="o",
                label=f"{label}, ECE {ece:.1f}%",
            )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"reliability: {task} (n={len(labels)})")
        ax.legend(loc="upper left", fontsize=7)
        fig.tight_layout()
        file = f"reliability_{task}.png"
        fig.savefig(out / file, dpi=110)
        plt.close(fig)
        written.append(file)
    return written


# ------------------------------------------------------------------------------------------------ CLI
def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from softbio_hf.pipeline_softbio import resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, torch.device(device))
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise EvaluationError(f"--dtype {args.dtype}: use auto, float32 or bfloat16.")
    out = writable_out(Path(args.out))  # before any inference: a wrong --out is said at once
    splits = open_splits(args.data, args.split, args.limit)  # every folder is checked before the model loads
    calibration_splits = {}
    if args.calibrate:
        for path, name in zip(args.data, splits, strict=True):
            try:
                calibration_splits[name] = open_split(path, args.calibration_split, args.limit)
            except EvaluationError:
                print(
                    f"note: {name} has no {args.calibration_split!r} split; not used to fit temperatures",
                    file=sys.stderr,
                )
        if not calibration_splits:
            raise EvaluationError(
                f"--calibrate: none of the datasets has a {args.calibration_split!r} split to fit on."
            )
    model = load_model(args.model, device=device, dtype=dtype)
    evaluated_tasks(model.config)
    options = {"batch_size": args.batch_size, "num_workers": args.num_workers}
    predictions = {name: predict(model, data, desc=name, **options) for name, data in splits.items()}
    temperatures = None
    if args.calibrate:
        fit_on = {
            name: predict(model, data, desc=f"{name} ({args.calibration_split})", **options)
            for name, data in calibration_splits.items()
        }
        temperatures = fit_temperatures(fit_on)
    report = {"model": args.model, "name": args.name or model_name(args.model), "split": args.split}
    if temperatures:
        calibrated = load_model(args.model, device="cpu", dtype=torch.float32)  # full precision, not the eval dtype
        apply_temperatures(calibrated, temperatures, fitted_on=args.calibration_split)
        calibrated.save_pretrained(out / "calibrated")
        report["calibrated_model"] = str(out / "calibrated")
    return write_evaluation(out, report, predictions, model.config, temperatures)


def writable_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise EvaluationError(f"--out {out} is a file; give a folder for results.json, report.md and the plots.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise EvaluationError(f"--out {out} cannot be written ({error.strerror}); choose a writable folder.") from None
    return out


def open_splits(paths: Sequence[str | Path], split: str, limit: int | None = None) -> dict[str, Any]:
    """Dataset name -> that split of each prepared folder (names made unique by the folder's name)."""
    splits: dict[str, Any] = {}
    for path in paths:
        data = open_split(path, split, limit)
        splits[dataset_name(data, Path(path), set(splits))] = data
    return splits


def write_evaluation(out: Path, report: dict[str, Any], predictions, config, temperatures=None) -> dict[str, Any]:
    """results.json, report.md and the plots for `predictions`; `report` holds model, name and split."""
    report["tasks"] = {task: list(labels) for task, labels in config.tasks.items()}  # what the scores refer to
    report.update(build_results(predictions, config, temperatures))
    report["plots"] = write_plots(out, predictions, config, temperatures)
    (out / "results.json").write_text(strict_json(report))
    write_report(out, report, report["plots"])
    return report


def strict_json(value: Any) -> str:
    """JSON that every parser reads: a metric that could not be computed (NaN, inf) is null, never bare NaN."""

    def finite(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: finite(v) for key, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [finite(v) for v in item]
        return item

    return json.dumps(finite(value), indent=2, allow_nan=False)


def model_name(spec: str) -> str:
    path = Path(spec.removeprefix("clip:"))
    name = path.parent.name if path.name == "best" else path.name
    return ("zs-" if spec.startswith("clip:") else "") + (name or spec)


def read_results(path: str | Path) -> dict[str, Any]:
    """A results.json written by this module; anything else is an EvaluationError that says so."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise EvaluationError(f"{path} is not a results.json written by python -m train.evaluate ({error}).") from None
    missing = [key for key in ("results", "summary") if not isinstance(report, dict) or key not in report]
    if missing:
        raise EvaluationError(f"{path} is not a results.json written by python -m train.evaluate (no {missing}).")
    problems = [] if isinstance(report["summary"], dict) else ["summary is not a mapping"]
    overall = report["summary"].get("overall") if not problems else None
    if not problems and not is_finite_number(overall):
        problems.append(f"summary.overall is {overall!r}, not a score")
    for dataset, tasks in (report["results"] if isinstance(report["results"], dict) else {}).items():
        for task, metrics in (tasks if isinstance(tasks, dict) else {}).items():
            absent = [
                k for k in RESULT_METRICS if not isinstance(metrics, dict) or not is_finite_number(metrics.get(k))
            ]
            if absent:
                problems.append(f"results.{dataset}.{task} has no finite {', '.join(absent)}")
    if problems:
        raise EvaluationError(
            f"{path} cannot be used: {'; '.join(problems[:3])}. It is not from a successful evaluation; evaluate the "
            "model again with python -m train.evaluate."
        )
    return report


RESULT_METRICS = ("n", "accuracy", "balanced_accuracy", "macro_f1", "ece")


def compare(paths: Sequence[str], names: Sequence[str] | None, baseline: str | None) -> str:
    if names and len(names) != len(paths):
        raise EvaluationError(f"--names gives {len(names)} names for {len(paths)} runs.")
    rows = []
    for index, path in enumerate(paths):
        report = read_results(path)
        name = names[index] if names else report.get("name") or Path(path).parent.name
        rows.append((name, report["summary"]))
    known = [name for name, _ in rows]
    if baseline is not None and baseline not in known:
        raise EvaluationError(f"--baseline {baseline!r} is none of the runs {known}.")
    return summary_table(rows, baseline if baseline is not None else known[0])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.evaluate",
        description="Evaluate a softbio model on prepared datasets: per-dataset metrics (the study's Tables "
        "4.11/4.12), per-group fairness, calibration, confusion matrices. Writes results.json, report.md and PNG "
        "plots to --out. `python -m train.evaluate compare RUN.json ...` tabulates several runs.",
    )
    parser.add_argument(
        "--model", required=True, help="softbio checkpoint folder or Hub id, or clip:ID_OR_FOLDER (zero-shot)"
    )
    parser.add_argument("--data", nargs="+", required=True, help="folders written by python -m train.data prepare")
    parser.add_argument("--split", default="test", help="split to evaluate (default test)")
    parser.add_argument("--out", default="outputs/eval", help="output folder (default outputs/eval)")
    parser.add_argument("--name", default=None, help="row name in the tables (default: from --model)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    parser.add_argument("--device", default="auto", help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--dtype", default="auto", help="auto (bf16 where the device runs it natively), float32, bfloat16"
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most N rows per dataset")
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="fit one temperature per task and save a calibrated copy in OUT/calibrated",
    )
    parser.add_argument("--calibration-split", default="validation", help="split the temperatures are fitted on")
    return parser


def build_compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.evaluate compare",
        description="The study's summary table (Table 4.11) with one row per run and the difference to a baseline.",
    )
    parser.add_argument("runs", nargs="+", help="results.json files")
    parser.add_argument("--names", nargs="+", default=None, help="row names, one per run (default: each run's name)")
    parser.add_argument("--baseline", default=None, help="row to compare against (default: the first)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["compare"]:
            args = build_compare_parser().parse_args(argv[1:])
            print(compare(args.runs, args.names, args.baseline))
            return 0
        args = build_parser().parse_args(argv)
        if args.batch_size < 1 or (args.limit is not None and args.limit < 1) or args.num_workers < 0:
            raise EvaluationError("--batch-size and --limit must be at least 1, --num-workers at least 0.")
        report = run(args)
    except EvaluationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary_table([(report["name"], report["summary"])]))
    print(f"results.json, report.md and {len(report['plots'])} plots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
