"""`pip install .` installs the softbio_hf package with its dependencies declared; it imports from any folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_the_package_and_its_dependencies(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "softbio_hf", source / "softbio_hf", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("softbio-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    package = {Path(n).name for n in names if n.startswith("softbio_hf/")}
    assert {p.name for p in (REPO / "softbio_hf").glob("*.py")} == package
    assert not [n for n in names if n.startswith(("train/", "tests/", "bench/", "app.py"))]
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    for requirement in ("transformers", "torch", "opencv-python-headless", "safetensors"):
        assert f"Requires-Dist: {requirement}" in metadata
    assert "Provides-Extra: train" in metadata and "Provides-Extra: demo" in metadata

    # Installed (without re-installing the dependencies this environment has), it imports from anywhere.
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    check = subprocess.run(
        [sys.executable, "-c", "import softbio_hf, sys; print(softbio_hf.__file__); print(softbio_hf.SoftBioModel)"],
        cwd=elsewhere,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, check.stderr[-2000:]
    assert check.stdout.startswith(str(target))


def test_requirements_and_project_dependencies_agree():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    names = {r.split(">")[0].split("<")[0].split("=")[0].strip().lower() for r in declared}
    pinned = {
        line.split(">")[0].split("<")[0].split("=")[0].strip().lower()
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert names <= pinned, names - pinned
