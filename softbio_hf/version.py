"""softbio's version, from its one source (pyproject.toml's [project] version), and the `--version` option every
command takes. Standard library only, so a command answers `--version` without importing torch."""

from __future__ import annotations

import argparse
import re
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "softbio"
UNKNOWN = "0+unknown"  # these files copied beside a checkpoint as remote code: neither installed nor a checkout


def read_version() -> str:
    """The installed distribution's version; in a checkout that is not installed, pyproject.toml's own."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if not pyproject.is_file():
        return UNKNOWN
    # The [project] table's `version = "..."` line (tomllib is Python 3.11+; 3.10 is supported).
    project = re.search(r"^\[project\]\n(.*?)(?=^\[|\Z)", pyproject.read_text(), flags=re.DOTALL | re.MULTILINE)
    found = re.search(r'^version\s*=\s*"([^"]+)"', project.group(1), flags=re.MULTILINE) if project else None
    return found.group(1) if found else UNKNOWN


__version__ = read_version()


def add_version_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--version` prints "softbio X.Y.Z" and exits, before any other argument is checked."""
    parser.add_argument("--version", action="version", version=f"{DISTRIBUTION} {__version__}")
    return parser
