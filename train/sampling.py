"""What training draws: task- and class-balanced row weights (the study's weighted shares), the sampler, and
the run's fixed draw of rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from train.schema import IGNORE, TASKS, task_labels

CLASS_BALANCE_MODES = ("mix", "power")


@dataclass(frozen=True)
class Balancing:
    """
    How training draws its rows (the `data` section of a training config).

    Within each task, class c gets a target share of the draws labelled for that task:
    - `mix` (the "Weighted %" column of the study's training-mix table): (1 - class_mix) x share_c +
      class_mix / K, K the classes present;
    - `power`: n_c^(1 - class_alpha), normalised (0: as the data comes, 1: uniform).
    Across tasks, task t's rows start in proportion to N_t^(1 - task_alpha) (0: as the data comes, 1: balanced).
    """

    class_balance: str = "mix"
    class_mix: float = 0.5
    class_alpha: float = 0.5
    task_alpha: float = 0.5

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> Balancing:
        return cls(**{key: data[key] for key in ("class_balance", "class_mix", "class_alpha", "task_alpha")})

    def class_targets(self, counts: np.ndarray) -> np.ndarray:
        """Target share of draws per class (0 for a class with no row)."""
        present = counts > 0
        if not present.any():
            return np.zeros(len(counts))
        if self.class_balance == "mix":
            shares = counts / counts.sum()
            return np.where(present, (1 - self.class_mix) * shares + self.class_mix / present.sum(), 0.0)
        if self.class_balance == "power":
            powered = np.where(present, counts.astype(float) ** (1.0 - self.class_alpha), 0.0)
            return powered / powered.sum()
        raise ValueError(f"class_balance={self.class_balance!r}; choose one of {CLASS_BALANCE_MODES}.")

    def describe(self) -> str:
        rule = (
            f"(1 - {self.class_mix}) x share + {self.class_mix} / classes"
            if self.class_balance == "mix"
            else f"n_c^(1 - {self.class_alpha}), normalised"
        )
        return f"class balance {self.class_balance}: {rule}; task_alpha {self.task_alpha}"


def label_columns(dataset, tasks: Sequence[str] = TASKS) -> dict[str, np.ndarray]:
    """Each task's label column as integers (-100 where a row has none or the dataset lacks the column)."""
    return {
        task: np.asarray(dataset[task], dtype=np.int64)
        if task in dataset.column_names
        else np.full(len(dataset), IGNORE, dtype=np.int64)
        for task in tasks
    }


def draw_shares(labels: dict[str, np.ndarray], weights: np.ndarray) -> dict[str, np.ndarray]:
    """
    The expected class frequencies of a long weighted draw, per task, among the drawn rows labelled for it: what
    the loss of that task really sees (a row drawn for one task also brings its labels of the others).
    """
    shares = {}
    for task, column in labels.items():
        labelled = column != IGNORE
        classes = len(task_labels()[task])
        mass = np.bincount(column[labelled], weights=weights[labelled], minlength=classes)
        shares[task] = mass / mass.sum() if mass.sum() > 0 else mass
    return shares


def balanced_weights(
    dataset, balancing: Balancing | None = None, tasks: Sequence[str] = TASKS, iterations: int = 200
) -> np.ndarray:
    """
    Row weights for torch's WeightedRandomSampler whose draws give every task exactly its target class shares.

    Start: per task, class c's rows share the task's mass N_t^(1 - task_alpha) in proportion to the class target;
    a row labelled for several tasks takes its largest weight. Then raking (iterative proportional fitting):
    rescale each task's classes to their targets in turn until all agree at once, since a row drawn for one
    task also carries its labels of the others. Unlabelled rows get 0.
    """
    balancing = balancing or Balancing()
    labels = label_columns(dataset, tasks)
    targets, weights = {}, np.zeros(len(dataset), dtype=np.float64)
    for task, column in labels.items():
        labelled = column != IGNORE
        if not labelled.any():
            continue
        counts = np.bincount(column[labelled], minlength=len(task_labels()[task])).astype(float)
        targets[task] = balancing.class_targets(counts)
        per_row = np.divide(targets[task], counts, out=np.zeros_like(counts), where=counts > 0)
        task_weights = np.zeros(len(dataset))
        task_weights[labelled] = labelled.sum() ** (1.0 - balancing.task_alpha) * per_row[column[labelled]]
        weights = np.maximum(weights, task_weights)
    for _ in range(iterations):
        shares = draw_shares({t: labels[t] for t in targets}, weights)
        if all(np.abs(shares[t] - targets[t]).max() < 1e-9 for t in targets):
            break
        for task, target in targets.items():
            column = labels[task]
            labelled = column != IGNORE
            current = draw_shares({task: column}, weights)[task]
            factor = np.divide(target, current, out=np.zeros_like(target), where=current > 0)
            weights[labelled] *= factor[column[labelled]]
    return weights


def balanced_sampler(dataset, num_samples: int | None = None, seed: int = 0, balancing: Balancing | None = None):
    import torch

    weights = torch.as_tensor(balanced_weights(dataset, balancing))
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.WeightedRandomSampler(weights, num_samples or len(dataset), True, generator=generator)


class DrawnRows:
    """The training draw as a dataset: position i is row drawn[i], tagged with i for its augmentation seed."""

    def __init__(self, dataset, drawn: Sequence[int]):
        self.dataset, self.drawn = dataset, drawn

    def __len__(self) -> int:
        return len(self.drawn)

    def __getitem__(self, position: int) -> dict[str, Any]:
        return {**self.dataset[int(self.drawn[position])], "draw": position}


def label_coverage(dataset, tasks: Sequence[str]) -> dict[str, int]:
    import numpy as np

    return {
        task: int((np.asarray(dataset[task]) != -100).sum()) if task in dataset.column_names else 0 for task in tasks
    }


def training_draw(dataset, config: dict[str, Any]) -> list[int]:
    """Every row index the run will see, in order: task- and class-balanced, fixed by the seed."""
    train = config["train"]
    total = train["max_steps"] * train["batch_size"] * train["grad_accum"]
    sampler = balanced_sampler(
        dataset, num_samples=total, seed=train["seed"], balancing=Balancing.from_config(config["data"])
    )
    return list(sampler)
