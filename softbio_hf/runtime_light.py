"""
The torch-free runtime: a photo in, the pipeline's JSON out, from an export folder alone (numpy, OpenCV, Pillow and
onnxruntime or OpenVINO; neither torch nor transformers is imported).

    from softbio_hf.runtime_light import ExportedPipeline
    analyze = ExportedPipeline("softbio-onnx", backend="onnx")     # an export folder or a Hub repo id
    analyze("photo.jpg", detector="haar")                          # [{"box": ..., "age": ..., ...}, ...]

The pipeline's exported backends call the same code: detection (faces.py), cropping, normalisation and
postprocessing live here once, whichever backend runs the forward pass. Everything the answer depends on comes
from the export's manifest (tasks, labels, age years, image size and normalisation, detector defaults).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .conformal import label_set
from .faces import DETECTION_MAX_SIDE, DetectorsPerThread, crop_face, detect_faces
from .images import DEFAULT_TIMEOUT_S, MAX_IMAGE_PIXELS, check_image, describe, load_image
from .runtimes import ExportedModel, age_bin_bounds, exported_folder

# Haar scores are neighbours / (neighbours + 5); 0.7 (12+ neighbours) drops most of its false positives.
DEFAULT_THRESHOLDS = {"yunet": 0.6, "haar": 0.7, "none": 0.0}
DEFAULT_MARGIN = 0.25
DEFAULT_MIN_FACE_SIZE = 20


def detector_defaults() -> dict[str, Any]:
    """What detection and cropping default to: written into an export's manifest, read back by the runtime."""
    return {
        "thresholds": dict(DEFAULT_THRESHOLDS),
        "margin": DEFAULT_MARGIN,
        "min_face_size": DEFAULT_MIN_FACE_SIZE,
        "detection_max_side": DETECTION_MAX_SIDE,
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and bool(np.isfinite(value))


def check_options(threshold, margin, max_faces, min_face_size, detection_max_side, top_k, timeout) -> None:
    """Call options are checked before any work: a wrong one is named with what it takes."""
    rules = (
        ("threshold", threshold, lambda v: _is_number(v) and 0 <= v <= 1, "a number between 0 and 1"),
        ("margin", margin, lambda v: _is_number(v) and 0 <= v <= 2, "a fraction of the face size between 0 and 2"),
        ("max_faces", max_faces, lambda v: isinstance(v, int) and v >= 1, "a whole number >= 1 (or None for all)"),
        ("min_face_size", min_face_size, lambda v: _is_number(v) and v >= 1, "a size in pixels >= 1"),
        ("detection_max_side", detection_max_side, lambda v: isinstance(v, int) and v >= 32, "pixels, >= 32"),
        ("top_k", top_k, lambda v: isinstance(v, int) and v >= 1, "a whole number >= 1"),
        ("timeout", timeout, lambda v: _is_number(v) and v > 0, "seconds, > 0"),
    )
    for option, value, valid, allowed in rules:
        if value is not None and not valid(value):
            raise ValueError(f"{option}={value!r}: use {allowed}.")


CALL_OPTIONS = (
    "detector",
    "threshold",
    "margin",
    "max_faces",
    "min_face_size",
    "detection_max_side",
    "top_k",
    "timeout",
    "batch_size",
    "num_workers",
)


def unknown_options_message(options: dict) -> str:
    """A misspelt option must not be ignored: name it and the closest valid one."""
    import difflib

    hints = []
    for name in sorted(options):
        close = difflib.get_close_matches(name, CALL_OPTIONS, n=1, cutoff=0.6)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"Unknown soft-biometrics option(s): {', '.join(hints)}. Valid options: {', '.join(CALL_OPTIONS)}."


def task_result(labels: list[str], probs: list[float], top_k: int | None) -> dict[str, Any]:
    ranked = sorted(zip(labels, probs, strict=True), key=lambda pair: pair[1], reverse=True)
    if top_k is not None:
        ranked = ranked[: max(1, top_k)]
    return {"label": ranked[0][0], "score": round(ranked[0][1], 4), "scores": {k: round(v, 4) for k, v in ranked}}


def int_box(box, width: int, height: int) -> dict[str, int]:
    xmin, ymin, xmax, ymax = box
    return {
        "xmin": max(0, int(np.floor(xmin))),
        "ymin": max(0, int(np.floor(ymin))),
        "xmax": min(width, int(np.ceil(xmax))),
        "ymax": min(height, int(np.ceil(ymax))),
    }


def face_array(crop: np.ndarray, size: int) -> np.ndarray:
    """
    A square face crop at the model's input size, uint8 [1, 3, size, size]: the image processor's resize (PIL
    bicubic; its centre crop is a no-op on a square) without its float conversion, done for a whole batch by
    `normalize_array` (or by the pipeline on the model's device). Equal to the image processor's pixels (tested).
    """
    image = Image.fromarray(crop)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.array(image).transpose(2, 0, 1)[None]


def normalize_array(pixels: np.ndarray, mean, std) -> np.ndarray:
    """uint8 [N, 3, S, S] to the backbone's float32 input: (x / 255 - mean) / std as one multiply and one subtract,
    the same float32 arithmetic as the pipeline's normalize_pixels."""
    mean = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    values = pixels.astype(np.float32)
    values *= np.float32(1) / (np.float32(255) * std)
    values -= mean / std
    return values


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits.astype(np.float32) - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def expected_years(age_probs: np.ndarray, age_years, labels=None) -> float:
    """expected_age_years for one face's probabilities: the bins' representative ages weighted by them, kept
    within the predicted age group's range (so "70+" is never "about 38")."""
    years = float(age_probs @ np.asarray(age_years, dtype=age_probs.dtype))
    bounds = age_bin_bounds(tuple(labels)) if labels is not None else None
    if bounds is None:
        return years
    predicted = int(age_probs.argmax())
    return min(max(years, bounds[0][predicted]), bounds[1][predicted])


def face_result(
    face: dict[str, Any],
    probs: dict[str, np.ndarray],
    tasks: dict[str, list[str]],
    age_years,
    top_k: int | None,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One face's record: its box and detection score, then each task's label, score and scores (age: years), and
    its conformal `set` where the model holds thresholds (softbio_hf.conformal)."""
    record = dict(face)
    for task, labels in tasks.items():
        values = np.asarray(probs[task], dtype=np.float32).reshape(-1)
        record[task] = task_result(labels, values.tolist(), top_k)
        if (members := label_set(values.tolist(), labels, calibration, task)) is not None:
            record[task]["set"] = members  # holds the true label at the fitted level (exchangeable data)
        if task == "age" and age_years:
            record[task]["years"] = round(float(np.float32(expected_years(values, age_years, labels))), 1)
    return record


def faces_and_crops(
    rgb: np.ndarray,
    face_detector,
    image_size: int,
    *,
    threshold: float,
    margin: float,
    max_faces: int | None,
    min_face_size: float,
    detection_max_side: int,
) -> tuple[list[dict[str, Any]], np.ndarray | None]:
    """An RGB image's faces (box and detection score, largest first) and their uint8 crops [F, 3, S, S] (None when
    it has none): detection and cropping, the same for the pipeline (any backend) and the torch-free runtime."""
    found = detect_faces(
        face_detector,
        rgb,
        min_face_size=min_face_size,
        score_threshold=threshold,
        max_faces=max_faces,
        max_side=detection_max_side,
    )
    if not found:
        return [], None
    height, width = rgb.shape[:2]
    faces = [{"box": int_box(face.box, width, height), "detection_score": round(face.score, 4)} for face in found]
    return faces, np.concatenate([face_array(crop_face(rgb, face, margin), image_size) for face in found])


Prepared = tuple[list[dict[str, Any]], "np.ndarray | None"]


def overlapped(
    items: Iterable[Any],
    prepare: Callable[[Any], Prepared],
    score: Callable[[np.ndarray], dict[str, np.ndarray]],
    batch_size: int | None = None,
    ahead: int = 2,
    workers: int = 1,
) -> Iterator[tuple[list[dict[str, Any]], dict[str, np.ndarray]]]:
    """
    Many photos at the model's pace: each item's faces and their per-task probabilities, in the items' order.
    `prepare(item)` (decoding, detection, cropping: faces and uint8 crops) runs in `workers` other threads up to
    `ahead` items in advance (at least one more than `workers`, so none idles), while the current crops are in
    `score` (OpenCV, Pillow's decoders and the model's kernels all let go of the GIL). With several workers,
    `prepare` must keep per-thread state (a detector per thread, as `detector` does in both runtimes). Faces of
    consecutive items share forward passes of `batch_size` crops (None: each item's faces in one pass of their own).
    An item's answer comes out once all its faces are scored. A generator or dataset is read one item at a time, so
    a long stream costs no memory up front.
    """
    source = iter(items)
    pending: deque[Future] = deque()
    waiting: deque[list[Any]] = deque()  # [faces, crops, scored parts, crops scored so far] in the items' order

    def submit(pool: ThreadPoolExecutor) -> None:
        for item in source:
            pending.append(pool.submit(prepare, item))
            return

    if not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"num_workers={workers!r}: use a whole number of preparing threads >= 1.")
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="softbio-prepare") as pool:
        for _ in range(max(1, ahead, workers + 1)):
            submit(pool)
        while pending:
            faces, crops = pending.popleft().result()
            submit(pool)  # the next item is prepared while this one's faces run through the model
            waiting.append([faces, crops, [], 0])
            queued = sum(len(entry[0]) - entry[3] for entry in waiting)
            if batch_size is None or queued >= batch_size or not pending:
                yield from score_waiting(waiting, score, batch_size, flush=not pending)
        yield from score_waiting(waiting, score, batch_size, flush=True)


def photo_answers(
    items: Iterable[Any],
    prepare: Callable[[Any], Prepared],
    score: Callable[[np.ndarray], dict[str, np.ndarray]],
    batch_size: int | None,
    tasks: dict[str, list[str]],
    card: dict[str, Any],
    top_k: int | None,
    workers: int = 1,
) -> Iterator[list[dict[str, Any]]]:
    """`overlapped`'s faces and probabilities as each photo's answer (face_result per face); `card` holds the
    model's age_years and calibration (a manifest, or a config's)."""
    for faces, probs in overlapped(items, prepare, score, batch_size, workers=workers):
        yield face_records(faces, probs, tasks, card, top_k)


def face_records(
    faces: list[dict[str, Any]],
    probs: dict[str, np.ndarray],
    tasks: dict[str, list[str]],
    card: dict[str, Any],
    top_k: int | None,
) -> list[dict[str, Any]]:
    """Each face's answer (face_result) from its row of `probs`; `card` holds the model's age_years and
    calibration (a manifest, or a config's)."""
    return [
        face_result(
            face,
            {task: values[i] for task, values in probs.items()},
            tasks,
            card.get("age_years"),
            top_k,
            card.get("calibration"),
        )
        for i, face in enumerate(faces)
    ]


def score_waiting(
    waiting: deque[list[Any]], score: Callable, batch_size: int | None, flush: bool
) -> Iterator[tuple[list[dict[str, Any]], dict[str, np.ndarray]]]:
    """Forward passes over the waiting crops (full batches only unless `flush`), then every leading item whose
    faces are all scored, with its probabilities."""
    while True:
        while waiting and len(waiting[0][0]) == waiting[0][3]:  # done (or no face): out, in order
            faces, _, parts, _ = waiting.popleft()
            yield faces, {task: np.concatenate([part[task] for part in parts]) for task in (parts[0] if parts else {})}
        unscored = [(entry, entry[1][entry[3] :]) for entry in waiting if len(entry[0]) > entry[3]]
        count = sum(len(crops) for _, crops in unscored)
        if count == 0 or (batch_size is not None and count < batch_size and not flush):
            return
        if batch_size is None:  # each item's faces in a pass of their own
            unscored = unscored[:1]
        size = len(unscored[0][1]) if batch_size is None else min(batch_size, count)
        batch, owners = [], []
        for entry, crops in unscored:
            take = crops[: size - sum(len(b) for b in batch)]
            if len(take):
                batch.append(take)
                owners.append((entry, len(take)))
        probs = score(np.concatenate(batch))
        start = 0
        for entry, taken in owners:
            entry[2].append({task: values[start : start + taken] for task, values in probs.items()})
            entry[3] += taken
            start += taken


class ExportedPipeline:
    """
    An export served without torch: `ExportedPipeline(folder_or_repo, backend)(image_or_list, **options)` answers
    as `pipeline("soft-biometrics", ...)` does, for the same options (detector, threshold, margin, max_faces,
    min_face_size, detection_max_side, top_k, batch_size, max_pixels, timeout). A list runs detection of the next
    photo while the current one's faces are in the forward pass.
    """

    def __init__(
        self,
        model: str | Path,
        backend: str = "onnx",
        exact: bool = True,
        yunet_path: str | None = None,
        threads: int | None = None,
    ):
        if backend not in ("onnx", "openvino"):
            raise ValueError(f"backend={backend!r}: the torch-free runtime runs 'onnx' or 'openvino'.")
        self.model = ExportedModel(backend, exported_folder(model, backend), exact=exact, threads=threads)
        self.backend = backend
        manifest = self.model.manifest
        self.manifest = manifest
        self.tasks = {task: list(manifest["labels"][task]) for task in manifest["tasks"]}
        self.defaults = {**detector_defaults(), **(manifest.get("detector") or {})}
        self.yunet_path = yunet_path
        self._detectors = DetectorsPerThread(yunet_path)

    def detector(self, name: str):
        return self._detectors.get(name)

    def __call__(self, inputs: Any, batch_size: int | None = None, num_workers: int = 1, **options: Any):
        unknown = {k: v for k, v in options.items() if k not in CALL_OPTIONS and k != "max_pixels"}
        if unknown:
            raise TypeError(unknown_options_message(unknown))
        options = self.checked(options)
        if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size={batch_size!r}: use a whole number of face crops >= 1.")
        single = not isinstance(inputs, (list, tuple))
        items = [inputs] if single else list(inputs)
        for index, item in enumerate(items):  # every input named up front, before any model work
            check_image(
                item, max_pixels=options["max_pixels"], name=None if single else f"input {index} ({describe(item)})"
            )
        results = list(self.stream(items, options, batch_size, num_workers))
        return results[0] if single else results

    def checked(self, options: dict[str, Any]) -> dict[str, Any]:
        """The call's options with the manifest's defaults filled in; a wrong one is named."""
        check_options(*(options.get(key) for key in CHECKED_OPTIONS))
        max_pixels = options.get("max_pixels", MAX_IMAGE_PIXELS)
        if not (isinstance(max_pixels, int) and max_pixels >= 1):
            raise ValueError(f"max_pixels={max_pixels!r}: use a whole number of pixels >= 1.")
        filled = {key: options.get(key) for key in CHECKED_OPTIONS}
        for key in ("margin", "min_face_size", "detection_max_side"):
            filled[key] = self.defaults[key] if filled[key] is None else filled[key]
        filled["timeout"] = filled["timeout"] or DEFAULT_TIMEOUT_S
        filled["detector"] = options.get("detector") or "auto"
        filled["max_pixels"] = max_pixels
        return filled

    def stream(
        self, items: list, options: dict[str, Any], batch_size: int | None, workers: int = 1
    ) -> Iterator[list[dict[str, Any]]]:
        """Each image's faces in order, through `overlapped`: the next images are decoded and their faces found
        (by `workers` threads) while the current faces run through the model."""
        prepare = functools.partial(self.crops_of, options=options)
        yield from photo_answers(
            items, prepare, self.probabilities, batch_size, self.tasks, self.manifest, options["top_k"], workers
        )

    def crops_of(self, image: Any, options: dict[str, Any]) -> tuple[list[dict[str, Any]], np.ndarray | None]:
        """An image's faces (box and detection score, largest first) and their uint8 crops [F, 3, S, S]."""
        rgb = load_image(image, timeout=options["timeout"], max_pixels=options["max_pixels"])
        face_detector = self.detector(options["detector"])
        threshold = options["threshold"]
        if threshold is None:
            threshold = self.defaults["thresholds"][face_detector.name]
        return faces_and_crops(
            rgb,
            face_detector,
            int(self.manifest["image_size"]),
            threshold=threshold,
            margin=options["margin"],
            max_faces=options["max_faces"],
            min_face_size=options["min_face_size"],
            detection_max_side=options["detection_max_side"],
        )

    def probabilities(self, crops: np.ndarray, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Per-task probabilities for uint8 crops [F, 3, S, S], `batch_size` crops per forward pass (all at once
        by default)."""
        step = batch_size or len(crops)
        parts = []
        for start in range(0, len(crops), step):
            pixels = normalize_array(
                crops[start : start + step], self.manifest["image_mean"], self.manifest["image_std"]
            )
            parts.append({task: softmax(value) for task, value in self.model(pixels).items()})
        return {task: np.concatenate([part[task] for part in parts]) for task in self.tasks}

    def records(self, faces: list[dict[str, Any]], probs: dict[str, np.ndarray], top_k: int | None) -> list[dict]:
        """Each face's record from its rows of `probs` (the server's cross-request batches come back this way)."""
        return face_records(faces, probs, self.tasks, self.manifest, top_k)

    def describe(self) -> dict[str, Any]:
        """What the model answers and how it was made (the server's GET /v1/model)."""
        keys = ("tasks", "labels", "age_years", "image_size", "batch", "versions", "calibration", "detector")
        return {"backend": self.backend, **{key: self.manifest.get(key) for key in keys}}


CHECKED_OPTIONS = ("threshold", "margin", "max_faces", "min_face_size", "detection_max_side", "top_k", "timeout")
