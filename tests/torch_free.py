"""A Python where torch and transformers cannot be imported, as on a machine with only the server's install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCKER = '''
import sys


class NoTorch:
    """Refuses torch and transformers, as a machine without them does (ModuleNotFoundError naming the package)."""

    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in ("torch", "transformers"):
            raise ModuleNotFoundError(f"No module named {top!r} (blocked: the torch-free install)", name=top)
        return None


sys.meta_path.insert(0, NoTorch())
'''


def torch_free_env(tmp_path: Path) -> dict[str, str]:
    """Environment variables for a subprocess that cannot import torch or transformers (a sitecustomize blocks
    them before any code runs) and that imports softbio_hf from this repository, offline."""
    blocker = tmp_path / "no-torch"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    return {
        **os.environ,
        "PYTHONPATH": f"{blocker}:{REPO}",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
    }


def run_torch_free(tmp_path: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python ARGS` without torch and transformers; the result, whatever its exit code."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=tmp_path,
        env=torch_free_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
