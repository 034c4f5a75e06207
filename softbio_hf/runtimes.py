"""Run an exported softbio model (ONNX or OpenVINO) on face crops: the pipeline's `backend="onnx"|"openvino"` and
the torch-free runtime's forward pass.

An export (python -m softbio_hf.export) writes, beside a checkpoint's config.json or into a folder of its own:

    manifest.json            what was exported and what the answer needs: tasks, labels, age years, image size and
                             normalisation, detector defaults, batch, versions, and the sha256 of every artifact and
                             of the weights it came from
    onnx/model.onnx          input `pixel_values` float32 [batch, 3, S, S]; outputs `logits_<task>`, task order
    openvino/openvino_model.xml + .bin

An export is verified before it runs: a changed artifact, or weights beside it that are not the ones it came from,
are refused with the command that makes a fresh one. Neither runtime needs torch: numpy in, numpy out. This file
imports numpy and the standard library alone (it travels with a checkpoint's remote code).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from .conformal import check_conformal

BACKENDS = ("torch", "onnx", "openvino")
MANIFEST = "manifest.json"
ARTIFACTS = {"onnx": ("onnx/model.onnx",), "openvino": ("openvino/openvino_model.xml", "openvino/openvino_model.bin")}
EXTRAS = {"onnx": "onnxruntime", "openvino": "openvino"}
# Checkpoint weights beside an export: the manifest's digest must be theirs.
WEIGHT_PATTERNS = ("*.safetensors",)
MANIFEST_KEYS = (
    "formats", "tasks", "labels", "image_size", "image_mean", "image_std", "batch", "digests", "answer_digest",
)  # fmt: skip
# The manifest's fields that decide an answer: its `answer_digest` covers them, so an edit is refused.
ANSWER_FIELDS = (
    "tasks", "labels", "age_years", "calibration", "image_size", "image_mean", "image_std", "detector", "outputs",
    "batch",
)  # fmt: skip


class ExportInvalid(ValueError):
    """An export that must not serve (changed, stale, broken or incomplete); the message names the fix."""


def reexport_hint(folder: Path, backend: str | None = None) -> str:
    formats = f" --format {backend}" if backend else ""
    return f"python -m softbio_hf.export --model CHECKPOINT{formats} --out {folder}"


def file_digest(path: Path) -> str:
    """sha256 of a file, read in 4 MiB pieces (the ViT-L export is 1.2 GB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while piece := handle.read(4 * 1024 * 1024):
            digest.update(piece)
    return digest.hexdigest()


def answer_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's answer-deciding fields (labels, normalisation, age years, calibration and conformal
    thresholds, detector defaults), as canonical JSON: written by the export, checked before serving."""
    fields = {key: manifest.get(key) for key in ANSWER_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity, lowered by a cgroup CPU quota (a container's --cpus), >= 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    for quota_file, period_file in (
        ("/sys/fs/cgroup/cpu.max", None),  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),  # cgroup v1
    ):
        try:
            text = Path(quota_file).read_text().split()
            quota, period = (text[0], text[1]) if period_file is None else (text[0], Path(period_file).read_text())
            if quota not in ("max", "-1") and int(period) > 0:
                cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
        except (OSError, ValueError, IndexError):
            continue
    return max(1, cpus)


def weights_digest(folder: Path) -> str | None:
    """One sha256 over a checkpoint folder's weight files (names and contents, sorted), None when it has none."""
    files = sorted(path for pattern in WEIGHT_PATTERNS for path in Path(folder).glob(pattern))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + file_digest(path).encode())
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest, checked for what the runtimes read; a broken or old one is named with the fix."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportInvalid(f"{path} cannot be read ({error}); export again: {reexport_hint(Path(folder))}") from None
    missing = [key for key in MANIFEST_KEYS if not isinstance(manifest, dict) or key not in manifest]
    if missing:
        raise ExportInvalid(
            f"{path} lacks {missing} (an older softbio wrote it, or it was edited); export again: "
            f"{reexport_hint(Path(folder))}"
        )
    calibration = manifest.get("calibration") or {}
    conformal = calibration.get("conformal") if isinstance(calibration, dict) else calibration
    try:  # thresholds that would answer wrongly on every call are refused here, at load
        labels = {task: manifest["labels"][task] for task in manifest["tasks"]}
        check_conformal(conformal, labels, str(path))
    except (KeyError, TypeError) as error:
        raise ExportInvalid(f"{path}: its tasks and labels do not match ({error}); export again.") from None
    except ValueError as error:
        raise ExportInvalid(str(error)) from None
    return manifest


def read_artifacts(folder: Path, backend: str) -> dict[str, bytes]:
    """`backend`'s artifacts read into memory: the runtime loads these bytes, checked against the manifest, so a
    file changed (or truncated) under a running server changes nothing (nothing is memory-mapped)."""
    blobs = {}
    for name in ARTIFACTS[backend]:
        try:
            blobs[name] = (Path(folder) / name).read_bytes()
        except OSError:
            blobs[name] = b""  # named below as not the file its manifest names
    return blobs


