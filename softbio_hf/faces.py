"""Face detection, cropping and alignment behind one interface.

Detectors: "yunet" (OpenCV's FaceDetectorYN, 5 landmarks; its ~0.3 MB ONNX file is fetched from the
Hub once and cached, or given as a local path), "haar" (the cascade that ships inside OpenCV 4.x
wheels: no download, the offline fallback), "none" (the whole image is one face).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

try:  # optional at import time so the model itself loads as remote code without OpenCV
    import cv2
except ImportError:  # pragma: no cover - exercised only where OpenCV is absent
    cv2 = None

from .hub_access import hub_reachable

logger = logging.getLogger(__name__)

YUNET_REPO = "opencv/face_detection_yunet"
YUNET_FILE = "face_detection_yunet_2023mar.onnx"
DETECTORS = ("auto", "yunet", "haar", "none")
# Detection runs on a copy whose longer side is at most this; crops come from the original. Larger
# sizes find smaller faces in group photos but cost time and, with Haar, add false positives.
DETECTION_MAX_SIDE = 800


@dataclass
class Face:
    """A detected face in the original image's pixel coordinates."""

    box: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax
    score: float
    landmarks: np.ndarray | None = None  # [5, 2]: right eye, left eye, nose, mouth right, mouth left

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])

    def scaled(self, factor: float) -> Face:
        landmarks = None if self.landmarks is None else self.landmarks * factor
        return Face(tuple(v * factor for v in self.box), self.score, landmarks)


def _require_cv2(what: str):
    if cv2 is None:
        raise ImportError(f"{what} needs OpenCV: pip install 'opencv-python-headless<5', or use detector='none'.")
    return cv2


class HaarDetector:
    """OpenCV's frontal-face Haar cascade. Score: neighbours / (neighbours + min_neighbors), in (0, 1)."""

    name = "haar"

    def __init__(self, min_neighbors: int = 5):
        cv = _require_cv2("The Haar face detector")
        if not hasattr(cv, "CascadeClassifier") or not hasattr(cv, "data"):
            raise ImportError(
                "This OpenCV has no Haar cascades (OpenCV 5 dropped them): pip install 'opencv-python-headless<5'."
            )
        path = os.path.join(cv.data.haarcascades, "haarcascade_frontalface_default.xml")
        self.cascade = cv.CascadeClassifier(path)
        if self.cascade.empty():
            raise OSError(f"Could not load the Haar cascade at {path}; reinstall opencv-python-headless.")
        self.min_neighbors = min_neighbors

    def __call__(self, rgb: np.ndarray, min_face_size: int) -> list[Face]:
        gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        size = max(1, int(min_face_size))
        boxes, neighbours = self.cascade.detectMultiScale2(
            gray, scaleFactor=1.1, minNeighbors=self.min_neighbors, minSize=(size, size)
        )
        return [
            Face((float(x), float(y), float(x + w), float(y + h)), float(n) / (float(n) + self.min_neighbors))
            for (x, y, w, h), n in zip(boxes, np.ravel(neighbours), strict=True)
        ]


