"""Video: people tracked through a real mp4, one steady answer per person, and bad clips named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from clips import make_clip
from tiny import TINY_VISION
from transformers import pipeline

from softbio_hf import SoftBioConfig, SoftBioModel
from softbio_hf.video import VideoInputError, read_frames

TASKS = ("age", "gender", "emotion")


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    model = SoftBioModel(SoftBioConfig(vision_config={"model_type": "clip_vision_model", **TINY_VISION}))
    return pipeline("soft-biometrics", model=model, dtype="float32")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("clip") / "walk.mp4"
    return path, make_clip(path)


@pytest.fixture(scope="module")
def analysed(pipe, clip):
    return pipe(str(clip[0]), detector="haar")


def test_two_people_are_two_tracks_with_their_frame_spans(analysed, clip):
    _, truth = clip
    tracks = sorted(analysed["tracks"], key=lambda t: t["first_frame"])
    assert len(tracks) == 2
    for track, person in zip(tracks, ("a", "b"), strict=True):
        frames = truth[person]
        assert (track["first_frame"], track["last_frame"]) == (frames[0], frames[-1])
        assert track["frames"] >= 0.85 * len(frames)  # the detector may miss a frame; the track bridges it
        assert track["first_time_s"] == pytest.approx(frames[0] / 8.0)
    assert not any(f["faces"] for f in analysed["frames"][: truth["a"][0]])  # the empty frames stay empty
    moving, standing = tracks
    assert moving["box_last"]["xmin"] > moving["box_first"]["xmin"] + 100  # A walked right, B stood
    assert abs(standing["box_last"]["xmin"] - standing["box_first"]["xmin"]) < 10


def test_each_frame_is_answered_as_the_photo_pipeline_answers_it(pipe, analysed, clip):
    frames = {f.index: f.rgb for f in read_frames(clip[0])}
    for entry in analysed["frames"][::5]:
        photo = pipe(frames[entry["frame"]], detector="haar")
        video = [{k: v for k, v in face.items() if k not in ("frame", "time_s", "track_id")} for face in entry["faces"]]
        assert video == photo


def test_a_tracks_answer_is_the_mean_of_its_frames(analysed):
    for track in analysed["tracks"]:
        faces = [f for e in analysed["frames"] for f in e["faces"] if f["track_id"] == track["track_id"]]
        assert len(faces) == track["frames"]
        for task in TASKS:
            labels = list(track[task]["scores"])
            mean = np.mean([[face[task]["scores"][label] for label in labels] for face in faces], axis=0)
            assert [track[task]["scores"][label] for label in labels] == pytest.approx(mean.tolist(), abs=1e-9)
            assert track[task]["label"] == labels[int(mean.argmax())]
            agreement = np.mean([face[task]["label"] == track[task]["label"] for face in faces])
            assert track[task]["agreement"] == pytest.approx(agreement)


def test_every_and_max_frames_choose_the_frames(pipe, clip):
    result = pipe(str(clip[0]), detector="haar", every=4, max_frames=3)
    assert [f["frame"] for f in result["frames"]] == [0, 4, 8]
    assert [f.index for f in read_frames(clip[0], fps=2.0)] == [0, 4, 8, 12, 16, 20]  # an 8 fps clip


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"not a video at all" * 100), "cannot be opened as a video"),
        (lambda p: p.write_bytes(b""), "cannot be opened as a video"),
        (lambda p: None, "no such file"),
    ],
)
def test_a_bad_clip_is_named(pipe, tmp_path, make, message):
    path = tmp_path / "clip.mp4"
    make(path)
    with pytest.raises(VideoInputError, match=message):
        pipe(str(path))


def test_a_clip_too_long_and_bad_options_are_refused(pipe, clip):
    with pytest.raises(VideoInputError, match=r"over the 1 s this accepts"):
        list(read_frames(clip[0], max_seconds=1))
    with pytest.raises(VideoInputError, match=r"every=0"):
        pipe(str(clip[0]), every=0)
    with pytest.raises(VideoInputError, match=r"top_k"):
        pipe(str(clip[0]), top_k=1)


def test_the_batch_command_writes_a_row_per_face_per_frame_and_a_track_table(pipe, clip, tmp_path):
    import csv

    from softbio_hf.predict import main as predict

    pipe.model.save_pretrained(tmp_path / "model")
    photo = str(Path(__file__).resolve().parents[1] / "examples" / "grace_hopper.jpg")
    out, tracks = tmp_path / "faces.csv", tmp_path / "tracks.csv"
    argv = [photo, str(clip[0]), "--model", str(tmp_path / "model"), "--detector", "haar", "--num-workers", "0"]
    assert predict([*argv, "--dtype", "float32", "--out", str(out), "--tracks", str(tracks)]) == 0
    rows = list(csv.DictReader(out.open()))
    video = [r for r in rows if r["source"] == str(clip[0])]
    analysed = pipe(str(clip[0]), detector="haar")
    expected = [(f["frame"], face["track_id"]) for f in analysed["frames"] for face in f["faces"]]
    assert [(int(r["frame"]), int(r["track_id"])) for r in video] == expected
    assert rows[0]["source"] == photo and rows[0]["frame"] == ""  # a photo's row has no frame
    track_rows = list(csv.DictReader(tracks.open()))
    assert [(int(r["track_id"]), int(r["first_frame"]), int(r["last_frame"])) for r in track_rows] == [
        (t["track_id"], t["first_frame"], t["last_frame"]) for t in analysed["tracks"]
    ]
    assert all(r["gender_label"] in ("male", "female") and 0 <= float(r["gender_agreement"]) <= 1 for r in track_rows)
    # resumed after the fact: nothing analysed twice, both tables the same
    assert predict([*argv, "--dtype", "float32", "--out", str(out), "--tracks", str(tracks), "--resume"]) == 0
    assert list(csv.DictReader(out.open())) == rows and list(csv.DictReader(tracks.open())) == track_rows


def test_faces_of_many_frames_share_forward_passes(pipe, clip, monkeypatch):
    sizes: list[int] = []
    classify = pipe.classify
    monkeypatch.setattr(pipe, "classify", lambda pixels: sizes.append(len(pixels)) or classify(pixels))
    result = pipe(str(clip[0]), detector="haar")
    faces = sum(len(frame["faces"]) for frame in result["frames"])
    assert max(sizes) > 8 and len(sizes) < faces / 4  # batched across frames, not one pass per face


def test_a_video_block_torn_after_its_first_track_row_is_done_again_on_resume(pipe, clip, tmp_path):
    """A crash while a video's block is written (its face rows, then one row per track) leaves a part file that
    ends mid-block; --resume must analyse that video again, not take the face rows and one track as complete."""
    import json

    from softbio_hf.predict import Source, block_text, main, video_rows

    pipe.model.save_pretrained(tmp_path / "model")
    argv = [str(clip[0]), "--model", str(tmp_path / "model"), "--detector", "haar", "--num-workers", "0"]
    argv += ["--dtype", "float32"]
    assert main([*argv, "--out", str(tmp_path / "straight.jsonl"), "--tracks", str(tmp_path / "t1.jsonl")]) == 0

    rows = video_rows(pipe, Source(0, str(clip[0]), str(clip[0])), {"detector": "haar"}, pipe.model.config.tasks, False)
    lines = block_text(rows).splitlines(keepends=True)
    first_track = next(i for i, row in enumerate(rows) if row.get("kind") == "track")
    assert len(rows) - first_track == 2  # two tracks: the block is cut between them, with half a line after
    torn = "".join(lines[: first_track + 1]) + lines[first_track + 1][:25]
    out = tmp_path / "resumed.jsonl"
    (tmp_path / "resumed.jsonl.parts").mkdir()
    (tmp_path / "resumed.jsonl.parts" / "part-000.jsonl").write_text(torn)
    assert main([*argv, "--out", str(out), "--tracks", str(tmp_path / "t2.jsonl"), "--resume"]) == 0
    assert out.read_text() == (tmp_path / "straight.jsonl").read_text()
    tracks = [json.loads(line) for line in (tmp_path / "t2.jsonl").read_text().splitlines()]
    assert tracks == [json.loads(line) for line in (tmp_path / "t1.jsonl").read_text().splitlines()]
    assert len(tracks) == 2