def verify_export(folder: Path, backend: str, manifest: dict[str, Any], blobs: dict[str, bytes] | None = None) -> None:
    """Refuse an export whose `backend` artifacts (the files, or `blobs` read from them), neighbouring weights or
    answer-deciding manifest fields are not the ones the export wrote."""
    folder = Path(folder)
    if backend not in manifest["formats"]:
        raise FileNotFoundError(
            f"{folder} has no {backend} export (it holds {manifest['formats']}). Make one with: "
            f"{reexport_hint(folder, backend)}"
        )
    if manifest.get("answer_digest") != answer_digest(manifest):
        raise ExportInvalid(
            f"{folder / MANIFEST} was edited since the export (its labels, normalisation, age years, calibration or "
            f"detector defaults no longer match its answer_digest): it will not be served. Export again: "
            f"{reexport_hint(folder, backend)}"
        )
    for name in ARTIFACTS[backend]:
        expected = manifest["digests"].get(name)
        if blobs is not None:
            actual = hashlib.sha256(blobs[name]).hexdigest()
        else:
            actual = file_digest(folder / name) if (folder / name).is_file() else None
        if expected != actual:
            raise ExportInvalid(
                f"{folder / name} is not the file its manifest names (changed, truncated or replaced since the "
                f"export): it will not be served. Export again: {reexport_hint(folder, backend)}"
            )
    beside = weights_digest(folder)
    if beside is not None and beside != manifest.get("weights_digest"):
        raise ExportInvalid(
            f"The weights in {folder} are not the ones its {backend} export was made from (saved again since?): "
            f"the export would answer for the old model. Export again: python -m softbio_hf.export --model {folder} "
            f"--out {folder}"
        )


class ExportedModel:
    """
    An exported model's logits per task for a float32 batch [N, 3, S, S], normalised as the model expects.
    `exact=True` keeps OpenVINO in fp32 (it otherwise computes in bf16 on CPUs that have it, as torch's
    dtype="auto" does); ONNX Runtime's CPU provider computes in fp32 either way. An export with a fixed batch
    size gets batches of exactly that size (the last one padded).
    """

    def __init__(self, backend: str, folder: Path, exact: bool = True, threads: int | None = None):
        self.backend = backend
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        blobs = read_artifacts(self.folder, backend)
        verify_export(self.folder, backend, self.manifest, blobs)
        self.digest = self.manifest["digests"][ARTIFACTS[backend][-1]]  # the weights' sha256, as loaded
        self.tasks: list[str] = list(self.manifest["tasks"])
        batch = self.manifest["batch"]
        self.fixed_batch: int | None = batch if isinstance(batch, int) else None
        self.threads = threads or usable_cpus()
        path = self.folder / ARTIFACTS[backend][0]
        try:
            self._load(blobs, exact, self.threads)
        except Exception as error:  # the runtimes raise their own kinds for a file they cannot read
            raise ExportInvalid(
                f"{backend} could not load {path} ({type(error).__name__}: {str(error)[:300]}); export again: "
                f"{reexport_hint(self.folder, backend)}"
            ) from None

    def _load(self, blobs: dict[str, bytes], exact: bool, threads: int) -> None:
        """The runtime built from the checked bytes in memory, never from the files again."""
        if self.backend == "onnx":
            runtime = import_runtime("onnxruntime", "onnx")
            options = runtime.SessionOptions()
            options.intra_op_num_threads = threads
            model = blobs[ARTIFACTS["onnx"][0]]
            self._session = runtime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        else:
            runtime = import_runtime("openvino", "openvino")
            hints: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads}
            if exact:
                hints["INFERENCE_PRECISION_HINT"] = "f32"
            xml, weights = (blobs[name] for name in ARTIFACTS["openvino"])
            core = runtime.Core()
            self._compiled = core.compile_model(core.read_model(model=xml, weights=weights), "CPU", hints)

    def __call__(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
        if self.fixed_batch is None:
            return dict(zip(self.tasks, self._run(pixel_values), strict=True))
        size, parts = self.fixed_batch, []
        for start in range(0, len(pixel_values), size):
            chunk = pixel_values[start : start + size]
            padded = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), np.float32)])
            parts.append([output[: len(chunk)] for output in self._run(padded)])
        return {task: np.concatenate([part[i] for part in parts]) for i, task in enumerate(self.tasks)}

    def _run(self, pixel_values: np.ndarray) -> list[np.ndarray]:
        if self.backend == "onnx":
            return self._session.run(None, {"pixel_values": pixel_values})
        result = self._compiled(pixel_values)
        return [result[output] for output in self._compiled.outputs]


def import_runtime(module: str, backend: str):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(
            f'backend="{backend}" needs {module}: pip install "softbio[{backend}]" (or pip install {EXTRAS[backend]}).'
        ) from None


def exported_folder(name_or_path: str | os.PathLike, backend: str, **hub_kwargs: Any) -> Path:
    """The folder holding `backend`'s artifacts and the manifest: a checkpoint or export folder, or a Hub repo's
    files (downloaded once into the Hub cache; a push commits weights and export together)."""
    if backend not in ARTIFACTS:
        raise ValueError(f"backend={backend!r}: choose one of {BACKENDS}.")
    folder = Path(name_or_path)
    if folder.is_dir():
        missing = [name for name in (MANIFEST, *ARTIFACTS[backend]) if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder} has no {backend} export ({', '.join(missing)} missing). Make one with: python -m "
                f"softbio_hf.export --model {folder} --format {backend} --out {folder}"
            )
        return folder
    from huggingface_hub import hf_hub_download

    from .hub_access import cache_only

    hub_kwargs.setdefault("local_files_only", cache_only(name_or_path))  # one probe, not minutes of retries
    for name in (MANIFEST, *ARTIFACTS[backend]):
        downloaded = Path(hf_hub_download(str(name_or_path), name, **hub_kwargs))
    return downloaded.parents[len(Path(ARTIFACTS[backend][-1]).parts) - 1]


@functools.cache
def age_bin_bounds(labels: tuple[str, ...]) -> tuple[list[float], list[float]] | None:
    """Inclusive year range of each age label ("20-29" -> 20..29, "70+" -> 70..inf); None if one does not parse."""
    lows, highs = [], []
    for label in labels:
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)|\+)\s*", str(label))
        if match is None:
            return None
        lows.append(float(match[1]))
        highs.append(float(match[2]) if match[2] else math.inf)
    return lows, highs
