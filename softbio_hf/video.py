"""Video: every person in a clip, tracked across frames, with one steady answer and an emotion timeline each.

Decoding. Clips are read with PyAV (FFmpeg bundled: mp4, mov, avi, mkv, webm, ...). A frame's time is its
decoder timestamp (pts x time base), so variable frame-rate phone videos get their true times. One frame in
`every`, or about `fps` a second (by timestamp), at most `max_frames`; `every` and `fps` together are refused.
Frames that are not analysed are decoded by the codec (later frames depend on them) but never converted to RGB.
An analysed frame is converted and scaled in one step to at most `max_side` pixels a side (MAX_SIDE), so a 4K clip
costs what a 1280-pixel one does; its faces are detected and cropped there and only the crops are kept until their
forward pass. Boxes are given in the clip's own pixels. The length check holds when the container reports no
length: frames are counted while reading, and reading stops past `max_seconds`. A clip that stops decoding early
(corrupt or cut short) is analysed up to where it stops and says so: `status` "truncated", `frames_read`, and the
frames its container announced.

Tracking. Faces are linked into tracks from one analysed frame to the next as DeepSORT does with its appearance
embedding, with IoU in place of its motion model. The appearance is the feature the forward pass already computes
for the heads (each task's pooled, projected feature, averaged, unit length): no second model. A face joins a live
track (one missing for at most `max_gap` analysed frames) whose last box overlaps it (IoU >= 0.3), the pairs ranked
by appearance similarity (cosine) first, so two people whose boxes overlap as they cross keep their own tracks.
A face left over may re-join, by appearance alone, a track missing for up to `reid_gap` analysed frames, when its
similarity to that track is at least `reid_similarity` and higher than to any other track: a person hidden for a
while, or turned away, keeps their track. Limits: appearance here is what the model's heads look at, not an
identity model; two similar-looking people (or one person and a look-alike appearing while the first is hidden)
can be confused; `reid_similarity` (0.85 by default) is not calibrated on real faces in this repository; an
exported model (ONNX, OpenVINO) gives logits only, so its tracks use IoU alone.

Answers. Per track, each task's probabilities are averaged over the track's frames, each frame weighted by how
far it can be trusted: its detection score times min(1, face side / 96 px) (a small, far face counts less). The
label and score come from that mean (meaningful when probabilities are calibrated: python -m train.evaluate
--calibrate); `agreement` is the share of the track's frames whose own label was the same. `timeline` lists
(time, emotion probabilities) for every frame of the track.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm"}
MAX_VIDEO_SECONDS = 600.0  # a longer clip is refused: say --max-frames / every, or cut it
MAX_SIDE = 1280  # analysed frames are scaled to at most this many pixels a side (memory does not grow with 4K)
DECODE_THREADS = min(4, os.cpu_count() or 1)  # decoder threads: memory stays bounded on a many-core machine
REID_GAP = 50  # analysed frames a track may be missing and still be re-joined by appearance alone
REID_SIMILARITY = 0.85  # cosine similarity a face needs to re-join a track by appearance alone
# A clip given by URL is fetched whole by the one bounded fetch (images.fetch_url) within this many seconds in all.
VIDEO_DOWNLOAD_TIMEOUT_S = 60.0
MAX_VIDEO_DOWNLOAD_BYTES = 512 * 1024 * 1024
FULL_TRUST_SIDE = 96  # a face this many pixels wide or more counts fully in its track's answer


class VideoInputError(ValueError):
    """A file that is not a video, a video without frames, a codec that cannot be decoded, a clip too long, an
    option of the wrong kind."""


def is_video(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike)) and Path(str(source).split("?")[0]).suffix.lower() in VIDEO_EXTENSIONS


@dataclass
class Frame:
    index: int  # in the clip, from 0
    time_s: float  # the decoder's timestamp
    rgb: np.ndarray  # at most max_side pixels a side
    scale: float = 1.0  # clip pixels per pixel of `rgb`


@dataclass
class Decoding:
    """How reading a clip went: `status` is "complete" or "truncated" (it stopped decoding early)."""

    frames_read: int = 0  # frames decoded, analysed or not
    frames_expected: int | None = None  # what the container announced, when it does
    status: str = "complete"
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "frames_read": self.frames_read, "frames_expected": self.frames_expected} | (
            {"reason": self.reason} if self.reason else {}
        )


def _whole(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)


def check_video_options(
    every=None, fps=None, max_frames=None, max_gap=5, max_seconds=MAX_VIDEO_SECONDS, reid_gap=REID_GAP
) -> None:
    """Every video option checked for its type and range before anything is read; a wrong one is named."""
    if every is not None and fps is not None:
        raise VideoInputError(f"every={every!r} and fps={fps!r}: give one of them (one frame in N, or N a second).")
    rules = (
        ("every", every, _whole, 1, "one frame in N: a whole number >= 1"),
        ("fps", fps, _number, 1e-9, "frames per second: a number > 0"),
        ("max_frames", max_frames, _whole, 1, "a whole number >= 1"),
        ("max_gap", max_gap, _whole, 0, "analysed frames a track may miss: a whole number >= 0"),
        ("max_seconds", max_seconds, _number, 1e-9, "seconds: a number > 0"),
        ("reid_gap", reid_gap, _whole, 0, "analysed frames: a whole number >= 0"),
    )
    for name, value, kind, low, allowed in rules:
        if value is not None and not (kind(value) and value >= low):
            raise VideoInputError(f"{name}={value!r}: use {allowed}.")


def clip_name(source: Any) -> str:
    """How messages name a clip: its path or URL, or a file object's `name` (the demo reads uploads in memory)."""
    return str(getattr(source, "name", "the clip")) if hasattr(source, "read") else str(source)


