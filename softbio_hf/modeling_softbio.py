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
from transformers.utils import ModelOutput, TransformersKwargs, is_torchvision_available, logging

from . import methods
from .checkpoint_files import check_local_config, check_same_tasks, refuse_pickled_weights, weights_named
from .configuration_softbio import SoftBioConfig
from .hub_access import cache_only
from .methods import ADAPTER_MARKERS
from .mtlora import MTLoRALinear, TaskParameters, task_stream_tokens
from .runtimes import age_bin_bounds

logger = logging.get_logger(__name__)
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
# Keywords transformers passes through a model's forward to its attention layers (besides the output flags).
_BACKBONE_KEYWORDS = frozenset(TransformersKwargs.__annotations__) - {"output_attentions", "output_hidden_states"}
PIPELINE_FILES = (
    "pipeline_softbio.py",
    "faces.py",
    "runtimes.py",
    "video.py",
    "face_stream.py",  # video: its Batcher
    "images.py",
    "runtime_light.py",
    "conformal.py",
    "export_folder.py",  # an export folder without weights, served by the pipeline
)


@dataclass
class SoftBioOutput(ModelOutput):
    """
    loss: the total multi-task loss, when any labels were given.
    logits: task -> [batch, num_labels] scores.
    task_losses: task -> mean cross-entropy over that task's labelled rows (tasks with no label are absent).
    features: task -> [batch, dim] features fed to that task's head.
    hidden_states: the backbone's hidden states (embeddings, then each block), with `output_hidden_states=True`.
    attentions: the backbone's attention weights per block, with `output_attentions=True`.
    """

    loss: torch.Tensor | None = None
    logits: dict[str, torch.Tensor] | None = None
    task_losses: dict[str, torch.Tensor] | None = None
    features: dict[str, torch.Tensor] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class SoftBioAttentionPooling(nn.Module):
    """SigLIP-style pooling with one learned query per task; the tasks share keys, values and MLP."""

    def __init__(self, config: SoftBioConfig):
        super().__init__()
        hidden = config.vision_config.hidden_size
        heads = config.pooling_heads or config.vision_config.num_attention_heads
        if hidden % heads:
            raise ValueError(f"SoftBioConfig.pooling_heads={heads} must divide the backbone width {hidden}.")
        self.probes = TaskParameters({task: (1, 1, hidden) for task in config.tasks}, "normal", std=hidden**-0.5)
        self.attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.layernorm = nn.LayerNorm(hidden, eps=config.vision_config.layer_norm_eps)
        mlp_width = int(hidden * config.pooling_mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_width), nn.GELU(), nn.Linear(mlp_width, hidden))

    def forward(self, tokens: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Shared tokens: all queries in one call. Per-task tokens (MTLoRA streams): each task its own."""
        if isinstance(tokens, dict):
            return {task: self._attend([task], task_tokens)[task] for task, task_tokens in tokens.items()}
        return self._attend(list(self.probes), tokens)

    def _attend(self, tasks: list[str], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        queries = torch.cat([self.probes[t] for t in tasks], dim=1).expand(tokens.shape[0], -1, -1)
        pooled, _ = self.attention(queries.to(tokens.dtype), tokens, tokens, need_weights=False)
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return {task: pooled[:, i] for i, task in enumerate(tasks)}


class SoftBioHead(nn.Module):
    """Linear head (what zero-shot weights fill), or a one-hidden-layer MLP when hidden_size > 0."""

    def __init__(self, in_features: int, num_labels: int, hidden_size: int, dropout: float, unit_inputs: bool):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        if hidden_size > 0:
            first = nn.Linear(in_features, hidden_size)
            # LeCun-normal, so hidden units and logits start at unit scale: with L2-normalised features (norm 1,
            # not unit variance per component) that is std 1, else 1/sqrt(fan_in). transformers' default 0.02
            # would start the logits near 1e-4 and slow the first thousand steps.
            first.init_std = 1.0 if unit_inputs else in_features**-0.5
            self.hidden = nn.Sequential(first, nn.GELU(), nn.Dropout(dropout))
            self.classifier = nn.Linear(hidden_size, num_labels)
            self.classifier.init_std = hidden_size**-0.5
        else:
            self.hidden = nn.Identity()
            self.classifier = nn.Linear(in_features, num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden(self.dropout(features)))


class SoftBioLossWeights(nn.Module):
    """Learned log-variances s_t for uncertainty weighting; kept in fp32 (see _keep_in_fp32_modules)."""

    def __init__(self, tasks):
        super().__init__()
        self.log_vars = TaskParameters({task: () for task in tasks}, "zeros", dtype=torch.float32)

    def forward(self, task_losses: dict[str, torch.Tensor]) -> torch.Tensor:
        # Only tasks present in the batch: an absent task's 0.5*s_t term would drive s_t to -inf.
        terms = [torch.exp(-self.log_vars[t]) * loss + 0.5 * self.log_vars[t] for t, loss in task_losses.items()]
        return torch.stack(terms).sum()


def init_adapter_parameters(module: nn.Module) -> None:
    """Task parameters and MTLoRA's shared pair, by their own rules; tensors loaded from a checkpoint are kept."""
    if isinstance(module, TaskParameters):
        module.reset_parameters()
    elif isinstance(module, MTLoRALinear):
        module.reset_shared()


def expected_age_years(age_probs: torch.Tensor, age_years, labels=None) -> torch.Tensor:
    """
    Age in years: the expectation of the bins' representative ages under the predicted probabilities, kept
    within the range of the predicted age group (given its labels), so the two never contradict each other:
    a face read as "70+" with some weight on young bins is "about 70", not "about 38".
    """
    years = age_probs @ torch.as_tensor(age_years, dtype=age_probs.dtype, device=age_probs.device)
    bounds = age_bin_bounds(tuple(labels)) if labels is not None else None  # parsed once per label set
    if bounds is None:
        return years
    predicted = age_probs.argmax(dim=-1)
    lows, highs = (torch.as_tensor(b, dtype=years.dtype, device=years.device)[predicted] for b in bounds)
    return torch.minimum(torch.maximum(years, lows), highs)


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
        init_adapter_parameters(module)
        if isinstance(module, nn.Linear) and hasattr(module, "init_std"):  # an MLP head's layers (SoftBioHead)
            nn.init.normal_(module.weight, std=module.init_std)
            nn.init.zeros_(module.bias)

    @torch.no_grad()
    def initialize_weights(self):
        """
        As transformers does it, then the parameters CLIP's own `_init_weights` does not know: transformers hands
        the backbone's modules (a model of its own) to CLIP's rule, which leaves MTLoRA's pairs untouched.
        """
        backbone = getattr(self, "backbone", None)
        if backbone is not None:
            # CLIP's rule as CLIP runs it, first: under ours (custom code) transformers skips a module without
            # parameters of its own, and CLIP sets q/k/v/out and fc1/fc2 from their parent attention and MLP
            # modules, so a model built on the meta device kept the generic Linear init there.
            backbone.initialize_weights()
        super().initialize_weights()
        if backbone is not None:
            for module in backbone.modules():
                init_adapter_parameters(module)


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
        # The backbone computes no loss (ours is compute_loss): without this, reading its loss_function (a trace reads
        # every attribute) falls back to a causal language model's loss and warns of it.
        self.backbone.loss_function = None
        if config.adapter:  # a checkpoint rebuilds the layers its method added
            methods.install_adapter_layers(self, config.adapter)
        hidden = config.vision_config.hidden_size
        feature_dim = config.projection_dim or hidden
        self.visual_projection = nn.Linear(hidden, feature_dim, bias=False) if config.projection_dim else nn.Identity()
        self.pooling = SoftBioAttentionPooling(config) if config.pooling == "attention" else None
        self.heads = nn.ModuleDict({task: self._new_head(task) for task in config.tasks})
        self.loss_weights = SoftBioLossWeights(config.tasks) if config.loss_weighting == "uncertainty" else None
        self.post_init()

    @property
    def loss_function(self):
        """The multi-task loss (compute_loss). transformers' default, picked by the class's name, would be a causal
        language model's (ForCausalLMLoss), wrong for a classifier, and warns of it wherever the property is read
        (a trace reads every attribute)."""
        return self.compute_loss

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
        if torch.jit.is_tracing():  # the export traces an example it made at this shape: a check would only warn
            return
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (channels, size, size) or not len(pixel_values):
            raise ValueError(
                f"pixel_values has shape {list(pixel_values.shape)}; expected {expected}. "
                "Preprocess images with the model's image processor (AutoImageProcessor.from_pretrained)."
            )

    def _collect_labels(
        self, labels: dict[str, torch.Tensor] | None, task_labels: dict[str, torch.Tensor | None], batch: int
    ) -> dict[str, torch.Tensor]:
        merged = {**(labels or {}), **{k: v for k, v in task_labels.items() if v is not None}}
        unknown = sorted(set(merged) - set(self.config.tasks))
        if unknown:
            raise ValueError(
                f"Unknown task(s) {unknown} in the labels; this model's tasks are {self.config.task_names}."
            )
        checked = {}
        for task, value in merged.items():
            value = torch.as_tensor(value, device=self.device)
            if value.is_floating_point() and not torch.equal(value, value.round()):
                raise ValueError(
                    f"Labels for task {task!r} must be class ids (whole numbers), got {value.tolist()[:5]}; "
                    "probabilities or soft labels are not supported."
                )
            value = value.long().reshape(-1) if value.ndim else value.long().reshape(1)
            if len(value) != batch:
                raise ValueError(
                    f"Labels for task {task!r} have {len(value)} entries for a batch of {batch} images; give one "
                    f"class id per image ({IGNORE_INDEX} for 'no label')."
                )
            num_labels = len(self.config.tasks[task])
            bad = (value != IGNORE_INDEX) & ((value < 0) | (value >= num_labels))
            if bad.any():  # checked here so a bad label never becomes a device-side assert
                raise ValueError(
                    f"Label {int(value[bad][0])} for task {task!r} is out of range: use 0..{num_labels - 1} "
                    f"({self.config.tasks[task]}) or {IGNORE_INDEX} for 'no label'."
                )
            checked[task] = value
        return checked

    def _split_keywords(self, kwargs: dict) -> tuple[dict, dict]:
        """forward's extra keywords: labels of configured tasks, and transformers' pass-through arguments."""
        task_labels = {k: v for k, v in kwargs.items() if k in self.config.tasks}
        passed = {k: v for k, v in kwargs.items() if k in _BACKBONE_KEYWORDS}
        unknown = sorted(set(kwargs) - set(task_labels) - set(passed))
        if unknown:
            raise TypeError(
                f"SoftBioModel.forward() got unexpected keyword argument(s) {unknown}. Labels are passed as "
                + ", ".join(f"{task}=" for task in self.config.tasks)
                + " or labels={task: tensor}; the other arguments are pixel_values, output_attentions, "
                "output_hidden_states and return_dict."
            )
        return task_labels, passed

    # ---------------------------------------------------------------------------------------- forward
    def backbone_tokens(self, pixel_values: torch.Tensor, **backbone_kwargs) -> tuple[torch.Tensor, ModelOutput]:
        """All output tokens, normalised (CLIP applies post_layernorm to the CLS token only), and CLIP's output."""
        output = self.backbone(pixel_values=pixel_values, **backbone_kwargs)
        return self.backbone.post_layernorm(output.last_hidden_state), output

    def encode(
        self, pixel_values: torch.Tensor, **backbone_kwargs
    ) -> tuple[torch.Tensor | dict[str, torch.Tensor], ModelOutput | None]:
        """Backbone tokens: one tensor shared by all tasks, or per task (MTLoRA's task streams)."""
        if self.uses_task_streams:
            if backbone_kwargs.get("output_attentions") or backbone_kwargs.get("output_hidden_states"):
                raise ValueError(
                    "An MTLoRA model runs its own task streams through the encoder: output_attentions and "
                    "output_hidden_states are not available for it."
                )
            return task_stream_tokens(self.backbone, pixel_values, self.config.task_names), None
        return self.backbone_tokens(pixel_values, **backbone_kwargs)

    @property
    def uses_task_streams(self) -> bool:
        return (self.config.adapter or {}).get("method") == "mtlora"

    def pool(self, tokens: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.pooling is not None:
            return self.pooling(tokens)
        if isinstance(tokens, dict):  # position 0 of each task's streams is its final CLS token
            return {task: task_tokens[:, 0] for task, task_tokens in tokens.items()}
        return dict.fromkeys(self.config.tasks, tokens[:, 0])

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
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SoftBioOutput | tuple:
        r"""
        age, gender, emotion (`torch.LongTensor` of shape `(batch,)`, *optional*): class ids, -100 for "no label";
            a model with other tasks takes each as a keyword of its name, or all of them as `labels={task: ids}`.
        output_attentions / output_hidden_states: return the backbone's attentions / hidden states.
        kwargs: labels of other configured tasks, and transformers' attention arguments for the backbone.
        """
        task_labels, backbone_kwargs = self._split_keywords(kwargs)
        self._check_pixel_values(pixel_values)
        targets = self._collect_labels(
            labels, {"age": age, "gender": gender, "emotion": emotion, **task_labels}, pixel_values.shape[0]
        )
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        tokens, backbone_output = self.encode(
            pixel_values.to(self.backbone.dtype),
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **backbone_kwargs,
        )
        pooled = self.pool(tokens)

        features: dict[str, torch.Tensor] = {}
        projected_by_input: dict[int, torch.Tensor] = {}  # "cls" pooling shares one tensor: project it once
        for task, vector in pooled.items():
            if id(vector) not in projected_by_input:
                projected_by_input[id(vector)] = self.project(vector)
            features[task] = projected_by_input[id(vector)]
        logits = {task: self.heads[task](features[task]) for task in self.config.tasks}

        loss, task_losses = self.compute_loss(logits, targets) if targets else (None, {})
        output = SoftBioOutput(
            loss=loss,
            logits=logits,
            task_losses=task_losses or None,
            features=features,
            hidden_states=getattr(backbone_output, "hidden_states", None),
            attentions=getattr(backbone_output, "attentions", None),
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    def compute_loss(
        self,
        logits: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        label_counts: dict[str, int] | None = None,
        scale: float = 1.0,
        complete_graph: bool = False,
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """
        The multi-task loss: per task the cross-entropy summed over its labelled rows (label -100 is masked) and
        divided by `label_counts[task]` (default: this batch's count, i.e. the mean), times `scale`; then the sum
        (times `config.task_weights`) or the uncertainty weighting over the tasks that have labels.

        Data-parallel training passes the counts summed over processes and `scale` = number of processes, so
        the averaged gradients equal one process's on the whole batch. `complete_graph` adds a zero-weighted
        term for tasks without labels, so every head and log-variance takes part in every backward pass (as
        DistributedDataParallel requires) without changing any value.
        """
        task_losses = {}
        for task, target in targets.items():
            count = int((target != IGNORE_INDEX).sum()) if label_counts is None else label_counts[task]
            if count:  # a task with no label anywhere adds nothing (an absent task's log-variance would run off)
                summed = F.cross_entropy(
                    logits[task].float(),
                    target,
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                    label_smoothing=self.config.label_smoothing,
                )
                task_losses[task] = summed * (scale / count)
        total = None
        if task_losses:
            if self.loss_weights is not None:
                total = self.loss_weights(task_losses)
            else:
                weights = self.config.task_weights or {}
                total = torch.stack([weights.get(t, 1.0) * loss for t, loss in task_losses.items()]).sum()
        if complete_graph:
            idle = [logits[t].float().sum() for t in self.config.tasks if t not in task_losses]
            if self.loss_weights is not None:
                idle += [self.loss_weights.log_vars[t] for t in self.config.tasks if t not in task_losses]
            if idle:
                zero = torch.stack(idle).sum() * 0.0
                total = zero if total is None else total + zero
        return total, task_losses

    # ------------------------------------------------------------------------------------ structure
    def _new_head(self, task: str) -> SoftBioHead:
        config = self.config
        in_features = config.projection_dim or config.vision_config.hidden_size
        return SoftBioHead(
            in_features,
            len(config.tasks[task]),
            config.head_hidden_size,
            config.head_dropout,
            config.normalize_features,
        )

    def set_pooling(self, pooling: str) -> None:
        """Switch between the class token ("cls") and a fresh attention pooling ("attention")."""
        if pooling == self.config.pooling:
            return
        self.config.pooling = pooling
        self.config._validate()
        if pooling == "attention":
            reference = next(self.heads.parameters())  # the new pooling follows the model's device and dtype
            self.pooling = SoftBioAttentionPooling(self.config).to(device=reference.device, dtype=reference.dtype)
            self._init_weights(self.pooling)
        else:
            self.pooling = None

    def set_head_hidden_size(self, head_hidden_size: int) -> None:
        """Replace every head by a fresh one of this shape (0: linear, > 0: an MLP of that width)."""
        if head_hidden_size == self.config.head_hidden_size:
            return
        self.config.head_hidden_size = head_hidden_size
        reference = next(self.heads.parameters())
        for task in self.config.tasks:
            head = self._new_head(task).to(device=reference.device, dtype=reference.dtype)
            head.apply(self._init_weights)
            self.heads[task] = head

    # ------------------------------------------------------ the study's methods (softbio_hf/methods.py)
    def apply_method(self, method: str, **options) -> SoftBioModel:
        """Prepare the model for a row of the study; see `methods.apply_method` for the options."""
        return methods.apply_method(self, method, **options)

    def apply_trainable_blocks(self, trainable_blocks: int | None = None) -> None:
        """0 = linear probe, k = the last k blocks too (FT4 is 4), -1 = everything; see methods.py."""
        methods.apply_trainable_blocks(self, trainable_blocks)

    def merge_adapters(self) -> SoftBioModel:
        """Fold the adapters into the backbone weights, in place: a plain model that needs no peft."""
        return methods.merge_adapters(self)

    def optimizer_groups(self, lr: float, **options) -> list[dict]:
        """torch.optim parameter groups per kind of trainable parameter; see `methods.optimizer_groups`."""
        return methods.optimizer_groups(self, lr, **options)

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
        local = {"local_files_only": cache_only(clip_id_or_path)}  # one probe, not huggingface_hub's retries
        clip = CLIPModel.from_pretrained(clip_id_or_path, dtype=torch.float32, **local)
        tokenizer = AutoTokenizer.from_pretrained(clip_id_or_path, **local)
        try:
            processor = AutoImageProcessor.from_pretrained(clip_id_or_path, **local)
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
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, allow_new_heads: bool = False, **kwargs):
        """
        As PreTrainedModel.from_pretrained (safetensors only). Refuses a checkpoint whose labels differ from the
        requested ones. As transformers does, weights the checkpoint lacks are initialised, with a warning and in
        `output_loading_info`; a task whose head has no weights at all is listed in `model.untrained_heads`, and
        the pipeline, the demo, the batch command and `hub push` refuse to serve it (see `refuse_untrained_heads`)
        unless loaded with `allow_new_heads=True` (to train it, or to use it knowingly).
        """
        refuse_pickled_weights(pretrained_model_name_or_path)
        check_local_config(pretrained_model_name_or_path)
        kwargs.setdefault("use_safetensors", True)  # never unpickle a checkpoint
        if pretrained_model_name_or_path is not None and "local_files_only" not in kwargs:
            kwargs["local_files_only"] = cache_only(pretrained_model_name_or_path)  # one probe, no retries
        requested = kwargs.get("tasks")
        config = kwargs.get("config")
        if requested is None and isinstance(config, SoftBioConfig):
            requested = config.tasks
        if (
            requested is not None
            and pretrained_model_name_or_path is not None
            and not isinstance(config, (str, os.PathLike))
        ):
            hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            saved, _ = SoftBioConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
            check_same_tasks(saved.get("tasks"), requested, pretrained_model_name_or_path)
        wants_info = kwargs.pop("output_loading_info", False)
        with weights_named(pretrained_model_name_or_path):
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        missing = set(info.get("missing_keys", ()))
        headless = [
            task
            for task, head in model.heads.items()
            if all(f"heads.{task}.{name}" in missing for name, _ in head.named_parameters())
        ]
        if headless:
            logger.warning(
                "The checkpoint %s has no weights for the head of task(s) %s: they are newly initialised (train "
                "them before use).",
                pretrained_model_name_or_path,
                headless,
            )
        model.untrained_heads = [] if allow_new_heads else headless
        return (model, info) if wants_info else model


def refuse_untrained_heads(model: nn.Module) -> None:
    """Where predictions are served or published: a head loaded without weights would give random answers."""
    untrained = getattr(model, "untrained_heads", None)
    if untrained:
        raise ValueError(
            f"The checkpoint {model.name_or_path!r} has no weights for the head of task(s) {untrained}: its config "
            "names a task its weights were never trained for, so those predictions would be random. Remove the "
            "task from config.json or train it; to use it anyway, load it with "
            "SoftBioModel.from_pretrained(..., allow_new_heads=True)."
        )


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
    if any(marker in name for marker in ADAPTER_MARKERS):
        return "adapters"
    for prefix, part in _PARTS:
        if name.startswith(prefix):
            return part
    return "other"


__all__ = [
    "SoftBioModel",
    "SoftBioOutput",
    "SoftBioPreTrainedModel",
    "expected_age_years",
    "image_processor_for",
    "refuse_untrained_heads",
]
