"""Video: people tracked through a real mp4, one steady answer per person, and bad clips named."""

from __future__ import annotations

import re
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
EMOTIONS = ["surprise", "fear", "disgust", "happy", "sad", "angry", "neutral"]


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


def test_a_tracks_answer_is_the_mean_of_its_frames_weighted_by_trust(analysed):
    for track in analysed["tracks"]:
        faces = [f for e in analysed["frames"] for f in e["faces"] if f["track_id"] == track["track_id"]]
        assert len(faces) == track["frames"]
        sides = [min(f["box"]["xmax"] - f["box"]["xmin"], f["box"]["ymax"] - f["box"]["ymin"]) for f in faces]
        weights = [f["detection_score"] * min(1.0, side / 96) for f, side in zip(faces, sides, strict=True)]
        for task in TASKS:
            labels = list(track[task]["scores"])
            scores = [[face[task]["scores"][label] for label in labels] for face in faces]
            mean = np.average(scores, axis=0, weights=weights)
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
    monkeypatch.setattr(pipe, "classify", lambda pixels, **kw: sizes.append(len(pixels)) or classify(pixels, **kw))
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

    rows, _ = video_rows(
        pipe, Source(0, str(clip[0]), str(clip[0])), {"detector": "haar"}, pipe.model.config.tasks, False
    )
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


# ---------------------------------------------------------------------- tracking by appearance, decoding
@pytest.fixture(scope="module")
def crossing(tmp_path_factory) -> tuple[Path, dict]:
    from clips import make_crossing_clip

    path = tmp_path_factory.mktemp("crossing") / "crossing.mp4"
    return path, make_crossing_clip(path)


def test_two_people_who_cross_and_one_hidden_past_the_gap_are_two_tracks_of_their_own_frames(pipe, crossing):
    from clips import person_at

    path, truth = crossing
    result = pipe(str(path), detector="haar")
    assert len(result["tracks"]) == 2
    owners: dict[int, set] = {}
    for entry in result["frames"]:
        for face in entry["faces"]:
            owners.setdefault(face["track_id"], set()).add(person_at(truth["frames"][entry["frame"]], face["box"]))
    assert sorted(map(sorted, owners.values())) == [["a"], ["b"]]  # each track holds one person's frames only
    a = next(t for t in result["tracks"] if owners[t["track_id"]] == {"a"})
    assert a["first_frame"] < 16 and a["last_frame"] > 44  # before the crossing, and back after hiding 10 frames
    # Overlap alone cannot do it: without re-joining by appearance, the hidden people come back as new tracks.
    assert len(pipe(str(path), detector="haar", reid_gap=0)["tracks"]) > 2


def test_frame_times_are_the_decoders_timestamps_for_variable_frame_timing(tmp_path):
    from clips import write_clip

    times = [0.0, 0.1, 0.35, 0.4, 1.0, 1.05, 2.2, 2.25]  # as a phone writes them: no steady rate
    frames = [np.full((48, 64, 3), 30 * i, np.uint8) for i in range(len(times))]
    write_clip(tmp_path / "vfr.mp4", frames, times)
    assert [f.time_s for f in read_frames(tmp_path / "vfr.mp4")] == pytest.approx(times, abs=1e-3)
    assert [f.index for f in read_frames(tmp_path / "vfr.mp4", fps=2.0)] == [0, 4, 6]  # by time: 0, 1.0, 2.2 s


def write_solid_clip(path: Path, seconds: float, fps: float = 8, **container_options: str) -> None:
    from clips import write_clip

    count = round(seconds * fps)
    frames = [np.full((48, 64, 3), i % 250, np.uint8) for i in range(count)]
    write_clip(path, frames, [i / fps for i in range(count)], **container_options)


def test_a_container_that_states_no_length_is_refused_past_the_cap_while_reading(tmp_path):
    import av

    path = tmp_path / "live.mkv"
    write_solid_clip(path, seconds=4, live="1")  # a live Matroska stream: no duration, no frame count
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0 and container.duration is None
    with pytest.raises(VideoInputError, match=r"runs past 2 s \(its container does not state its length\)"):
        list(read_frames(path, max_seconds=2))
    assert len(list(read_frames(path, max_seconds=5))) == 32  # under the cap it is read whole


