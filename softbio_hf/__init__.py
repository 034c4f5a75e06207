"""softbio: age group, gender and emotion from one forward pass of a CLIP vision model.

`import softbio_hf` registers the Auto classes and the "soft-biometrics" pipeline task. The public names load
on first use.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from .version import __version__

_EXPORTS = {
    "AGE_LABELS": "configuration_softbio",
    "DEFAULT_TASKS": "configuration_softbio",
    "EMOTION_LABELS": "configuration_softbio",
    "GENDER_LABELS": "configuration_softbio",
    "SoftBioConfig": "configuration_softbio",
    "SoftBioModel": "modeling_softbio",
    "SoftBioOutput": "modeling_softbio",
    "image_processor_for": "modeling_softbio",
    "SoftBiometricsPipeline": "pipeline_softbio",
    "load_image": "pipeline_softbio",
}
__all__ = [
    "AGE_LABELS",
    "DEFAULT_TASKS",
    "EMOTION_LABELS",
    "GENDER_LABELS",
    "SoftBioConfig",
    "SoftBioModel",
    "SoftBioOutput",
    "SoftBiometricsPipeline",
    "__version__",
    "image_processor_for",
    "load_image",
    "register",
]

if TYPE_CHECKING:
    from .configuration_softbio import AGE_LABELS, DEFAULT_TASKS, EMOTION_LABELS, GENDER_LABELS, SoftBioConfig
    from .modeling_softbio import SoftBioModel, SoftBioOutput, image_processor_for
    from .pipeline_softbio import SoftBiometricsPipeline, load_image


_registration_deferred = False


def __getattr__(name: str) -> Any:
    global _registration_deferred
    if name not in _EXPORTS:
        raise AttributeError(f"module 'softbio_hf' has no attribute {name!r}")
    if _registration_deferred:  # a command that deferred it now uses the model: save_pretrained needs auto_map
        _registration_deferred = False
        register()
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def register() -> None:
    """Register SoftBioConfig / SoftBioModel with the Auto classes and the "soft-biometrics" pipeline task.
    Idempotent."""
    from transformers import AutoConfig, AutoModel
    from transformers.pipelines import PIPELINE_REGISTRY

    from .configuration_softbio import PIPELINE_TASK, SoftBioConfig
    from .export_folder import ExportFolderModel
    from .modeling_softbio import SoftBioModel
    from .pipeline_softbio import SoftBiometricsPipeline

    AutoConfig.register(SoftBioConfig.model_type, SoftBioConfig, exist_ok=True)
    AutoModel.register(SoftBioConfig, SoftBioModel, exist_ok=True)
    # save_pretrained then copies our files beside the weights and writes auto_map, so a checkpoint
    # loads with trust_remote_code=True and no softbio install.
    SoftBioConfig.register_for_auto_class()
    SoftBioModel.register_for_auto_class("AutoModel")
    if (PIPELINE_REGISTRY.supported_tasks.get(PIPELINE_TASK) or {}).get("impl") is SoftBiometricsPipeline:
        return  # ours already (the package registers when imported): again would only warn that it is
    # AutoModel first; where it finds no weights, an export folder loads as its config (softbio_hf.export_folder)
    PIPELINE_REGISTRY.register_pipeline(
        PIPELINE_TASK, pipeline_class=SoftBiometricsPipeline, pt_model=(AutoModel, ExportFolderModel), type="image"
    )


# `python -m softbio_hf.predict` imports this package while Python still locates the command (sys.argv[0] is
# "-m" until then), and the training and benchmark commands (`python -m train.*`, `bench.*`, the running __main__)
# import our safe files, extras and version. Both defer registration until a public name (SoftBioModel, ...) is
# first taken from the package, so their --help, --version and argument errors answer without the seconds that
# torch and transformers take to import, and a checkpoint they save still carries auto_map and our code
# (register_for_auto_class).
# The demo (app.py, run as a script, so it has no module name) asks for the same by defining
# DEFER_SOFTBIO_REGISTRATION before its first import of ours; it registers when it builds its pipeline.
# The torch-free install (requirements-serve.txt) has neither torch nor transformers: its runtime and server need no
# registration, so `import softbio_hf.runtime_light` works there.
_MAIN = sys.modules.get("__main__")
_COMMAND = getattr(getattr(_MAIN, "__spec__", None), "name", None) or ""
_DEFERRED_BY_MAIN = getattr(_MAIN, "DEFER_SOFTBIO_REGISTRATION", False)
if sys.argv[:1] == ["-m"] or _COMMAND.startswith(("train.", "bench.")) or _DEFERRED_BY_MAIN:
    _registration_deferred = True
else:
    try:
        register()
    except ImportError as error:
        if error.name not in ("torch", "transformers"):
            raise