def _open(source: Any):
    import av

    name = clip_name(source)
    in_memory = hasattr(source, "read")
    if not in_memory and not name.startswith(("http://", "https://")) and not Path(name).is_file():
        raise VideoInputError(f"{name}: no such file.")
    if not in_memory and name.startswith(("http://", "https://")):
        source, in_memory = _fetched(name), True  # FFmpeg's own http reader has no total deadline
    try:
        container = av.open(source if in_memory else name)
    except (av.FFmpegError, OSError, ValueError) as error:
        raise VideoInputError(
            f"{name} cannot be opened as a video: it is not one, or it is damaged ({type(error).__name__}); convert "
            "it to H.264 in an .mp4."
        ) from None
    if not container.streams.video:
        container.close()
        raise VideoInputError(f"{name} cannot be opened as a video: it holds no video stream.")
    return container


def _fetched(url: str) -> BinaryIO:
    """A clip's URL read into memory within VIDEO_DOWNLOAD_TIMEOUT_S in all, by the images' one bounded fetch."""
    import io

    from .images import ImageInputError, fetch_url

    try:
        data = fetch_url(url, VIDEO_DOWNLOAD_TIMEOUT_S, url, max_bytes=MAX_VIDEO_DOWNLOAD_BYTES)
    except (ImageInputError, OSError) as error:
        raise VideoInputError(str(error).replace("downscale it first", "cut it first")) from None
    fetched = io.BytesIO(data)
    fetched.name = url
    return fetched


def _announced(container, stream) -> tuple[float | None, int | None]:
    """The length the container states, if it states one: (seconds, frames)."""
    seconds = None
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / 1_000_000
    return seconds, (stream.frames or None)


def _rgb(frame, max_side: int) -> tuple[np.ndarray, float]:
    """The frame as RGB, converted and scaled in one step by FFmpeg (the full-size RGB frame is never made)."""
    scale = max(frame.width, frame.height) / max_side
    if scale <= 1:
        return frame.to_ndarray(format="rgb24"), 1.0
    width, height = max(2, round(frame.width / scale)), max(2, round(frame.height / scale))
    return frame.to_ndarray(format="rgb24", width=width, height=height), frame.width / width


