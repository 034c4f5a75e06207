"""The unified row's schema (DESIGN.md): the label columns, the ignore value, the splits, the canonical labels.
The bottom of train/: every other module may import it, it imports none of them."""

from __future__ import annotations

import functools
import math
from typing import Any

IGNORE = -100


TASKS = ("age", "gender", "emotion")  # the unified schema's label columns (DESIGN.md), canonical order


SPLITS = ("train", "validation", "test")


def is_finite_number(value: Any) -> bool:
    """A real number (not a bool), neither NaN nor infinite: what a setting or a score must be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Age labels in these datasets are model estimates: reported apart, left out of the age average (as the study).
SYNTHETIC_AGE_DATASETS = {"vggface2"}


@functools.cache
def task_labels() -> dict[str, tuple[str, ...]]:
    """The canonical label names per task, from softbio_hf: imported on first use (it takes seconds), so the
    command line answers --help at once."""
    from softbio_hf.configuration_softbio import DEFAULT_TASKS

    return {task: tuple(DEFAULT_TASKS[task]) for task in TASKS}
