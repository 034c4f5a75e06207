"""Real photos from installed packages, with hand-labelled face key points (eyes, mouth) for the tests."""

from __future__ import annotations

import cv2
import matplotlib.cbook
import numpy as np
from PIL import Image
from skimage import data

# (x, y) of the two eyes and the mouth centre, read off the images by hand.
ASTRONAUT_KEYPOINTS = [(207, 108), (243, 108), (225, 145)]
GRACE_HOPPER_KEYPOINTS = [(223, 195), (308, 195), (258, 290)]


def astronaut() -> np.ndarray:
    return data.astronaut()


def grace_hopper_path() -> str:
    return str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def grace_hopper() -> np.ndarray:
    return np.asarray(Image.open(grace_hopper_path()).convert("RGB"))


def lfw_patch(index: int, side: int = 160, pad: int = 40) -> np.ndarray:
    """lfw_subset(): 100 face then 100 non-face 25x25 patches; upscaled so a detector can see them."""
    patch = (data.lfw_subset()[index] * 255).astype(np.uint8)
    patch = cv2.resize(patch, (side, side), interpolation=cv2.INTER_CUBIC)
    patch = cv2.copyMakeBorder(patch, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=128)
    return np.stack([patch] * 3, axis=-1)


def tiled_faces() -> np.ndarray:
    """A 2x2 grid of four real faces of different sizes: astronaut, Grace Hopper and two LFW faces."""
    tiles = [astronaut(), grace_hopper()[:512], lfw_patch(0, 320, 96), lfw_patch(3, 240, 136)]
    tiles = [cv2.resize(t, (512, 512)) if t.shape[:2] != (512, 512) else t for t in tiles]
    return np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)], axis=0)


def covers(box: dict, keypoints) -> bool:
    """The box holds every key point and is face-sized (not the whole picture)."""
    inside = all(box["xmin"] <= x <= box["xmax"] and box["ymin"] <= y <= box["ymax"] for x, y in keypoints)
    eye_distance = abs(keypoints[1][0] - keypoints[0][0])
    width = box["xmax"] - box["xmin"]
    return inside and 1.5 * eye_distance < width < 4.5 * eye_distance


def assert_same_answers(got: list, expected: list, tolerance: float = 1e-4) -> None:
    """Two runs' answers for the same photos: the same faces, boxes and labels, every score within `tolerance`
    (a batch's float sums may differ from another batch's in the last bits, which can move a rounded digit)."""
    assert [len(faces) for faces in got] == [len(faces) for faces in expected]
    for faces_got, faces_expected in zip(got, expected, strict=True):
        for a, b in zip(faces_got, faces_expected, strict=True):
            assert a["box"] == b["box"] and a["detection_score"] == b["detection_score"]
            for task in ("age", "gender", "emotion"):
                assert a[task]["label"] == b[task]["label"]
                for label, score in b[task]["scores"].items():
                    assert abs(a[task]["scores"][label] - score) <= tolerance, (task, label)