def read_frames(
    source: str | os.PathLike | BinaryIO,
    every: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    max_seconds: float = MAX_VIDEO_SECONDS,
    max_side: int = MAX_SIDE,
    decoding: Decoding | None = None,
) -> Iterator[Frame]:
    """The analysed frames of a clip (a path, a URL, or a file object such as io.BytesIO), in order. `decoding`
    (if given) is filled in as reading goes."""
    import av

    check_video_options(every, fps, max_frames, max_seconds=max_seconds)
    name, decoding = clip_name(source), decoding if decoding is not None else Decoding()
    with _open(source) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = DECODE_THREADS  # each frame thread holds a full-size frame
        seconds, decoding.frames_expected = _announced(container, stream)
        if seconds is not None and seconds > max_seconds:
            raise VideoInputError(
                f"{name} is {seconds:.0f} s long, over the {max_seconds:.0f} s this accepts; cut it first."
            )
        start, next_time, taken = None, 0.0, 0
        try:
            for frame in container.decode(stream):
                time_s = (
                    float(frame.time)
                    if frame.time is not None
                    else decoding.frames_read / float(stream.average_rate or 25)
                )
                start = time_s if start is None else start
                time_s -= start  # from the clip's first frame, whatever its container's start time
                if time_s > max_seconds:  # counted while reading: holds when the container states no length
                    raise VideoInputError(
                        f"{name} runs past {max_seconds:.0f} s (its container does not state its length), over the "
                        f"{max_seconds:.0f} s this accepts; cut it first."
                    )
                index = decoding.frames_read
                decoding.frames_read += 1
                wanted = index % every == 0 if every else (fps is None or time_s >= next_time - 1e-6)
                if not wanted:
                    continue  # decoded by the codec, never converted
                if fps:
                    next_time = (math.floor(time_s * fps + 1e-6) + 1) / fps  # the next 1/fps slot
                rgb, scale = _rgb(frame, max_side)
                yield Frame(index, round(time_s, 4), rgb, scale)
                taken += 1
                if max_frames is not None and taken >= max_frames:
                    return
        except av.FFmpegError as error:  # damaged mid-stream: what came before is kept, and said to be partial
            decoding.status, decoding.reason = "truncated", f"{type(error).__name__}: {error}"
        if decoding.frames_read == 0:
            raise VideoInputError(f"{name} holds no frame that can be decoded (empty, damaged, or an unknown codec).")
        expected = decoding.frames_expected
        short = expected is not None and decoding.frames_read < expected - 1  # one: the container's rounding
        if decoding.status == "truncated" or short:
            of = f" of the {expected} frames it announces" if expected else ""
            cause = f" ({decoding.reason})" if decoding.reason else ""
            decoding.status = "truncated"
            decoding.reason = f"decoding stopped after {decoding.frames_read}{of}{cause}"


# --------------------------------------------------------------------------------------------- tracking
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
    appearance: np.ndarray | None = None  # running mean of its faces' unit features, unit length
    faces: list[dict[str, Any]] = field(default_factory=list)  # the frame records, each with frame and time_s

    def remember(self, embedding: np.ndarray | None) -> None:
        if embedding is None:
            return
        mean = embedding if self.appearance is None else 0.8 * self.appearance + 0.2 * embedding
        self.appearance = mean / (np.linalg.norm(mean) or 1.0)


class FaceTracker:
    """IoU association ranked by appearance, and re-joining by appearance alone (see the module's docstring)."""

    def __init__(
        self,
        iou_threshold: float = 0.3,
        max_gap: int = 5,
        reid_gap: int = REID_GAP,
        reid_similarity: float = REID_SIMILARITY,
    ):
        self.iou_threshold, self.max_gap = iou_threshold, max_gap
        self.reid_gap, self.reid_similarity = max(reid_gap, max_gap), reid_similarity
        self.tracks: list[Track] = []
        self.step = -1

    def update(self, faces: list[dict[str, Any]], embeddings: list[np.ndarray | None] | None = None) -> list[int]:
        """The track id of each face of the next analysed frame (in the order given)."""
        self.step += 1
        embeddings = embeddings or [None] * len(faces)
        assigned = self._by_overlap(faces, embeddings)
        self._by_appearance(assigned, embeddings)
        ids = []
        for f, face in enumerate(faces):
            track = assigned.get(f)
            if track is None:
                track = Track(len(self.tracks) + 1, face["box"], self.step)
                self.tracks.append(track)
            track.last_box, track.last_seen = face["box"], self.step
            track.remember(embeddings[f])
            track.faces.append(face)
            ids.append(track.id)
        return ids

    def _gap(self, track: Track) -> int:
        return self.step - track.last_seen - 1  # analysed frames missed since it was last seen

    def _by_overlap(self, faces, embeddings) -> dict[int, Track]:
        """Faces to live tracks whose last box overlaps theirs, the most similar-looking pairs first."""
        pairs = []
        for track in (t for t in self.tracks if self._gap(t) <= self.max_gap):
            for f, face in enumerate(faces):
                overlap = iou(track.last_box, face["box"])
                if overlap >= self.iou_threshold:
                    pairs.append((similarity(track.appearance, embeddings[f]), overlap, f, track))
        return _greedy(pairs)

    def _by_appearance(self, assigned: dict[int, Track], embeddings) -> None:
        """Faces left over to missing tracks that they resemble more than any other track (and enough)."""
        taken = {id(t) for t in assigned.values()}
        pairs = []
        for f, embedding in enumerate(embeddings):
            if f in assigned or embedding is None:
                continue
            scores = [(similarity(t.appearance, embedding), t) for t in self.tracks if t.appearance is not None]
            if not scores:
                continue
            best, track = max(scores, key=lambda pair: pair[0])
            if id(track) not in taken and 0 <= self._gap(track) <= self.reid_gap and best >= self.reid_similarity:
                pairs.append((best, 0.0, f, track))
        assigned.update(_greedy(pairs, taken))


