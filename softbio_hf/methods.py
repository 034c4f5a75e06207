"""The study's methods applied to a SoftBioModel: what trains, which adapters it carries, how they ship.

Kept apart from the model, as peft keeps its tuners apart from the models they tune: modeling_softbio.py
builds and runs a model; this module freezes it for a row of the study (zero-shot, linear probe, last-k
blocks, LoRA, DoRA, LoRA+, MTLoRA), installs and merges adapters, and groups parameters for the optimizer.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from torch import nn

from .configuration_softbio import POOLING_CHOICES
from .mtlora import install_task_layers, resolve_task_ranks, task_block_indices, task_layer_names

try:  # only needed to train LoRA/DoRA/MTLoRA or to load an unmerged adapter checkpoint; merged ones need no peft
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
except ImportError:
    LoraConfig = inject_adapter_in_model = LoraLayer = None

if TYPE_CHECKING:  # for type hints only: modeling_softbio imports this module at run time, never the reverse
    from .modeling_softbio import SoftBioModel

# The study's rows (DESIGN.md): zero-shot, linear probe, last-k blocks, and the adapter methods.
METHODS = ("zs", "lp", "ft", "lora", "dora", "loraplus", "mtlora")
ADAPTER_METHODS = ("lora", "dora", "loraplus", "mtlora")
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# Names of trainable low-rank parameters: peft's LoRA/DoRA and MTLoRA's pairs.
ADAPTER_MARKERS = ("lora_", ".shared_A", ".shared_B", ".task_A.", ".task_B.")
B_MARKERS = ("lora_B", ".shared_B", ".task_B.")


def apply_method(
    model: SoftBioModel,
    method: str,
    *,
    rank: int = 16,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: list[str] | tuple[str, ...] | None = None,
    last_k: int | None = None,
    task_rank: int | dict[str, int] = 4,
    task_scale: float = 1.0,
    loraplus_ratio: float = 16.0,
    pooling: str | None = "attention",
    head_hidden_size: int | None = None,
) -> SoftBioModel:
    """
    Prepare the model for one of the study's rows and freeze what should not train. The choice is recorded
    in `config.adapter`, so a checkpoint says how it was made.

    - "zs": nothing trains. "lp": pooling + heads. "ft": the last `last_k` blocks too (default 4).
    - "lora" / "dora" / "loraplus": peft low-rank adapters (rank, alpha = 2 x rank by default, dropout) on
      `target_modules` (default: q/k/v/out projections and both MLP linears) of all blocks, or the last
      `last_k`. "loraplus" also makes `optimizer_groups` train the B matrices at `loraplus_ratio` x the rate.
    - "mtlora": shared adapters of rank `rank` everywhere, task-specific ones of rank `task_rank` (an int or
      task -> int) in the last block of each quarter, scaled by `task_scale`; per-task pooling of the streams.
    Trainable methods switch the pooling to `pooling` ("attention" by default; None keeps the current one) and,
    with `head_hidden_size` (None keeps the current heads), the heads: 0 linear, > 0 a fresh MLP of that width
    (the study's figure). Zero-shot heads are text embeddings, so they stay linear.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}.")
    if (model.config.adapter or {}).get("method") in ADAPTER_METHODS:
        raise ValueError(
            f"This model already carries {model.config.adapter['method']!r} adapters; apply a method to a fresh "
            "model (from_clip or a merged checkpoint)."
        )
    if method == "zs":
        if head_hidden_size:
            raise ValueError(
                f"head_hidden_size={head_hidden_size}: zero-shot heads are CLIP text embeddings, i.e. linear; "
                "MLP heads need a trainable method (lp, ft, lora, ...)."
            )
        model.requires_grad_(False)
        model.config.adapter = {"method": "zs"}
        return model
    # Every setting is checked before the model or its config changes.
    if pooling is not None and pooling not in POOLING_CHOICES:
        raise ValueError(f"pooling={pooling!r}; choose one of {POOLING_CHOICES}.")
    if head_hidden_size is not None and (not isinstance(head_hidden_size, int) or head_hidden_size < 0):
        raise ValueError(f"head_hidden_size={head_hidden_size!r}: 0 for linear heads, or the MLP's width (> 0).")
    if method in ("lp", "ft"):
        blocks = 0 if method == "lp" else (last_k or 4)
        check_trainable_blocks(blocks, model.config.num_backbone_layers)
        adapter = {"method": method, **({"last_k": blocks} if method == "ft" else {})}
    else:
        adapter = adapter_settings(model, method, rank, alpha, dropout, target_modules, last_k, task_rank, task_scale)
        if method == "loraplus":
            if not loraplus_ratio or loraplus_ratio <= 0:
                raise ValueError(f"loraplus_ratio must be > 0, got {loraplus_ratio}.")
            adapter["loraplus_ratio"] = float(loraplus_ratio)
    if pooling is not None:
        model.set_pooling(pooling)
    if head_hidden_size is not None:
        model.set_head_hidden_size(head_hidden_size)
    if method in ("lp", "ft"):
        apply_trainable_blocks(model, adapter.get("last_k", 0))
    else:
        install_adapter_layers(model, adapter)
        model.config.trainable_blocks = 0
        freeze_all_but_adapters(model)
    model.config.adapter = adapter
    return model


def adapter_settings(
    model: SoftBioModel, method, rank, alpha, dropout, target_modules, last_k, task_rank, task_scale
) -> dict:
    """The config.adapter entry of a low-rank method, every value checked."""
    alpha = 2 * rank if alpha is None else alpha
    for setting, value in (("rank", rank), ("alpha", alpha)):
        if not value or value <= 0:
            raise ValueError(f"{setting} must be > 0, got {value}.")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
    num_layers = model.config.num_backbone_layers
    if last_k is not None and not 1 <= last_k <= num_layers:
        raise ValueError(f"last_k={last_k}: adapt the last 1..{num_layers} blocks, or None for all.")
    adapter = {
        "method": method,
        "rank": int(rank),
        "alpha": float(alpha),
        "dropout": float(dropout),
        "target_modules": list(target_modules or DEFAULT_TARGET_MODULES),
        "last_k": last_k,
        "merged": False,
    }
    if method == "mtlora":
        if task_scale <= 0:
            raise ValueError(f"task_scale must be > 0, got {task_scale}.")
        resolve_task_ranks(task_rank, model.config.task_names)  # validates names and values
        adapter.update(task_rank=task_rank, task_scale=float(task_scale), task_blocks=task_block_indices(num_layers))
    lora_target_names(model.backbone, adapter)  # validates the targets before anything changes
    return adapter


def install_adapter_layers(model: SoftBioModel, adapter: dict) -> None:
    """Add the layers a method needs: MTLoRA's task layers (always) and peft LoRA (until merged)."""
    if adapter.get("method") not in ADAPTER_METHODS:
        return
    if adapter["method"] == "mtlora":
        install_task_layers(model.backbone, adapter, model.config.task_names)
    if adapter.get("merged"):
        return
    if LoraConfig is None:
        raise ImportError(
            f"A model with unmerged {adapter['method']!r} adapters needs peft: pip install 'softbio[train]' (or "
            "pip install 'peft>=0.18'). Merged checkpoints (merge_adapters, or --merge) load without it."
        )
    names = lora_target_names(model.backbone, adapter)
    lora_config = LoraConfig(
        r=adapter["rank"],
        lora_alpha=adapter["alpha"],
        lora_dropout=adapter["dropout"],
        target_modules="^(?:" + "|".join(re.escape(n) for n in names) + ")$",
        use_dora=adapter["method"] == "dora",
        bias="none",
    )
    inject_adapter_in_model(lora_config, model.backbone)


def trainable_parts(model: SoftBioModel) -> list[nn.Module]:
    """What trains in every trainable row: pooling, heads and the loss's log-variances."""
    return [module for module in (model.pooling, model.heads, model.loss_weights) if module is not None]


def freeze_all_but_adapters(model: SoftBioModel) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(any(marker in name for marker in ADAPTER_MARKERS))
    for module in trainable_parts(model):
        module.requires_grad_(True)


def apply_trainable_blocks(model: SoftBioModel, trainable_blocks: int | None = None) -> None:
    """
    Freeze the model for one of the study's rows, recording the choice in the config:
    0 = linear probe (pooling + heads), k = the last k blocks too (FT4 is 4), -1 = everything.
    The final norm and projection train whenever any backbone block does.
    """
    if trainable_blocks is not None:
        check_trainable_blocks(trainable_blocks, model.config.num_backbone_layers)  # before changing anything
        model.config.trainable_blocks = trainable_blocks
    k = model.config.trainable_blocks
    layers = model.backbone.encoder.layers
    model.requires_grad_(k == -1)
    for module in trainable_parts(model):
        module.requires_grad_(True)
    if k > 0:
        for layer in layers[len(layers) - k :]:
            layer.requires_grad_(True)
        model.backbone.post_layernorm.requires_grad_(True)
        model.visual_projection.requires_grad_(True)


def merge_adapters(model: SoftBioModel) -> SoftBioModel:
    """
    Fold the peft adapters (LoRA, DoRA, MTLoRA's shared ones) into the backbone weights, in place, and
    return the model: a plain SoftBioModel that runs at full speed and saves/loads without peft.
    MTLoRA's task-specific layers stay (they are rebuilt from the config when loading).
    """
    adapter = model.config.adapter or {}
    if adapter.get("method") not in ADAPTER_METHODS or adapter.get("merged"):
        return model
    for name, module in list(model.backbone.named_modules()):
        if LoraLayer is not None and isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, attribute = name.rpartition(".")
            setattr(model.backbone.get_submodule(parent_name), attribute, module.get_base_layer())
    model.config.adapter = {**adapter, "merged": True}
    return model


def optimizer_groups(
    model: SoftBioModel,
    lr: float,
    *,
    loraplus_ratio: float | None = None,
    weight_decay: float = 0.01,
    head_lr: float | None = None,
    loss_weight_lr: float | None = None,
) -> list[dict]:
    """
    Parameter groups for torch.optim, one per kind of trainable parameter: low-rank B matrices (LoRA+:
    `loraplus_ratio` x lr; default from the config for "loraplus", else 1), the other adapter parameters,
    backbone blocks, pooling + heads (`head_lr`, default lr) and loss weights (`loss_weight_lr`, default lr).
    Biases, norms, probes and log-variances get no weight decay.
    """
    adapter = model.config.adapter or {}
    if loraplus_ratio is not None and adapter.get("method") != "loraplus":
        raise ValueError(
            f"loraplus_ratio applies to LoRA+ only; this model's method is {adapter.get('method')!r}, whose B "
            "matrices train at the base rate. For LoRA+, apply_method('loraplus', loraplus_ratio=...)."
        )
    ratio = loraplus_ratio or adapter.get("loraplus_ratio") or 1.0
    rates = {
        "adapter_B": lr * ratio,
        "adapter": lr,
        "backbone": lr,
        "head": head_lr or lr,
        "loss_weights": loss_weight_lr or lr,
    }
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = parameter_kind(name)
        decays = param.ndim >= 2 and kind != "loss_weights" and ".probes." not in name
        groups.setdefault((kind, decays), []).append(param)
    return [
        {
            "name": kind if decays else f"{kind}_no_decay",
            "params": params,
            "lr": rates[kind],
            "weight_decay": weight_decay if decays else 0.0,
        }
        for (kind, decays), params in groups.items()
    ]


def parameter_kind(name: str) -> str:
    """Optimizer-group kind of a parameter (see optimizer_groups)."""
    if any(marker in name for marker in B_MARKERS):
        return "adapter_B"
    if any(marker in name for marker in ADAPTER_MARKERS):
        return "adapter"
    if name.startswith(("pooling", "heads")):
        return "head"
    if name.startswith("loss_weights"):
        return "loss_weights"
    return "backbone"


def check_trainable_blocks(blocks: int, num_layers: int) -> None:
    if not (blocks == -1 or 0 <= blocks <= num_layers):
        raise ValueError(
            f"trainable_blocks={blocks}: use 0 (frozen backbone), 1..{num_layers} (the last k blocks) or -1 "
            "(the whole backbone)."
        )


def lora_target_names(backbone: nn.Module, adapter: dict) -> list[str]:
    """
    Backbone linears that get peft LoRA: those whose name ends with a target, in the chosen blocks, minus
    MTLoRA's task-specific layers (which carry their own shared pair). Unmatched targets are an error.
    """
    linears = [name for name, module in backbone.named_modules() if isinstance(module, nn.Linear)]
    targets = adapter["target_modules"]

    def is_target(name: str, target: str) -> bool:
        return name == target or name.endswith("." + target)

    unmatched = [t for t in targets if not any(is_target(n, t) for n in linears)]
    if unmatched:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(
            f"target_modules {unmatched} match no linear layer of the backbone. Its linear layers are named "
            f"{suffixes} (e.g. {linears[0]!r})."
        )
    num_layers = len(backbone.encoder.layers)
    first = num_layers - adapter["last_k"] if adapter.get("last_k") else 0
    allowed = {f"encoder.layers.{i}." for i in range(first, num_layers)}
    excluded = set(task_layer_names(adapter, num_layers)) if adapter["method"] == "mtlora" else set()
    return [
        n
        for n in linears
        if any(is_target(n, t) for t in targets)
        and any(n.startswith(prefix) for prefix in allowed)
        and n not in excluded
    ]
