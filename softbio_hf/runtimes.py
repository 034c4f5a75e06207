"""Run an exported softbio model (ONNX or OpenVINO) on face crops: the pipeline's `backend="onnx"|"openvino"`.

An export (python -m softbio_hf.export) writes, beside a checkpoint's config.json:

    manifest.json            what was exported: input size, task order, dtype, versions
    onnx/model.onnx          input `pixel_values` float32 [batch, 3, S, S]; outputs `logits_<task>`, task order
    openvino/openvino_model.xml + .bin

Neither runtime needs torch: numpy in, numpy out. This file travels with a checkpoint's remote code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

BACKENDS = ("torch", "onnx", "openvino")
MANIFEST = "manifest.json"
ARTIFACTS = {"onnx": ("onnx/model.onnx",), "openvino": ("openvino/openvino_model.xml", "openvino/openvino_model.bin")}
EXTRAS = {"onnx": "onnxruntime", "openvino": "openvino"}


class ExportedModel:
    """
    An exported model's logits per task for a float32 batch [N, 3, S, S], normalised as the model expects.
    `exact=True` keeps OpenVINO in fp32 (it otherwise computes in bf16 on CPUs that have it, as torch's
    dtype="auto" does); ONNX Runtime's CPU provider computes in fp32 either way.
    """

    def __init__(self, backend: str, folder: Path, exact: bool = True):
        self.backend = backend
        self.manifest = json.loads((folder / MANIFEST).read_text())
        self.tasks: list[str] = list(self.manifest["tasks"])
        path = folder / ARTIFACTS[backend][0]
        if backend == "onnx":
            runtime = import_runtime("onnxruntime", "onnx")
            options = runtime.SessionOptions()
            options.intra_op_num_threads = os.cpu_count() or 1
            self._session = runtime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        else:
            runtime = import_runtime("openvino", "openvino")
            hints = {"INFERENCE_PRECISION_HINT": "f32"} if exact else {}
            self._compiled = runtime.Core().compile_model(str(path), "CPU", hints)

    def __call__(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
        if self.backend == "onnx":
            outputs = self._session.run(None, {"pixel_values": pixel_values})
        else:
            result = self._compiled(pixel_values)
            outputs = [result[output] for output in self._compiled.outputs]
        return dict(zip(self.tasks, outputs, strict=True))


def import_runtime(module: str, backend: str):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(
            f'backend="{backend}" needs {module}: pip install "softbio[{backend}]" (or pip install {EXTRAS[backend]}).'
        ) from None


def exported_folder(name_or_path: str | os.PathLike, backend: str, **hub_kwargs: Any) -> Path:
    """The folder holding `backend`'s artifacts and the manifest: a checkpoint folder, or a Hub repo's files
    (downloaded once into the Hub cache)."""
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
