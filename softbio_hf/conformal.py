"""Conformal prediction sets at inference time: numpy only (no torch, no transformers), so the pipeline, the batch
command and a torch-free runtime all call the same function.

A model holds thresholds when `python -m train.evaluate --conformal LEVEL` fitted them; they live in
`config.calibration["conformal"]`:

    {"level": 0.9, "score": "lac" | "aps", "class_conditional": bool, "fitted_on": "validation",
     "thresholds": {task: [one threshold per label, null = that label is always in the set]}}

A label is in a face's set when its nonconformity score is at most its label's threshold (one value repeated
for every label unless class-conditional). On data exchangeable with the calibration split the set holds the
true label with probability at least `level` (for each true label, when class-conditional).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SCORES = ("lac", "aps")


REFIT = "fit them again with python -m train.evaluate --model MODEL --conformal LEVEL, or delete calibration.conformal"


def check_conformal(conformal: Any, tasks: Mapping[str, Sequence[str]], source: str) -> None:
    """
    Refuse thresholds that would answer wrongly on every call, when `source` (a config.json, an export's
    manifest.json) is loaded rather than at the first face: a NaN gives every face an empty set, a value above 1
    every label. Each threshold is null (that label always in the set) or a finite number in [0, 1], one per label
    of a task the model has; the score is a known one. A ValueError names `source`, the entry and the fix.
    """
    if not conformal:
        return
    where = f"{source}: calibration.conformal"
    if not isinstance(conformal, Mapping):
        raise ValueError(f"{where} is {type(conformal).__name__}, not a mapping; {REFIT}.")
    if conformal.get("score") not in SCORES:
        raise ValueError(f"{where}.score is {conformal.get('score')!r}, not one of {', '.join(SCORES)}; {REFIT}.")
    level = conformal.get("level")
    if level is not None and not (_is_real(level) and 0 < level < 1):
        raise ValueError(f"{where}.level is {level!r}, not a level between 0 and 1; {REFIT}.")
    thresholds = conformal.get("thresholds")
    if not isinstance(thresholds, Mapping):
        raise ValueError(f"{where}.thresholds is {thresholds!r}, not a mapping of task to thresholds; {REFIT}.")
    for task, values in thresholds.items():
        if task not in tasks:
            raise ValueError(f"{where}.thresholds names {task!r}, not a task of this model ({list(tasks)}); {REFIT}.")
        labels = len(tasks[task])
        if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != labels:
            raise ValueError(
                f"{where}.thresholds[{task!r}] is {values!r}: give one threshold per label ({labels}); {REFIT}."
            )
        wrong = [v for v in values if v is not None and not (_is_real(v) and 0.0 <= v <= 1.0)]
        if wrong:
            raise ValueError(
                f"{where}.thresholds[{task!r}] holds {wrong[0]!r}: each threshold is null or a finite number in "
                f"[0, 1]; {REFIT}."
            )


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def conformity_scores(probs: np.ndarray, score: str) -> np.ndarray:
    """
    (N, K) probabilities -> (N, K) nonconformity of every candidate label. LAC: 1 - p. APS: the probability mass
    of the labels at least as likely, itself included (labels tied with it count once, their own).
    """
    probs = np.asarray(probs, dtype=np.float64)
    if score == "lac":
        return 1.0 - probs
    if score == "aps":
        above = probs[:, None, :] > probs[:, :, None]  # [n, label, other]: other is more probable than label
        # a mass: at most 1 (float sums can pass it by an ulp, which would drop a label from a set with threshold 1)
        return np.minimum((probs[:, None, :] * above).sum(axis=-1) + probs, 1.0)
    raise ValueError(f"conformal score {score!r}: use one of {', '.join(SCORES)}.")


def prediction_sets(probs: np.ndarray, calibration: Mapping[str, Any] | None, task: str) -> np.ndarray | None:
    """
    (N, K) probabilities of `task` -> (N, K) booleans, True where the label is in the face's set; None when the
    model holds no conformal thresholds for `task` (then callers report no set, as before thresholds existed).
    """
    conformal = (calibration or {}).get("conformal")
    if not conformal or task not in conformal.get("thresholds", {}):
        return None
    probs = np.atleast_2d(np.asarray(probs, dtype=np.float64))
    thresholds = conformal["thresholds"][task]
    if len(thresholds) != probs.shape[1]:
        raise ValueError(
            f"config.calibration['conformal']['thresholds'][{task!r}] has {len(thresholds)} values for "
            f"{probs.shape[1]} labels; fit them again with python -m train.evaluate --conformal LEVEL."
        )
    limits = np.array([np.inf if t is None else float(t) for t in thresholds])
    return conformity_scores(probs, conformal["score"]) <= limits


def label_set(probs: Sequence[float], labels: Sequence[str], calibration, task: str) -> list[str] | None:
    """One face's set as label names, most probable first; None when the model holds no thresholds."""
    inside = prediction_sets(np.asarray(probs)[None], calibration, task)
    if inside is None:
        return None
    order = np.argsort(-np.asarray(probs, dtype=np.float64), kind="stable")
    return [labels[i] for i in order if inside[0, i]]
