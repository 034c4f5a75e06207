"""Video: every person in a clip, tracked across frames, with one steady answer per person.

Frames are read with OpenCV (whatever its FFmpeg decodes: mp4, avi, mov, mkv, webm where the codec is there),
one in `every` (or at `fps`), and go through the pipeline like photos: faces from many frames share each forward
pass. Faces are linked into tracks by IoU association of their boxes from one analysed frame to the next, as
SORT does without its motion model: each box joins the live track whose last box overlaps it most (IoU >= 0.3,
greedily, best pairs first), or starts a new track; a track missing for more than `max_gap` analysed frames
ends. Limits: two people who cross paths, or one hidden for longer than the gap, can swap or split tracks; there
is no re-identification by face.

Per track, each task's probabilities are averaged over the track's frames (meaningful when they are calibrated:
python -m train.evaluate --calibrate): the label and score come from that mean, and `agreement` is the share of
the track's frames whose own label was the same.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm"}
MAX_VIDEO_SECONDS = 600.0  # a longer clip is refused: say --max-frames / every, or cut it
FRAMES_PER_CALL = 16  # frames handed to the pipeline at once: their faces share forward passes, memory stays flat


class VideoInputError(ValueError):
    """A file that is not a video, a video without frames, a codec that cannot be decoded, a clip too long."""


def is_video(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike)) and Path(str(source).split("?")[0]).suffix.lower() in VIDEO_EXTENSIONS


@dataclass
class Frame:
    index: int  # in the clip, from 0
    time_s: float
    rgb: np.ndarray


def read_frames(
    source: str | os.PathLike,
    every: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    max_seconds: float = MAX_VIDEO_SECONDS,
) -> Iterator[Frame]:
    """The analysed frames of a clip, in order: one in `every`, or about `fps` a second, at most `max_frames`."""
    import cv2

    name = str(source)
    if every is not None and (not isinstance(every, int) or every < 1):
        raise VideoInputError(f"every={every!r}: analyse one frame in N, N a whole number >= 1.")
    if fps is not None and not fps > 0:
        raise VideoInputError(f"fps={fps!r}: give frames per second > 0.")
    if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 1):
        raise VideoInputError(f"max_frames={max_frames!r}: give a whole number >= 1.")
    if not name.startswith(("http://", "https://")) and not Path(name).is_file():
        raise VideoInputError(f"{name}: no such file.")
    capture = cv2.VideoCapture(name)
    try:
        if not capture.isOpened():
            raise VideoInputError(
                f"{name} cannot be opened as a video: it is not one, or its codec cannot be decoded by OpenCV here "
                "(convert it to H.264 or MPEG-4 in an .mp4)."
            )
        rate = capture.get(cv2.CAP_PROP_FPS) or 25.0
        count = capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0
        if count / rate > max_seconds:
            raise VideoInputError(
                f"{name} is {count / rate:.0f} s long, over the {max_seconds:.0f} s this accepts; cut it first."
            )
        step = every or (max(1, round(rate / fps)) if fps else 1)
        index = taken = 0
        while max_frames is None or taken < max_frames:
            ok, bgr = capture.read()
            if not ok:
                break
            if index % step == 0:
                yield Frame(index, round(index / rate, 3), cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                taken += 1
            index += 1
        if index == 0:
            raise VideoInputError(f"{name} holds no frame that OpenCV can decode (empty, or an unsupported codec).")
    finally:
        capture.release()


def iou(a: dict[str, int], b: dict[str, int]) -> float:
    width = min(a["xmax"], b["xmax"]) - max(a["xmin"], b["xmin"])
    height = min(a["ymax"], b["ymax"]) - max(a["ymin"], b["ymin"])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    area = (a["xmax"] - a["xmin"]) * (a["ymax"] - a["ymin"]) + (b["xmax"] - b["xmin"]) * (b["ymax"] - b["ymin"])
    return inter / (area - inter)


@dataclass
class Track:
    id: int
    last_box: dict[str, int]
    last_seen: int  # analysed-frame number
    faces: list[dict[str, Any]] = field(default_factory=list)  # the frame records, each with frame and time_s


class IoUTracker:
    """IoU association of boxes between consecutive analysed frames (SORT without its Kalman filter)."""

    def __init__(self, iou_threshold: float = 0.3, max_gap: int = 5):
        self.iou_threshold, self.max_gap = iou_threshold, max_gap
        self.tracks: list[Track] = []
        self.step = -1

    def update(self, faces: list[dict[str, Any]]) -> list[int]:
        """The track id of each face of the next analysed frame (in the order given)."""
        self.step += 1
        live = [t for t in self.tracks if self.step - t.last_seen <= self.max_gap + 1]
        pairs = sorted(
            ((iou(track.last_box, face["box"]), t, f) for t, track in enumerate(live) for f, face in enumerate(faces)),
            reverse=True,
        )
        assigned: dict[int, Track] = {}
        used: set[int] = set()
        for overlap, t, f in pairs:
            if overlap < self.iou_threshold:
                break
            if t not in used and f not in assigned:
                assigned[f] = live[t]
                used.add(t)
        ids = []
        for f, face in enumerate(faces):
            track = assigned.get(f)
            if track is None:
                track = Track(len(self.tracks) + 1, face["box"], self.step)
                self.tracks.append(track)
            track.last_box, track.last_seen = face["box"], self.step
            track.faces.append(face)
            ids.append(track.id)
        return ids


def track_summary(track: Track, tasks: dict[str, list[str]], age_years: list[float] | None) -> dict[str, Any]:
    """One steady answer for a track: per task the mean of its frames' probabilities, with their agreement."""
    from .modeling_softbio import expected_age_years

    faces = track.faces
    centres = np.array(
        [[(f["box"]["xmin"] + f["box"]["xmax"]) / 2, (f["box"]["ymin"] + f["box"]["ymax"]) / 2] for f in faces]
    )
    summary: dict[str, Any] = {
        "track_id": track.id,
        "first_frame": faces[0]["frame"],
        "last_frame": faces[-1]["frame"],
        "first_time_s": faces[0]["time_s"],
        "last_time_s": faces[-1]["time_s"],
        "frames": len(faces),
        "box_first": faces[0]["box"],
        "box_last": faces[-1]["box"],
        "mean_centre": [round(float(v), 1) for v in centres.mean(axis=0)],
    }
    for task, labels in tasks.items():
        mean = np.mean([[f[task]["scores"][label] for label in labels] for f in faces], axis=0)
        best = int(mean.argmax())
        result = {
            "label": labels[best],
            "score": float(mean[best]),
            "scores": {label: float(p) for label, p in zip(labels, mean, strict=True)},
            "agreement": float(np.mean([f[task]["label"] == labels[best] for f in faces])),
        }
        if task == "age" and age_years:
            import torch

            result["years"] = round(float(expected_age_years(torch.tensor(mean), age_years, labels)), 1)
        summary[task] = result
    return summary


