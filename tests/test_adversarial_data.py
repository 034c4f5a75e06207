"""The data CLI against hostile or broken input: nothing read outside --root, nothing lost, every error named."""

from __future__ import annotations

import pytest
from datasets import DatasetDict, load_from_disk
from datasets_fixtures import make_folder, make_rafdb, make_utkface, write_jpeg

from train.data import main, prepare

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def prepare_cli(*args) -> int:
    return main(["prepare", *[str(a) for a in args]])


def test_list_entries_and_symlinks_pointing_outside_the_root_are_not_read(tmp_path):
    outside = tmp_path / "private"
    write_jpeg(outside / "secret.jpg", 1)
    write_jpeg(outside / "secret_aligned.jpg", 2)
    root = tmp_path / "mine"
    make_folder(root)
    (root / "link.jpg").symlink_to(outside / "secret.jpg")
    with (root / "metadata.csv").open("a") as table:
        table.write("../private/secret.jpg,30,male,,train\n")
        table.write(f"{outside / 'secret.jpg'},30,male,,train\n")
        table.write("link.jpg,30,male,,train\n")
    splits, report = prepare("folder", root, tmp_path / "out", image_size=32)
    assert report["skipped"]["counts"]["outside --root"] == 3
    assert sum(len(part) for part in splits.values()) == 3  # the fixture's own readable rows only

    raf = tmp_path / "raf"
    make_rafdb(raf)
    with (raf / "EmoLabel" / "list_patition_label.txt").open("a") as listing:
        listing.write("../../../private/secret.jpg 3\n")
        listing.write("/nowhere/train_12345.jpg 3\n")  # an absolute path that does not exist: skipped, not fatal
    _, report = prepare("rafdb", raf, tmp_path / "raf-out", image_size=32)
    # ../../../private/secret_aligned.jpg exists but lies outside; the absolute one and the fixture's are missing
    assert report["skipped"]["counts"] == {"missing image": 2, "outside --root": 1}
    assert sum(report["rows"].values()) == 8


def test_an_existing_output_is_refused_unless_overwrite_and_never_mixed(tmp_path, capsys):
    root = tmp_path / "mine"
    make_folder(root)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    assert prepare_cli("--dataset", "folder", "--root", root, "--out", out, "--image-size", 32) == 2
    assert "not empty" in capsys.readouterr().err and (out / "notes.txt").read_text() == "my notes"
    assert prepare_cli("--dataset", "folder", "--root", root, "--out", out, "--image-size", 32, "--overwrite") == 0
    assert not (out / "notes.txt").exists()  # replaced whole: no stale file or split of an older run
    assert set(load_from_disk(str(out))) == {"train", "test"}
    for inside in (root, root / "prepared"):
        assert prepare_cli("--dataset", "folder", "--root", root, "--out", inside, "--image-size", 32) == 2
        assert "overlap" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert prepare_cli("--dataset", "folder", "--root", root, "--out", tmp_path / "a-file") == 2
    assert "is a file" in capsys.readouterr().err


def test_a_crash_leaves_the_old_output_and_no_half_written_folder(tmp_path, monkeypatch):
    root = tmp_path / "mine"
    make_folder(root)
    out = tmp_path / "out"
    prepare("folder", root, out, image_size=32)
    before = sorted(p.name for p in out.rglob("*"))

    def crash(self, path, **kwargs):
        (tmp_path / "marker").write_text(path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DatasetDict, "save_to_disk", crash)
    with pytest.raises(OSError, match="No space left"):
        prepare("folder", root, out, image_size=32, overwrite=True)
    assert sorted(p.name for p in out.rglob("*")) == before and len(load_from_disk(str(out))["train"]) == 2
    assert not list(tmp_path.glob(".out.*"))  # the staging folder is gone
    assert ".out.partial-" in (tmp_path / "marker").read_text()  # it was written beside --out, not into it


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (b"\xef\xbb\xbffile_name,gender\na.jpg,female\n", None),  # a byte-order mark is fine
        (b"file_name,gender,emotion\na.jpg\n", None),  # a short row: its empty cells are no labels
        (b"file_name,gender\na.jpg,f\xe9minin\n", "is not UTF-8 text"),
        (b"file_name,gender\na.jpg," + b"x" * 140_000 + b"\n", "131,072 characters"),
        (b"file_name,gender\n,female\n", "no usable row"),  # the only row names no file
    ],
)
def test_metadata_csv_edge_cases(tmp_path, capsys, table, message):
    root = tmp_path / "mine"
    write_jpeg(root / "a.jpg", 1)
    (root / "metadata.csv").write_bytes(table)
    code = prepare_cli("--dataset", "folder", "--root", root, "--out", tmp_path / "out", "--image-size", 32)
    error = capsys.readouterr().err
    if message is None:
        assert code == 0, error
        assert sum(len(p) for p in load_from_disk(str(tmp_path / "out")).values()) == 1
    else:
        assert code == 2 and message in error, error
        assert "metadata.csv" in error or message == "no usable row"
        assert "Traceback" not in error
        assert not (tmp_path / "out").exists()


