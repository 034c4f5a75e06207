"""What a command prints that is not ours: the warnings a normal run must not show (issue 38)."""

from __future__ import annotations

import re

FOREIGN = re.compile(r"Warning: |\[transformers\]|deprecat|Using the default loss", re.IGNORECASE)


def foreign_warnings(stderr: str) -> list[str]:
    """Lines of a command's stderr that are a Python warning (`file:line: SomeWarning: ...`, from our files too: a
    tracing warning in our model is as empty to a user) or transformers' logged warning, or its wrong-loss note."""
    return [line for line in stderr.splitlines() if FOREIGN.search(line)]
