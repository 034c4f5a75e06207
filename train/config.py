"""The training config: every key with its default and rule, the YAML reader (duplicate keys refused, merge keys
taken), `--set` overrides and "did you mean" for unknown keys. The one place where a new setting is added.

Each key's check is a rule in RULES; load_config applies DEFAULTS, then the file, then --set, checking each value.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from train.errors import ConfigError
from train.schema import TASKS, is_finite_number

CONFIG_DIR = Path(__file__).parent / "configs"


METHODS = ("zs", "lp", "ft", "lora", "dora", "loraplus", "mtlora")


# Every key a config may set, with its default. A YAML file or --set may only name these.
DEFAULTS: dict[str, Any] = {
    "method": {
        "name": "lora",
        "rank": 16,
        "alpha": None,  # 2 x rank
        "dropout": 0.0,
        "target_modules": None,  # q/k/v/out projections and both MLP linears
        "last_k": None,  # ft: blocks that train (default 4); adapters: only the last k blocks (None: all)
        "loraplus_ratio": 16.0,
        "task_rank": 4,
        "task_scale": 1.0,
    },
    # SoftBioConfig's options that training can change (the rest follow from the backbone or the method).
    "model": {
        "backbone": "openai/clip-vit-large-patch14-336",
        "pooling": "attention",
        "pooling_heads": None,  # the backbone's
        "pooling_mlp_ratio": 4.0,
        "normalize_features": True,
        "head_hidden_size": 0,  # 0: linear heads; > 0: one-hidden-layer MLP heads (trainable methods only)
        "head_dropout": 0.0,
    },
    "data": {
        "train": [],
        "eval": [],
        "if_present": [],  # folders added to train and eval when they exist (the study: data/vggface2)
        "eval_split": "validation",
        "test_split": "test",
        "class_balance": "mix",
        "class_mix": 0.5,
        "class_alpha": 0.5,
        "task_alpha": 0.5,
        "augment": True,
        "num_workers": 2,
    },
    "loss": {"weighting": "uncertainty", "task_weights": None, "label_smoothing": 0.0},
    "train": {
        "max_steps": 10000,
        "batch_size": 64,
        "grad_accum": 1,
        "lr": 1e-4,
        "head_lr": None,
        # The uncertainty weights' log-variances must move by O(1) to weigh tasks: at FT4's lr (1e-5) a whole run
        # sums to 0.08 and they stay put, so they get a rate of their own (null: lr).
        "loss_weight_lr": 1e-3,
        "weight_decay": 0.01,
        "warmup_steps": 500,
        "max_grad_norm": 1.0,
        "seed": 0,
        "device": "auto",
        "mixed_precision": "auto",
        "gradient_checkpointing": False,
        "compile": False,
        "bf16_base": False,
    },
    "eval": {"every": 500, "batch_size": 128, "patience": 5, "limit": None},
    "checkpoint": {"every": 500, "keep": 2},
    "output_dir": "runs/train",
}


# key -> (allowed types, check, what is allowed). Keys absent here take the type of their default.
FLOAT, INT, OPTIONAL_INT, OPTIONAL_FLOAT = (float, int), (int,), (int, type(None)), (float, int, type(None))


RULES: dict[str, tuple[tuple[type, ...], Callable[[Any], bool] | None, str]] = {
    "method.name": ((str,), lambda v: v in METHODS, f"one of {METHODS}"),
    "method.rank": (INT, lambda v: v > 0, "an integer > 0"),
    "method.alpha": (OPTIONAL_FLOAT, lambda v: v is None or v > 0, "a number > 0 or null (2 x rank)"),
    "method.dropout": (FLOAT, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "method.target_modules": ((list, type(None)), None, "a list of linear-layer names or null"),
    "method.last_k": (OPTIONAL_INT, lambda v: v is None or v > 0, "an integer > 0 or null"),
    "method.loraplus_ratio": (FLOAT, lambda v: v > 0, "a number > 0"),
    "method.task_rank": ((int, dict), None, "an integer or a task -> integer mapping"),
    "method.task_scale": (FLOAT, lambda v: v > 0, "a number > 0"),
    "model.pooling": ((str,), lambda v: v in ("attention", "cls"), "attention or cls"),
    "model.pooling_heads": (OPTIONAL_INT, lambda v: v is None or v > 0, "an integer > 0 or null (the backbone's)"),
    "model.pooling_mlp_ratio": (FLOAT, lambda v: v > 0, "a number > 0"),
    "model.head_hidden_size": (INT, lambda v: v >= 0, "an integer >= 0 (0: linear heads)"),
    "model.head_dropout": (FLOAT, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "data.train": ((list,), lambda v: all(isinstance(p, str) for p in v), "a list of prepared dataset folders"),
    "data.eval": ((list,), lambda v: all(isinstance(p, str) for p in v), "a list of prepared dataset folders"),
    "data.if_present": ((list,), lambda v: all(isinstance(p, str) for p in v), "a list of prepared dataset folders"),
    "data.class_balance": ((str,), lambda v: v in ("mix", "power"), "mix or power"),
    "data.class_mix": (FLOAT, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "data.class_alpha": (FLOAT, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "data.task_alpha": (FLOAT, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "data.num_workers": (INT, lambda v: v >= 0, "an integer >= 0"),
    "loss.weighting": ((str,), lambda v: v in ("sum", "uncertainty"), "sum or uncertainty"),
    "loss.task_weights": (
        (dict, type(None)),
        lambda v: v is None or all(k in TASKS and is_finite_number(w) and w >= 0 for k, w in v.items()),
        f"null or a mapping of tasks {TASKS} to weights >= 0",
    ),
    "loss.label_smoothing": (FLOAT, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "train.max_steps": (INT, lambda v: v > 0, "an integer > 0"),
    "train.batch_size": (INT, lambda v: v > 0, "an integer > 0 (the global batch)"),
    "train.grad_accum": (INT, lambda v: v > 0, "an integer > 0"),
    "train.lr": (FLOAT, lambda v: v > 0, "a number > 0"),
    "train.head_lr": (OPTIONAL_FLOAT, lambda v: v is None or v > 0, "a number > 0 or null (= lr)"),
    "train.loss_weight_lr": (OPTIONAL_FLOAT, lambda v: v is None or v > 0, "a number > 0 or null (= lr)"),
    "train.weight_decay": (FLOAT, lambda v: v >= 0, "a number >= 0"),
    "train.warmup_steps": (INT, lambda v: v >= 0, "an integer >= 0"),
    "train.max_grad_norm": (OPTIONAL_FLOAT, lambda v: v is None or v > 0, "a number > 0 or null (no clipping)"),
    # numpy, which accelerate seeds too, takes 0 <= seed < 2**32
    "train.seed": (INT, lambda v: 0 <= v < 2**32, "an integer from 0 to 4294967295"),
    "train.device": ((str,), lambda v: v in ("auto", "cpu", "cuda"), "auto, cpu or cuda"),
    "train.mixed_precision": ((str,), lambda v: v in ("auto", "bf16", "no"), "auto, bf16 or no"),
    "eval.every": (INT, lambda v: v >= 0, "an integer >= 0 (0: only at the end)"),
    "eval.batch_size": (INT, lambda v: v > 0, "an integer > 0"),
    "eval.patience": (INT, lambda v: v >= 0, "an integer >= 0 (0: no early stopping)"),
    "eval.limit": (OPTIONAL_INT, lambda v: v is None or v > 0, "an integer > 0 or null (all rows)"),
    "checkpoint.every": (INT, lambda v: v >= 0, "an integer >= 0 (0: no periodic checkpoints)"),
    "checkpoint.keep": (INT, lambda v: v > 0, "an integer > 0"),
    "output_dir": ((str,), lambda v: v.strip() != "", "a folder for this run (not empty: '' would be here)"),
}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(DEFAULTS_FLAT_SECTIONS.get(name), dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


DEFAULTS_FLAT_SECTIONS = {key: value for key, value in DEFAULTS.items() if isinstance(value, dict)}


KNOWN_KEYS = list(flatten(DEFAULTS))


def unknown_key_error(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"Unknown config key {key!r} in {source}.{hint} Known keys: {', '.join(KNOWN_KEYS)}.")


def coerce(key: str, value: Any) -> Any:
    """YAML reads 1e-4 as a string (it wants 1.0e-4) and `no` as false: both are taken as meant."""
    if key == "train.mixed_precision" and value is False:
        return "no"
    types = RULES.get(key, ((type(flatten(DEFAULTS)[key]),), None, ""))[0]
    if isinstance(value, str) and float in types:
        with contextlib.suppress(ValueError):
            return float(value)
    return value


def check_value(key: str, value: Any) -> None:
    default = flatten(DEFAULTS)[key]
    types, check, allowed = RULES.get(key, ((type(default),), None, f"a {type(default).__name__}"))
    wrong_type = not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
    not_finite = isinstance(value, float) and not math.isfinite(value)  # .inf and .nan are YAML floats too
    if wrong_type or not_finite or (check is not None and not check(value)):
        raise ConfigError(f"{key}={value!r} is not allowed: use {allowed}.")


def set_value(config: dict[str, Any], key: str, value: Any, source: str) -> None:
    if key not in KNOWN_KEYS:
        raise unknown_key_error(key, source)
    value = coerce(key, value)
    check_value(key, value)
    section, _, leaf = key.rpartition(".")
    (config[section] if section else config)[leaf] = value


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """DEFAULTS, then the YAML file, then `--set key=value` overrides (values parsed as YAML); all checked."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = resolve_config_path(path)
        loaded = read_yaml_config(path)
        for section, value in loaded.items():
            if section in DEFAULTS_FLAT_SECTIONS and not isinstance(value, dict):
                example = "name: lora" if section == "method" else f"{next(iter(DEFAULTS[section]))}: ..."
                raise ConfigError(
                    f"{path}: '{section}' is a section, so it holds keys, not {value!r}; write it as\n"
                    f"{section}:\n  {example}"
                )
        for key, value in flatten(loaded).items():
            set_value(config, key, value, str(path))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: write key=value, e.g. --set train.max_steps=2000.")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({error}).") from error
        except RecursionError:
            raise ConfigError(f"--set {item!r}: the value is nested too deeply.") from None
        set_value(config, key.strip(), value, "--set")
    method = config["method"]["name"]
    if method != "zs" and not config["data"]["train"]:
        raise ConfigError(
            f"method {method!r} trains: set data.train (prepared dataset folders), e.g. --set "
            "'data.train=[data/utkface, data/fairface, data/rafdb]'."
        )
    return config


