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