class YuNetDetector:
    """OpenCV's FaceDetectorYN (YuNet): boxes, five landmarks and a confidence score."""

    name = "yunet"

    # Candidates down to this score come back; detect_faces applies the caller's threshold.
    candidate_threshold = 0.3

    def __init__(self, model_path: str, nms_threshold: float = 0.3):
        cv = _require_cv2("The YuNet face detector")
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"YuNet model file not found: {model_path}. Download {YUNET_FILE} from the Hub repo {YUNET_REPO}, "
                "or use detector='haar' (no download)."
            )
        self.detector = cv.FaceDetectorYN.create(
            model_path, "", (320, 320), self.candidate_threshold, nms_threshold, 5000
        )

    def __call__(self, rgb: np.ndarray, min_face_size: int) -> list[Face]:
        height, width = rgb.shape[:2]
        self.detector.setInputSize((width, height))
        _, rows = self.detector.detect(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        faces = []
        for row in rows if rows is not None else []:
            x, y, w, h = (float(v) for v in row[:4])
            if min(w, h) < min_face_size:
                continue
            faces.append(
                Face((x, y, x + w, y + h), float(row[14]), np.asarray(row[4:14], dtype=np.float32).reshape(5, 2))
            )
        return faces


class WholeImageDetector:
    """detector='none': the image is already a face crop."""

    name = "none"

    def __call__(self, rgb: np.ndarray, min_face_size: int) -> list[Face]:
        height, width = rgb.shape[:2]
        return [Face((0.0, 0.0, float(width), float(height)), 1.0)]


@functools.cache
def yunet_model_path(local_path: str | None = None, download_timeout_s: float = 15.0) -> str | None:
    """
    A local YuNet file: the given path, else the Hub copy from the cache, else downloaded once when the Hub is
    reachable (waiting at most `download_timeout_s`). None when none of these works; the answer is remembered
    for the process, so an offline machine pays for the question once.
    """
    if local_path:
        return local_path
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(YUNET_REPO, YUNET_FILE, local_files_only=True)
    except Exception:  # not cached yet
        pass
    if not hub_reachable():
        return None
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(hf_hub_download, YUNET_REPO, YUNET_FILE)
    pool.shutdown(wait=False)
    try:
        return future.result(timeout=download_timeout_s)
    except Exception as error:  # offline, timed out, repo unreachable: the caller falls back to Haar
        logger.debug("YuNet model unavailable: %s", error)
        return None


class DetectorUnavailable(FileNotFoundError):
    """The detector asked for cannot run here (YuNet's model file neither given, cached nor reachable): the caller
    can fix it by choosing another detector, so its message is theirs to read."""


def make_detector(detector: str = "auto", yunet_path: str | None = None):
    """Build a detector by name. 'auto' is YuNet when its file is available or downloadable, else Haar."""
    if detector not in DETECTORS:
        raise ValueError(f"Unknown face detector {detector!r}; choose one of {DETECTORS}.")
    if detector == "none":
        return WholeImageDetector()
    if detector == "haar":
        return HaarDetector()
    path = yunet_model_path(yunet_path)
    if detector == "yunet":
        if path is None:
            raise DetectorUnavailable(
                f"Could not get the YuNet model ({YUNET_REPO}/{YUNET_FILE}): no network and no cached copy. "
                "Pass yunet_path=<local .onnx>, or use detector='haar'."
            )
        return YuNetDetector(path)
    if path is not None:
        return YuNetDetector(path)
    logger.warning("YuNet face detector unavailable (offline?); using OpenCV's Haar cascade instead.")
    return HaarDetector()


class DetectorsPerThread:
    """Detectors by name, built on first use, one set per thread: OpenCV's detectors keep per-image state (YuNet's
    input size) and are not shared between threads, so preparing threads and a web server's workers each get
    their own."""

    def __init__(self, yunet_path: str | None = None):
        self.yunet_path = yunet_path
        self._local = threading.local()

    def get(self, name: str):
        built = self._local.__dict__.setdefault("detectors", {})
        if name not in built:
            built[name] = make_detector(name, self.yunet_path)
        return built[name]


def detect_faces(
    detector,
    rgb: np.ndarray,
    *,
    min_face_size: int = 20,
    score_threshold: float = 0.6,
    max_faces: int | None = None,
    max_side: int = DETECTION_MAX_SIDE,
) -> list[Face]:
    """Faces in original-image coordinates, largest first. Large images are downscaled for detection only."""
    height, width = rgb.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    small = (
        rgb
        if scale == 1.0
        else cv2.resize(  # a very long, thin image keeps at least one pixel each way
            rgb, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA
        )
    )
    faces = [f.scaled(1.0 / scale) for f in detector(small, max(1, round(min_face_size * scale)))]
    faces = [f for f in faces if f.score >= score_threshold]
    faces.sort(key=lambda f: f.area, reverse=True)
    return faces[:max_faces] if max_faces else faces


def crop_matrix(face: Face, margin: float = 0.25, max_side: int = 1024) -> tuple[np.ndarray, int]:
    """
    The 2x3 affine map from the image to a square face crop: `margin` x the face size added on each side
    (FairFace's chips use 0.25), rotated upright on the eyes when landmarks are known.
    """
    xmin, ymin, xmax, ymax = face.box
    center_x, center_y = (xmin + xmax) / 2, (ymin + ymax) / 2
    side = max(xmax - xmin, ymax - ymin, 1.0) * (1 + 2 * margin)
    angle = 0.0
    if face.landmarks is not None:
        (rx, ry), (lx, ly) = face.landmarks[0], face.landmarks[1]
        angle = math.degrees(math.atan2(ly - ry, lx - rx))
    out_side = max(1, min(round(side), max_side))
    # Rotate about the face centre, scale the square to out_side, and move it to the output's centre.
    matrix = cv2.getRotationMatrix2D((center_x, center_y), angle, out_side / side)
    matrix[:, 2] += (out_side / 2 - center_x, out_side / 2 - center_y)
    return matrix, out_side


def crop_face(rgb: np.ndarray, face: Face, margin: float = 0.25, max_side: int = 1024) -> np.ndarray:
    """The aligned square crop of `crop_matrix`; whatever lies outside the image is black."""
    matrix, out_side = crop_matrix(face, margin, max_side)
    return cv2.warpAffine(rgb, matrix, (out_side, out_side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
