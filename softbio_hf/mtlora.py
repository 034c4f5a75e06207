"""MTLoRA (Agiza et al., CVPR 2024) on a plain ViT: task-agnostic and task-specific low-rank adaptation.

peft cannot express it, so it lives here. Layout on a ViT with L blocks (REFERENCE.md section 7):
- task-agnostic (shared) low-rank pairs on every target linear (peft LoRA, except in the layers below);
- in the last block of each quarter of the encoder (blocks L/4-1, L/2-1, 3L/4-1, L-1), the attention output
  projection and both MLP linears are `MTLoRALinear`s: the shared stream gets W0 x + B_s A_s x, and each
  task t carries its own stream through that block, W0 x_t + B_t A_t x_t (the encoder's last block has no
  shared stream: nothing reads it);
- the shared pairs of those layers stay separate when the peft part is merged (W0 must stay W0 for the task
  streams), so merged checkpoints rebuild these layers from the config and load their weights;
- each task's stream leaving those four blocks is that task's view of the image at four depths; the task's
  attention pooling attends over all of them. One backbone pass serves all tasks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

TASK_SPECIFIC_LINEARS = ("self_attn.out_proj", "mlp.fc1", "mlp.fc2")


class TaskParameters(nn.Module):
    """
    One parameter per task, held by this module itself (state-dict keys `...<name>.<task>`, as an nn.ParameterDict
    writes them). transformers 5 runs `_init_weights` on a custom-code module only when the module holds parameters
    directly: the parent of a ParameterDict holds none and is skipped, so parameters kept that way keep whatever the
    constructor left, or uninitialised memory after a load that lacks them. `reset_parameters` is the one rule for
    these parameters; it uses transformers' init functions, which leave loaded tensors alone.
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        rule: str,
        std: float = 1.0,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if rule not in ("normal", "zeros", "kaiming_uniform"):
            raise ValueError(f"Unknown init rule {rule!r}.")
        self.rule, self.std = rule, std
        for task, shape in shapes.items():
            self.register_parameter(task, nn.Parameter(torch.zeros(shape, dtype=dtype)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for param in self._parameters.values():
            if self.rule == "normal":
                init.normal_(param, mean=0.0, std=self.std)
            elif self.rule == "zeros":
                init.zeros_(param)
            else:  # as LoRA's A matrices (and nn.Linear's weights)
                init.kaiming_uniform_(param, a=math.sqrt(5))

    def __getitem__(self, task: str) -> nn.Parameter:
        return self._parameters[task]

    def __contains__(self, task: object) -> bool:
        return task in self._parameters

    def __iter__(self):
        return iter(self._parameters)

    def __len__(self) -> int:
        return len(self._parameters)

    def keys(self):
        return self._parameters.keys()

    def values(self):
        return self._parameters.values()

    def items(self):
        return self._parameters.items()


def task_block_indices(num_layers: int, stages: int = 4) -> list[int]:
    """The last block of each of `stages` equal parts of the encoder: [5, 11, 17, 23] for 24 blocks."""
    return sorted({max(0, round(num_layers * (s + 1) / stages) - 1) for s in range(stages)})


class MTLoRALinear(nn.Linear):
    """A frozen linear W0 with a shared low-rank pair and one low-rank pair per task."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tasks: list[str],
        shared_rank: int,
        shared_scale: float,
        task_ranks: dict[str, int],
        task_scale: float,
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__(in_features, out_features, bias=bias)
        self.shared_scale = shared_scale
        self.task_scale = task_scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # shared_rank 0: no shared pair (the encoder's last block, whose shared stream nothing reads).
        self.shared_A = nn.Parameter(torch.empty(shared_rank, in_features)) if shared_rank else None
        self.shared_B = nn.Parameter(torch.zeros(out_features, shared_rank)) if shared_rank else None
        # As LoRA: A random, B zero, so a new adapter starts as the identity change.
        self.task_A = TaskParameters({t: (task_ranks[t], in_features) for t in tasks}, "kaiming_uniform")
        self.task_B = TaskParameters({t: (out_features, task_ranks[t]) for t in tasks}, "zeros")
        self.reset_shared()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> MTLoRALinear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **kwargs)
        layer.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    @torch.no_grad()
    def reset_shared(self) -> None:
        """The shared pair as LoRA's (the task pairs reset themselves); loaded tensors are left alone."""
        if self.shared_A is not None:
            init.kaiming_uniform_(self.shared_A, a=math.sqrt(5))
            init.zeros_(self.shared_B)

    def _low_rank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), a), b) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The shared stream."""
        if self.shared_A is None:
            return super().forward(x)
        return super().forward(x) + self._low_rank(x, self.shared_A, self.shared_B, self.shared_scale)

    def task_forward(self, task: str, x: torch.Tensor) -> torch.Tensor:
        """Task `task`'s stream: W0 x_t + B_t A_t x_t."""
        return super().forward(x) + self._low_rank(x, self.task_A[task], self.task_B[task], self.task_scale)

    def task_outputs(self, x: torch.Tensor, tasks: list[str]) -> dict[str, torch.Tensor]:
        """Every task's output for one shared input, computing W0 x once."""
        base = super().forward(x)
        return {t: base + self._low_rank(x, self.task_A[t], self.task_B[t], self.task_scale) for t in tasks}


