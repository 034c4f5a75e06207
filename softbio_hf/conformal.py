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

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SCORES = ("lac", "aps")


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
