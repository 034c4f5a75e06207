"""The errors a train/ command reports as a message with exit code 2 (no traceback), and its exit codes."""

from __future__ import annotations

from softbio_hf.extras import MissingExtra, require

EXIT_USER_ERROR, EXIT_INTERRUPTED = 2, 130


class ConfigError(ValueError):
    """A bad config file, key or value: reported before any work, exit code 2."""


class TrainingError(RuntimeError):
    """A run that cannot go on for a reason the user can fix (data, memory, device): exit code 2."""


class EvaluationError(ValueError):
    """A user error (bad folder, incompatible model, bad option): reported without a traceback, exit code 2."""


def require_train_extra(command: str, *modules: str) -> None:
    """The [train] extra's packages that `command` needs, checked before any work: MissingExtra names the install."""
    for module in modules:
        require(module, "train", command)


__all__ = ["ConfigError", "EvaluationError", "MissingExtra", "TrainingError", "require_train_extra"]