def task_layer_names(adapter: dict, num_layers: int) -> list[str]:
    """Backbone module names of the task-specific linears (relative to the backbone)."""
    blocks = adapter.get("task_blocks") or task_block_indices(num_layers)
    return [f"encoder.layers.{index}.{path}" for index in blocks for path in TASK_SPECIFIC_LINEARS]


def install_task_layers(backbone: nn.Module, adapter: dict, tasks: list[str]) -> list[str]:
    """Replace the task-specific linears of the task blocks by MTLoRALinears; returns their module names."""
    task_ranks = resolve_task_ranks(adapter.get("task_rank", 4), tasks)
    num_layers = len(backbone.encoder.layers)
    names = task_layer_names(adapter, num_layers)
    for name in names:
        is_last_block = name.startswith(f"encoder.layers.{num_layers - 1}.")
        parent_path, _, attribute = name.rpartition(".")
        parent = backbone.get_submodule(parent_path)
        linear = getattr(parent, attribute)
        if not isinstance(linear, MTLoRALinear):
            setattr(
                parent,
                attribute,
                MTLoRALinear.from_linear(
                    linear,
                    tasks=tasks,
                    shared_rank=0 if is_last_block else adapter["rank"],
                    shared_scale=adapter["alpha"] / adapter["rank"],
                    task_ranks=task_ranks,
                    task_scale=adapter.get("task_scale", 1.0),
                    dropout=adapter.get("dropout", 0.0),
                ),
            )
    return names


def resolve_task_ranks(task_rank: int | dict[str, int], tasks: list[str]) -> dict[str, int]:
    if isinstance(task_rank, dict):
        unknown = sorted(set(task_rank) - set(tasks))
        if unknown:
            raise ValueError(f"task_rank names unknown task(s) {unknown}; this model's tasks are {tasks}.")
        ranks = {t: int(task_rank.get(t, 4)) for t in tasks}
    else:
        ranks = dict.fromkeys(tasks, int(task_rank))
    bad = {t: r for t, r in ranks.items() if r <= 0}
    if bad:
        raise ValueError(f"task_rank must be > 0, got {bad}.")
    return ranks


def _attention_before_output(attention: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """CLIP self-attention up to (not including) the output projection, so each stream can project it."""
    batch, length, width = hidden.shape
    heads = attention.num_heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, length, heads, width // heads).transpose(1, 2)

    q, k, v = split(attention.q_proj(hidden)), split(attention.k_proj(hidden)), split(attention.v_proj(hidden))
    out = F.scaled_dot_product_attention(q, k, v, scale=attention.scale)
    return out.transpose(1, 2).reshape(batch, length, width)


def task_block_forward(layer: nn.Module, hidden: torch.Tensor, tasks: list[str], need_shared: bool = True):
    """One encoder block with task streams: the shared output (None unless needed) and each task's output."""
    attention = _attention_before_output(layer.self_attn, layer.layer_norm1(hidden))
    out_proj = layer.self_attn.out_proj
    shared = None
    if need_shared:
        shared = hidden + out_proj(attention)
        shared = shared + layer.mlp(layer.layer_norm2(shared))
    streams = {}
    for task, projected in out_proj.task_outputs(attention, tasks).items():
        stream = hidden + projected
        mlp_in = layer.layer_norm2(stream)
        mlp_hidden = layer.mlp.activation_fn(layer.mlp.fc1.task_forward(task, mlp_in))
        streams[task] = stream + layer.mlp.fc2.task_forward(task, mlp_hidden)
    return shared, streams


def task_stream_tokens(backbone: nn.Module, pixel_values: torch.Tensor, tasks: list[str]) -> dict[str, torch.Tensor]:
    """
    One pass through the encoder. Per task: the normalised tokens of its stream leaving each task block,
    deepest first (so position 0 is the final CLS token), concatenated along the sequence.
    """
    hidden = backbone.pre_layrnorm(backbone.embeddings(pixel_values))
    per_task: dict[str, list[torch.Tensor]] = {t: [] for t in tasks}
    layers = backbone.encoder.layers
    for index, layer in enumerate(layers):
        if isinstance(layer.self_attn.out_proj, MTLoRALinear):
            hidden, streams = task_block_forward(layer, hidden, tasks, need_shared=index < len(layers) - 1)
            for task, stream in streams.items():
                per_task[task].append(backbone.post_layernorm(stream))
        else:
            hidden = layer(hidden, None)
    return {task: torch.cat(streams[::-1], dim=1) for task, streams in per_task.items()}
