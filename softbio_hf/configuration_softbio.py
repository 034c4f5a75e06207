"""SoftBioConfig: everything a softbio checkpoint needs to rebuild itself."""

from __future__ import annotations

import sys

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .conformal import check_conformal

# Canonical label order (DESIGN.md). Never reorder: checkpoints' head rows depend on it.
AGE_LABELS = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+")
GENDER_LABELS = ("male", "female")
EMOTION_LABELS = ("surprise", "fear", "disgust", "happy", "sad", "angry", "neutral")
DEFAULT_TASKS: dict[str, tuple[str, ...]] = {
    "age": AGE_LABELS,
    "gender": GENDER_LABELS,
    "emotion": EMOTION_LABELS,
}
# Representative age of each bin, for the "years" estimate (expectation over bins).
# The open 70+ bin uses 77, roughly the mean age of 70+ faces in UTKFace.
DEFAULT_AGE_YEARS = (1.0, 6.0, 14.5, 24.5, 34.5, 44.5, 54.5, 64.5, 77.0)

# openai/clip-vit-large-patch14-336, the study's backbone; used when no vision config is given.
CLIP_L14_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _task_rank(task: str) -> tuple[int, str]:
    canonical = list(DEFAULT_TASKS)
    return (canonical.index(task), "") if task in canonical else (len(canonical), task)


def pipeline_registered_here() -> bool:
    """Whether this is softbio_hf's own config class (not a remote-code copy of it) with its pipeline registered."""
    if __name__.startswith("transformers_modules"):  # the remote copy: the checkpoint's entry is its way in
        return False
    pipelines = sys.modules.get("transformers.pipelines")  # registering needs it: not imported, not registered
    return pipelines is not None and PIPELINE_TASK in pipelines.PIPELINE_REGISTRY.get_supported_tasks()


PIPELINE_TASK = "soft-biometrics"
PIPELINE_SPEC = {"impl": "pipeline_softbio.SoftBiometricsPipeline", "pt": ["AutoModel"], "type": "image"}
POOLING_CHOICES = ("cls", "attention")
LORA_KEYS = ("rank", "alpha", "dropout", "target_modules", "merged")
LOSS_WEIGHTING_CHOICES = ("sum", "uncertainty")


