"""Export a softbio checkpoint to ONNX and OpenVINO, for CPU serving (and serving without Python's torch).

    python -m softbio_hf.export --model runs/lora/best --out runs/lora/best        # both formats, beside it
    python -m softbio_hf.export --model clip:openai/clip-vit-large-patch14-336 --format onnx --out softbio-zs
    python -m softbio_hf.export --model runs/lora/best --out softbio-int8 --precision int8 --calibration data/rafdb

The artifacts (onnx/model.onnx, openvino/openvino_model.xml + .bin) go into --out with manifest.json: everything
the answer depends on (tasks, labels, age years, calibration record, image size and normalisation, detector
defaults, batch, opset, versions) and the sha256 of each artifact and of the weights they came from, checked at
load. In a folder of its own the config and image processor go too, and the folder serves alone (python -m
softbio_hf.serve). The input is `pixel_values`, float32 [batch, 3, S, S] normalised as the image processor does,
with a dynamic batch axis (or a fixed one, --batch-size N); the outputs are `logits_<task>` in the config's task
order. The export is written aside and put in place under a lock (softbio_hf.safe_files). Then
`pipeline("soft-biometrics", model=OUT, backend="onnx")`, `--backend` of the batch command, or the server.
int8 (opt-in, never the default) is ONNX Runtime's static quantization calibrated on faces from --calibration
(softbio_hf.quantize); the manifest records the precision, and `python -m train.evaluate --backend onnx --model OUT`
shows what it costs in accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from .safe_files import unwritable_reason

FORMATS = ("onnx", "openvino")
OPSET = 18


class ExportError(ValueError):
    """What cannot be exported, and why: exit code 2."""


def tuple_outputs(model):
    """The model as a module that returns a tuple of logits in the config's task order (exporters want tensors)."""
    import torch

    class TupleOutputs(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            logits = self.inner(pixel_values=pixel_values).logits
            return tuple(logits[task] for task in self.inner.config.tasks)

    return TupleOutputs(model).eval()


def export(
    model,
    out: str | Path,
    formats=FORMATS,
    batch_size: int | None = None,
    checkpoint: str | Path | None = None,
    calibration_faces=None,
) -> dict[str, Any]:
    """
    Write the artifacts of `model` (a SoftBioModel with merged adapters) into `out`; returns the manifest. With
    `calibration_faces` (uint8 face crops, softbio_hf.quantize.calibration_faces) the export is int8 (opt-in).

    Everything is written aside first and put in place under a lock: a folder of its own is swapped in whole; beside
    a checkpoint, the old manifest goes first, the formats are swapped in (formats not exported now are removed, so
    none is left stale) and the new manifest comes last, so a kill at any point leaves either the old export or none,
    never a mixture. The digest of the weights in `checkpoint` (default: the folder the model was loaded from) is
    recorded, so that weights saved over the checkpoint later are refused rather than answered for by the old export.
    """
    from .runtimes import MANIFEST, weights_digest
    from .safe_files import LockBusy, atomic_write_json, holding, replace_folder, staging_folder

    check_exportable(model, formats, batch_size)
    out = Path(out)
    if out.is_symlink():  # the export lands where the link points: swapping a folder in would replace the link
        out = out.resolve()
    source = Path(checkpoint) if checkpoint is not None else checkpoint_folder(model)
    beside = refuse_foreign_folder(out, source)
    digest = weights_digest(source) if source is not None else None
    busy = f"another export is writing {out} now; wait for it to finish (two at once would mix two models)."
    try:
        with holding(export_lock(out), busy):
            staging = staging_folder(out)
            staging.chmod(0o755)  # mkdtemp's 0700 would become the export folder's mode
            try:
                manifest = write_export(model, staging, formats, batch_size, digest, calibration_faces)
                if beside:
                    install_beside(staging, out, manifest)
                else:
                    atomic_write_json(staging / MANIFEST, manifest)
                    replace_folder(staging, out)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except LockBusy as error:
        raise ExportError(str(error)) from None
    return manifest


def export_lock(out: Path) -> Path:
    """The lock an export of `out` holds: beside the folder, since a folder of its own is replaced whole."""
    return out.parent / f".{out.name}.export.lock"


def check_exportable(model, formats, batch_size: int | None) -> None:
    adapter = model.config.adapter or {}
    if adapter.get("method") in ("lora", "dora", "loraplus", "mtlora") and not adapter.get("merged"):
        raise ExportError(
            f"the model carries unmerged {adapter['method']} adapters (peft layers exporters cannot follow): merge "
            "them first (model.merge_adapters(), or --merge)."
        )
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ExportError(f"--format {unknown}: choose from {list(FORMATS)}.")
    if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
        raise ExportError("--batch-size must be at least 1 (or left out for a dynamic batch).")


def checkpoint_folder(model) -> Path | None:
    """The local softbio checkpoint folder `model` was loaded from, if any."""
    folder = Path(str(getattr(model, "name_or_path", "") or ""))
    if not str(folder) or not (folder / "config.json").is_file():
        return None
    try:
        return folder if json.loads((folder / "config.json").read_text()).get("model_type") == "softbio" else None
    except (OSError, ValueError):
        return None


def refuse_foreign_folder(out: Path, source: Path | None) -> bool:
    """Whether `out` is the checkpoint's own folder (the export goes beside its weights); a folder holding another
    checkpoint, or files that are not an export, is refused (a folder of its own is replaced whole)."""
    from .runtimes import MANIFEST, WEIGHT_PATTERNS

    if not out.exists():
        return False
    if not out.is_dir():
        raise ExportError(f"--out {out} is a file: give a folder (a new one, or the checkpoint's own).")
    has_weights = any(next(out.glob(pattern), None) for pattern in WEIGHT_PATTERNS)
    if has_weights:
        if source is not None and source.resolve() == out.resolve():
            return True
        raise ExportError(
            f"--out {out} holds another checkpoint's weights: its export would answer for a different model. Export "
            f"into the checkpoint's own folder (--out {source or 'CHECKPOINT'}) or a new folder."
        )
    if any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ExportError(
            f"--out {out} is neither empty nor an earlier export, and an export replaces its folder whole: give a new "
            "folder (or the checkpoint's own)."
        )
    return False


def install_beside(staging: Path, out: Path, manifest: dict[str, Any]) -> None:
    """Move a finished export from `staging` into a checkpoint's folder: old manifest out first, new one in last."""
    from .runtimes import MANIFEST
    from .safe_files import atomic_write_json, fsync_folder, replace_folder

    (out / MANIFEST).unlink(missing_ok=True)
    fsync_folder(out)
    for name in FORMATS:
        if name in manifest["formats"]:
            replace_folder(staging / name, out / name)
        elif (out / name).exists():  # a format not re-exported would be stale: it goes
            shutil.rmtree(out / name)
    atomic_write_json(out / MANIFEST, manifest)


def write_export(
    model, folder: Path, formats, batch_size: int | None, weights_digest: str | None, calibration_faces=None
) -> dict[str, Any]:
    """The artifacts, and (for a folder of its own) the config and image processor, written into `folder`; returns
    the manifest, with every artifact's digest. int8 (given calibration faces): the ONNX graph quantized, and the
    OpenVINO model converted from it (softbio_hf.quantize)."""
    import torch

    from .modeling_softbio import image_processor_for
    from .runtime_light import detector_defaults
    from .runtimes import ARTIFACTS, answer_digest, file_digest

    model = model.to(torch.float32).eval()
    size = model.config.image_size
    example = torch.zeros(batch_size or 2, 3, size, size)
    wrapped = tuple_outputs(model)
    outputs = [f"logits_{task}" for task in model.config.tasks]
    versions = {"torch": torch.__version__}
    quantization = None
    if calibration_faces is not None:  # int8: one quantized ONNX graph, which OpenVINO converts too
        from .quantize import write_int8

        versions["onnx"] = write_onnx(wrapped, example, folder, outputs, batch_size)
        quantization = write_int8(folder, formats, calibration_faces, model.config, batch_size)
        if "openvino" in formats:
            versions["openvino"] = __import__("openvino").__version__
    else:
        if "onnx" in formats:
            versions["onnx"] = write_onnx(wrapped, example, folder, outputs, batch_size)
        if "openvino" in formats:
            versions["openvino"] = write_openvino(wrapped, example, folder, outputs, batch_size)
    config = model.config
    manifest = {
        "formats": sorted(formats),
        "input": {"name": "pixel_values", "shape": [batch_size or "batch", 3, size, size], "dtype": "float32"},
        "outputs": outputs,
        "tasks": list(config.tasks),
        "labels": {task: list(labels) for task, labels in config.tasks.items()},
        "age_years": list(config.age_years) if config.age_years else None,
        "calibration": config.calibration,  # the temperatures are folded into the heads; recorded for the answer
        "image_size": size,
        "image_mean": list(config.image_mean),
        "image_std": list(config.image_std),
        "detector": detector_defaults(),
        "opset": OPSET if "onnx" in formats else None,
        "batch": batch_size or "dynamic",
        "precision": "int8" if quantization else "fp32",
        "quantization": quantization,
        "versions": versions,
        "weights_digest": weights_digest,
        "digests": {name: file_digest(folder / name) for fmt in sorted(formats) for name in ARTIFACTS[fmt]},
    }
    manifest["answer_digest"] = answer_digest(manifest)  # an edited label or threshold is refused at load
    config.save_pretrained(folder)  # a folder of its own keeps the config and image processor; beside, unused
    image_processor_for(config).save_pretrained(folder)
    return manifest


def write_onnx(wrapped, example, folder: Path, outputs: list[str], batch_size: int | None) -> str:
    import torch

    from .runtimes import ARTIFACTS

    try:
        import onnx
    except ImportError:
        raise ExportError('--format onnx needs onnx: pip install "softbio[onnx]".') from None
    (folder / "onnx").mkdir(exist_ok=True)
    dynamic = None if batch_size else {"pixel_values": {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    with torch.no_grad(), traced_quietly():
        torch.onnx.export(
            wrapped,
            (example,),
            str(folder / ARTIFACTS["onnx"][0]),
            input_names=["pixel_values"],
            output_names=outputs,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )
    return onnx.__version__


def write_openvino(wrapped, example, folder: Path, outputs: list[str], batch_size: int | None) -> str:
    import torch

    from .runtimes import ARTIFACTS

    try:
        import openvino
    except ImportError:
        raise ExportError('--format openvino needs openvino: pip install "softbio[openvino]".') from None
    size = example.shape[-1]
    with torch.no_grad(), traced_quietly():
        converted = openvino.convert_model(wrapped, example_input=example, input=[batch_size or -1, 3, size, size])
    for output, name in zip(converted.outputs, outputs, strict=True):
        output.get_tensor().set_names({name})
    (folder / "openvino").mkdir(exist_ok=True)
    openvino.save_model(converted, str(folder / ARTIFACTS["openvino"][0]), compress_to_fp16=False)
    return openvino.__version__


@contextlib.contextmanager
def traced_quietly():
    """Both exports trace the model (TorchScript): the warnings that raises which do not apply to it, silenced here
    only, each for its reason; any other warning still shows."""
    import warnings

    from torch.jit import TracerWarning

    with warnings.catch_warnings():
        # transformers' CLIP compares the input's size with the model's, and SDPA asks whether attention is causal:
        # both are constants in a trace of the model's own image size and a vision model (never causal)
        warnings.filterwarnings("ignore", category=TracerWarning, module=r"transformers\.")
        # write_onnx asks for the TorchScript exporter (dynamo=False) on purpose: the graph the runtimes were
        # measured with; being told it is the older exporter is nothing to act on
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning)
        # the trace reads every attribute of every module, deprecated properties included; softbio uses none of them
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m softbio_hf.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from .version import add_version_argument  # stdlib only: --version needs no torch

    add_version_argument(parser)
    parser.add_argument("--model", required=True, help="a softbio checkpoint (folder or Hub id) or clip:ID_OR_FOLDER")
    parser.add_argument("--out", required=True, help="folder for the artifacts (the checkpoint's own folder is fine)")
    parser.add_argument("--format", nargs="+", default=list(FORMATS), choices=FORMATS, help="default: both")
    parser.add_argument("--batch-size", type=int, default=None, help="a fixed batch size (default: dynamic)")
    parser.add_argument("--merge", action="store_true", help="merge unmerged adapters before exporting")
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "int8"),
        help="int8: static post-training quantization (opt-in; needs --calibration). Default fp32",
    )
    parser.add_argument(
        "--calibration",
        nargs="+",
        default=None,
        metavar="PATH",
        help="int8's calibration faces: a folder from python -m train.data prepare, or photos / folders of photos",
    )
    parser.add_argument("--calibration-faces", type=int, default=128, help="how many faces calibrate (default 128)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .batch_rows import load_model

    try:
        if args.batch_size is not None and args.batch_size < 1:
            raise ExportError("--batch-size must be at least 1 (or left out for a dynamic batch).")
        if reason := unwritable_reason(Path(args.out) / "manifest.json"):  # before the model loads (seconds)
            raise ExportError(f"--out {args.out} cannot be written: {reason}. Choose a folder you can write.")
        if args.calibration_faces < 1:
            raise ExportError("--calibration-faces must be at least 1.")
        if (args.precision == "int8") != (args.calibration is not None):
            raise ExportError("--precision int8 needs --calibration PATH (prepared data or photos), and only it does.")
        model = load_model(args.model)
        if args.merge:
            model.merge_adapters()
        faces = None
        if args.precision == "int8":
            from .quantize import calibration_faces

            faces = calibration_faces(args.calibration, model.config.image_size, args.calibration_faces)
        manifest = export(model, args.out, args.format, args.batch_size, calibration_faces=faces)
    except (ExportError, ValueError, ImportError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"exported {', '.join(manifest['formats'])} ({manifest['precision']}) to {args.out} (tasks {manifest['tasks']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
