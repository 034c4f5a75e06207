"""python -m softbio_hf.predict: every input once, with a face or a reason; resumable; two processes = one."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets_fixtures import face_like
from PIL import Image
from serving import serving

from softbio_hf import SoftBioModel
from softbio_hf.predict import main, predict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(saved_tiny_model):
    return saved_tiny_model


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Generated images, the real example photos, and broken files, in nested folders."""
    root = tmp_path_factory.mktemp("photos")
    (root / "generated").mkdir()
    for i in range(12):
        face_like(i, size=64).save(root / "generated" / f"g{i:02d}.png")
    (root / "real").mkdir()
    for photo in (REPO / "examples").glob("*.jpg"):
        shutil.copy(photo, root / "real" / photo.name)
    (root / "broken").mkdir()
    (root / "broken" / "truncated.jpg").write_bytes((REPO / "examples" / "astronaut.jpg").read_bytes()[:3000])
    (root / "broken" / "notes.jpg").write_text("not a picture")
    (root / "broken" / "empty.png").write_bytes(b"")
    (root / "ignored.txt.bak").write_text("not an image extension: not an input")
    return root


def rows_of(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def run(inputs, model_dir, out, **options) -> dict:
    options = {"detector": "haar", "num_workers": 2, "batch_size": 4, "dtype": "float32", **options}
    return predict([str(i) for i in inputs], str(model_dir), out, **options)


def test_every_input_appears_once_with_a_face_or_a_reason(photos, model_dir, tmp_path):
    listing = tmp_path / "list.txt"
    body = (REPO / "examples" / "grace_hopper.jpg").read_bytes()
    with serving(body) as base:
        listing.write_text(
            f"# photos elsewhere\n{base}/grace.jpg\n\n{photos / 'real' / 'astronaut.jpg'}\nmissing.jpg\n"
        )
        stats = run([photos, listing], model_dir, tmp_path / "faces.csv")
    rows = rows_of(tmp_path / "faces.csv")
    expected = 12 + 2 + 3 + 3  # folder: generated, real, broken; list: URL, the astronaut again, a missing file
    assert stats["photos"] == expected and len(rows) == expected  # one face per real photo here
    assert sorted(int(r["index"]) for r in rows if r["face"] in ("0", "-1")) == list(range(expected))
    by_source = {r["source"]: r for r in rows}
    assert by_source[str(photos / "real" / "astronaut.jpg")]["status"] == "ok"
    assert by_source[f"{base}/grace.jpg"]["status"] == "ok"  # the URL was fetched
    assert "truncated or corrupt" in by_source[str(photos / "broken" / "truncated.jpg")]["status"]
    assert "not an image" in by_source[str(photos / "broken" / "notes.jpg")]["status"]
    assert "no such image file" in by_source["missing.jpg"]["status"]
    assert {by_source[str(photos / "generated" / f"g{i:02d}.png")]["status"] for i in range(12)} == {"no face"}
    assert stats["errors"] == 4 and stats["no_face"] == 12 and stats["faces"] == 4
    face = by_source[str(photos / "real" / "astronaut.jpg")]
    assert int(face["xmax"]) > int(face["xmin"]) and face["age_label"] and 0 <= float(face["gender_score"]) <= 1
    assert float(face["age_years"]) > 0
    assert [int(r["index"]) for r in rows] == sorted(int(r["index"]) for r in rows)  # input order
    assert not (tmp_path / "faces.csv.parts").exists()


def test_formats_hold_the_same_rows(photos, model_dir, tmp_path):
    import pyarrow.parquet as pq

    inputs = [photos / "real", photos / "broken"]
    for suffix in ("csv", "jsonl", "parquet"):
        run(inputs, model_dir, tmp_path / f"faces.{suffix}", probabilities=True)
    as_csv = rows_of(tmp_path / "faces.csv")
    as_jsonl = [json.loads(line) for line in (tmp_path / "faces.jsonl").read_text().splitlines()]
    as_parquet = pq.read_table(tmp_path / "faces.parquet").to_pylist()
    assert [r["source"] for r in as_csv] == [r["source"] for r in as_jsonl] == [r["source"] for r in as_parquet]
    ok = [r for r in as_jsonl if r["status"] == "ok"]
    assert ok and all(sum(r[f"gender_prob_{g}"] for g in ("male", "female")) == pytest.approx(1, abs=1e-3) for r in ok)
    assert "emotion_prob_happy" in as_csv[0]


def test_compile_gives_the_same_rows(photos, model_dir, tmp_path, capsys):
    inputs = [photos / "real"]
    run(inputs, model_dir, tmp_path / "plain.jsonl", probabilities=True)
    run(inputs, model_dir, tmp_path / "compiled.jsonl", probabilities=True, compile=True)
    assert "compiled the model for batches of 4" in capsys.readouterr().err
    plain, compiled = (
        [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        for name in ("plain.jsonl", "compiled.jsonl")
    )
    assert len(plain) == len(compiled) == 2
    for a, b in zip(plain, compiled, strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():  # labels and boxes equal, probabilities within float tolerance
            tolerance = 0.11 if key == "age_years" else 1e-3  # years are rounded to 0.1
            assert b[key] == (pytest.approx(value, abs=tolerance) if isinstance(value, float) else value), key


def test_a_batch_that_does_not_fit_is_halved_and_gives_the_same_rows(photos, model_dir, tmp_path, monkeypatch, capsys):
    from softbio_hf import SoftBiometricsPipeline

    inputs = [photos / "real", photos / "generated"]
    run(inputs, model_dir, tmp_path / "small.jsonl", batch_size=2, detector="none")
    forward = SoftBiometricsPipeline._forward

    def forward_within_two_faces(self, model_inputs):  # a device that holds two faces at a time
        if len(model_inputs["pixel_values"]) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated: two faces fit)")
        return forward(self, model_inputs)

    monkeypatch.setattr(SoftBiometricsPipeline, "_forward", forward_within_two_faces)
    run(inputs, model_dir, tmp_path / "halved.jsonl", batch_size=8, detector="none")
    assert capsys.readouterr().err.count("does not fit in memory") == 2  # 8 -> 4 -> 2, said each time
    small, halved = ((tmp_path / name).read_text().splitlines() for name in ("small.jsonl", "halved.jsonl"))
    assert len(small) == 14 and halved == small


def test_an_interrupted_run_resumes_to_the_same_table(photos, model_dir, tmp_path):
    run([photos], model_dir, tmp_path / "straight.csv")

    def stop(count):
        if count == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run([photos], model_dir, tmp_path / "resumed.csv", on_photo=stop)
    parts = tmp_path / "resumed.csv.parts"
    kept = [json.loads(line) for p in parts.glob("*.jsonl") for line in p.read_text().splitlines()]
    assert len({r["source"] for r in kept}) == 7 and not (tmp_path / "resumed.csv").exists()
    with next(parts.glob("*.jsonl")).open("a") as part:  # a crash in the middle of writing a row
        part.write('{"index": 99, "source": "half-writ')
    with pytest.raises(ValueError, match="--resume"):
        run([photos], model_dir, tmp_path / "resumed.csv")  # an existing output is never overwritten silently
    stats = run([photos], model_dir, tmp_path / "resumed.csv", resume=True)
    assert stats["photos"] == 17 - 7  # only what was left (12 generated, 2 real and 3 broken files)
    assert rows_of(tmp_path / "resumed.csv") == rows_of(tmp_path / "straight.csv")


def test_two_processes_give_the_same_rows_as_one(photos, model_dir, tmp_path):
    run([photos], model_dir, tmp_path / "one.jsonl")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "softbio_hf.predict",
        str(photos), "--model", str(model_dir), "--out", str(tmp_path / "two.jsonl"), "--detector", "haar",
        "--num-workers", "1", "--batch-size", "4", "--dtype", "float32",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = [line for line in result.stdout.splitlines() if "photos this run" in line]
    # one summary, for the whole run: both processes' photos (it said the main process's share alone)
    assert len(summary) == 1 and summary[0].startswith("17 photos this run: 2 faces, 12 without a face, 3 unreadable")
    one = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [(r["source"], r["face"], r["status"]) for r in two] == [(r["source"], r["face"], r["status"]) for r in one]
    for a, b in zip(one, two, strict=True):
        for key in ("age_label", "gender_label", "emotion_label", "xmin", "ymax"):
            assert a.get(key) == b.get(key), key
        if a["status"] == "ok":
            assert a["gender_score"] == pytest.approx(b["gender_score"], abs=1e-3)


def test_a_prepared_dataset_is_an_input(model_dir, tmp_path):
    from datasets import Dataset, DatasetDict, Features, Value
    from datasets import Image as ImageFeature

    images = [Image.fromarray(np.asarray(face_like(i, 48))) for i in range(3)]
    features = Features({"image": ImageFeature(), "age": Value("int16")})
    DatasetDict({"test": Dataset.from_dict({"image": images, "age": [1, 2, 3]}, features=features)}).save_to_disk(
        str(tmp_path / "prepared")
    )
    run([tmp_path / "prepared"], model_dir, tmp_path / "faces.csv", detector="none")
    rows = rows_of(tmp_path / "faces.csv")
    assert [r["source"] for r in rows] == [f"{tmp_path / 'prepared'}:test/{i}" for i in range(3)]
    assert {r["status"] for r in rows} == {"ok"}  # detector none: each image is a face crop


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "faces.xlsx"], "cannot write .xlsx; use one of .csv, .jsonl, .parquet"),
        (["--out", "faces.csv", "--detector", "mtcnn"], "Unknown face detector 'mtcnn'"),
        (["--out", "faces.csv", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_bad_options_are_clear(model_dir, tmp_path, capsys, args, message):
    args = [a if a.startswith("--") or a.isdigit() or a == "mtcnn" else str(tmp_path / a) for a in args]
    assert main([str(REPO / "examples"), "--model", str(model_dir), *args]) == 2
    assert message in capsys.readouterr().err


def test_help_explains_each_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for option in (
        "--model",
        "--out",
        "--limit",
        "--detector",
        "--batch-size",
        "--num-workers",
        "--device",
        "--dtype",
        "--resume",
        "--overwrite",
        "--probabilities",
    ):
        assert option in text


@pytest.mark.parametrize("suffix", [".CSV", ".JsonL"])
def test_the_format_is_the_suffix_in_any_case_and_resume_reads_it_back(photos, model_dir, tmp_path, suffix):
    out = tmp_path / f"faces{suffix}"
    run([photos / "real"], model_dir, out)
    first = out.read_text()
    assert first.startswith("index,source,face") if suffix == ".CSV" else json.loads(first.splitlines()[0])
    stats = run([photos / "real"], model_dir, out, resume=True)  # the finished table is read back in its format
    assert stats["photos"] == 0 and out.read_text() == first


def place(tmp_path: Path, case: str) -> list[str]:
    """Arguments naming an output that cannot be written, set up in tmp_path."""
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    (tmp_path / "faces.csv.parts").write_text("a file where the rows would wait")
    return {
        "tracks is out": ["--out", f"{tmp_path}/faces.jsonl", "--tracks", f"{tmp_path}/x/../faces.jsonl"],
        "under a file": ["--out", f"{tmp_path}/notes.txt/faces.csv"],
        "deeper under a file": ["--out", f"{tmp_path}/notes.txt/a/b/faces.csv"],
        "tracks under a file": ["--out", f"{tmp_path}/f.csv", "--tracks", f"{tmp_path}/notes.txt/t.csv"],
        "parts is a file": ["--out", f"{tmp_path}/faces.csv"],
    }[case]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("tracks is out", "is --out too: the track table would replace the faces; give another"),
        ("under a file", "cannot be written: {tmp}/notes.txt is a file, not a folder. Choose --out in a folder"),
        ("deeper under a file", "cannot be written: {tmp}/notes.txt is a file, not a folder"),
        ("tracks under a file", "--tracks {tmp}/notes.txt/t.csv cannot be written: {tmp}/notes.txt is a file"),
        ("parts is a file", "{tmp}/faces.csv.parts (where rows wait) is a file; move it away"),
    ],
)
def test_an_output_that_cannot_be_written_is_named_before_any_work(model_dir, tmp_path, capsys, case, message):
    args = place(tmp_path, case)
    assert main([str(REPO / "examples"), "--model", str(model_dir), *args]) == 2
    error = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in error and "Traceback" not in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces.csv.parts", "notes.txt"]  # nothing written


