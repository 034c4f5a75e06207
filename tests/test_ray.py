"""python -m softbio_hf.predict --engine ray: the local command's rows on an actor pool; a corrupt photo, a killed
actor and an interrupted run cost nothing. One local Ray cluster (2 CPUs, two actors) for the whole file: Ray's
start is slow on a small machine."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
from datasets_fixtures import face_like

from softbio_hf.predict import main, predict
from softbio_hf.predict_ray import predict_ray

REPO = Path(__file__).resolve().parents[1]
ACTOR = "MapWorker(MapBatches(FaceTable))"  # how Ray names an actor of the pool in its process title


@pytest.fixture(scope="module")
def cluster():
    import ray  # CI installs it (requirements-dev.txt); ray[data] is the softbio[ray] extra: never skipped

    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
    for number, handler in handlers.items():  # ray.init's SIGTERM handler outlives shutdown: later tests need theirs
        signal.signal(number, handler)


@pytest.fixture(scope="module")
def model_dir(saved_tiny_model):
    return saved_tiny_model


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Two real photos (a face each), generated ones (no face) and a corrupt file among them."""
    root = tmp_path_factory.mktemp("ray-photos")
    for photo in (REPO / "examples").glob("*.jpg"):
        shutil.copy(photo, root / photo.name)
    for i in range(7):
        face_like(i, size=48).save(root / f"g{i}.png")
    (root / "corrupt.jpg").write_bytes((REPO / "examples" / "astronaut.jpg").read_bytes()[:2000])
    return root


OPTIONS = {"detector": "haar", "dtype": "float32", "batch_size": 4, "probabilities": True}


def rows_of(out: Path) -> list[dict]:
    import pyarrow.parquet as parquet

    return parquet.read_table(out).to_pylist()


def by_face(rows: list[dict]) -> dict[tuple[str, int], dict]:
    keyed = {(row["source"], row["face"]): row for row in rows}
    assert len(keyed) == len(rows), "a photo's row appears twice"
    return keyed


def test_the_ray_engine_gives_the_local_commands_rows_and_a_corrupt_photo_is_a_status_row(
    cluster, model_dir, photos, tmp_path, capsys
):
    predict([str(photos)], str(model_dir), tmp_path / "local.parquet", num_workers=0, **OPTIONS)
    argv = [str(photos), "--model", str(model_dir), "--engine", "ray", "--actors", "2", "--ray-batch", "2"]
    argv += ["--detector", "haar", "--dtype", "float32", "--batch-size", "4", "--probabilities"]
    assert main([*argv, "--out", str(tmp_path / "ray")]) == 0
    assert "10 photos this run: 2 faces, 7 without a face, 1 unreadable; 10 rows added" in capsys.readouterr().out
    local, ray = by_face(rows_of(tmp_path / "local.parquet")), by_face(rows_of(tmp_path / "ray"))
    assert ray.keys() == local.keys() and len(ray) == 10  # compared without regard to order
    for key, row in local.items():
        theirs = ray[key]
        assert theirs.keys() == row.keys()
        for column, value in row.items():  # labels and boxes equal; probabilities equal at fp32
            expected = pytest.approx(value, rel=1e-5, abs=1e-6) if isinstance(value, float) else value
            assert theirs[column] == expected, (key, column)
    corrupt = ray[(str(photos / "corrupt.jpg"), -1)]
    assert corrupt["status"].startswith("error: ") and "truncated or corrupt" in corrupt["status"]
    assert main([*argv, "--out", str(tmp_path / "ray")]) == 2  # an existing output is never added to silently
    assert "exists; continue it with --resume, or replace it with --overwrite" in capsys.readouterr().err


def actor_processes() -> list[int]:
    """PIDs of the pool's actors on this machine (Ray sets each actor's process title)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if ACTOR in title:
            found.append(int(pid))
    return found


def test_an_actor_killed_mid_run_is_replaced_and_every_photo_appears_once(cluster, model_dir, photos, tmp_path):
    killed = []

    def kill_an_actor(done: int) -> None:
        if not killed:  # after the first part: the other batches are queued on or running in the actors
            pids = actor_processes()
            assert pids, "no actor process found to kill"
            os.kill(pids[0], signal.SIGKILL)
            killed.append((pids[0], done))

    stats = predict_ray(
        [str(photos)], str(model_dir), str(tmp_path / "ray"), actors=(2, 2), photos_per_task=1, on_part=kill_an_actor,
        **OPTIONS,
    )  # fmt: skip
    assert killed and killed[0][1] < 10  # killed while photos were still to do
    rows = rows_of(tmp_path / "ray")
    assert sorted(row["index"] for row in rows) == list(range(10))  # every photo once: none lost, none twice
    assert stats["photos"] == 10 and stats["faces"] == 2


def test_an_interrupted_run_resumed_adds_only_the_missing_photos(cluster, model_dir, photos, tmp_path):
    out = tmp_path / "ray"

    def stop(done: int) -> None:
        raise KeyboardInterrupt  # Ctrl-C after the first part is written

    with pytest.raises(KeyboardInterrupt):
        predict_ray([str(photos)], str(model_dir), str(out), actors=(2, 2), photos_per_task=2, on_part=stop, **OPTIONS)
    first = {row["index"] for row in rows_of(out)}
    assert 0 < len(first) < 10
    with pytest.raises(ValueError, match="--resume"):
        predict_ray([str(photos)], str(model_dir), str(out), actors=(2, 2), **OPTIONS)
    stats = predict_ray([str(photos)], str(model_dir), str(out), actors=(2, 2), resume=True, **OPTIONS)
    assert stats["photos"] == 10 - len(first)  # only the missing ones
    assert sorted(row["index"] for row in rows_of(out)) == list(range(10))


def test_without_ray_the_option_names_the_extra_and_bad_pool_sizes_are_refused(model_dir, tmp_path):
    from remote import run_isolated

    script = (
        "import contextlib, io, sys\n"
        "sys.modules['ray'] = None  # as where softbio[ray] is not installed\n"
        "model, sys.argv = sys.argv[1], ['-m']  # as while Python locates `-m softbio_hf.predict`\n"
        "from softbio_hf.predict import main\n"
        "for extra in ([], ['--actors', '3,1'], ['--actors', 'two'], ['--tracks', 't.csv']):\n"
        "    with contextlib.redirect_stderr(io.StringIO()) as said:\n"
        "        code = main(['photo.jpg', '--model', model, '--engine', 'ray', '--out', 'rows', *extra])\n"
        "    print('exit', code, said.getvalue().strip())\n"
    )
    lines = run_isolated(tmp_path, script, str(model_dir), pythonpath=str(REPO)).splitlines()
    assert lines[0].startswith(
        "exit 2 error: --engine ray needs ray, which is not installed: pip install 'softbio[ray]'"
    )
    assert lines[1] == lines[2].replace("two", "3,1") and "give N (at least 1) or MIN,MAX" in lines[1]
    assert lines[3].startswith("exit 2 error: --tracks is for clips, which the local engine analyses")
    assert not (tmp_path / "rows").exists()


def test_a_ray_output_that_is_not_a_folder_of_parts_is_named_before_any_work(model_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("a file")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("the user's")
    argv = [str(REPO / "examples"), "--model", str(model_dir), "--engine", "ray"]
    assert main([*argv, "--out", str(tmp_path / "file")]) == 2
    assert "is a file; --engine ray writes a folder of Parquet files" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "notes"), "--overwrite"]) == 2
    assert "holds files that are not this command's; choose an empty or new folder" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "new"), "--model", str(tmp_path / "gone")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "notes"]  # nothing written, Ray not started
