"""SoftBioModel: one vision-backbone pass, attention pooling, and a head per soft-biometric task."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, is_torchvision_available

from .configuration_softbio import SoftBioConfig

IGNORE_INDEX = -100
# Hub arguments of from_pretrained that also apply when reading the checkpoint's own config.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
# Parameter-name prefixes -> part, for the parameter report (first match wins).
_PARTS = (
    ("backbone.embeddings", "backbone.embeddings"),
    ("backbone.pre_layrnorm", "backbone.embeddings"),
    ("backbone.encoder", "backbone.blocks"),
    ("backbone.post_layernorm", "backbone.final_norm"),
    ("visual_projection", "projection"),
    ("pooling", "pooling"),
    ("heads", "heads"),
    ("loss_weights", "loss_weights"),
)
SUPPORTED_BACKBONES = ("clip_vision_model",)
PIPELINE_FILES = ("pipeline_softbio.py", "faces.py")


@dataclass
class SoftBioOutput(ModelOutput):
    """
    loss: the total multi-task loss, when any labels were given.
    logits: task -> [batch, num_labels] scores.
    task_losses: task -> mean cross-entropy over that task's labelled rows (tasks with no label are absent).
    features: task -> [batch, dim] features fed to that task's head.
    """

    loss: torch.Tensor | None = None
    logits: dict[str, torch.Tensor] | None = None
    task_losses: dict[str, torch.Tensor] | None = None
    features: dict[str, torch.Tensor] | None = None


class SoftBioAttentionPooling(nn.Module):
    """SigLIP-style pooling with one learned query per task; the tasks share keys, values and MLP."""

    def __init__(self, config: SoftBioConfig):
        super().__init__()
        hidden = config.vision_config.hidden_size
        heads = config.pooling_heads or config.vision_config.num_attention_heads
        if hidden % heads:
            raise ValueError(f"SoftBioConfig.pooling_heads={heads} must divide the backbone width {hidden}.")
        self.probes = nn.ParameterDict({task: nn.Parameter(torch.zeros(1, 1, hidden)) for task in config.tasks})
        self.attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.layernorm = nn.LayerNorm(hidden, eps=config.vision_config.layer_norm_eps)
        mlp_width = int(hidden * config.pooling_mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_width), nn.GELU(), nn.Linear(mlp_width, hidden))

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        tasks = list(self.probes)
        queries = torch.cat([self.probes[t] for t in tasks], dim=1).expand(tokens.shape[0], -1, -1)
        pooled, _ = self.attention(queries.to(tokens.dtype), tokens, tokens, need_weights=False)
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return {task: pooled[:, i] for i, task in enumerate(tasks)}


class SoftBioHead(nn.Module):
    """Linear head (what zero-shot weights fill), or a one-hidden-layer MLP when head_hidden_size > 0."""

    def __init__(self, in_features: int, num_labels: int, hidden_size: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        if hidden_size > 0:
            self.hidden = nn.Sequential(nn.Linear(in_features, hidden_size), nn.GELU(), nn.Dropout(dropout))
            in_features = hidden_size
        else:
            self.hidden = nn.Identity()
        self.classifier = nn.Linear(in_features, num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden(self.dropout(features)))


class SoftBioLossWeights(nn.Module):
    """Learned log-variances s_t for uncertainty weighting; kept in fp32 (see _keep_in_fp32_modules)."""

    def __init__(self, tasks):
        super().__init__()
        self.log_vars = nn.ParameterDict({task: nn.Parameter(torch.zeros(())) for task in tasks})

    def forward(self, task_losses: dict[str, torch.Tensor]) -> torch.Tensor:
        # Only tasks present in the batch: an absent task's 0.5*s_t term would drive s_t to -inf.
        terms = [torch.exp(-self.log_vars[t]) * loss + 0.5 * self.log_vars[t] for t, loss in task_losses.items()]
        return torch.stack(terms).sum()


def image_processor_for(config: SoftBioConfig):
    """The backbone's image processor, rebuilt from the config (its single source of truth)."""
    if is_torchvision_available():
        from transformers import CLIPImageProcessor as processor_class
    else:  # transformers 5 needs torchvision for CLIPImageProcessor; the PIL backend gives the same pixels.
        from transformers import CLIPImageProcessorPil as processor_class
    size = config.image_size
    return processor_class(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
        do_convert_rgb=True,
    )


