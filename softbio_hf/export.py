"""Export a softbio checkpoint to ONNX and OpenVINO, for CPU serving (and serving without Python's torch).

    python -m softbio_hf.export --model runs/lora/best --out runs/lora/best        # both formats, beside it
    python -m softbio_hf.export --model clip:openai/clip-vit-large-patch14-336 --format onnx --out softbio-zs

The artifacts (onnx/model.onnx, openvino/openvino_model.xml + .bin) go into --out with the checkpoint's
config.json, the image processor and manifest.json (input size, task order, dtype, opset, versions). The input
is `pixel_values`, float32 [batch, 3, S, S] normalised as the image processor does, with a dynamic batch axis
(or a fixed one, --batch-size N); the outputs are `logits_<task>` in the config's task order. Then
`pipeline("soft-biometrics", model=OUT, backend="onnx")`, or `--backend` of the batch command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

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


def export(model, out: str | Path, formats=FORMATS, batch_size: int | None = None) -> dict[str, Any]:
    """Write the artifacts of `model` (a SoftBioModel with merged adapters) into `out`; returns the manifest."""
    import torch

    from .modeling_softbio import image_processor_for
    from .runtimes import ARTIFACTS, MANIFEST

    adapter = model.config.adapter or {}
    if adapter.get("method") in ("lora", "dora", "loraplus", "mtlora") and not adapter.get("merged"):
        raise ExportError(
            f"the model carries unmerged {adapter['method']} adapters (peft layers exporters cannot follow): merge "
            "them first (model.merge_adapters(), or --merge)."
        )
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ExportError(f"--format {unknown}: choose from {list(FORMATS)}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.float32).eval()
    size = model.config.image_size
    example = torch.zeros(batch_size or 2, 3, size, size)
    wrapped = tuple_outputs(model)
    outputs = [f"logits_{task}" for task in model.config.tasks]
    versions = {"torch": torch.__version__}
    if "onnx" in formats:
        try:
            import onnx
        except ImportError:
            raise ExportError('--format onnx needs onnx: pip install "softbio[onnx]".') from None
        (out / "onnx").mkdir(exist_ok=True)
        dynamic = None if batch_size else {"pixel_values": {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
        with torch.no_grad():
            torch.onnx.export(
                wrapped,
                (example,),
                str(out / ARTIFACTS["onnx"][0]),
                input_names=["pixel_values"],
                output_names=outputs,
                dynamic_axes=dynamic,
                opset_version=OPSET,
                dynamo=False,
            )
        versions["onnx"] = onnx.__version__
    if "openvino" in formats:
        try:
            import openvino
        except ImportError:
            raise ExportError('--format openvino needs openvino: pip install "softbio[openvino]".') from None
        with torch.no_grad():
            converted = openvino.convert_model(wrapped, example_input=example, input=[batch_size or -1, 3, size, size])
        for output, name in zip(converted.outputs, outputs, strict=True):
            output.get_tensor().set_names({name})
        (out / "openvino").mkdir(exist_ok=True)
        openvino.save_model(converted, str(out / ARTIFACTS["openvino"][0]), compress_to_fp16=False)
        versions["openvino"] = openvino.__version__
    manifest = {
        "formats": sorted(formats),
        "input": {"name": "pixel_values", "shape": [batch_size or "batch", 3, size, size], "dtype": "float32"},
        "outputs": outputs,
        "tasks": list(model.config.tasks),
        "labels": {task: list(labels) for task, labels in model.config.tasks.items()},
        "opset": OPSET if "onnx" in formats else None,
        "batch": batch_size or "dynamic",
        "versions": versions,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if not (out / "config.json").is_file():  # a checkpoint's own folder keeps its config (auto_map and all)
        model.config.save_pretrained(out)
        image_processor_for(model.config).save_pretrained(out)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m softbio_hf.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a softbio checkpoint (folder or Hub id) or clip:ID_OR_FOLDER")
    parser.add_argument("--out", required=True, help="folder for the artifacts (the checkpoint's own folder is fine)")
    parser.add_argument("--format", nargs="+", default=list(FORMATS), choices=FORMATS, help="default: both")
    parser.add_argument("--batch-size", type=int, default=None, help="a fixed batch size (default: dynamic)")
    parser.add_argument("--merge", action="store_true", help="merge unmerged adapters before exporting")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .predict import load_model

    try:
        if args.batch_size is not None and args.batch_size < 1:
            raise ExportError("--batch-size must be at least 1 (or left out for a dynamic batch).")
        model = load_model(args.model)
        if args.merge:
            model.merge_adapters()
        manifest = export(model, args.out, args.format, args.batch_size)
    except (ExportError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {', '.join(manifest['formats'])} to {args.out} (tasks {manifest['tasks']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
