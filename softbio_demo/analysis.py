"""The demo's analyses: a photo's bytes, a clip, each turned into what the page shows, bad input into a message."""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np

from .render import TASK_TITLES, annotate, detector_html, gif_data_url, image_data_url, live_html, tracks_html

logger = logging.getLogger("softbio.app")


def users_to_fix(error: Exception) -> str | None:
    """The message of a failure the visitor can fix (their file, an option, a detector that cannot run here), or
    None for the server's own failures, whose internals no visitor sees."""
    from softbio_hf.faces import DetectorUnavailable

    if isinstance(error, DetectorUnavailable):
        return f"{error} Here: choose the face detector auto or haar."
    return str(error) if isinstance(error, (ValueError, TypeError)) else None


def detector_that_ran(pipe, detector: str | None) -> str:
    """The face detector behind a result, as the page says it ("auto" names the one it chose)."""
    asked = detector or "auto"
    return detector_html(pipe.detector(asked).name, asked)


def analyze_bytes(pipe, data: bytes, name: str, detector: str = "auto", threshold: float | None = None):
    """
    Decode and run the pipeline. A bad input becomes the product's own message on the page and in the API, and
    one line in the server log; anything else is logged there and the client sees no internals.
    """

    from softbio_hf import load_image

    try:
        rgb = load_image(data, name=name)
        return rgb, pipe(rgb, detector=detector, threshold=threshold or None)  # threshold 0: detector default
    except Exception as error:
        raise failure(error, name, "photo") from None


def failure(error: Exception, name: str, what: str, message: str | None = None):
    """The gr.Error a failed analysis answers with: the reason where the visitor can fix it (`message`, else
    users_to_fix's), one line in the log; else a plain apology, and the traceback in the log only."""
    import gradio as gr

    message = message or users_to_fix(error)
    if message is None:
        logger.error("analysis of %s failed", name, exc_info=error)
        return gr.Error(f"The analysis failed on the server; it was logged. Try another {what}.", print_exception=False)
    logger.warning("rejected %s: %s", name, error)  # the input or an option: the message names it and the fix
    return gr.Error(message, print_exception=False)


# The Video tab: a clip is analysed at VIDEO_FPS frames a second, at most VIDEO_MAX_FRAMES of them, and refused past
# VIDEO_MAX_SECONDS (a demo's bounds; python -m softbio_hf.predict takes longer clips). Its memory does not grow with
# the clip's resolution: frames are decoded at most MAX_SIDE pixels a side (softbio_hf.video), and only a
# THUMBNAIL-pixel copy of each analysed frame is kept for the animation (120 of them: under 50 MB).
VIDEO_FPS, VIDEO_MAX_FRAMES, VIDEO_MAX_SECONDS = 4.0, 120, 60.0
THUMBNAIL = 480


def analyze_clip(pipe, clip: str | bytes, name: str, detector: str = "auto", threshold: float | None = None):
    """A clip (its bytes, as read_upload read them, or a path) as HTML (an animated GIF of the analysed frames, each
    face labelled with its track's steady answer; the per-track table with each person's emotion timeline) and as
    JSON. The clip is decoded once, from memory: gradio's cache sweep may delete the upload meanwhile. Nothing is
    written to disk: the pictures are inline."""

    from softbio_hf.video import VideoInputError

    thumbnails = []  # (picture, its pixels per clip pixel)

    def keep_thumbnail(frame) -> None:
        from PIL import Image

        picture = Image.fromarray(frame.rgb)
        picture.thumbnail((THUMBNAIL, THUMBNAIL))
        thumbnails.append((picture, picture.width / (frame.rgb.shape[1] * frame.scale)))

    limits = {"fps": VIDEO_FPS, "max_frames": VIDEO_MAX_FRAMES, "max_seconds": VIDEO_MAX_SECONDS}
    source = clip
    if isinstance(clip, bytes):
        source = io.BytesIO(clip)
        source.name = name
    try:
        result = pipe.analyze_video(
            source, detector=detector, threshold=threshold or None, on_frame=keep_thumbnail, **limits
        )
    except (VideoInputError, ValueError) as error:
        message = str(error) if isinstance(clip, bytes) else str(error).replace(clip, name)
        raise failure(error, name, "clip", message) from None
    except Exception as error:
        raise failure(error, name, "clip") from None
    tracks = {track["track_id"]: track for track in result["tracks"]}
    images = []
    for number, entry in enumerate(result["frames"]):
        (picture, factor), thumbnails[number] = thumbnails[number], None  # each thumbnail dropped once drawn on
        steady = [
            {**steady_face(face, tracks[face["track_id"]]), "box": scaled_box(face["box"], factor)}
            for face in entry["faces"]
        ]
        images.append(annotate(np.asarray(picture), steady, [face["track_id"] for face in steady]))
    note = decoding_note(result["decoding"], name)
    html = tracks_html(gif_data_url(images, VIDEO_FPS), result["tracks"], note, detector_that_ran(pipe, detector))
    return html, result["tracks"]