def test_a_read_only_folder_is_named_before_any_work(tmp_path):
    from remote import unprivileged

    shelf = tmp_path / "shelf"
    shelf.mkdir()
    shelf.chmod(0o555)
    command = [*unprivileged(), sys.executable, "-m", "softbio_hf.predict", "x.jpg", "--model", "m"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        for option in (["--out", str(shelf / "faces.csv")], ["--out", "f.csv", "--tracks", str(shelf / "t.csv")]):
            result = subprocess.run([*command, *option], cwd=tmp_path, env=env, capture_output=True, text=True)
            assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
            assert f"{option[-1]} cannot be written: the folder {shelf} is read-only" in result.stderr
    finally:
        shelf.chmod(0o755)
    assert list(shelf.iterdir()) == []


def test_a_lists_relative_paths_start_at_its_folder_and_a_missing_one_shows_where_it_was_looked_for(
    model_dir, tmp_path, monkeypatch
):
    shelf = tmp_path / "shelf"
    (shelf / "sub").mkdir(parents=True)
    shutil.copy(REPO / "examples" / "grace_hopper.jpg", shelf / "sub" / "grace.jpg")
    (shelf / "list.txt").write_text("sub/grace.jpg\nsub/missing.jpg\n")
    monkeypatch.chdir(tmp_path)  # not the list's folder
    run([shelf / "list.txt"], model_dir, tmp_path / "faces.csv", num_workers=0)
    found, missing = rows_of(tmp_path / "faces.csv")
    assert (found["source"], found["status"]) == ("sub/grace.jpg", "ok")
    assert missing["status"] == (
        f"error: 'sub/missing.jpg' (read as {shelf / 'sub' / 'missing.jpg'}: a list's relative paths start at the "
        "list's folder): no such image file; check the path."
    )


def test_a_run_whose_every_input_failed_exits_non_zero(model_dir, tmp_path, capsys):
    argv = ["--model", str(model_dir), "--detector", "haar", "--num-workers", "0"]
    missing = [str(tmp_path / "gone-1.jpg"), str(tmp_path / "gone-2.jpg")]
    assert main([*missing, *argv, "--out", str(tmp_path / "none.csv")]) == 1  # it exited 0 with two error rows
    assert "none of the 2 inputs could be read" in capsys.readouterr().err
    assert len(rows_of(tmp_path / "none.csv")) == 2  # the rows still say why, photo by photo
    assert main([*missing, str(REPO / "examples" / "grace_hopper.jpg"), *argv, "--out", str(tmp_path / "one.csv")]) == 0


@pytest.mark.parametrize("every", ["0", "-3"])
def test_every_below_one_is_refused_up_front(model_dir, tmp_path, capsys, every):
    out = tmp_path / "faces.csv"
    assert main([str(REPO / "examples"), "--model", str(model_dir), "--out", str(out), "--every", every]) == 2
    assert f"--every {every}: analyse one frame in N, N at least 1" in capsys.readouterr().err
    assert not out.exists()


def test_a_missing_or_unusable_model_folder_is_said_as_a_folder_before_torch_is_imported(tmp_path):
    from remote import run_isolated

    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not unpickled")
    (tmp_path / "empty").mkdir()
    script = (
        "import contextlib, io, sys\n"
        "models, sys.argv = sys.argv[1:], ['-m']  # as while Python locates `-m softbio_hf.predict`\n"
        "from softbio_hf.predict import main\n"
        "for model in models:\n"
        "    with contextlib.redirect_stderr(io.StringIO()) as said:\n"
        "        code = main(['photo.jpg', '--model', model, '--out', 'rows.csv'])\n"
        "    print('exit', code, said.getvalue().strip())\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    said = run_isolated(tmp_path, script, "runs/lora/best", "pickled", "empty", pythonpath=str(REPO))
    lines = said.splitlines()
    assert lines[0].startswith("exit 2 error: --model runs/lora/best: no such folder (looked in "), said
    assert lines[1].startswith("exit 2 error: --model pickled cannot be used: pickled holds pickled weights"), said
    assert lines[2].startswith("exit 2 error: --model empty holds no config.json"), said
    assert "Repo id" not in said and "torch imported: False" in said  # said at once, not after 30 s of imports
    assert not list(tmp_path.glob("rows*"))


def test_an_unmerged_lora_checkpoint_without_peft_is_said_without_a_traceback(model_dir, tmp_path, monkeypatch, capsys):
    import softbio_hf.methods

    torch.manual_seed(0)
    SoftBioModel.from_pretrained(model_dir).apply_method("lora", rank=2).save_pretrained(tmp_path / "unmerged")
    monkeypatch.setattr(softbio_hf.methods, "LoraConfig", None)  # what methods.py holds where peft is not installed
    argv = [str(REPO / "examples" / "grace_hopper.jpg"), "--model", str(tmp_path / "unmerged")]
    assert main([*argv, "--out", str(tmp_path / "faces.csv")]) == 2  # it raised the ImportError
    error = capsys.readouterr().err
    assert "unmerged 'lora' adapters needs peft: pip install 'softbio[train]'" in error and "Traceback" not in error


def test_the_batch_command_without_torch_says_what_to_install(tmp_path):
    from torch_free import run_torch_free

    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("{}")
    args = ["-m", "softbio_hf.predict", "x.jpg", "--model", "export", "--out", "rows.csv", "--backend", "onnx"]
    result = run_torch_free(tmp_path, *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "needs torch, also with --backend onnx" in result.stderr
    assert "pip install 'softbio[onnx]'" in result.stderr and "python -m softbio_hf.serve" in result.stderr


def test_resume_on_a_damaged_table_names_it_and_a_damaged_part_line_is_done_again(photos, model_dir, tmp_path, capsys):
    table = tmp_path / "faces.jsonl"
    run([photos / "real"], model_dir, table)
    finished = table.read_text()
    table.write_text(finished[: len(finished) // 2])  # cut short in a row, as a copy that stopped
    with pytest.raises(ValueError, match=r"faces.jsonl cannot be read back .* --overwrite"):
        run([photos / "real"], model_dir, table, resume=True)
    assert main([str(photos / "real"), "--model", str(model_dir), "--out", str(table), "--resume"]) == 2

    def stop(count):
        if count == 2:
            raise KeyboardInterrupt

    out = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run([photos / "real", photos / "broken"], model_dir, out, on_photo=stop)
    part = next((tmp_path / "resumed.jsonl.parts").glob("*.jsonl"))
    _first, *rest = part.read_text().splitlines(keepends=True)
    part.write_text("\x00\x00garbled\n" + "".join(rest))  # the first photo's row, damaged in place
    stats = run([photos / "real", photos / "broken"], model_dir, out, resume=True)
    assert stats["photos"] == 5 - 1  # the damaged photo again, and the three left
    assert "1 damaged line(s) skipped" in capsys.readouterr().err
    run([photos / "real", photos / "broken"], model_dir, tmp_path / "straight.jsonl")
    assert out.read_text() == (tmp_path / "straight.jsonl").read_text()


def test_the_batch_callable_gives_the_local_commands_rows_for_encoded_images(photos, model_dir, tmp_path):
    from softbio_hf.batch_rows import FaceRows

    run([photos / "real", photos / "broken"], model_dir, tmp_path / "local.jsonl", probabilities=True)
    local = [json.loads(line) for line in (tmp_path / "local.jsonl").read_text().splitlines()]
    files = sorted((photos / "real").iterdir()) + sorted((photos / "broken").iterdir())
    face_rows = FaceRows(str(model_dir), detector="haar", dtype="float32", probabilities=True, batch_size=4)
    batch = {"bytes": [f.read_bytes() for f in files], "source": [str(f) for f in files], "index": range(len(files))}
    table = face_rows(batch)
    rows = [dict(zip(table, values, strict=True)) for values in zip(*table.values(), strict=True)]
    assert set(table) == set(local[0]) and len(rows) == len(local) == 5
    for mine, theirs in zip(rows, local, strict=True):
        assert mine["source"] == theirs["source"] and mine["face"] == theirs["face"]
        if theirs["status"] == "ok":
            assert mine == pytest.approx(theirs, abs=1e-6)
        else:  # a file's rows name it by path, the bytes' by their source; both say why
            assert mine["status"].startswith("error: ") and theirs["status"].startswith("error: ")
    assert "not an image" in rows[[r["source"] for r in rows].index(str(photos / "broken" / "notes.jpg"))]["status"]
    empty = face_rows({"bytes": [], "source": []})
    assert empty == {name: [] for name in face_rows.names}
