"""The model a config asks for: CLIP's zero-shot model with the row's method applied, and what the run reports of
its parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from train.errors import ConfigError, TrainingError


def build_model(config: dict[str, Any], base_model=None):
    """
    The study's row: CLIP's zero-shot model from the backbone (or `base_model`, e.g. random weights of the real
    architecture for a benchmark), then the method applied (fp32).
    """
    from softbio_hf import SoftBioModel

    method, loss, options = config["method"], config["loss"], config["model"]
    if method["name"] == "zs" and options["pooling"] != "cls":
        raise ConfigError("method zs uses CLIP's own pooling (the class token): set model.pooling=cls.")
    if base_model is not None:
        return apply_configured_method(base_model, config)
    try:
        model = SoftBioModel.from_clip(
            options["backbone"],
            pooling=options["pooling"],
            # head_hidden_size is the method's to apply: from_clip's heads are the zero-shot (linear) ones.
            **{key: options[key] for key in ("pooling_heads", "pooling_mlp_ratio", "normalize_features")},
            head_dropout=options["head_dropout"],
            loss_weighting=loss["weighting"],
            task_weights=loss["task_weights"],
            label_smoothing=loss["label_smoothing"],
        )
    except OSError as error:
        raise TrainingError(
            f"model.backbone={config['model']['backbone']!r} could not be loaded ({error}). Give a CLIP Hub id "
            "(needs the network or a cached copy) or a local folder holding a CLIP checkpoint with its tokenizer."
        ) from error
    except ValueError as error:  # a model.* setting this backbone cannot take (pooling_heads not dividing its width)
        raise ConfigError(f"the model.* settings do not fit model.backbone={options['backbone']!r}: {error}") from None
    return apply_configured_method(model, config)


def apply_configured_method(model, config: dict[str, Any]):
    """The config's `method` section (and the heads of `model`) as an apply_method call; a bad option is a
    ConfigError."""
    method = config["method"]
    options: dict[str, Any] = {
        "pooling": config["model"]["pooling"],
        "head_hidden_size": config["model"]["head_hidden_size"],
    }
    if method["name"] == "ft":
        options["last_k"] = method["last_k"] or 4
    elif method["name"] in ("lora", "dora", "loraplus", "mtlora"):
        options.update({k: method[k] for k in ("rank", "alpha", "dropout", "target_modules", "last_k")})
        if method["name"] == "loraplus":
            options["loraplus_ratio"] = method["loraplus_ratio"]
        if method["name"] == "mtlora":
            options.update(task_rank=method["task_rank"], task_scale=method["task_scale"])
    if method["name"] == "zs":
        options = {"head_hidden_size": config["model"]["head_hidden_size"]}  # refused unless 0
    try:
        return model.apply_method(method["name"], **options)
    except ValueError as error:
        raise ConfigError(f"method {method['name']!r}: {error}") from error


def freeze_tasks(model, tasks: Sequence[str]) -> None:
    """Leave these tasks' own parameters (head, pooling query, log-variance, MTLoRA task pairs) as they are:
    with no labels they get no gradient, and AdamW's weight decay alone would still shrink them."""
    markers = [
        m
        for task in tasks
        for m in (f"heads.{task}.", f"probes.{task}", f"log_vars.{task}", f"task_A.{task}", f"task_B.{task}")
    ]
    for name, param in model.named_parameters():
        if any(marker in name for marker in markers):
            param.requires_grad_(False)


def trainable_state(model) -> dict[str, Any]:
    return {name: p.detach().float().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def format_parameter_report(model) -> str:
    rows = model.parameter_report()
    lines = [f"{'part':<22} {'trainable':>14} {'total':>14}"]
    lines += [f"{r['part']:<22} {r['trainable']:>14,} {r['total']:>14,}" for r in rows]
    total = rows[-1]
    lines.append(f"trainable share: {100 * total['trainable'] / max(1, total['total']):.2f}%")
    return "\n".join(lines)