def test_bad_values_and_an_unreachable_hub_are_named(tmp_path, capsys):
    root = tmp_path / "mine"
    make_folder(root)
    assert prepare_cli("--dataset", "folder", "--root", root, "--out", tmp_path / "o", "--image-size", 0) == 2
    assert "--image-size 0: use 16 to 4096" in capsys.readouterr().err
    assert prepare_cli("--dataset", "fairface", "--root", "hub:0.25", "--out", tmp_path / "ff") == 2  # offline here
    error = capsys.readouterr().err
    assert "could not load HuggingFaceM4/FairFace" in error and "Traceback" not in error


def prepare_unprivileged(*args):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from remote import unprivileged

    command = [*unprivileged(), sys.executable, "-m", "train.data", "prepare", *[str(a) for a in args]]
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)


def test_unreadable_tables_locked_folders_and_unwritable_outputs_are_named(tmp_path):
    import subprocess

    from remote import unprivileged

    root = tmp_path / "mine"
    make_folder(root)
    table = root / "metadata.csv"
    table.chmod(0)
    assert subprocess.run([*unprivileged(), "cat", str(table)], capture_output=True).returncode != 0  # it holds
    result = prepare_unprivileged("--dataset", "folder", "--root", root, "--out", tmp_path / "out", "--image-size", 32)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{table} cannot be read (Permission denied); check its permissions" in result.stderr
    table.chmod(0o644)

    utk = tmp_path / "utk"
    make_utkface(utk)
    write_jpeg(utk / "locked" / "30_1_0_20170116174525111.jpg.chip.jpg", 7)
    (utk / "locked").chmod(0)
    result = prepare_unprivileged(
        "--dataset", "utkface", "--root", utk, "--out", tmp_path / "utk-out", "--image-size", 32
    )
    (utk / "locked").chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert "1 unreadable folder" in result.stdout  # counted in the report, not silently left out
    assert load_from_disk(str(tmp_path / "utk-out"))

    shelf = tmp_path / "read-only"
    shelf.mkdir()
    shelf.chmod(0o555)
    result = prepare_unprivileged("--dataset", "folder", "--root", root, "--out", shelf / "out", "--image-size", 32)
    shelf.chmod(0o755)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"--out {shelf / 'out'} cannot be written: the folder {shelf} is read-only (for this user)" in result.stderr
    assert list(shelf.iterdir()) == []


DEAD_HUB = {
    "HF_HUB_OFFLINE": "0",
    "HF_DATASETS_OFFLINE": "0",
    "TRANSFORMERS_OFFLINE": "0",
    "HF_ENDPOINT": "http://127.0.0.1:9",
}


# Runs a module as `python -m` does and counts the connections it opens to the dead Hub address: an audit hook
# sees every socket.connect, so the test counts retries instead of timing them (a timing fails on a slow machine).
COUNTING_CONNECTS = """
import runpy, sys
connects = []
sys.addaudithook(lambda event, args: connects.append(args[1]) if event == "socket.connect" else None)
module, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
    print("HUB CONNECTS", sum(1 for address in connects if tuple(address)[:2] == ("127.0.0.1", 9)), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "command",
    [
        ["train.train", "--config", "lora", "--set", "model.backbone=someone/clip-model", "output_dir=OUT"],
        ["train.data", "prepare", "--dataset", "fairface", "--root", "hub:0.25", "--out", "OUT"],
        ["train.evaluate", "--model", "someone/softbio", "--data", "OUT", "--out", "OUT/eval"],
    ],
)
def test_an_unreachable_hub_is_said_after_one_probe_not_a_minute_of_retries(command, tmp_path):
    """A Hub address where nothing answers, as on a machine without network: one probe per process, then the
    cache only, so each command fails at once with its message (huggingface_hub alone retried for 26-58 s).
    The connections are counted, not timed: huggingface_hub's retries would show as more than one."""
    import os
    import re
    import subprocess
    import sys

    env = {**os.environ, **DEAD_HUB, "HF_HOME": str(tmp_path / "hf")}
    args = [part.replace("OUT", str(tmp_path / "out")) for part in command]
    result = subprocess.run(
        [sys.executable, "-c", COUNTING_CONNECTS, *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=900,  # only to catch a hang: a loaded 2-core machine takes over 40 s to import torch here
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    connects = re.search(r"HUB CONNECTS (\d+)", result.stderr)
    assert connects and int(connects[1]) <= 1, result.stderr[-2000:]  # at most the one probe: no retry