def add_present_folders(data: dict[str, Any], say: bool = True) -> None:
    """`data.if_present` folders that exist join data.train and data.eval (each once); absent ones are said."""
    for folder in data["if_present"]:
        if not Path(folder).is_dir():
            if say:
                print(f"note: data.if_present {folder} is not there; going on without it.", file=sys.stderr)
            continue
        for key in ("train", "eval"):
            if folder not in data[key]:
                data[key] = [*data[key], folder]


MERGE_TAG = "tag:yaml.org,2002:merge"
EXTENSION_PREFIX = "x-"  # top-level keys that only hold anchors for merge keys (as docker compose's), then dropped


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (YAML's last-wins would hide one of them).
    Merge keys (`<<: *base`) are standard YAML: the keys they bring may be overridden by keys written here."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"the key {key!r} is given twice (line {key_node.start_mark.line + 1}); keep one.")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml_config(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (byte {error.start}); save it as UTF-8.") from None
    except OSError as error:
        raise ConfigError(f"--config {path}: cannot be read ({error.strerror}).") from None
    try:
        loaded = yaml.load(text, Loader=UniqueKeyLoader) or {}
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a config (sections hold keys, one level).") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (method, model, data, ...).")
    return {k: v for k, v in loaded.items() if not str(k).startswith(EXTENSION_PREFIX)}


def resolve_config_path(path: str | Path) -> Path:
    """A file, or the name of one in train/configs (e.g. `lora`)."""
    candidates = [Path(path), CONFIG_DIR / f"{path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    available = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"--config {path}: no such file. The study's rows are in train/configs: {available}.")


def tracker_config(config: dict[str, Any]) -> dict[str, Any]:
    """TensorBoard's hparams take scalars and strings only."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(config).items()}
