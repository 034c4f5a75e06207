"""Honest uncertainty, on arrays: split-conformal thresholds and their coverage, and bootstrap intervals for every
accuracy results.json reports (a paired bootstrap for `compare`). The sets themselves are computed by
softbio_hf.conformal, the one function inference also calls. Accuracies and coverages in percent.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from softbio_hf.conformal import conformity_scores, prediction_sets
from train.metrics import FAIRNESS_MIN_GROUPS, Predictions, pooled, softmax, summarize
from train.schema import IGNORE

INTERVAL_LEVEL = 0.95
BOOTSTRAP_CHUNK = 100  # replicates drawn at once: bounds memory at CHUNK x rows counts


# ------------------------------------------------------------------------------------------- conformal


def conformal_quantile(scores: np.ndarray, level: float) -> float | None:
    """The ceil((n+1) level)-th smallest score: the split-conformal threshold; None (every label) when n is too
    small for `level` to be guaranteed."""
    rank = math.ceil((len(scores) + 1) * level - 1e-9)
    if rank > len(scores) or not len(scores):
        return None
    return float(np.sort(scores)[rank - 1])


def fit_thresholds(
    probs: np.ndarray, labels: np.ndarray, level: float, score: str, class_conditional: bool
) -> list[float | None]:
    """One threshold per label: the same one for all, or (Mondrian over the true label) each from its own rows."""
    true_scores = conformity_scores(probs, score)[np.arange(len(labels)), labels]
    classes = probs.shape[1]
    if not class_conditional:
        return [conformal_quantile(true_scores, level)] * classes
    return [conformal_quantile(true_scores[labels == c], level) for c in range(classes)]


def fit_conformal(
    predictions: Mapping[str, Predictions], level: float, score: str, class_conditional: bool, fitted_on: str
) -> dict[str, Any]:
    """The `config.calibration["conformal"]` entry, fitted on the pooled labelled rows of every task."""
    thresholds = {}
    for task in sorted({t for p in predictions.values() for t in p.logits}):
        logits, labels = pooled(predictions, task)
        if len(labels):
            thresholds[task] = fit_thresholds(softmax(logits), labels, level, score, class_conditional)
    return {
        "level": level,
        "score": score,
        "class_conditional": class_conditional,
        "fitted_on": fitted_on,
        "thresholds": thresholds,
    }


def smallest_split(level: float) -> int:
    """The fewest calibration rows for which conformal_quantile gives a threshold at `level` (9 at 0.9, 19 at 0.95)."""
    rows = max(1, math.floor(level / (1 - level)) - 1)
    while math.ceil((rows + 1) * level - 1e-9) > rows:
        rows += 1
    return rows


def too_small(predictions: Mapping[str, Predictions], config, conformal: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Where the calibration split was too small for the level: per task, the labels left without a threshold
    (null: every set holds them), the rows they were fitted on and the smallest split that would fit (per label
    when class-conditional)."""
    needed = smallest_split(conformal["level"])
    found = []
    for task, thresholds in conformal["thresholds"].items():
        empty = [i for i, threshold in enumerate(thresholds) if threshold is None]
        if not empty:
            continue
        _, labels = pooled(predictions, task)
        names = config.tasks[task]
        if conformal["class_conditional"]:
            rows: Any = {names[i]: int((labels == i).sum()) for i in empty}
        else:
            rows = len(labels)
        found.append({"task": task, "labels": [names[i] for i in empty], "rows": rows, "needed": needed})
    return found


def too_small_message(found: Sequence[Mapping[str, Any]], conformal: Mapping[str, Any]) -> str:
    """The one wording of a split too small, for the console and report.md."""
    per = " of each label" if conformal["class_conditional"] else ""
    parts = []
    for entry in found:
        rows = entry["rows"]
        had = ", ".join(f"{k}: {v}" for k, v in rows.items()) if isinstance(rows, dict) else f"{rows} rows"
        parts.append(f"{entry['task']} ({', '.join(entry['labels'])}; {had})")
    return (
        f"the calibration split {conformal['fitted_on']!r} is too small for level {conformal['level']} in "
        f"{'; '.join(parts)}: those thresholds are null, so those sets hold every label and promise nothing. "
        f"The smallest split that fits holds {found[0]['needed']} labelled rows{per} per task."
    )