def analyze_video(
    pipe,
    source: str | os.PathLike,
    every: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    max_gap: int = 5,
    max_seconds: float = MAX_VIDEO_SECONDS,
    **options: Any,
) -> dict[str, Any]:
    """
    Every analysed frame's faces (the pipeline's records, with `frame`, `time_s` and `track_id`) and one entry per
    track. `options` are the pipeline's per-call options (detector, threshold, ...).
    """
    options.setdefault("batch_size", 32)  # faces from all the frames of a call share forward passes
    tracker = IoUTracker(max_gap=max_gap)
    frames: list[dict[str, Any]] = []
    batch: list[Frame] = []

    def run(batch: list[Frame]) -> None:
        for frame, faces in zip(batch, pipe([f.rgb for f in batch], **options), strict=True):
            for face in faces:
                face.update(frame=frame.index, time_s=frame.time_s)
            for face, track_id in zip(faces, tracker.update(faces), strict=True):
                face["track_id"] = track_id
            frames.append({"frame": frame.index, "time_s": frame.time_s, "faces": faces})

    for frame in read_frames(source, every, fps, max_frames, max_seconds):
        batch.append(frame)
        if len(batch) == FRAMES_PER_CALL:
            run(batch)
            batch = []
    if batch:
        run(batch)
    config = pipe.model.config
    tracks = [track_summary(t, config.tasks, config.age_years) for t in tracker.tracks]
    return {"frames": frames, "tracks": tracks}
