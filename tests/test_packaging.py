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
    assert not [n for n in names if n.startswith(("train/", "tests/", "bench/", "app.py", "softbio_demo/"))]
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
        for name in ("requirements.txt", "requirements-dev.txt")  # the export extras are test-only here
        for line in (REPO / name).read_text().splitlines()
        if line.strip() and not line.startswith(("#", "-r"))
    }
    assert names <= pinned, names - pinned


EXTRAS_ONLY = (
    "accelerate",
    "datasets",
    "pyarrow",
    "peft",
    "gradio",
    "gradio_client",
    "matplotlib",
    "tensorboard",
    "onnx",
    "onnxruntime",
    "openvino",
    "ray",
)
WITHOUT_EXTRAS = """
import runpy, sys
for name in {extras!r}:
    sys.modules[name] = None  # the extras' packages cannot be imported
from transformers import pipeline
import softbio_hf
faces = pipeline("soft-biometrics", model=sys.argv[1])(sys.argv[2], detector="haar")
assert faces and set(faces[0]) >= {{"box", "age", "gender", "emotion"}}, faces
sys.argv = ["softbio_hf.predict", sys.argv[2], "--model", sys.argv[1], "--out", "rows.csv", "--detector", "haar",
            "--num-workers", "0"]
try:
    runpy.run_module("softbio_hf.predict", run_name="__main__")
except SystemExit as done:
    assert done.code == 0, done.code
print(open("rows.csv").read())
"""


def test_the_package_without_extras_runs_the_pipeline_and_the_batch_command(tiny_clip_dir, tmp_path):
    from photos import grace_hopper_path
    from remote import run_isolated

    from softbio_hf import SoftBioModel

    SoftBioModel.from_clip(tiny_clip_dir).save_pretrained(tmp_path / "model")
    stdout = run_isolated(
        tmp_path,
        WITHOUT_EXTRAS.format(extras=EXTRAS_ONLY),
        str(tmp_path / "model"),
        grace_hopper_path(),
        pythonpath=str(REPO),
    )
    summary, header, first = stdout.splitlines()[:3]
    assert summary.startswith("1 photos this run: 1 faces")
    assert header.startswith("index,source,face,faces,status") and ",ok," in first


def test_an_extra_that_is_missing_is_named_with_the_install_command_before_any_work(tmp_path):
    """A .parquet table without pyarrow is refused when the command starts (it used to fail after all the work)."""
    from remote import run_isolated

    script = (
        "import contextlib, io, sys\nsys.modules['pyarrow'] = None\nsys.modules['pyarrow.parquet'] = None\n"
        "sys.argv = ['-m']  # as while Python locates `-m softbio_hf.predict`: no model registered, no torch\n"
        "from softbio_hf.predict import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as said:\n"
        "    code = main(['photo.jpg', '--model', 'no-such-model', '--out', 'rows.PARQUET'])\n"
        "print('exit', code, said.getvalue(), 'torch imported:', 'torch' in sys.modules)\n"
    )
    said = run_isolated(tmp_path, script, pythonpath=str(REPO))
    assert "exit 2" in said and "--out rows.PARQUET (a .parquet table) needs pyarrow" in said
    assert "pip install 'softbio[train]'" in said
    assert "torch imported: False" in said  # refused before the model, or torch, is touched
    assert not list(tmp_path.glob("rows*"))


def test_the_batch_commands_help_and_argument_errors_answer_without_torch(tmp_path):
    """`python -m softbio_hf.predict --help` (and a wrong --out) must not import torch: seconds on any machine."""
    script = (
        "import runpy, sys\n"
        "sys.argv = ['-m', '--help']  # as while Python locates `-m softbio_hf.predict`\n"
        "import softbio_hf\n"
        "sys.argv = ['softbio_hf.predict', 'x.jpg', '--model', 'm', '--out', 'rows.txt']\n"
        "try:\n    runpy.run_module('softbio_hf.predict', run_name='__main__')\n"
        "except SystemExit as done:\n    print('exit', done.code)\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert "exit 2" in result.stdout and "torch imported: False" in result.stdout, result.stdout + result.stderr
    assert "cannot write .txt" in result.stderr


def test_ci_installs_system_packages_without_their_recommends():
    """apt's recommends pull in hundreds of MB the tests never use (a desktop's worth with chromium)."""
    installs = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if "apt-get install" in line]
    assert len(installs) == 2 and all("--no-install-recommends" in line for line in installs), installs
