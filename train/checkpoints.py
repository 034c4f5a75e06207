"""A run's output folder and checkpoints: the claim on output_dir (softbio_hf.safe_files' lock), which
checkpoints are intact, and the disk-full wording. Writing a checkpoint is the Run's (train.loop), since
accelerate holds the state."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

from train.errors import ConfigError, TrainingError

TRAINER_STATE = "trainer_state.json"


BEST_WEIGHTS = "best_trainable.safetensors"


class Interrupted(Exception):
    """The run stopped at a signal after `step`, with its checkpoint in `folder` (None: none was written yet)."""

    def __init__(self, folder: Path | None, step: int, signal_name: str | None = "SIGINT"):
        super().__init__(f"interrupted at step {step}")
        self.folder, self.step, self.signal_name = folder, step, signal_name

    @property
    def exit_code(self) -> int:
        return 143 if self.signal_name == "SIGTERM" else 130  # 128 + the signal's number, as shells report it


# What a training run writes in output_dir: --overwrite removes these and nothing else, and only in a folder whose
# run marker says a run claimed it.
RUN_ENTRIES = (
    "config.yaml",
    "checkpoints",
    "best",
    "eval",
    "logs",
    "summary.json",
    "training_curves.png",
    BEST_WEIGHTS,
    ".lock",
)
# Written first by the run that claims output_dir (before any other file), with the run's identity: what makes a
# folder a run's, not the names in it (a folder of one's own config.yaml and logs/ is not a run).
RUN_MARKER = ".softbio-run.json"


def is_run_entry(name: str) -> bool:
    """One of RUN_ENTRIES (or the marker), or safe_files' temporary file beside one (`.NAME.writing-PID`)."""
    entries = (*RUN_ENTRIES, RUN_MARKER)
    return name in entries or any(name.startswith(f".{entry}.") for entry in entries)


def read_run_marker(out: Path) -> dict[str, Any] | None:
    """The run marker of `out`, or None where there is none (or a file of that name that is not one)."""
    try:
        marker = json.loads((out / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("run_id"), str) else None


def write_run_marker(out: Path) -> dict[str, Any]:
    import socket
    import uuid
    from datetime import datetime, timezone

    from softbio_hf.safe_files import atomic_write_json

    marker = {
        "softbio_run": 1,
        "run_id": uuid.uuid4().hex,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    atomic_write_json(out / RUN_MARKER, marker)
    return marker


def claim_output_dir(out: Path, resume, overwrite: bool):
    """
    The run's output folder, held for the whole run (softbio_hf.safe_files.lock_exclusively: never left stuck by a
    killed run, never taken while a live run holds it even when its lock file was deleted). A folder holding
    another run is refused without --resume or --overwrite; --overwrite removes what the run named by the folder's
    run marker wrote, and refuses a folder without a marker or holding anything else (it never deletes what is
    not ours). The claim writes a new run marker first. Processes other than the first of a launcher share their
    first process's claim.
    """
    from softbio_hf.safe_files import LockReplaced, LockUnsupported, lock_exclusively, release

    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file; give a folder (--set output_dir=...).")
    if os.environ.get("RANK", "0") != "0":
        return None
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = lock_exclusively(out / ".lock")
    except LockReplaced as error:
        raise ConfigError(f"output_dir {out} is in use by another training run: {error}.") from None
    except LockUnsupported as error:
        raise ConfigError(f"output_dir {out}: {error.strerror}.") from None
    except OSError as error:
        raise ConfigError(f"output_dir {out} cannot be written ({error.strerror}); choose a writable folder.") from None
    if lock is None:
        raise ConfigError(
            f"output_dir {out} is in use by another training run; wait for it to end, or choose another output_dir."
        )
    try:
        clear_for_run(out, resume, overwrite)
    except BaseException:
        release(lock)  # a refused claim leaves the folder as it was
        raise
    return lock


def clear_for_run(out: Path, resume, overwrite: bool) -> None:
    """Check (and with --overwrite empty) a claimed output_dir, then mark it as this run's."""
    held = sorted(p.name for p in out.iterdir() if p.name not in (".lock", RUN_MARKER))
    marker = read_run_marker(out)
    if held and not resume:
        foreign = [name for name in held if not is_run_entry(name)]
        if foreign:
            raise ConfigError(
                f"output_dir {out} holds files that no training run wrote ({', '.join(foreign[:5])}); nothing was "
                "deleted. Choose a new or empty folder with --set output_dir=..."
            )
        if marker is None:
            raise ConfigError(
                f"output_dir {out} holds {', '.join(held[:5])} but no run marker ({RUN_MARKER}): no training run "
                "claimed this folder, so these are taken for your own files and nothing was deleted. Choose a new or "
                "empty folder with --set output_dir=... (or, if they are an old run's, delete them yourself)."
            )
        if not overwrite:
            raise ConfigError(
                f"output_dir {out} already holds a run ({', '.join(held[:5])}). Continue it with --resume, replace "
                "it with --overwrite, or choose another folder with --set output_dir=..."
            )
        for name in held:
            path = out / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if not resume or (marker is None and (not held or checkpoints_in(out))):
        write_run_marker(out)  # a resumed run keeps its identity; an older run's checkpoints are adopted


def checkpoints_in(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.partial` folder is a save that did not finish)."""
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if not p.name.endswith(".partial") and (p / TRAINER_STATE).is_file())


def checkpoint_state(folder: Path) -> dict[str, Any]:
    """A checkpoint's trainer state, once its files have been checked: a ValueError says what is broken."""
    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"its {TRAINER_STATE} cannot be read ({error})") from None
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors":
            check_safetensors(path)
        elif path.suffix in (".bin", ".pkl", ".pt"):
            check_torch_archive(path)
    return state


def check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as opened:
            for name in opened.keys():  # noqa: SIM118 (safe_open is not iterable): every tensor must be there
                opened.get_slice(name)
    except Exception as error:  # safetensors raises its own error types for a torn file
        raise ValueError(f"{path.name} is damaged ({error})") from None


def check_torch_archive(path: Path) -> None:
    """accelerate writes the optimizer and RNG states with torch.save, a zip archive: its CRCs tell a torn file
    without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ValueError(f"{path.name} is damaged ({error})") from None
    if broken is not None:
        raise ValueError(f"{path.name} is damaged (its entry {broken} fails its checksum)")


DISK_FULL_SIGNS = ("No space left", "StorageFull", "inline_container", "os error 28")


@contextlib.contextmanager
def disk_full_is_said(path: Path):
    """A save that runs out of space is said so, whoever wrote: Python (ENOSPC), torch's serializer ('enforce fail
    at inline_container') or safetensors (its Rust IoError, 'StorageFull')."""
    try:
        yield
    except Exception as error:
        text = str(error)
        if getattr(error, "errno", None) == errno.ENOSPC or any(sign in text for sign in DISK_FULL_SIGNS):
            raise TrainingError(f"disk full at {path}: free some space and continue with --resume.") from None
        raise
