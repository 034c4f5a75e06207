"""A short synthetic clip for the video tests: real face photos moving across a frame, written as a real mp4."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from photos import astronaut, grace_hopper

FRAMES, WIDTH, HEIGHT, FPS = 24, 880, 400, 8.0
FIRST_A, FIRST_B = 3, 12  # frames 0-2 have no face; the second person enters at frame 12


def scaled(rgb: np.ndarray, factor: float = 0.6) -> np.ndarray:
    return cv2.resize(rgb, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)


def make_clip(path: Path) -> dict:
    """Person A (Grace Hopper) walks left to right from frame 3; person B (the astronaut) stands on the right from
    frame 12. Returns what the clip holds: the frames each person is in."""
    a, b = scaled(grace_hopper()), scaled(astronaut())  # whole photos: the Haar cascade wants the context
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for index in range(FRAMES):
        frame = np.full((HEIGHT, WIDTH, 3), 90, np.uint8)
        if index >= FIRST_A:
            x = 8 * (index - FIRST_A)  # a few pixels a frame: consecutive boxes overlap
            frame[20 : 20 + a.shape[0], x : x + a.shape[1]] = a
        if index >= FIRST_B:
            frame[40 : 40 + b.shape[0], WIDTH - b.shape[1] :] = b
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return {"a": list(range(FIRST_A, FRAMES)), "b": list(range(FIRST_B, FRAMES))}


# ------------------------------------------------------------------------ clips for tracking and decoding
def face_tile(rgb: np.ndarray, keypoints: list[tuple[int, int]], side: int = 150) -> np.ndarray:
    """A square around the face (about four eye distances wide: the Haar cascade wants some context), resized."""
    (lx, ly), (rx, _), (_, my) = keypoints
    centre_x, centre_y, span = (lx + rx) // 2, (ly + my) // 2, 2 * (rx - lx)
    top, left = max(0, centre_y - span), max(0, centre_x - span)
    return cv2.resize(rgb[top : centre_y + span, left : centre_x + span], (side, side), interpolation=cv2.INTER_AREA)


def write_clip(
    path: Path, frames: list[np.ndarray], times_s: list[float], codec: str = "libx264", **container_options: str
) -> None:
    """Frames written with PyAV at exactly these times (milliseconds): variable frame timing if they say so.
    `container_options` go to the muxer (live="1": Matroska without a length; movflags="faststart")."""
    from fractions import Fraction

    import av

    with av.open(str(path), "w", options=container_options) as container:
        stream = container.add_stream(codec, rate=8)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)  # the encoder keeps milliseconds
        stream.codec_context.max_b_frames = 0  # no reordering: any timing the test asks for can be muxed
        for rgb, time_s in zip(frames, times_s, strict=True):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = round(time_s * 1000), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


CROSS_W, CROSS_H, CROSS_FPS = 720, 360, 8.0


def make_crossing_clip(path: Path) -> dict:
    """Person A (Grace Hopper, a face tile) walks left to right in front of person B (the astronaut, the whole
    photo, standing), her face box passing over his; then A is hidden for 10 frames (longer than the tracker's gap
    of 5) and comes back far from where she left. Returns, per frame, each visible person's drawn rectangle
    (xmin, ymin, xmax, ymax), front first."""
    from photos import GRACE_HOPPER_KEYPOINTS

    a, b = face_tile(grace_hopper(), GRACE_HOPPER_KEYPOINTS), scaled(astronaut())
    frames, truth = [], []
    for index in range(52):
        frame = np.full((CROSS_H, CROSS_W, 3), 90, np.uint8)
        drawn = {}
        if index < 34:
            x = 20 + 16 * index  # her face box overlaps his between frames 16 and 26
            drawn["a"] = (x, 60, x + a.shape[1], 60 + a.shape[0])
        elif index >= 44:  # hidden for frames 34-43, back on the far left, lower down
            x = 10 + 6 * (index - 44)
            drawn["a"] = (x, 180, x + a.shape[1], 180 + a.shape[0])
        drawn["b"] = (300, 20, 300 + b.shape[1], 20 + b.shape[0])
        for person, tile in (("b", b), ("a", a)):  # A in front
            if person in drawn:
                xmin, ymin, xmax, ymax = drawn[person]
                frame[ymin:ymax, xmin:xmax] = tile
        frames.append(frame)
        truth.append(drawn)
    write_clip(path, frames, [i / CROSS_FPS for i in range(len(frames))])
    return {"frames": truth}


def person_at(drawn: dict, box: dict) -> str | None:
    """Whose picture a face box's centre lies on (the one in front where two overlap), per the drawn rectangles."""
    x, y = (box["xmin"] + box["xmax"]) / 2, (box["ymin"] + box["ymax"]) / 2
    return next((p for p, (x0, y0, x1, y1) in drawn.items() if x0 <= x < x1 and y0 <= y < y1), None)


def write_y4m(path: Path, frames: list[np.ndarray], fps: int = 10) -> Path:
    """Frames as a raw YUV4MPEG2 file: what Chromium's fake camera plays (--use-file-for-fake-video-capture)."""
    height, width = frames[0].shape[:2]
    with path.open("wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for rgb in frames:
            out.write(b"FRAME\n" + cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).tobytes())
    return path


def two_people_frame() -> np.ndarray:
    """One picture with both people apart (the crossing clip's first frame, drawn the same way)."""
    from photos import GRACE_HOPPER_KEYPOINTS

    frame = np.full((CROSS_H, CROSS_W, 3), 90, np.uint8)
    a, b = face_tile(grace_hopper(), GRACE_HOPPER_KEYPOINTS), scaled(astronaut())
    frame[20 : 20 + b.shape[0], 300 : 300 + b.shape[1]] = b
    frame[60 : 60 + a.shape[0], 20 : 20 + a.shape[1]] = a
    return frame
