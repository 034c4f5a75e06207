"""
Safe files for every command that writes or locks: the batch command, training, prepare, export, evaluate and
the Hub staging folder. One lock, one atomic write, one folder swap, so a fix lands in one place.

- `lock_exclusively` / `holding`: a run's claim on an output (a deleted lock file is told, never taken).
- `atomic_write` (and `_bytes`, `_text`, `_json`): the whole new file or the old one, also after a power cut.
- `staging_folder` / `replace_folder` / `folder_written_whole`: a folder written aside and swapped in whole.
- `unwritable_reason`: why an output cannot be created there (under a file, read-only), asked before the work.

Imports only the standard library: the torch-free server and `--help` paths use it too.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


class LockBusy(RuntimeError):
    """Another process holds the lock."""


class LockUnsupported(OSError):
    """The file system cannot lock (ENOLCK/EOPNOTSUPP: NFS without a lock daemon, some FUSE mounts)."""


# ------------------------------------------------------------------------------------------------ locks
class LockReplaced(LockBusy):
    """The lock file was deleted or replaced while a live process still holds the claim it stood for."""


class Claim:
    """A held lock: the open lock file (its POSIX record lock) and the anchor bound beside it (see lock_exclusively).
    `close()` ends both; `name` is the lock file's path."""

    def __init__(self, handle: IO[str], anchor: Any | None, anchor_key: str | None):
        self.handle, self.anchor, self.anchor_key, self.name = handle, anchor, anchor_key, handle.name
        self.inode = os.fstat(handle.fileno()).st_ino

    def fileno(self) -> int:
        return self.handle.fileno()

    @property
    def closed(self) -> bool:
        return self.handle.closed

    def still_named(self) -> bool:
        """Whether the lock file at `name` is still the one this claim holds (not deleted, not replaced)."""
        try:
            return os.stat(self.name).st_ino == self.inode
        except OSError:
            return False

    def close(self) -> None:
        if self.anchor is not None:
            self.anchor.close()
            if _ANCHORS.get(self.anchor_key) is self.anchor:  # not a later claim's anchor under the same key
                _ANCHORS.pop(self.anchor_key, None)
                _ANCHOR_PATHS.pop(self.anchor_key, None)
        self.handle.close()


# Anchors held by this process; a forked child (a DataLoader worker) closes its copies at once, so that only the
# process that claimed holds the anchor and it goes with that process (a lingering child never keeps it).
_ANCHORS: dict[str, Any] = {}
_ANCHOR_PATHS: dict[str, Path] = {}  # the lock file each anchor was bound for


def _close_anchors_in_child() -> None:
    for anchor in list(_ANCHORS.values()):
        with contextlib.suppress(OSError):
            anchor.close()
    _ANCHORS.clear()
    _ANCHOR_PATHS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_anchors_in_child)


def anchor_key(path: Path) -> str:
    folder = os.stat(path.parent)
    return hashlib.sha256(f"{folder.st_dev}:{folder.st_ino}:{path.name}".encode()).hexdigest()[:48]


def bind_anchor(key: str) -> tuple[Any | None, bool]:
    """(the bound anchor socket, True), (None, False) when a live process holds it, (None, True) where the system
    has no abstract sockets (not Linux): the lock file alone then."""
    import socket

    if not sys.platform.startswith("linux"):
        return None, True
    anchor = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        anchor.bind(f"\0softbio-lock-{key}")
    except OSError as error:
        anchor.close()
        if error.errno == errno.EADDRINUSE:
            return None, False
        return None, True  # a sandbox without unix sockets: the lock file alone, as before
    _ANCHORS[key] = anchor
    return anchor, True


def lock_exclusively(path: Path) -> Claim | None:
    """
    A Claim holding an exclusive lock on `path`, or None when another process holds it; LockReplaced when the lock
    file was deleted (or replaced) while a live process holds the claim.

    A POSIX record lock (fcntl.lockf), not flock: the system drops it when the process dies, so a killed run never
    leaves it stuck, and forked children such as DataLoader workers do not inherit it. With flock a lingering
    forked worker kept the lock after its parent died (a test saw it), refusing the next run.

    Why a second anchor: a lock file is a name anyone can delete, and a new file at that name locks freely while
    the first holder still runs (a second run then emptied a live run's folder). So the claim also binds a Linux
    abstract unix socket named after the lock (its folder's device and inode, and the file's name): it is no file,
    cannot be deleted, is refused (EADDRINUSE) to anyone else while bound, and the kernel unbinds it when the holder
    dies; forked children close their copy at fork. A free lock file with a bound anchor is thus a deleted lock
    file, said as such. (Abstract sockets live per network namespace: across containers sharing a folder the lock
    file still holds, as before.)

    A file system that cannot lock raises LockUnsupported, never "held by another run".
    """
    import fcntl

    path = Path(path)
    key = anchor_key(path)
    if key in _ANCHORS:
        if anchors_same_folder(_ANCHOR_PATHS.get(key), key):  # this process holds it already: asked before opening
            return None  # the file again, since closing any descriptor of a file drops the process's record locks
        drop_anchor(key)  # bound for a folder since deleted, whose inode this new folder reuses: it guards nothing
    handle = path.open("a")  # the open file is the lock: it outlives this function (a Claim closes it)
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        handle.close()
        if error.errno in (errno.EACCES, errno.EAGAIN):
            return None
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise LockUnsupported(
                error.errno,
                f"the file system of {path.parent} cannot lock files ({error.strerror}); write to a local "
                "folder (not NFS without a lock daemon)",
            ) from None
        raise
    anchor, free = bind_anchor(key)
    if not free:
        handle.close()  # the new lock file is left: the live holder's claim still stands for it
        raise LockReplaced(
            f"the lock file {path} was deleted or replaced while another run still holds it (that run is alive); "
            "nothing was touched. Wait for that run to end; never delete a lock file by hand (a killed run leaves "
            "no stuck lock)"
        )
    if anchor is not None:
        _ANCHOR_PATHS[key] = path
    return Claim(handle, anchor, key if anchor is not None else None)


