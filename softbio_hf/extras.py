"""softbio's optional extras (pyproject's [project.optional-dependencies]): a command that needs one names the
install line, never a bare ModuleNotFoundError. Standard library only, so any command can use it first."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """A package of one of softbio's extras is not installed; the message says how to install it."""


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """`module`, imported; or MissingExtra saying `pip install 'softbio[extra]'`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise MissingExtra(
            f"{needed_for} needs {package}, which is not installed: pip install 'softbio[{extra}]' "
            f"(or pip install {package})."
        ) from None