def steady_face(face: dict[str, Any], track: dict[str, Any]) -> dict[str, Any]:
    """A frame's face record with its track's steady answers in place of the frame's own."""
    return {**face, **{task: track[task] for task in TASK_TITLES if task in face}}


def scaled_box(box: dict[str, int], factor: float) -> dict[str, int]:
    return {key: round(value * factor) for key, value in box.items()}


def decoding_note(decoding: dict[str, Any], name: str) -> str | None:
    """What to tell a visitor whose clip stopped decoding early: the answers cover only the frames before."""
    if decoding["status"] == "complete":
        return None
    expected = f" of the {decoding['frames_expected']} it announces" if decoding.get("frames_expected") else ""
    return (
        f"{name} stopped decoding after {decoding['frames_read']} frames{expected} (damaged or cut short): these "
        "answers cover only the frames before that."
    )


# The Webcam tab: each browser session keeps its own tracker (in gr.State: never shared, dropped with the session).
# A stream that pauses for LIVE_RESET_S or more (stopped, then started again) starts afresh.
LIVE_RESET_S = 5.0
LIVE_MAX_GAP = 4  # analysed frames (0.5 s apart) a live track may miss before appearance alone must re-join it


class LiveSession:
    """One browser's webcam stream: its frames, its people's tracks and their steady answers so far."""

    def __init__(self, pipe):
        from softbio_hf.video import FaceTracker, TrackedFaces

        self.faces = TrackedFaces(pipe, FaceTracker(max_gap=LIVE_MAX_GAP), batch_size=8)
        self.started = self.last = time.monotonic()

    def stale(self) -> bool:
        return time.monotonic() - self.last >= LIVE_RESET_S

    def analyse(self, rgb: np.ndarray, options: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """This frame's faces (with their track ids) and every track's steady answer so far."""
        from softbio_hf.video import Frame

        self.last = time.monotonic()
        self.faces.options = options  # the detector and threshold as the page has them now
        frame = Frame(self.faces.added, round(self.last - self.started, 3), rgb)
        entries = self.faces.add(frame) + self.faces.flush()
        return entries[-1]["faces"], self.faces.summaries()


def analyze_live_frame(pipe, session: LiveSession | None, data: bytes, detector: str, threshold: float | None):
    """A webcam frame, tracked within its browser's session: the picture with each person's steady label, and the
    per-track table. Returns the HTML and the session (a new one when there was none, or the stream had paused)."""

    from softbio_hf import load_image

    if session is None or session.stale():
        session = LiveSession(pipe)
    try:
        rgb = load_image(data, name="webcam frame")
        preprocess, _, _ = pipe._sanitize_parameters(detector=detector, threshold=threshold or None)
        faces, tracks = session.analyse(rgb, preprocess)
    except Exception as error:
        raise failure(error, "a webcam frame", "frame") from None
    by_id = {track["track_id"]: track for track in tracks}
    steady = [steady_face(face, by_id[face["track_id"]]) for face in faces]
    picture = annotate(rgb, steady, [face["track_id"] for face in steady])
    live = [track for track in tracks if track["last_frame"] == session.faces.added - 1]  # in view now
    return live_html(image_data_url(picture), live, len(tracks), detector_that_ran(pipe, detector)), session
