"""softbio_hf.safe_files: the one lock and the one atomic write, each killed mid-write by a real SIGKILL."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from softbio_hf import safe_files

ROOT = Path(__file__).resolve().parents[1]


def start_writer(script: str) -> subprocess.Popen:
    """A Python process running `script` that prints 'ready' once it is inside its write, then hangs there."""
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline()
    assert line.strip() == "ready", process.stderr.read()
    return process


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def test_atomic_write_killed_mid_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "results.json"
    target.write_text('{"old": true}')
    writer = start_writer(
        f"""
        import time
        from softbio_hf.safe_files import atomic_write
        with atomic_write({str(target)!r}, "wb") as handle:
            handle.write(b"x" * 5_000_000)
            handle.flush()
            print("ready", flush=True)
            time.sleep(60)
        """
    )
    kill(writer)
    assert target.read_text() == '{"old": true}'
    safe_files.atomic_write_json(target, {"new": 1})  # a later writer is not blocked by the leftover
    assert target.read_text() == '{\n  "new": 1\n}\n'


def test_lock_holder_killed_mid_write_frees_the_lock_and_leaves_the_old_file(tmp_path):
    target, lock = tmp_path / "faces.csv", tmp_path / "faces.csv.lock"
    target.write_text("old table\n")
    writer = start_writer(
        f"""
        import time
        from softbio_hf.safe_files import atomic_write, holding
        with holding({str(lock)!r}, "busy"), atomic_write({str(target)!r}) as handle:
            handle.write("new table, half written")
            handle.flush()
            print("ready", flush=True)
            time.sleep(60)
        """
    )
    assert safe_files.lock_exclusively(lock) is None  # held by the writer
    with pytest.raises(safe_files.LockBusy, match="busy"), safe_files.holding(lock, "busy"):
        pass
    kill(writer)
    assert target.read_text() == "old table\n"
    with safe_files.holding(lock, "busy"):  # the dead writer's lock went with it
        safe_files.atomic_write_text(target, "new table\n")
    assert target.read_text() == "new table\n"
    assert not lock.exists()


def test_folder_written_whole_killed_mid_fill_leaves_the_old_folder(tmp_path):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "data.arrow").write_text("old rows")
    writer = start_writer(
        f"""
        import time
        from softbio_hf.safe_files import folder_written_whole
        with folder_written_whole({str(out)!r}) as staging:
            (staging / "data.arrow").write_text("new rows, half")
            print("ready", flush=True)
            time.sleep(60)
        """
    )
    kill(writer)
    assert [p.name for p in out.iterdir()] == ["data.arrow"]
    assert (out / "data.arrow").read_text() == "old rows"
    with safe_files.folder_written_whole(out) as staging:
        (staging / "data.arrow").write_text("new rows")
    assert (out / "data.arrow").read_text() == "new rows"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".prepared.partial")) == ["prepared"]


def test_an_error_inside_the_block_keeps_the_old_file_and_cleans_up(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), safe_files.atomic_write(target) as handle:
        handle.write("new")
        raise RuntimeError("disk said no")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_atomic_json_refuses_non_finite_numbers(tmp_path):
    with pytest.raises(ValueError):
        safe_files.atomic_write_json(tmp_path / "r.json", {"accuracy": float("nan")})
    assert not (tmp_path / "r.json").exists()


def test_a_file_system_without_locks_is_named_not_taken_for_another_run(tmp_path, monkeypatch):
    import fcntl

    def no_locks(*_args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "lockf", no_locks)  # NFS without a lock daemon answers ENOLCK; none is mounted here
    with pytest.raises(safe_files.LockUnsupported, match="cannot lock files"):
        safe_files.lock_exclusively(tmp_path / "x.lock")


def test_a_deleted_lock_file_is_said_and_never_taken_while_its_holder_lives(tmp_path):
    lock = tmp_path / "faces.csv.lock"
    holder = start_writer(
        f"""
        import time
        from softbio_hf.safe_files import holding
        with holding({str(lock)!r}, "busy"):
            print("ready", flush=True)
            time.sleep(60)
        """
    )
    lock.unlink()  # a user takes it for a stale file
    with pytest.raises(safe_files.LockReplaced, match="was deleted or replaced while another run still holds it"):
        safe_files.lock_exclusively(lock)
    kill(holder)
    claim = safe_files.lock_exclusively(lock)  # the holder is gone: its anchor went with it
    assert claim is not None
    lock.unlink()
    other = safe_files.lock_exclusively(lock.with_name("other.lock"))
    lock.write_text("")  # someone else's file at the name now: releasing leaves it
    safe_files.release(claim)
    assert lock.exists()
    safe_files.release(other)


def test_a_claim_on_a_deleted_folder_does_not_hold_a_new_folder_that_reuses_its_inode(tmp_path, monkeypatch):
    """Anchors are named after the folder's inode, which the system reuses once a folder is deleted: a claim this
    process still holds on a deleted folder (bench.train's temporary run folders, one after another) must not make
    a new folder with the same inode look held. The reuse is forced by giving both folders one anchor key."""
    import shutil

    def one_key(path: Path) -> str:
        os.stat(path.parent)  # as the real key: a deleted folder has none
        return f"one-key-for-both-folders-{os.getpid()}"

    monkeypatch.setattr(safe_files, "anchor_key", one_key)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    old = safe_files.lock_exclusively(first / ".lock")
    assert old is not None
    assert safe_files.lock_exclusively(first / ".lock") is None  # still held: the same folder is refused
    shutil.rmtree(first)  # the old claim is never released, as a run object left alive would
    new = safe_files.lock_exclusively(second / ".lock")
    assert new is not None  # was None: "in use by another training run"
    old.close()  # closing the stale claim leaves the new one's anchor bound
    assert safe_files.lock_exclusively(second / ".lock") is None
    safe_files.release(new)