class SoftBioConfig(PreTrainedConfig):
    r"""
    Configuration of a [`SoftBioModel`]: a vision backbone, a pooling stage and one linear (or MLP)
    head per task, all fed by a single backbone pass.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            The backbone's vision config (CLIP's `clip_vision_model` now; any vision tower whose model
            returns `last_hidden_state` fits). Defaults to CLIP ViT-L/14 at 336 px.
        projection_dim (`int`, *optional*):
            Width of the visual projection after pooling (CLIP's `visual_projection`); `None` or 0 keeps
            the backbone width and adds no projection.
        tasks (`dict[str, list[str]]`, *optional*):
            Task name -> label names, in the order of the head's rows. Defaults to age, gender and
            emotion in the canonical order.
        pooling (`str`, defaults to `"attention"`):
            `"cls"` (the backbone's normalised class token, as CLIP does) or `"attention"` (one learned
            query per task attending over all tokens).
        pooling_heads (`int`, *optional*): attention heads of the pooling; defaults to the backbone's.
        pooling_mlp_ratio (`float`, defaults to 4.0): width of the pooling MLP relative to the backbone.
        normalize_features (`bool`, defaults to `True`):
            L2-normalise the projected features before the heads (what CLIP zero-shot does).
        head_hidden_size (`int`, defaults to 0): 0 gives linear heads; > 0 a one-hidden-layer MLP.
        head_dropout (`float`, defaults to 0.0): dropout before each head's last layer.
        trainable_blocks (`int`, defaults to 0):
            Backbone blocks that train, counted from the last one: 0 freezes the backbone (linear
            probe), 4 is the study's FT4, -1 trains the whole backbone.
        loss_weighting (`str`, defaults to `"sum"`):
            `"sum"` of the per-task losses (times `task_weights`), or `"uncertainty"` (Kendall et al. 2018,
            learned log-variances).
        task_weights (`dict[str, float]`, *optional*): fixed weight per task for `"sum"`; missing tasks weigh 1.
        label_smoothing (`float`, defaults to 0.0): label smoothing of every task's cross-entropy.
        age_years (`list[float]`, *optional*): representative age per age bin, for the years estimate.
        image_mean / image_std (`list[float]`, *optional*): the backbone's normalisation.
        adapter (`dict`, *optional*): how the backbone was adapted (method and its options); written by
            the adapter code so a checkpoint says how it was made and rebuilds its extra layers.
        logit_scale (`float`, *optional*): the CLIP logit scale the zero-shot heads were built with (record only).
        zero_shot_source (`str`, *optional*): the CLIP checkpoint the zero-shot heads came from (record only).
        calibration (`dict`, *optional*): per-task temperatures already folded into the heads by
            `python -m train.evaluate --calibrate`, and the split they were fitted on (record only).
    """

    model_type = "softbio"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=CLIP_L14_336
        )
    }

    vision_config: dict | PreTrainedConfig | None = None
    projection_dim: int | None = 768
    tasks: dict[str, list[str]] | None = None
    pooling: str = "attention"
    pooling_heads: int | None = None
    pooling_mlp_ratio: float = 4.0
    normalize_features: bool = True
    head_hidden_size: int = 0
    head_dropout: float = 0.0
    trainable_blocks: int = 0
    loss_weighting: str = "sum"
    task_weights: dict[str, float] | None = None
    label_smoothing: float = 0.0
    age_years: list[float] | None = None
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    adapter: dict | None = None
    logit_scale: float | None = None
    zero_shot_source: str | None = None
    calibration: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Dataclass configs cannot have mutable defaults: fill them here.
        tasks = DEFAULT_TASKS if self.tasks is None else self.tasks
        # config.json stores keys sorted; a fixed order keeps outputs and reports stable across a save.
        self.tasks = {str(task): list(tasks[task]) for task in sorted(tasks, key=_task_rank)}
        if self.age_years is None and "age" in self.tasks and len(self.tasks["age"]) == len(DEFAULT_AGE_YEARS):
            self.age_years = list(DEFAULT_AGE_YEARS)
        if self.image_mean is None:
            self.image_mean = list(OPENAI_CLIP_MEAN)
        if self.image_std is None:
            self.image_std = list(OPENAI_CLIP_STD)
        # custom_pipelines points transformers at the pipeline's code in a checkpoint: what remote-code users need.
        # With softbio_hf imported, its registered pipeline serves the task; left on the instance, the entry would
        # make transformers demand trust_remote_code for that same code. to_dict() always writes it.
        if pipeline_registered_here():
            self.__dict__.pop("custom_pipelines", None)
        elif not getattr(self, "custom_pipelines", None):
            self.custom_pipelines = {PIPELINE_TASK: dict(PIPELINE_SPEC)}
        self._validate()

    def to_dict(self) -> dict:
        output = super().to_dict()
        # Every checkpoint is pipeline-ready: pipeline(model=dir_or_repo, trust_remote_code=True).
        output["custom_pipelines"] = {**(output.get("custom_pipelines") or {}), PIPELINE_TASK: dict(PIPELINE_SPEC)}
        return output

    def _validate(self) -> None:
        vision = self.vision_config
        for key in ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            value = getattr(vision, key, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            if not all(isinstance(v, int) and v > 0 for v in values):
                raise ValueError(f"SoftBioConfig.vision_config.{key}={value!r} must be a positive whole number.")
        if self.projection_dim is not None and (not isinstance(self.projection_dim, int) or self.projection_dim < 0):
            raise ValueError(
                f"SoftBioConfig.projection_dim={self.projection_dim!r}: give a positive width, or 0/None for none."
            )
        if not self.tasks:
            raise ValueError(
                "SoftBioConfig.tasks is empty: give at least one task, e.g. {'gender': ['male', 'female']}."
            )
        for task, labels in self.tasks.items():
            if len(labels) < 2:
                raise ValueError(f"SoftBioConfig.tasks[{task!r}] has {len(labels)} label(s); a task needs at least 2.")
            if len(set(labels)) != len(labels):
                raise ValueError(f"SoftBioConfig.tasks[{task!r}] repeats a label: {labels}.")
            if not all(isinstance(label, str) and label for label in labels):
                raise ValueError(f"SoftBioConfig.tasks[{task!r}]: labels must be non-empty strings, got {labels}.")
        if self.pooling not in POOLING_CHOICES:
            raise ValueError(f"SoftBioConfig.pooling={self.pooling!r}; choose one of {POOLING_CHOICES}.")
        if self.loss_weighting not in LOSS_WEIGHTING_CHOICES:
            raise ValueError(
                f"SoftBioConfig.loss_weighting={self.loss_weighting!r}; choose one of {LOSS_WEIGHTING_CHOICES}."
            )
        unknown = sorted(set(self.task_weights or {}) - set(self.tasks))
        if unknown:
            raise ValueError(f"SoftBioConfig.task_weights names unknown task(s) {unknown}; tasks: {list(self.tasks)}.")
        if any(not weight >= 0 for weight in (self.task_weights or {}).values()):
            raise ValueError(f"SoftBioConfig.task_weights={self.task_weights}: weights must be >= 0.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"SoftBioConfig.label_smoothing={self.label_smoothing} must be in [0, 1).")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"SoftBioConfig.head_dropout={self.head_dropout} must be in [0, 1).")
        num_layers = self.vision_config.num_hidden_layers
        if not (self.trainable_blocks == -1 or 0 <= self.trainable_blocks <= num_layers):
            raise ValueError(
                f"SoftBioConfig.trainable_blocks={self.trainable_blocks}: use 0 (frozen backbone), 1..{num_layers} "
                "(the last k blocks) or -1 (the whole backbone)."
            )
        self._validate_adapter()
        if self.calibration is not None and not isinstance(self.calibration, dict):
            raise ValueError(f"config.json: calibration is {self.calibration!r}, not a mapping; remove it.")
        check_conformal((self.calibration or {}).get("conformal"), self.tasks, "config.json")
        if self.age_years is not None and "age" in self.tasks and len(self.age_years) != len(self.tasks["age"]):
            raise ValueError(
                f"SoftBioConfig.age_years has {len(self.age_years)} values but the age task has "
                f"{len(self.tasks['age'])} labels; give one representative age per bin."
            )

    def _validate_adapter(self) -> None:
        """A checkpoint's adapter entry must say enough to rebuild its layers."""
        adapter = self.adapter
        if not adapter:
            return
        if not isinstance(adapter, dict) or "method" not in adapter:
            raise ValueError(
                f"SoftBioConfig.adapter={adapter!r} must be a dict with a 'method' (as apply_method writes)."
            )
        needed = {"lora": LORA_KEYS, "dora": LORA_KEYS, "loraplus": LORA_KEYS, "mtlora": LORA_KEYS}.get(
            adapter["method"], ()
        )
        missing = [key for key in needed if key not in adapter]
        if missing:
            raise ValueError(
                f"SoftBioConfig.adapter for {adapter['method']!r} lacks {missing}; this checkpoint's config.json is "
                "incomplete: save the model again with save_pretrained."
            )

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def id2label_of(self, task: str) -> dict[int, str]:
        return dict(enumerate(self.tasks[task]))

    def label2id_of(self, task: str) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.tasks[task])}

    @property
    def image_size(self) -> int:
        size = self.vision_config.image_size
        return size if isinstance(size, int) else int(size[0])

    @property
    def num_backbone_layers(self) -> int:
        return self.vision_config.num_hidden_layers


__all__ = ["AGE_LABELS", "DEFAULT_TASKS", "EMOTION_LABELS", "GENDER_LABELS", "SoftBioConfig"]