class SoftBioPreTrainedModel(PreTrainedModel):
    config: SoftBioConfig
    config_class = SoftBioConfig
    base_model_prefix = "softbio"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["CLIPEncoderLayer"]
    _keep_in_fp32_modules_strict = ["loss_weights"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SoftBioAttentionPooling):
            for probe in module.probes.values():
                init.normal_(probe, mean=0.0, std=module.layernorm.normalized_shape[0] ** -0.5)
        elif isinstance(module, SoftBioLossWeights):
            for log_var in module.log_vars.values():
                init.zeros_(log_var)


class SoftBioModel(SoftBioPreTrainedModel):
    """
    Age group, gender and emotion (or any configured tasks) from one backbone pass.

    `forward(pixel_values, age=None, gender=None, emotion=None)` returns a [`SoftBioOutput`]; label
    value -100 means "no label for this row" and is masked per task.
    """

    def __init__(self, config: SoftBioConfig):
        super().__init__(config)
        if config.vision_config.model_type not in SUPPORTED_BACKBONES:
            raise ValueError(
                f"vision_config.model_type={config.vision_config.model_type!r} is not supported yet; "
                f"supported: {SUPPORTED_BACKBONES}."
            )
        self.backbone = AutoModel.from_config(config.vision_config)
        hidden = config.vision_config.hidden_size
        feature_dim = config.projection_dim or hidden
        self.visual_projection = nn.Linear(hidden, feature_dim, bias=False) if config.projection_dim else nn.Identity()
        self.pooling = SoftBioAttentionPooling(config) if config.pooling == "attention" else None
        self.heads = nn.ModuleDict(
            {
                task: SoftBioHead(feature_dim, len(labels), config.head_hidden_size, config.head_dropout)
                for task, labels in config.tasks.items()
            }
        )
        self.loss_weights = SoftBioLossWeights(config.tasks) if config.loss_weighting == "uncertainty" else None
        self.post_init()

    # ----------------------------------------------------------------------------------------- inputs
    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.embeddings.patch_embedding

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        size, channels = self.config.image_size, self.config.vision_config.num_channels
        expected = f"[batch, {channels}, {size}, {size}]"
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(
                f"pixel_values must be a torch.Tensor of shape {expected}, got {type(pixel_values).__name__}."
            )
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (channels, size, size):
            raise ValueError(
                f"pixel_values has shape {list(pixel_values.shape)}; expected {expected}. "
                "Preprocess images with the model's image processor (AutoImageProcessor.from_pretrained)."
            )

    def _collect_labels(
        self, labels: dict[str, torch.Tensor] | None, task_labels: dict[str, torch.Tensor | None]
    ) -> dict[str, torch.Tensor]:
        merged = {**(labels or {}), **{k: v for k, v in task_labels.items() if v is not None}}
        unknown = sorted(set(merged) - set(self.config.tasks))
        if unknown:
            raise ValueError(
                f"Unknown task(s) {unknown} in the labels; this model's tasks are {self.config.task_names}."
            )
        checked = {}
        for task, value in merged.items():
            value = torch.as_tensor(value, device=self.device).long()
            num_labels = len(self.config.tasks[task])
            bad = (value != IGNORE_INDEX) & ((value < 0) | (value >= num_labels))
            if bad.any():  # checked here so a bad label never becomes a device-side assert
                raise ValueError(
                    f"Label {int(value[bad][0])} for task {task!r} is out of range: use 0..{num_labels - 1} "
                    f"({self.config.tasks[task]}) or {IGNORE_INDEX} for 'no label'."
                )
            checked[task] = value
        return checked

    # ---------------------------------------------------------------------------------------- forward
    def backbone_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """All output tokens, normalised: CLIP applies post_layernorm to the CLS token only."""
        hidden = self.backbone(pixel_values=pixel_values).last_hidden_state
        return self.backbone.post_layernorm(hidden)

    def pool(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.pooling is None:
            cls_token = tokens[:, 0]
            return dict.fromkeys(self.config.tasks, cls_token)
        return self.pooling(tokens)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        features = self.visual_projection(pooled)
        return F.normalize(features, dim=-1) if self.config.normalize_features else features

    def forward(
        self,
        pixel_values: torch.Tensor,
        age: torch.Tensor | None = None,
        gender: torch.Tensor | None = None,
        emotion: torch.Tensor | None = None,
        labels: dict[str, torch.Tensor] | None = None,
        return_dict: bool | None = None,
        **task_labels: torch.Tensor,
    ) -> SoftBioOutput | tuple:
        self._check_pixel_values(pixel_values)
        targets = self._collect_labels(labels, {"age": age, "gender": gender, "emotion": emotion, **task_labels})
        pixel_values = pixel_values.to(self.backbone.dtype)
        pooled = self.pool(self.backbone_tokens(pixel_values))

        features: dict[str, torch.Tensor] = {}
        projected_by_input: dict[int, torch.Tensor] = {}  # "cls" pooling shares one tensor: project it once
        for task, vector in pooled.items():
            if id(vector) not in projected_by_input:
                projected_by_input[id(vector)] = self.project(vector)
            features[task] = projected_by_input[id(vector)]
        logits = {task: self.heads[task](features[task]) for task in self.config.tasks}

        task_losses = self._task_losses(logits, targets)
        loss = self._total_loss(task_losses) if task_losses else None
        output = SoftBioOutput(loss=loss, logits=logits, task_losses=task_losses or None, features=features)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    @staticmethod
    def _task_losses(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        losses = {}
        for task, target in targets.items():
            labelled = target != IGNORE_INDEX
            if labelled.any():  # a task with no label in the batch adds nothing, not a zero with a gradient
                losses[task] = F.cross_entropy(logits[task][labelled].float(), target[labelled])
        return losses

    def _total_loss(self, task_losses: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.loss_weights is not None:
            return self.loss_weights(task_losses)
        return torch.stack(list(task_losses.values())).sum()

    # --------------------------------------------------------------------------------------- training
    def apply_trainable_blocks(self, trainable_blocks: int | None = None) -> None:
        """
        Freeze the model for one of the study's rows, recording the choice in the config:
        0 = linear probe (pooling + heads), k = the last k blocks too (FT4 is 4), -1 = everything.
        The final norm and projection train whenever any backbone block does.
        """
        if trainable_blocks is not None:
            self.config.trainable_blocks = trainable_blocks
            self.config._validate()
        k = self.config.trainable_blocks
        layers = self.backbone.encoder.layers
        first_trainable = 0 if k == -1 else len(layers) - k
        self.requires_grad_(False)
        for module in (self.pooling, self.heads, self.loss_weights):
            if module is not None:
                module.requires_grad_(True)
        if k == -1:
            self.requires_grad_(True)
        elif k > 0:
            for layer in layers[first_trainable:]:
                layer.requires_grad_(True)
            self.backbone.post_layernorm.requires_grad_(True)
            self.visual_projection.requires_grad_(True)

    def parameter_report(self) -> list[dict[str, int | str]]:
        """Trainable and total parameters per part of the model, plus a total row."""
        rows: dict[str, dict[str, int | str]] = {}
        for name, param in self.named_parameters():
            part = parameter_part(name)
            row = rows.setdefault(part, {"part": part, "trainable": 0, "total": 0})
            row["total"] += param.numel()
            row["trainable"] += param.numel() if param.requires_grad else 0
        total = {
            "part": "total",
            "trainable": sum(r["trainable"] for r in rows.values()),
            "total": sum(r["total"] for r in rows.values()),
        }
        return [*rows.values(), total]

    # ---------------------------------------------------------------------------------- build and I/O
    @classmethod
    def from_clip(
        cls,
        clip_id_or_path: str | os.PathLike,
        prompts: dict[str, dict[str, list[str]]] | None = None,
        **config_overrides,
    ) -> SoftBioModel:
        """
        Build a zero-shot model from a CLIP checkpoint (Hub id or local folder): CLIP's vision tower and
        visual projection, and per task a linear head whose rows are the logit scale times the averaged,
        normalised text embeddings of that label's prompts. No text tower is kept.
        `prompts` maps task -> label -> prompt strings; defaults to `zero_shot.DEFAULT_PROMPTS`.
        """
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        from .zero_shot import DEFAULT_PROMPTS, class_embeddings, validate_prompts

        prompts = prompts or DEFAULT_PROMPTS
        validate_prompts(prompts)
        clip = CLIPModel.from_pretrained(clip_id_or_path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(clip_id_or_path)
        try:
            processor = AutoImageProcessor.from_pretrained(clip_id_or_path)
            normalisation = {"image_mean": list(processor.image_mean), "image_std": list(processor.image_std)}
        except OSError:  # no preprocessor_config.json: keep OpenAI CLIP's normalisation
            normalisation = {}
        logit_scale = clip.logit_scale.detach().exp().item()
        config = SoftBioConfig(
            vision_config=clip.config.vision_config.to_dict(),
            projection_dim=clip.config.projection_dim,
            tasks={task: list(labels) for task, labels in prompts.items()},
            pooling=config_overrides.pop("pooling", "cls"),
            logit_scale=logit_scale,
            zero_shot_source=str(clip_id_or_path),
            **normalisation,
            **config_overrides,
        )
        model = cls(config)
        model.backbone.load_state_dict(clip.vision_model.state_dict())
        model.visual_projection.load_state_dict(clip.visual_projection.state_dict())
        for task, embeddings in class_embeddings(clip, tokenizer, prompts).items():
            model.set_head_weights(task, embeddings * logit_scale)
        model.eval()
        return model

    @torch.no_grad()
    def set_head_weights(self, task: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Set a linear head's rows (e.g. zero-shot class embeddings); the bias defaults to zero."""
        classifier = self.heads[task].classifier
        if weight.shape != classifier.weight.shape:
            raise ValueError(
                f"Head {task!r} expects weights of shape {list(classifier.weight.shape)}, got {list(weight.shape)}."
            )
        classifier.weight.copy_(weight)
        classifier.bias.copy_(bias if bias is not None else torch.zeros_like(classifier.bias))

    def save_pretrained(self, save_directory: str | os.PathLike, *args, is_main_process: bool = True, **kwargs):
        """Save weights (safetensors), config, remote code, and the image processor beside them."""
        kwargs.pop("safe_serialization", None)  # safetensors only: never a pickle
        result = super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            image_processor_for(self.config).save_pretrained(save_directory)
            copy_pipeline_code(save_directory)
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """As PreTrainedModel.from_pretrained; refuses a checkpoint whose labels differ from the requested ones."""
        requested = kwargs.get("tasks")
        config = kwargs.get("config")
        if requested is None and isinstance(config, SoftBioConfig):
            requested = config.tasks
        if requested is not None and not isinstance(config, (str, os.PathLike)):
            hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            saved, _ = SoftBioConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
            check_same_tasks(saved.get("tasks"), requested, pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)


def copy_pipeline_code(save_directory: str | os.PathLike) -> None:
    """
    Put the pipeline's files beside the checkpoint (config.custom_pipelines points at them). Copied, not
    imported, so loading the model alone as remote code never needs OpenCV or Pillow.
    """
    here = Path(__file__).parent
    for name in PIPELINE_FILES:
        if (here / name).is_file():  # absent when this file itself runs as partial remote code
            shutil.copy(here / name, Path(save_directory) / name)


def parameter_part(name: str) -> str:
    if "lora_" in name or "mtlora" in name:
        return "adapters"
    for prefix, part in _PARTS:
        if name.startswith(prefix):
            return part
    return "other"


def check_same_tasks(saved: dict | None, requested: dict, source) -> None:
    """A checkpoint's heads are only meaningful under its own label names and order."""
    saved = {task: list(labels) for task, labels in (saved or {}).items()}
    requested = {task: list(labels) for task, labels in requested.items()}
    if saved == requested:
        return
    problems = []
    for task in sorted(set(saved) | set(requested)):
        if task not in saved:
            problems.append(f"task {task!r} is not in the checkpoint")
        elif task not in requested:
            problems.append(f"the checkpoint also has task {task!r}")
        elif saved[task] != requested[task]:
            problems.append(f"{task!r} labels are {saved[task]} in the checkpoint but {requested[task]} were requested")
    raise ValueError(
        f"The checkpoint {str(source)!r} does not match the requested tasks: {'; '.join(problems)}. "
        "Load it without `tasks=` to use its own labels, or train a new head for the labels you need."
    )


__all__ = ["SoftBioModel", "SoftBioOutput", "SoftBioPreTrainedModel", "image_processor_for"]
