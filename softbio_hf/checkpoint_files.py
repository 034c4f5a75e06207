"""
A checkpoint's files as read before and around transformers: pickles refused, a damaged config.json or
safetensors file named with the way out, labels that must match. Kept apart from modeling_softbio.py (shipped
beside checkpoints as remote code with it), so `train.hub` reads config.json through the same rule.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SAVE_AGAIN = (
    "copy or save the checkpoint again (save_pretrained, or python -m train.train's best/ folder); for a Hub id, "
    "download it again with from_pretrained(..., force_download=True)"
)


class CheckpointFileError(Exception):
    """
    A checkpoint file that cannot be read (cut short, corrupt, not JSON), named with the fix. Deliberately not a
    ValueError or OSError: transformers' pipeline() catches those while it tries model classes and reports them
    buried in traceback text; this one reaches the caller as it is.
    """


def read_config_json(path: Path) -> dict[str, Any]:
    """A config.json as a JSON object, or a CheckpointFileError that names the file, where it breaks and the fix."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointFileError(
            f"{path} is not valid JSON ({error}): it is cut short or damaged; {SAVE_AGAIN}."
        ) from None
    if not isinstance(value, dict):
        raise CheckpointFileError(f"{path} holds a JSON {type(value).__name__}, not a config object; {SAVE_AGAIN}.")
    return value


def check_local_config(source) -> None:
    """A local checkpoint's config.json read first: transformers' own error names the file but not the fix."""
    if source is not None and (Path(str(source)) / "config.json").is_file():
        read_config_json(Path(str(source)) / "config.json")


@contextlib.contextmanager
def weights_named(source) -> Iterator[None]:
    """safetensors' error on a truncated or corrupt weights file (an Exception of its own, which no caller
    expects), as a CheckpointFileError naming the file and the fix."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as error:
        folder = Path(str(source))
        found = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        named = ", ".join(map(str, found)) or f"the safetensors weights of {source}"
        raise CheckpointFileError(
            f"{named} could not be read ({error}): the file is truncated or corrupt; {SAVE_AGAIN}."
        ) from None


def refuse_pickled_weights(source) -> None:
    """A local checkpoint with only pickled weights gets a message that says how to convert them."""
    if source is None or not Path(str(source)).is_dir():
        return
    folder = Path(str(source))
    if not list(folder.glob("*.safetensors")) and (list(folder.glob("*.bin")) or list(folder.glob("*.pt"))):
        raise ValueError(
            f"{folder} holds pickled weights (.bin/.pt) and no safetensors; softbio loads safetensors only, since "
            "unpickling can run code. If you trust the file, convert it once: load the state dict with "
            "torch.load(path, weights_only=True) and write it with safetensors.torch.save_file(state_dict, "
            f"'{folder}/model.safetensors')."
        )


def check_same_tasks(saved: dict | None, requested: dict, source) -> None:
    """A checkpoint's heads are only meaningful under its own label names and order."""
    saved = {task: list(labels) for task, labels in (saved or {}).items()}
    requested = {task: list(labels) for task, labels in requested.items()}
    if saved == requested:
        return
    problems = []
    for task in sorted(set(saved) | set(requested)):
        if task not in saved:
            problems.append(f"task {task!r} is not in the checkpoint")
        elif task not in requested:
            problems.append(f"the checkpoint also has task {task!r}")
        elif saved[task] != requested[task]:
            problems.append(f"{task!r} labels are {saved[task]} in the checkpoint but {requested[task]} were requested")
    raise ValueError(
        f"The checkpoint {str(source)!r} does not match the requested tasks: {'; '.join(problems)}. "
        "Load it without `tasks=` to use its own labels, or train a new head for the labels you need."
    )
