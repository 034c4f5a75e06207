"""What people read: the markdown tables (the study's summary, per dataset, fairness, calibration) that
report.md and the model card share, the plots (confusion matrices, reliability, training curves), results.json
read back and checked, and `compare`."""

from __future__ import annotations

import io
import json
import math
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from softbio_hf.safe_files import atomic_path, atomic_write_bytes, atomic_write_text
from train.errors import EvaluationError
from train.metrics import (
    SUMMARY_TASKS,
    Predictions,
    confusion_matrix,
    expected_calibration_error,
    pooled,
    reliability_bins,
    softmax,
)
from train.schema import IGNORE, SYNTHETIC_AGE_DATASETS, is_finite_number
from train.uncertainty import paired_difference

OUTCOMES_FILE = "rows.npz"  # beside results.json: each test row right or wrong, for compare's paired bootstrap
COMPARE_REPLICATES = 1000


def plot_curves(history: list[dict[str, Any]], path: Path) -> str:
    """Training loss per task and the validation overall score against the step, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [h for h in history if "loss" in h]
    for key in ["loss", *sorted({k for h in steps for k in h if k.startswith("loss/")})]:
        points = [(h["step"], h[key]) for h in steps if key in h]
        left.plot(*zip(*points, strict=True), label=key.replace("loss/", ""), linewidth=1)
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    left.legend(fontsize=7)
    evals = [(h["step"], h["overall"]) for h in history if h.get("overall") is not None]
    if evals:
        right.plot(*zip(*evals, strict=True), marker="o")
    right.set_xlabel("step")
    right.set_ylabel("validation overall accuracy %")
    fig.tight_layout()
    with atomic_path(path) as partial:
        fig.savefig(partial, dpi=110)
    plt.close(fig)
    return str(path)


def percent(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def with_interval(value: float | None, ci: Sequence[float] | None, digits: int = 2) -> str:
    """`84.10 [83.20, 85.00]`: a number and its bootstrap interval, where it has one."""
    text = percent(value, digits)
    return text if not ci or value is None else f"{text} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def summary_table(rows: Sequence[tuple[str, Mapping[str, Any]]], baseline: str | None = None) -> str:
    """Markdown Table 4.11: one row per run; with a baseline, each cell also shows the difference to it."""
    base = dict(rows).get(baseline) if baseline else None
    lines = ["| model | emotion | age* | gender | overall |", "|---|---:|---:|---:|---:|"]
    for name, summary in rows:
        cells = []
        for key in (*SUMMARY_TASKS, "overall"):
            cell = with_interval(summary.get(key), (summary.get("ci") or {}).get(key))
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
                f"| {name} | {task} | {m['n']:,} | {with_interval(m['accuracy'], m.get('accuracy_ci'))} | "
                f"{percent(m['balanced_accuracy'])} | "
                f"{percent(m['macro_f1'])} | {percent(m.get('one_off_accuracy'))} | {mae} | {percent(m['ece'])} |"
            )
    return "\n".join(lines)


def fairness_table(fairness: Mapping[str, Any]) -> str:
    lines = ["| dataset | task | by | accuracy per group (n) | worst | gap |", "|---|---|---|---|---|---:|"]
    for name, tasks in fairness.items():
        for task, by in tasks.items():
            for kind, entry in by.items():
                groups = ", ".join(
                    f"{g} {with_interval(v['accuracy'], v.get('accuracy_ci'), 1)} ({v['n']})"
                    for g, v in entry["groups"].items()
                )
                lines.append(
                    f"| {name} | {task} | {kind} | {groups} | {entry['worst_group']} "
                    f"({with_interval(entry['worst_accuracy'], entry.get('worst_accuracy_ci'), 1)}) | "
                    f"{with_interval(entry['gap'], entry.get('gap_ci'))} |"
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


def conformal_markdown(conformal: Mapping[str, Any]) -> str:
    """Coverage and mean set size per task, per dataset and per true label, against the level asked for."""
    kind = "class-conditional" if conformal["class_conditional"] else "marginal"
    lines = [
        f"Level {100 * conformal['level']:.0f}%, {conformal['score'].upper()} score, {kind} thresholds.",
        "",
        "| task | where | n | coverage % | mean set size |",
        "|---|---|---:|---:|---:|",
    ]
    for task, entry in conformal["tasks"].items():
        rows = [("all", entry)] + [(f"dataset {n}", r) for n, r in entry["datasets"].items()]
        rows += [(f"true {label}", r) for label, r in entry["per_label"].items()]
        rows += [
            (f"{name} {kind} {g}", r)
            for name, d in entry["datasets"].items()
            for kind in ("race", "gender")
            for g, r in d.get(kind, {}).items()
        ]
        lines += [f"| {task} | {w} | {r['n']:,} | {r['coverage']:.2f} | {r['mean_set_size']:.2f} |" for w, r in rows]
    if conformal.get("too_small_message"):
        lines += ["", f"**Warning:** {conformal['too_small_message']}"]
    return "\n".join(lines)


def write_outcomes(out: Path, outcomes: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """rows.npz: per dataset and task, each row 1 right, 0 wrong, -1 unlabelled (keys `dataset/task`)."""
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer, **{f"{name}/{task}": v for name, tasks in outcomes.items() for task, v in tasks.items()}
    )
    atomic_write_bytes(out / OUTCOMES_FILE, buffer.getvalue())


def read_outcomes(results_path: str | Path) -> dict[str, dict[str, np.ndarray]] | None:
    """The rows.npz beside a results.json, or None where the evaluation wrote none (--bootstrap 0)."""
    path = Path(results_path).parent / OUTCOMES_FILE
    if not path.is_file():
        return None
    outcomes: dict[str, dict[str, np.ndarray]] = {}
    try:  # a torn or foreign file is named: zip, zlib and numpy each raise their own error on one
        with np.load(path, allow_pickle=False) as saved:
            for key in saved.files:
                name, task = key.rsplit("/", 1)
                outcomes.setdefault(name, {})[task] = rows = saved[key]
                if rows.ndim != 1:
                    raise ValueError(f"{key} holds a {rows.ndim}-d array, not one outcome per row")
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as error:
        raise EvaluationError(
            f"{path} is damaged or not written by python -m train.evaluate ({error}); evaluate that run again with "
            "--bootstrap N, or delete the file to compare without the paired test."
        ) from None
    return outcomes


def same_rows(a: Mapping[str, Mapping[str, np.ndarray]], b: Mapping[str, Mapping[str, np.ndarray]]) -> bool:
    """Two evaluations over the same rows: same datasets, tasks, row counts and labelled rows."""
    return a.keys() == b.keys() and all(
        a[n].keys() == b[n].keys() and all(np.array_equal(a[n][t] < 0, b[n][t] < 0) for t in a[n]) for n in a
    )


def paired_lines(runs: Sequence[tuple[str, Any]], baseline: str, seed: int = 0) -> list[str]:
    """Per run against the baseline: the overall difference's paired-bootstrap interval and whether it is real."""
    outcomes = dict(runs)
    base = outcomes[baseline]
    lines = []
    for name, rows in runs:
        if name == baseline:
            continue
        if rows is None or base is None or not same_rows(rows, base):
            lines.append(f"{name} vs {baseline}: no paired test (not evaluated on the same rows with --bootstrap)")
            continue
        diff = paired_difference(rows, base, COMPARE_REPLICATES, seed)["overall"]
        if diff["ci"] is None:
            lines.append(f"{name} vs {baseline}: no overall score to compare")
            continue
        verdict = "a real difference" if diff["differs"] else "within noise"
        low, high = diff["ci"]
        lines.append(f"{name} vs {baseline}: overall difference 95% interval [{low:+.2f}, {high:+.2f}]: {verdict}")
    return lines