def similarity(appearance: np.ndarray | None, embedding: np.ndarray | None) -> float:
    """Cosine similarity of unit vectors; 0 where either is unknown (an exported model gives none)."""
    return 0.0 if appearance is None or embedding is None else float(appearance @ embedding)


def _greedy(pairs: list[tuple], taken: set[int] | None = None) -> dict[int, Track]:
    """Best pairs first, each face and each track used once."""
    taken = set() if taken is None else taken
    assigned: dict[int, Track] = {}
    for _, _, f, track in sorted(pairs, key=lambda pair: pair[:2], reverse=True):
        if f not in assigned and id(track) not in taken:
            assigned[f] = track
            taken.add(id(track))
    return assigned


# ---------------------------------------------------------------------------------------------- answers
def frame_weight(face: dict[str, Any]) -> float:
    """How far a face's answer is trusted in its track's: detection score x min(1, face side / 96 px)."""
    box = face["box"]
    side = min(box["xmax"] - box["xmin"], box["ymax"] - box["ymin"])
    return max(1e-6, float(face.get("detection_score", 1.0)) * min(1.0, side / FULL_TRUST_SIDE))


def track_summary(track: Track, tasks: dict[str, list[str]], age_years: list[float] | None) -> dict[str, Any]:
    """One steady answer for a track: per task the weighted mean of its frames' probabilities, with their
    agreement; and its emotion timeline."""
    from .modeling_softbio import expected_age_years

    faces = track.faces
    weights = np.array([frame_weight(f) for f in faces])
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
        mean = np.average([[f[task]["scores"][label] for label in labels] for f in faces], axis=0, weights=weights)
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
    if "emotion" in tasks:
        emotions = tasks["emotion"]  # in the label space's order, whichever the frame ranked first
        summary["timeline"] = [
            {"time_s": f["time_s"], "frame": f["frame"], **{e: f["emotion"]["scores"][e] for e in emotions}}
            for f in faces
        ]
    return summary


# --------------------------------------------------------------------------------------------- analysis
class TrackedFaces:
    """
    Frames in, tracked face records out: each frame's faces are detected and cropped at once (the frame is then
    dropped), their crops wait for a forward pass shared with other frames' faces, and each frame comes out, in
    order, with its records' `track_id`. The webcam keeps one per browser session; a clip uses one for its length.
    """

    def __init__(self, pipe, tracker: FaceTracker | None = None, batch_size: int = 32, **options: Any):
        from .face_stream import Batcher

        self.pipe, self.options = pipe, options
        self.tracker = tracker or FaceTracker()
        self.batcher = Batcher(pipe, batch_size)
        self.pending: dict[int, tuple[Frame, list[dict]]] = {}  # number -> frame (without pixels) and records
        self.done: dict[int, tuple[Frame, list[dict], list]] = {}
        self.added = self.emitted = 0

    def add(self, frame: Frame) -> list[dict[str, Any]]:
        """Queue a frame; returns the frames finished by the forward passes this made due."""
        chunks = [chunk for chunk in self.pipe.preprocess(frame.rgb, **self.options) if chunk["face"] is not None]
        number, self.added = self.added, self.added + 1
        self._finish(
            self.batcher.add(
                {"index": number, "chunks": chunks, "frame": Frame(frame.index, frame.time_s, None, frame.scale)}
            )
        )
        return self._in_order()

    def flush(self) -> list[dict[str, Any]]:
        """Run the faces still waiting; returns the frames they finish."""
        self._finish(self.batcher.run())
        return self._in_order()

    def summaries(self) -> list[dict[str, Any]]:
        config = self.pipe.model.config
        return [track_summary(t, config.tasks, config.age_years) for t in self.tracker.tracks]

    def _finish(self, finished) -> None:
        for item, records in finished:
            embeddings = [output.get("embedding") for output in item.get("outputs") or []]
            self.done[item["index"]] = (item["frame"], records, embeddings)

    def _in_order(self) -> list[dict[str, Any]]:
        """Frames are tracked in the clip's order, whichever finished first (a frame without faces at once)."""
        out = []
        while self.emitted in self.done:
            frame, records, embeddings = self.done.pop(self.emitted)
            self.emitted += 1
            for face in records:
                if frame.scale != 1.0:  # boxes in the clip's own pixels
                    face["box"] = {k: round(v * frame.scale) for k, v in face["box"].items()}
                face.update(frame=frame.index, time_s=frame.time_s)
            vectors = [None if e is None else e.reshape(-1).float().numpy() for e in embeddings]
            for face, track_id in zip(records, self.tracker.update(records, vectors or None), strict=True):
                face["track_id"] = track_id
            out.append({"frame": frame.index, "time_s": frame.time_s, "faces": records})
        return out


