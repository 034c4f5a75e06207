"""softbio: age group, gender and emotion from one forward pass of a CLIP vision model."""

from transformers import AutoConfig, AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_softbio import (
    AGE_LABELS,
    DEFAULT_TASKS,
    EMOTION_LABELS,
    GENDER_LABELS,
    PIPELINE_TASK,
    SoftBioConfig,
)
from .modeling_softbio import SoftBioModel, SoftBioOutput, image_processor_for
from .pipeline_softbio import SoftBiometricsPipeline, load_image

AutoConfig.register(SoftBioConfig.model_type, SoftBioConfig, exist_ok=True)
AutoModel.register(SoftBioConfig, SoftBioModel, exist_ok=True)
# save_pretrained then copies our files beside the weights and writes auto_map, so a checkpoint
# loads with trust_remote_code=True and no softbio install.
SoftBioConfig.register_for_auto_class()
SoftBioModel.register_for_auto_class("AutoModel")
PIPELINE_REGISTRY.register_pipeline(
    PIPELINE_TASK, pipeline_class=SoftBiometricsPipeline, pt_model=AutoModel, type="image"
)

__all__ = [
    "AGE_LABELS",
    "DEFAULT_TASKS",
    "EMOTION_LABELS",
    "GENDER_LABELS",
    "SoftBioConfig",
    "SoftBioModel",
    "SoftBioOutput",
    "SoftBiometricsPipeline",
    "image_processor_for",
    "load_image",
]