def anchors_same_folder(held: Path | None, key: str) -> bool:
    """Whether the lock file an anchor was bound for still names the folder `key` names (not a deleted one)."""
    try:
        return held is not None and anchor_key(held) == key
    except OSError:
        return False


def drop_anchor(key: str) -> None:
    anchor = _ANCHORS.pop(key, None)
    _ANCHOR_PATHS.pop(key, None)
    if anchor is not None:
        with contextlib.suppress(OSError):
            anchor.close()


def release(handle: Claim | IO[str] | None, unlink: bool = True) -> None:
    """End a claim. The file is unlinked while still held, so no later run can share this one's lock; a lock file
    that is no longer this claim's (deleted and taken anew) is left to its holder."""
    if handle is None:
        return
    if unlink and (not isinstance(handle, Claim) or handle.still_named()):
        Path(handle.name).unlink(missing_ok=True)
    handle.close()


@contextlib.contextmanager
def holding(lock_path: Path, busy_message: str) -> Iterator[None]:
    """The lock at `lock_path` for the block; LockBusy(busy_message) when another process has it."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = lock_exclusively(lock_path)
    if handle is None:
        raise LockBusy(busy_message)
    try:
        yield
    finally:
        release(handle)


def unwritable_reason(path: Path) -> str | None:
    """
    Why `path` cannot be created, or None: a file where a folder of its path should be, or a read-only folder
    (a read-only mount, an immutable folder, another user's). Asked before a long job starts, so that it fails at
    once and not when its first or last file is written.
    """
    for folder in (Path(path).parent, *Path(path).parent.parents):
        if folder.exists():
            if not folder.is_dir():
                return f"{folder} is a file, not a folder"
            if not os.access(folder, os.W_OK | os.X_OK):
                return f"the folder {folder} is read-only (for this user)"
            return None
    return None


# ----------------------------------------------------------------------------------------- atomic writes
def fsync_folder(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable (a rename lives in the folder, not in the file)."""
    with contextlib.suppress(OSError):  # some file systems refuse to open or sync a directory: best effort there
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def sibling(path: Path, tag: str) -> Path:
    """A hidden temporary name beside `path`, unique to this process."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_args: Any) -> Iterator[IO]:
    """
    Write `path` whole or not at all: the block writes a temporary file beside it, which is flushed, fsynced and
    renamed over `path` when the block ends without an error (then the folder is fsynced). A kill or an error
    mid-write leaves the old file as it was; the temporary file is removed on an error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = sibling(path, "writing")
    try:
        with partial.open(mode, **open_args) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """For writers that want a file name (pyarrow, safetensors' save_file): the block writes the yielded path,
    which then replaces `path` as atomic_write does."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = sibling(path, "writing").with_suffix(path.suffix)  # some writers look at the suffix
    try:
        yield partial
        descriptor = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike, value: Any, indent: int | None = 2) -> None:
    """Strict JSON (a NaN or inf is an error here, never a file other tools cannot read)."""
    atomic_write_text(path, json.dumps(value, indent=indent, allow_nan=False) + "\n")


# -------------------------------------------------------------------------------------------- folders
def staging_folder(out: Path) -> Path:
    """An empty folder beside `out` (same file system, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def fsync_tree(folder: Path) -> None:
    """Every file and folder under `folder` on disk before it is renamed into place."""
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                descriptor = os.open(Path(root) / name, os.O_RDONLY)
                try:
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)
        fsync_folder(Path(root))


def replace_folder(staging: Path, out: Path) -> None:
    """Put the finished `staging` folder at `out`; an old `out` is moved aside first and removed only once the
    new one is in place, so a kill at any point leaves one whole folder at `out` or beside it."""
    fsync_tree(staging)
    old = None
    if out.exists():
        old = sibling(out, "old")
        out.rename(old)
    staging.rename(out)
    fsync_folder(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def folder_written_whole(out: str | os.PathLike) -> Iterator[Path]:
    """The block fills the yielded staging folder; on success it replaces `out` whole, on an error it is
    removed and `out` stays as it was."""
    out = Path(out)
    staging = staging_folder(out)
    try:
        yield staging
        replace_folder(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


__all__ = [
    "Claim",
    "LockBusy",
    "LockReplaced",
    "LockUnsupported",
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "folder_written_whole",
    "fsync_folder",
    "holding",
    "lock_exclusively",
    "release",
    "replace_folder",
    "staging_folder",
    "unwritable_reason",
]
