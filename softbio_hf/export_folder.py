"""An export folder without torch weights, as transformers' pipeline factory loads a model:

    pipeline("soft-biometrics", model="softbio-onnx", backend="onnx")     # python -m softbio_hf.export --out it

The pipeline task's model classes are AutoModel, then `ExportFolderModel`: where AutoModel finds no weights, a
folder that holds an export (manifest.json beside config.json) loads as its config alone, and the pipeline runs the
forward pass in the export's runtime (softbio_hf.runtimes, the torch-free runtime's). Detection, crops and answers
are the pipeline's, as for a checkpoint with its export beside it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import PreTrainedModel

from .configuration_softbio import SoftBioConfig
from .runtimes import ARTIFACTS, MANIFEST, read_manifest, weights_digest


class ExportFolderModel(PreTrainedModel):
    """The config of an export folder that holds no torch weights; it has no forward pass of its own."""

    config_class = SoftBioConfig
    base_model_prefix = "softbio"
    main_input_name = "pixel_values"

    def __init__(self, config: SoftBioConfig):
        super().__init__(config)
        # one frozen scalar, no weights: it gives the model the dtype and device transformers' pipelines read
        self.anchor = torch.nn.Parameter(torch.zeros(()), requires_grad=False)
        self.formats: list[str] = []
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs) -> ExportFolderModel:
        """A local export folder; anything else is an OSError, so the factory reports AutoModel's own error."""
        folder = Path(pretrained_model_name_or_path)
        if not (folder / MANIFEST).is_file() or not (folder / "config.json").is_file():
            raise OSError(f"{folder} holds no export (manifest.json and config.json from python -m softbio_hf.export)")
        if weights_digest(folder) is not None:
            raise OSError(f"{folder} holds torch weights: AutoModel loads them")
        manifest = read_manifest(folder)
        model = cls(SoftBioConfig.from_pretrained(folder))
        model.name_or_path = str(folder)
        model.formats = [name for name in manifest["formats"] if name in ARTIFACTS]
        return model.eval()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing to initialise: no weights."""

    def forward(self, pixel_values: torch.Tensor | None = None, **kwargs):
        raise RuntimeError(
            f"{self.name_or_path} is an export without torch weights: it runs in its runtime, "
            f"pipeline(..., backend={self.formats[0] if self.formats else 'onnx'!r})."
        )


def refuse_torch_backend(model, backend: str) -> None:
    """backend="torch" (or an "auto" that fell back to torch) on an export folder: say which backend serves it."""
    if isinstance(model, ExportFolderModel):
        choices = " or ".join(f'backend="{name}"' for name in model.formats) or 'backend="onnx"'
        raise ValueError(
            f"{model.name_or_path} holds an export ({', '.join(model.formats)}) and no torch weights: "
            f'backend="{backend}"'
            f" cannot run it. Serve it with {choices}, or load the checkpoint it was exported from."
        )