def write_report(out: Path, report: Mapping[str, Any], plots: Sequence[str]) -> None:
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
    if report.get("conformal"):
        lines += ["## Conformal prediction sets", "", conformal_markdown(report["conformal"]), ""]
    if report.get("bootstrap"):
        boot = report["bootstrap"]
        lines += [
            f"Intervals in brackets: {100 * boot['level']:.0f}% percentile bootstrap over the test rows "
            f"({boot['replicates']} replicates, seed {boot['seed']}).",
            "",
        ]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {name}: {note}" for name, notes in report["notes"].items() for note in notes]
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    atomic_write_text(out / "report.md", "\n".join(lines))


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
            with atomic_path(out / file) as partial:
                fig.savefig(partial, dpi=110)
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
        with atomic_path(out / file) as partial:
            fig.savefig(partial, dpi=110)
        plt.close(fig)
        written.append(file)
    return written


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


RESULT_METRICS = ("n", "accuracy", "balanced_accuracy", "macro_f1", "ece")


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


def compare(paths: Sequence[str], names: Sequence[str] | None, baseline: str | None) -> str:
    if names and len(names) != len(paths):
        raise EvaluationError(f"--names gives {len(names)} names for {len(paths)} runs.")
    rows, outcomes = [], []
    for index, path in enumerate(paths):
        report = read_results(path)
        name = names[index] if names else report.get("name") or Path(path).parent.name
        rows.append((name, report["summary"]))
        outcomes.append((name, read_outcomes(path)))
    known = [name for name, _ in rows]
    if baseline is not None and baseline not in known:
        raise EvaluationError(f"--baseline {baseline!r} is none of the runs {known}.")
    baseline = baseline if baseline is not None else known[0]
    return "\n".join([summary_table(rows, baseline), "", *paired_lines(outcomes, baseline)])
