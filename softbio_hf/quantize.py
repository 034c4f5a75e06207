"""int8 exports: ONNX Runtime's static post-training quantization, calibrated on the user's own faces.

    python -m softbio_hf.export --model runs/lora/best --out softbio-int8 --precision int8 --calibration data/rafdb

The fp32 ONNX graph is quantized to QDQ form (QuantizeLinear / DequantizeLinear around the matmuls: int8 weights
per output channel, int8 activations with ranges measured on the calibration faces); ONNX Runtime runs it with its
int8 kernels (VNNI / AMX-INT8 where the CPU has them), and OpenVINO converts the same QDQ graph into its own int8
model, so both formats hold one quantization. LayerNorm, softmax and GELU stay in float (transformers lose the most
accuracy there). Opt-in, never the default: see its cost with `python -m train.evaluate --backend onnx`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PRECISIONS = ("fp32", "int8")
CALIBRATION_FACES = 128
QUANTIZED_OPS = ["MatMul", "Gemm", "Conv"]
METHOD = "onnxruntime static QDQ, int8 weights per channel and int8 activations (MinMax), MatMul/Gemm/Conv"


class CalibrationError(ValueError):
    """A calibration set that cannot be used; the message names the input and the fix."""


def calibration_faces(sources: Sequence[str], image_size: int, count: int = CALIBRATION_FACES) -> np.ndarray:
    """
    Up to `count` uint8 face crops [N, 3, S, S] from the user's data: a prepared folder (python -m train.data
    prepare; its rows are faces already, its train split first) or photos (files or folders of them; faces found
    and cropped as the pipeline does).
    """
    from .batch_inputs import is_saved_dataset

    crops: list[np.ndarray] = []
    for source in sources:
        path = Path(source)
        if not path.exists():
            raise CalibrationError(f"--calibration {source}: no such file or folder (give prepared data or photos).")
        wanted = count - sum(len(c) for c in crops)
        found = prepared_faces(path, image_size, wanted) if is_saved_dataset(path) else photo_faces(path, image_size)
        crops.extend(found[:wanted])
        if sum(len(c) for c in crops) >= count:
            break
    if not crops:
        raise CalibrationError(
            f"--calibration {' '.join(map(str, sources))}: no face in it. Give a folder from python -m train.data "
            "prepare, or photos with faces in them."
        )
    return np.concatenate(crops)[:count]


def prepared_faces(folder: Path, image_size: int, count: int) -> list[np.ndarray]:
    """A prepared folder's first `count` images (its train split, else its first), each a face crop."""
    from datasets import DatasetDict, load_from_disk

    from .runtime_light import face_array

    loaded = load_from_disk(str(folder))
    if isinstance(loaded, DatasetDict):
        loaded = loaded["train"] if "train" in loaded else loaded[sorted(loaded)[0]]
    rows = loaded.select(range(min(count, len(loaded))))
    return [face_array(np.asarray(image.convert("RGB")), image_size) for image in rows["image"]]


def photo_faces(path: Path, image_size: int) -> list[np.ndarray]:
    """Every face of a photo, or of the photos in a folder (sorted by name), cropped as the pipeline crops."""
    from .faces import make_detector
    from .images import image_files, load_image
    from .runtime_light import DEFAULT_MARGIN, DEFAULT_MIN_FACE_SIZE, DEFAULT_THRESHOLDS, faces_and_crops

    files = image_files(path) if path.is_dir() else [path]
    detector = make_detector("auto")
    found = []
    for file in files:
        _, crops = faces_and_crops(
            load_image(str(file)),
            detector,
            image_size,
            threshold=DEFAULT_THRESHOLDS[detector.name],
            margin=DEFAULT_MARGIN,
            max_faces=None,
            min_face_size=DEFAULT_MIN_FACE_SIZE,
            detection_max_side=800,
        )
        if crops is not None:
            found.append(crops)
    return found


def calibration_batches(faces: np.ndarray, mean, std, batch: int | None) -> Iterator[dict[str, np.ndarray]]:
    """The model's inputs for calibration: normalised as served, in batches of the export's size."""
    from .runtime_light import normalize_array

    step = batch or 8
    for start in range(0, len(faces), step):
        chunk = faces[start : start + step]
        if batch and len(chunk) < batch:  # a fixed batch axis takes exactly `batch` rows
            chunk = np.concatenate([chunk, faces[: batch - len(chunk)]])
        yield {"pixel_values": normalize_array(chunk, mean, std)}


def quantize_onnx(fp32: Path, out: Path, faces: np.ndarray, config, batch: int | None) -> None:
    """The QDQ int8 model of the fp32 ONNX graph at `fp32`, written to `out`, ranges from `faces`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Faces(CalibrationDataReader):
        def __init__(self):
            self.batches = calibration_batches(faces, config.image_mean, config.image_std, batch)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(
        str(fp32),
        str(out),
        Faces(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=QUANTIZED_OPS,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    )


def write_int8(folder: Path, formats, faces: np.ndarray, config, batch: int | None) -> dict[str, Any]:
    """Quantize the fp32 ONNX export in `folder` (onnx/model.onnx) in place; the OpenVINO model, when asked for, is
    converted from the quantized graph. Returns the manifest's record of the quantization."""
    from .runtimes import ARTIFACTS

    onnx_path = folder / ARTIFACTS["onnx"][0]
    fp32 = onnx_path.with_name("model-fp32.onnx")
    onnx_path.rename(fp32)
    quantize_onnx(fp32, onnx_path, faces, config, batch)
    fp32.unlink()
    if "openvino" in formats:
        import openvino

        converted = openvino.convert_model(str(onnx_path))
        (folder / "openvino").mkdir(exist_ok=True)
        openvino.save_model(converted, str(folder / ARTIFACTS["openvino"][0]), compress_to_fp16=False)
    if "onnx" not in formats:
        shutil.rmtree(folder / "onnx")
    return {"precision": "int8", "method": METHOD, "calibration_faces": len(faces)}