def test_a_clip_cut_short_is_analysed_up_to_where_it_stops_and_says_so(pipe, tmp_path):
    path = tmp_path / "cut.mp4"
    write_solid_clip(path, seconds=7.5, movflags="faststart")  # 60 frames, its index up front
    whole = pipe(str(path), detector="none")
    assert whole["decoding"] == {"status": "complete", "frames_read": 60, "frames_expected": 60}
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the second half lost in transfer
    cut = pipe(str(path), detector="none")
    assert cut["decoding"]["status"] == "truncated" and cut["decoding"]["frames_expected"] == 60
    assert 0 < cut["decoding"]["frames_read"] < 60 and "of the 60 frames" in cut["decoding"]["reason"]
    assert len(cut["frames"]) == cut["decoding"]["frames_read"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"fps": "4"}, r"fps='4': use frames per second"),
        ({"max_gap": "x"}, r"max_gap='x': use analysed frames"),
        ({"max_gap": -3}, r"max_gap=-3: use analysed frames"),
        ({"every": 2, "fps": 4}, r"every=2 and fps=4: give one of them"),
        ({"every": 1.5}, r"every=1.5: use one frame in N"),
        ({"max_frames": True}, r"max_frames=True"),
    ],
)
def test_video_options_of_the_wrong_kind_are_named(pipe, clip, options, message):
    with pytest.raises(VideoInputError, match=message):
        pipe(str(clip[0]), **options)


def test_each_track_has_an_emotion_timeline_of_its_frames(analysed):
    for track in analysed["tracks"]:
        faces = [f for e in analysed["frames"] for f in e["faces"] if f["track_id"] == track["track_id"]]
        assert [point["time_s"] for point in track["timeline"]] == [face["time_s"] for face in faces]
        assert all(list(point)[2:] == EMOTIONS for point in track["timeline"])  # one column order for every frame
        assert all(
            {k: v for k, v in point.items() if k not in ("time_s", "frame")} == face["emotion"]["scores"]
            for point, face in zip(track["timeline"], faces, strict=True)
        )


def test_the_batch_command_writes_timelines_counts_clip_frames_and_flags_a_cut_clip(pipe, crossing, tmp_path, capsys):
    import csv

    from PIL import Image

    from softbio_hf.predict import main as predict

    pipe.model.save_pretrained(tmp_path / "model")
    cut = tmp_path / "cut.mp4"
    write_solid_clip(cut, seconds=7.5, movflags="faststart")
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    out, timeline = tmp_path / "faces.csv", tmp_path / "timeline"
    argv = [str(crossing[0]), str(cut), "--model", str(tmp_path / "model"), "--detector", "haar"]
    argv += ["--num-workers", "0", "--dtype", "float32", "--out", str(out), "--timeline", str(timeline)]
    assert predict(argv) == 0
    summary = capsys.readouterr().out
    analysed = pipe(str(crossing[0]), detector="haar")
    frames = len(analysed["frames"]) + len(pipe(str(cut), detector="haar")["frames"])  # up to where it stops
    faces = sum(len(entry["faces"]) for entry in analysed["frames"])  # the cut clip's solid frames have none
    counts = re.search(r"0 photos and 2 clips \((\d+) frames analysed, (\d+) faces; 1 cut short\) this run", summary)
    assert counts, summary
    assert (int(counts[1]), int(counts[2])) == (frames, faces)
    rows = list(csv.DictReader(out.open()))
    assert {r["status"] for r in rows if r["source"] == str(crossing[0])} == {"ok"}
    assert [r["status"][:10] for r in rows if r["source"] == str(cut)] == ["truncated:"]
    for track in analysed["tracks"]:
        stem = timeline / f"00000-crossing-track{track['track_id']}"
        assert Image.open(stem.with_suffix(".png")).size == (520, 200)
        table = list(csv.DictReader(stem.with_suffix(".csv").open()))
        assert [float(r["time_s"]) for r in table] == [p["time_s"] for p in track["timeline"]]
        assert float(table[0]["happy"]) == pytest.approx(track["timeline"][0]["happy"], abs=1e-6)