def coverage_row(inside: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Coverage (% of rows whose set holds the true label), mean set size and n."""
    return {
        "coverage": 100 * float(inside[np.arange(len(labels)), labels].mean()),
        "mean_set_size": float(inside.sum(axis=1).mean()),
        "n": len(labels),
    }


def grouped_coverage(inside: np.ndarray, labels: np.ndarray, groups: Sequence[Any]) -> dict[str, Any]:
    names = sorted({g for g in groups if g is not None}, key=str)
    table = {}
    for name in names:
        keep = np.array([g == name for g in groups])
        table[str(name)] = coverage_row(inside[keep], labels[keep])
    return table


def conformal_report(predictions: Mapping[str, Predictions], config, conformal: Mapping[str, Any]) -> dict[str, Any]:
    """Coverage and set size per task (pooled), per dataset, per true label and per race/gender group."""
    calibration = {"conformal": conformal}
    report: dict[str, Any] = {"level": conformal["level"], "score": conformal["score"]}
    report["class_conditional"] = conformal["class_conditional"]
    tasks: dict[str, Any] = {}
    for task in conformal["thresholds"]:
        logits, labels = pooled(predictions, task)
        if not len(labels):
            continue
        inside = prediction_sets(softmax(logits), calibration, task)
        entry = coverage_row(inside, labels)
        names = config.tasks[task]
        entry["per_label"] = grouped_coverage(inside, labels, [names[i] for i in labels])
        entry["datasets"] = {}
        for name, preds in predictions.items():
            if task not in preds.labels or not (keep := preds.labels[task] != IGNORE).any():
                continue
            rows = prediction_sets(softmax(preds.logits[task][keep]), calibration, task)
            truth = preds.labels[task][keep]
            row = coverage_row(rows, truth)
            for kind, groups in group_columns(preds, config, keep, task).items():
                row[kind] = grouped_coverage(rows, truth, groups)
            entry["datasets"][name] = row
        tasks[task] = entry
    report["tasks"] = tasks
    return report


def group_columns(preds: Predictions, config, keep: np.ndarray, task: str) -> dict[str, list]:
    """The race and (for tasks other than gender) gender group of each kept row, where the dataset has them."""
    columns = {}
    races = [r for r, k in zip(preds.race, keep, strict=True) if k]
    if any(races):
        columns["race"] = races
    gender = preds.labels.get("gender")
    if gender is not None and task != "gender":
        genders = [config.tasks["gender"][g] if g != IGNORE else None for g in gender[keep]]
        if any(genders):
            columns["gender"] = genders
    return columns


# ------------------------------------------------------------------------------------------- bootstrap


def row_outcomes(predictions: Mapping[str, Predictions]) -> dict[str, dict[str, np.ndarray]]:
    """Per dataset and task, one int8 per row: 1 right, 0 wrong, -1 not labelled (rows stay aligned across tasks,
    so one resample of a dataset's rows serves all its tasks, and two runs on the same rows can be paired)."""
    outcomes = {}
    for name, preds in predictions.items():
        outcomes[name] = {}
        for task, logits in preds.logits.items():
            labels = preds.labels[task]
            right = (logits.argmax(axis=1) == labels).astype(np.int8)
            outcomes[name][task] = np.where(labels == IGNORE, np.int8(-1), right)
    return outcomes


def resample_counts(rows: int, replicates: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """How often each row is drawn in each bootstrap replicate (rows drawn with replacement), in chunks."""
    for start in range(0, replicates, BOOTSTRAP_CHUNK):
        size = min(BOOTSTRAP_CHUNK, replicates - start)
        yield rng.multinomial(rows, np.full(rows, 1.0 / rows), size=size).astype(np.float64)


def weighted_accuracy(counts: np.ndarray, outcome: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Accuracy in percent per replicate over the labelled rows (within `mask`); NaN where none was drawn."""
    labelled = outcome >= 0 if mask is None else (outcome >= 0) & mask
    drawn = counts @ labelled.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100 * (counts @ ((outcome == 1) & labelled).astype(np.float64)) / np.where(drawn > 0, drawn, np.nan)


def interval(values: np.ndarray, level: float = INTERVAL_LEVEL) -> list[float] | None:
    """The percentile interval of bootstrap replicates."""
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def summary_replicates(accuracies: Mapping[str, Mapping[str, np.ndarray]], replicates: int) -> dict[str, np.ndarray]:
    """The study's summary row (train.metrics.summarize) of every replicate, from per dataset/task accuracies."""
    keys = ("emotion", "age", "gender", "overall")
    out = {key: np.full(replicates, np.nan) for key in keys}
    for b in range(replicates):
        # a task no drawn row labels is left out, as build_results leaves out a task without labelled rows
        drawn = {
            n: {t: {"accuracy": float(a[b])} for t, a in tasks.items() if np.isfinite(a[b])}
            for n, tasks in accuracies.items()
        }
        summary = summarize(drawn)
        for key in keys:
            out[key][b] = np.nan if summary.get(key) is None else summary[key]
    return out


def draw_accuracies(
    runs: Sequence[Mapping[str, Mapping[str, np.ndarray]]], replicates: int, seed: int
) -> list[dict[str, dict[str, np.ndarray]]]:
    """Per run, dataset and task: `replicates` bootstrap accuracies, every run resampled on the SAME rows (paired)."""
    rng = np.random.default_rng(seed)
    drawn: list[dict[str, dict[str, np.ndarray]]] = [{} for _ in runs]
    for name in runs[0]:
        rows = len(next(iter(runs[0][name].values())))
        parts: list[dict[str, list[np.ndarray]]] = [{task: [] for task in run[name]} for run in runs]
        for counts in resample_counts(rows, replicates, rng):
            for run, part in zip(runs, parts, strict=True):
                for task, outcome in run[name].items():
                    part[task].append(weighted_accuracy(counts, outcome))
        for out, part in zip(drawn, parts, strict=True):
            out[name] = {task: np.concatenate(chunks) for task, chunks in part.items()}
    return drawn


def add_intervals(
    report: dict[str, Any], predictions: Mapping[str, Predictions], config, replicates: int, seed: int
) -> None:
    """Bootstrap intervals, in place, beside every accuracy of a build_results dictionary: per dataset and task
    (`accuracy_ci`), per group, worst group and gap (fairness), and the summary row (`summary["ci"]`)."""
    outcomes = row_outcomes(predictions)
    accuracies = draw_accuracies([outcomes], replicates, seed)[0]
    for name, tasks in report["results"].items():
        for task, metrics in tasks.items():
            metrics["accuracy_ci"] = interval(accuracies[name][task])
    rng = np.random.default_rng([seed, 1])  # the groups' own draws, reproducible from the same seed
    for name, tasks in report["fairness"].items():
        for task, by in tasks.items():
            columns = group_columns(predictions[name], config, np.ones(len(predictions[name]), dtype=bool), task)
            add_group_intervals(by, outcomes[name][task], columns, rng, replicates)
    summaries = summary_replicates(accuracies, replicates)
    report["summary"]["ci"] = {key: interval(values) for key, values in summaries.items()}
    report["bootstrap"] = {"replicates": replicates, "seed": seed, "level": INTERVAL_LEVEL}


def add_group_intervals(by: dict[str, Any], outcome: np.ndarray, columns, rng, replicates: int) -> None:
    """Intervals of each group's accuracy, of the worst group's accuracy and of the gap (best - worst)."""
    for kind, entry in by.items():
        groups = columns[kind]
        masks = {g: np.array([x == g for x in groups]) for g in entry["groups"]}
        draws: dict[str, list[np.ndarray]] = {g: [] for g in masks}
        for counts in resample_counts(len(outcome), replicates, rng):
            for g, mask in masks.items():
                draws[g].append(weighted_accuracy(counts, outcome, mask))
        table = np.stack([np.concatenate(draws[g]) for g in masks])  # groups x replicates
        for g, values in zip(masks, table, strict=True):
            entry["groups"][g]["accuracy_ci"] = interval(values)
        enough = np.isfinite(table).sum(axis=0) >= FAIRNESS_MIN_GROUPS
        with warnings.catch_warnings():  # a replicate may draw no row of a group: NaN, left out below
            warnings.simplefilter("ignore", RuntimeWarning)
            worst, best = np.nanmin(table, axis=0), np.nanmax(table, axis=0)
        entry["worst_accuracy_ci"] = interval(np.where(enough, worst, np.nan))
        entry["gap_ci"] = interval(np.where(enough, best - worst, np.nan))


def paired_difference(
    run: Mapping[str, Mapping[str, np.ndarray]],
    base: Mapping[str, Mapping[str, np.ndarray]],
    replicates: int,
    seed: int,
) -> dict[str, Any]:
    """Overall (and per task) summary difference run - base with a paired bootstrap interval over the same rows;
    `differs` when the interval excludes 0."""
    drawn_run, drawn_base = draw_accuracies([run, base], replicates, seed)
    sums_run, sums_base = summary_replicates(drawn_run, replicates), summary_replicates(drawn_base, replicates)
    out = {}
    for key in sums_run:
        ci = interval(sums_run[key] - sums_base[key])
        out[key] = {"ci": ci, "differs": ci is not None and (ci[0] > 0 or ci[1] < 0)}
    return out
