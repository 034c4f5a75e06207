"""One version, from pyproject.toml, and `--version` on every command (every module with a `__main__` block, and
app.py), answered before any other argument is checked and, for `python -m`, without importing torch."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib

import softbio_hf
from softbio_hf import version

REPO = Path(__file__).resolve().parents[1]
PYPROJECT_VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def command_modules() -> list[str]:
    """Every module a user runs: `python -m X` for each file with a `__main__` block, and app.py."""
    found = ["app"]
    for package in ("softbio_hf", "train", "bench"):
        for path in sorted((REPO / package).glob("*.py")):
            if 'if __name__ == "__main__":' in path.read_text():
                found.append(f"{package}.{path.stem}")
    return found


def test_the_version_is_pyprojects():
    assert softbio_hf.__version__ == version.__version__ == PYPROJECT_VERSION


def test_an_installed_distributions_version_comes_first_and_a_checkout_reads_pyproject(monkeypatch):
    monkeypatch.setattr(metadata, "version", lambda name: {"softbio": "9.8.7"}[name])
    assert version.read_version() == "9.8.7"

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert version.read_version() == PYPROJECT_VERSION


@pytest.mark.parametrize("module", command_modules())
def test_every_command_prints_the_version(module, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO))  # app.py is a script at the repository root
    main = importlib.import_module(module).main
    # `--version` first, then arguments the command would refuse: --version answers before they are checked.
    argv = ["--version", "--no-such-option"]
    with pytest.raises(SystemExit) as exited:
        if inspect.signature(main).parameters:
            main(argv)
        else:  # a command without an argv parameter reads sys.argv
            monkeypatch.setattr(sys, "argv", [module, *argv])
            main()
    assert exited.value.code == 0, capsys.readouterr().err
    assert capsys.readouterr().out == f"softbio {PYPROJECT_VERSION}\n"


def test_evaluates_compare_subcommand_prints_the_version_too(capsys):
    from train.evaluate import main

    with pytest.raises(SystemExit) as exited:
        main(["compare", "--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"softbio {PYPROJECT_VERSION}\n"


def test_python_m_version_answers_without_importing_torch():
    """A fresh `python -m softbio_hf.predict --version` prints the version; its import log holds no torch."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "softbio_hf.predict", "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and done.stdout == f"softbio {PYPROJECT_VERSION}\n", done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")}
    assert "softbio_hf.version" in imported and "torch" not in imported