def analyze_video(
    pipe,
    source: str | os.PathLike,
    every: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    max_gap: int = 5,
    max_seconds: float = MAX_VIDEO_SECONDS,
    reid_gap: int = REID_GAP,
    on_frame: Callable[[Frame], None] | None = None,
    on_analysed: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """
    Every analysed frame's faces (the pipeline's records, with `frame`, `time_s` and `track_id`), one entry per
    track, and how decoding went (`decoding`: status, frames read). `options` are the pipeline's per-call options
    (detector, threshold, ...). `on_frame(frame)` sees each analysed frame's pixels before they are dropped (the
    demo keeps a thumbnail); `on_analysed(entry)` is called as each frame's faces are tracked (progress bars).
    """
    check_video_options(every, fps, max_frames, max_gap, max_seconds, reid_gap)
    batch_size = options.pop("batch_size", 32)  # faces from many frames share forward passes
    preprocess, _, _ = pipe._sanitize_parameters(**options)  # the pipeline's options, named if wrong, up front
    faces = TrackedFaces(pipe, FaceTracker(max_gap=max_gap, reid_gap=reid_gap), batch_size, **preprocess)
    frames: list[dict[str, Any]] = []

    def keep(entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            frames.append(entry)
            if on_analysed:
                on_analysed(entry)

    decoding = Decoding()
    for frame in read_frames(source, every, fps, max_frames, max_seconds, decoding=decoding):
        if on_frame:
            on_frame(frame)
        keep(faces.add(frame))
    keep(faces.flush())
    return {"frames": frames, "tracks": faces.summaries(), "decoding": decoding.as_dict()}


# --------------------------------------------------------------------------------------------- timeline
TIMELINE_COLOURS = ["#f58231", "#911eb4", "#3cb44b", "#e6194b", "#4363d8", "#9a6324", "#808080"]


def timeline_image(track: dict[str, Any], width: int = 520, height: int = 200):
    """A track's emotion timeline as a picture (PIL): each emotion's probability (0 to 1) over the clip's time,
    one line per emotion, the legend on the right. The batch command's --timeline PNGs and the demo's plot."""
    from PIL import Image, ImageDraw, ImageFont

    points = track["timeline"]
    labels = [key for key in points[0] if key not in ("time_s", "frame")]
    image = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=11)
    left, right, top, bottom = 34, width - 86, 8, height - 22
    start, span = points[0]["time_s"], (points[-1]["time_s"] - points[0]["time_s"]) or 1.0
    draw.rectangle([left, top, right, bottom], outline="#999999")
    for value in (0.0, 0.5, 1.0):
        y = bottom - value * (bottom - top)
        draw.line([left, y, right, y], fill="#dddddd")
        draw.text((4, y - 6), f"{value:.1f}", fill="#444444", font=font)
    draw.text((left, bottom + 4), f"{start:.1f} s", fill="#444444", font=font)
    draw.text((right - 40, bottom + 4), f"{points[-1]['time_s']:.1f} s", fill="#444444", font=font)
    for number, label in enumerate(labels):
        colour = TIMELINE_COLOURS[number % len(TIMELINE_COLOURS)]
        xscale, yscale = (right - left) / span, bottom - top
        xy = [(left + (p["time_s"] - start) * xscale, bottom - p[label] * yscale) for p in points]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy[:: max(1, len(xy) // 30)]:  # the frames themselves, thinned where they are many
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw.text((right + 8, top + 14 * number), label, fill=colour, font=font)
    return image
