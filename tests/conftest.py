from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One intra-op thread per process (this one and every process a test starts, which inherit it), set before torch
# is imported. The tests' models are tiny: a second thread only adds a hand-off per op, and where processes run at
# once (app servers, torchrun, loader workers) or the machine is shared, each op then waits for a descheduled
# thread. 20 training steps of the tiny model took 71-83 s with two threads and 28-43 s with one at a load of 20.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

from tiny import TINY_VISION, make_tiny_clip

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHES = ("__pycache__", ".pytest_cache", ".ruff_cache", ".venv")  # what any Python run leaves: not the tests'


def checkout_extras() -> set[str] | None:
    """Untracked and ignored files of the checkout, caches aside; None outside a git checkout."""
    try:
        listed = subprocess.run(
            ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if listed.returncode != 0:
        return None
    paths = {line[3:] for line in listed.stdout.splitlines() if line[:2] in ("??", "!!")}
    return {path for path in paths if not any(part in CACHES for part in Path(path).parts)}


def is_xdist_worker(config) -> bool:
    """A pytest-xdist worker: the checkout is judged once, by the process that started the workers, after all of
    them have ended (a worker finishing early would see another's test at work)."""
    return hasattr(config, "workerinput")


def pytest_sessionstart(session):
    if not is_xdist_worker(session.config):
        session.config.stash_checkout = checkout_extras()


def pytest_sessionfinish(session, exitstatus):
    """The tests write under their tmp_path, never in the checkout (artifacts/, outputs/ and runs/zs/.lock were
    left there): anything new beside the repository's files fails the run, named."""
    if is_xdist_worker(session.config):
        return
    before, after = getattr(session.config, "stash_checkout", None), checkout_extras()
    if before is None or after is None or not after - before:
        return
    left = sorted(after - before)
    print(f"\nThe tests left {len(left)} file(s) in the checkout: {left[:10]}; write them under tmp_path instead.")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_signals_held() -> dict[str, list[str]]:
    """Ctrl-C and SIGTERM as this process's kernel masks hold them: blocked, or ignored. Every process a test starts
    inherits both (a child with SIGINT blocked or ignored runs on through Ctrl-C), unlike a Python handler."""
    held = {}
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:  # Linux; elsewhere nothing is checked
        name, _, value = line.partition(":")
        if name in ("SigBlk", "SigIgn"):
            bits = int(value.strip(), 16)
            held[name] = [signal.Signals(n).name for n in STOP_SIGNALS if bits & (1 << (n - 1))]
    return {name: names for name, names in held.items() if names}


def free_stop_signals() -> None:
    """Ctrl-C and SIGTERM back to their defaults (Python's KeyboardInterrupt for SIGINT), unblocked."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def pytest_configure(config):
    """A suite started in the background by a script (`cmd &` in a non-interactive shell) inherits SIGINT ignored,
    and so would every process the tests start: the Ctrl-C tests' commands then never see their Ctrl-C. Each test
    process (pytest-xdist's workers included) starts as it would from a terminal."""
    if stop_signals_held():
        free_stop_signals()


@pytest.fixture(autouse=True)
def stop_signals_left_free(request):
    """Tests send SIGINT and SIGTERM to the processes they start, so none may leave them blocked or ignored here:
    the change is undone, and reported against the test (or a fixture set up for it) after which it was seen."""
    yield
    held = stop_signals_held()
    if not held:
        return
    free_stop_signals()
    pytest.fail(f"after {request.node.nodeid}, this process holds {held}: later tests' Ctrl-C would not arrive")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def saved_tiny_model(tmp_path_factory) -> Path:
    """A random tiny SoftBioModel (seed 0) saved once for every test that reads one from a folder; never written to."""
    import torch

    from softbio_hf import SoftBioConfig, SoftBioModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-softbio")
    SoftBioModel(SoftBioConfig(vision_config={"model_type": "clip_vision_model", **TINY_VISION})).save_pretrained(
        folder
    )
    return folder


@pytest.fixture
def tiny_config():
    from softbio_hf import SoftBioConfig

    return SoftBioConfig(vision_config={"model_type": "clip_vision_model", **TINY_VISION}, projection_dim=16)


@pytest.fixture
def tiny_model(tiny_config):
    import torch

    from softbio_hf import SoftBioModel

    torch.manual_seed(0)
    return SoftBioModel(tiny_config).eval()
