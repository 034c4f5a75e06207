"""Train any row of the study (ZS, LP, FT4, LoRA, DoRA, LoRA+, MTLoRA) from one YAML file, under accelerate.

    python -m train.train --config train/configs/lora.yaml --set train.max_steps=2000 output_dir=runs/lora
    python -m train.train --config train/configs/lora.yaml --resume                # continue the latest checkpoint
    torchrun --nproc_per_node 2 -m train.train --config train/configs/lora.yaml   # or: accelerate launch -m ...

`train.batch_size` is the global batch: several processes split each batch between them, so a run gives the
same result on one device or many. The end of a run: OUTPUT_DIR/best/ (adapters merged; loads with AutoModel
and pipeline as remote code), OUTPUT_DIR/eval/ (test results through train.evaluate), training_curves.png,
summary.json and TensorBoard logs in OUTPUT_DIR/logs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import errno
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from softbio_hf.safe_files import atomic_write_bytes
from train.data import TASKS, is_finite_number

CONFIG_DIR = Path(__file__).parent / "configs"
METHODS = ("zs", "lp", "ft", "lora", "dora", "loraplus", "mtlora")
TRAINER_STATE = "trainer_state.json"
BEST_WEIGHTS = "best_trainable.safetensors"
EXIT_USER_ERROR, EXIT_INTERRUPTED = 2, 130

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
    "train.weight_decay": (FLOAT, lambda v: v >= 0, "a number >= 0"),
    "train.warmup_steps": (INT, lambda v: v >= 0, "an integer >= 0"),
    "train.max_grad_norm": (OPTIONAL_FLOAT, lambda v: v is None or v > 0, "a number > 0 or null (no clipping)"),
    "train.seed": (INT, None, "an integer"),
    "train.device": ((str,), lambda v: v in ("auto", "cpu", "cuda"), "auto, cpu or cuda"),
    "train.mixed_precision": ((str,), lambda v: v in ("auto", "bf16", "no"), "auto, bf16 or no"),
    "eval.every": (INT, lambda v: v >= 0, "an integer >= 0 (0: only at the end)"),
    "eval.batch_size": (INT, lambda v: v > 0, "an integer > 0"),
    "eval.patience": (INT, lambda v: v >= 0, "an integer >= 0 (0: no early stopping)"),
    "eval.limit": (OPTIONAL_INT, lambda v: v is None or v > 0, "an integer > 0 or null (all rows)"),
    "checkpoint.every": (INT, lambda v: v >= 0, "an integer >= 0 (0: no periodic checkpoints)"),
    "checkpoint.keep": (INT, lambda v: v > 0, "an integer > 0"),
}


class ConfigError(ValueError):
    """A bad config file, key or value: reported before any work, exit code 2."""


class TrainingError(RuntimeError):
    """A run that cannot go on for a reason the user can fix (data, memory, device): exit code 2."""


# ---------------------------------------------------------------------------------------------- config
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


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (YAML's last-wins would hide one of them)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
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
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (method, model, data, ...).")
    return loaded


def resolve_config_path(path: str | Path) -> Path:
    """A file, or the name of one in train/configs (e.g. `lora`)."""
    candidates = [Path(path), CONFIG_DIR / f"{path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    available = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"--config {path}: no such file. The study's rows are in train/configs: {available}.")


# --------------------------------------------------------------------------------------------- model
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


# ---------------------------------------------------------------------------------------------- data
class DrawnRows:
    """The training draw as a dataset: position i is row drawn[i], tagged with i for its augmentation seed."""

    def __init__(self, dataset, drawn: Sequence[int]):
        self.dataset, self.drawn = dataset, drawn

    def __len__(self) -> int:
        return len(self.drawn)

    def __getitem__(self, position: int) -> dict[str, Any]:
        return {**self.dataset[int(self.drawn[position])], "draw": position}


def label_coverage(dataset, tasks: Sequence[str]) -> dict[str, int]:
    import numpy as np

    return {
        task: int((np.asarray(dataset[task]) != -100).sum()) if task in dataset.column_names else 0 for task in tasks
    }


def training_draw(dataset, config: dict[str, Any]) -> list[int]:
    """Every row index the run will see, in order: task- and class-balanced, fixed by the seed."""
    from train.data import Balancing, balanced_sampler

    train = config["train"]
    total = train["max_steps"] * train["batch_size"] * train["grad_accum"]
    sampler = balanced_sampler(
        dataset, num_samples=total, seed=train["seed"], balancing=Balancing.from_config(config["data"])
    )
    return list(sampler)


def check_image_size(dataset, image_size: int) -> None:
    if not len(dataset):
        return
    shorter = min(dataset[0]["image"].size)
    if shorter != image_size:
        print(
            f"warning: the training images were prepared at {shorter} px (shorter side); the model takes "
            f"{image_size} px, so every image is resized on the fly. Prepare with --image-size {image_size} to "
            "save that work.",
            file=sys.stderr,
        )


# ------------------------------------------------------------------------------------------- schedule
def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# -------------------------------------------------------------------------------------------- the run
class Run:
    """One training run: accelerator, model, data, optimizer and the bookkeeping that a resume restores."""

    def __init__(self, config: dict[str, Any], resume: str | bool | None = None, overwrite: bool = False):
        self.config = config
        add_present_folders(config["data"], say=os.environ.get("RANK", "0") == "0")  # one note, not one per process
        self.out = Path(config["output_dir"])
        self.lock = claim_output_dir(self.out, resume, overwrite)
        self.resume_from = self._checkpoint_to_resume(resume)
        self.step = 0
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.evals_without_gain = 0
        self.history: list[dict[str, Any]] = []
        self.last_saved_step: int | None = None

    # ------------------------------------------------------------------------------------- setup
    def _checkpoint_to_resume(self, resume: str | bool | None) -> Path | None:
        """The newest intact checkpoint (or the one named); a damaged one is skipped, saying which and why."""
        if not resume:
            return None
        if resume is not True:
            path = Path(resume)
            if not (path / TRAINER_STATE).is_file():
                raise ConfigError(f"--resume {path}: not a checkpoint folder (it has no {TRAINER_STATE}).")
            try:
                checkpoint_state(path)
            except ValueError as error:
                raise ConfigError(f"--resume {path}: {error}; name an older checkpoint, or --resume alone.") from None
            return path
        for folder in reversed(checkpoints_in(self.out)):
            try:
                checkpoint_state(folder)
            except ValueError as error:
                print(f"note: skipping the checkpoint {folder}: {error}", file=sys.stderr)
                continue
            return folder
        raise ConfigError(f"--resume: no intact checkpoint in {self.out / 'checkpoints'} to continue from.")

    def setup(self, base_model=None) -> None:
        import torch
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState
        from accelerate.utils import DataLoaderConfiguration, set_seed

        from softbio_hf.pipeline_softbio import fast_bf16_available

        train = self.config["train"]
        cpu = train["device"] == "cpu" or (train["device"] == "auto" and not torch.cuda.is_available())
        if train["device"] == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device=cuda: this machine has no CUDA device; use cpu or auto.")
        device = torch.device("cpu" if cpu else "cuda")
        precision = train["mixed_precision"]
        if precision == "auto":
            precision = "bf16" if fast_bf16_available(device) else "no"
        if train["bf16_base"] and precision != "bf16":
            raise ConfigError("train.bf16_base needs train.mixed_precision=bf16 (the frozen weights run in bf16).")
        # One process may run several trainings (a notebook: lp, then lora). accelerate keeps its settings in a
        # process-wide singleton that refuses a second mixed-precision choice: each run starts from a clean one
        # (the distributed PartialState is kept).
        AcceleratorState._reset_state()
        GradientState._reset_state()
        self.accelerator = Accelerator(
            cpu=cpu,
            mixed_precision=precision,
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            log_with="tensorboard",
            project_dir=str(self.out / "logs"),
            dynamo_backend="inductor" if train["compile"] else "no",
        )
        if train["batch_size"] % self.accelerator.num_processes:
            raise ConfigError(
                f"train.batch_size={train['batch_size']} is the global batch and must divide among "
                f"{self.accelerator.num_processes} processes."
            )
        set_seed(train["seed"])
        self.model = build_model(self.config, base_model)
        self.tasks = list(self.model.config.tasks)
        self.main = self.accelerator.is_main_process

    def prepare_training(self) -> None:
        from torch.utils.data import DataLoader

        from softbio_hf import image_processor_for
        from train.data import SoftBioCollator, load_prepared

        config, train = self.config, self.config["train"]
        data = load_prepared_or_explain(load_prepared, config["data"]["train"], "train")
        coverage = label_coverage(data, self.tasks)
        self.untrained = [task for task, n in coverage.items() if n == 0]
        if self.untrained and self.main:  # a warning, not a crash: the other tasks still train
            print(
                f"warning: no training row is labelled for {self.untrained}; those heads stay untrained "
                "(reported in summary.json).",
                file=sys.stderr,
            )
        if len(self.untrained) == len(self.tasks):
            raise TrainingError(f"no row of data.train={config['data']['train']} is labelled for any task.")
        check_image_size(data, self.model.config.image_size)
        self.coverage = coverage
        collator = SoftBioCollator(
            image_processor_for(self.model.config), train=config["data"]["augment"], seed=train["seed"]
        )
        loader = DataLoader(
            DrawnRows(data, training_draw(data, config)),
            batch_size=train["batch_size"],
            shuffle=False,
            collate_fn=collator,
            num_workers=config["data"]["num_workers"],
        )
        self.loader = self.prepare_step(loader)
        self.eval_sets = self.open_eval_sets(config["data"]["eval"], config["data"]["eval_split"])

    def prepare_step(self, loader=None):
        """What one training step needs: frozen untrained tasks, the speed switches, AdamW on optimizer_groups
        with warmup + cosine, and accelerate's wrapping (also what bench/train.py times). Returns the loader."""
        import torch

        train = self.config["train"]
        freeze_tasks(self.model, getattr(self, "untrained", []))
        if train["gradient_checkpointing"]:
            self.model.activation_checkpointing_enable({"use_reentrant": False})
        if train["bf16_base"]:  # frozen weights in bf16: half the memory and no per-step cast under autocast
            for param in self.model.parameters():
                if not param.requires_grad:
                    param.data = param.data.to(torch.bfloat16)
        ratio = self.config["method"]["loraplus_ratio"] if self.config["method"]["name"] == "loraplus" else None
        groups = self.model.optimizer_groups(
            train["lr"], loraplus_ratio=ratio, weight_decay=train["weight_decay"], head_lr=train["head_lr"]
        )
        self.optimizer = torch.optim.AdamW(groups)
        warmup, total = train["warmup_steps"], train["max_steps"]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, warmup, total))
        if loader is None:
            self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
            return None
        self.model, self.optimizer, loader = self.accelerator.prepare(self.model, self.optimizer, loader)
        return loader

    def open_eval_sets(self, paths: Sequence[str], split: str) -> dict[str, Any]:
        """Validation sets by dataset name; a folder without the split (one prepared before RAF-DB got its
        validation split) is left out with a warning: a best checkpoint is never chosen on test data."""
        from train.evaluate import EvaluationError, open_splits

        sets = {}
        for path in paths:
            try:
                found = open_splits([path], split, self.config["eval"]["limit"])
            except EvaluationError as error:
                if self.main:
                    print(f"warning: not validated on {path}: {error}", file=sys.stderr)
                continue
            for name, data in found.items():
                sets[name if name not in sets else Path(path).name] = data
        return sets

    @property
    def core(self):
        # Without the torch.compile wrapper too: saved weights keep their names (no `_orig_mod.` prefix).
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    # ---------------------------------------------------------------------------------- state
    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "best_score": self.best_score,
            "best_step": self.best_step,
            "evals_without_gain": self.evals_without_gain,
            "history": self.history,
            "scheduler": self.scheduler.state_dict(),
            "config": self.config,
        }

    def save_checkpoint(self) -> Path:
        """
        accelerate's full state (model, optimizer, RNGs), ours, and the best weights so far, written into
        `step-N.partial` and renamed to `step-N` once complete: a kill mid-save leaves no checkpoint that --resume
        would take. The oldest beyond checkpoint.keep go.
        """
        folder = self.out / "checkpoints" / f"step-{self.step:07d}"
        partial = folder.with_name(folder.name + ".partial")
        with disk_full_is_said(partial):
            if self.main:
                shutil.rmtree(partial, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            self.accelerator.save_state(str(partial))
            if self.main:
                (partial / TRAINER_STATE).write_text(json.dumps(self.trainer_state(), indent=1))
                if (self.out / BEST_WEIGHTS).is_file():  # so --resume never meets best weights from a later step
                    shutil.copy2(self.out / BEST_WEIGHTS, partial / BEST_WEIGHTS)
                shutil.rmtree(folder, ignore_errors=True)
                partial.rename(folder)
                for old in checkpoints_in(self.out)[: -self.config["checkpoint"]["keep"]]:
                    shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.last_saved_step = self.step
        return folder

    def restore(self, folder: Path) -> None:
        state = checkpoint_state(folder)
        changed = [k for k in ("method", "model", "data", "loss") if state["config"].get(k) != self.config.get(k)]
        if changed:
            raise ConfigError(
                f"--resume {folder}: the config's {changed} differ from the checkpoint's; resume with the same "
                "config (train.max_steps, eval and checkpoint settings may change)."
            )
        self.accelerator.load_state(str(folder))
        if self.main:  # the best weights as they were at that step (none yet: none)
            if (folder / BEST_WEIGHTS).is_file():
                atomic_write_bytes(self.out / BEST_WEIGHTS, (folder / BEST_WEIGHTS).read_bytes())
            else:
                (self.out / BEST_WEIGHTS).unlink(missing_ok=True)
        self.step = state["step"]
        self.best_score, self.best_step = state["best_score"], state["best_step"]
        self.evals_without_gain = state["evals_without_gain"]
        self.history = state["history"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.last_saved_step = self.step

    # ----------------------------------------------------------------------------------- loop
    def train_step_or_explain(self, batches) -> dict[str, float]:
        """train_step; a batch that does not fit in memory stops the run with the settings that make it fit (the
        global batch is part of the recipe, so it is not silently changed)."""
        import torch

        try:
            return self.train_step(batches)
        except torch.OutOfMemoryError:
            train = self.config["train"]
            raise TrainingError(
                f"train.batch_size={train['batch_size']} does not fit in {self.accelerator.device} memory. Keep the "
                f"global batch with train.batch_size={max(1, train['batch_size'] // 2)} and "
                f"train.grad_accum={2 * train['grad_accum']}, or save memory with "
                "train.gradient_checkpointing=true or train.bf16_base=true."
            ) from None

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches; losses normalised over every process's rows."""
        import torch

        accelerator, accum = self.accelerator, self.config["train"]["grad_accum"]
        pending: dict[str, torch.Tensor] = {}  # logged values stay on the device: one transfer per step
        for micro, batch in enumerate(batches):
            targets = {task: batch[task] for task in self.tasks if task in batch}
            local = torch.stack([(targets[t] != -100).sum() for t in targets])
            counts = dict(zip(targets, accelerator.reduce(local, reduction="sum").tolist(), strict=True))
            sync = micro == accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(self.model), accelerator.autocast():
                logits = self.model(pixel_values=batch["pixel_values"]).logits
                loss, task_losses = self.core.compute_loss(
                    logits, targets, counts, scale=accelerator.num_processes, complete_graph=True
                )
                accelerator.backward(loss / accum)
            pending["loss"] = pending.get("loss", 0.0) + loss.detach().float() / accum
            for task, value in task_losses.items():
                name = f"loss/{task}"
                pending[name] = pending.get(name, 0.0) + value.detach().float() / accelerator.num_processes / accum
        if accelerator.sync_gradients:
            # The norm is needed anyway to clip; with clipping off (inf) it is only measured. Every process holds
            # the same reduced gradients, so all of them stop together.
            norm = accelerator.clip_grad_norm_(
                self.model.parameters(), self.config["train"]["max_grad_norm"] or math.inf
            )
            if not torch.isfinite(torch.as_tensor(norm)):
                self.refuse_non_finite_step(float(norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.core.loss_weights is not None:
            for task, log_var in self.core.loss_weights.log_vars.items():
                pending[f"task_weight/{task}"] = torch.exp(-log_var.detach().float())
        logged = dict(zip(pending, torch.stack(list(pending.values())).tolist(), strict=True))
        for group in self.optimizer.param_groups:
            logged[f"lr/{group['name']}"] = group["lr"]
        return logged

    def refuse_non_finite_step(self, norm: float) -> None:
        train = self.config["train"]
        last = checkpoints_in(self.out)
        resume = f" or --resume from {last[-1]} with changed settings" if last else ""
        raise TrainingError(
            f"the training loss is not finite at step {self.step + 1} (gradient norm {norm}): the run stopped before "
            f"that step changed any weight, and ships nothing. Lower train.lr (now {train['lr']}) or train.head_lr "
            f"(now {train['head_lr']}), keep train.max_grad_norm set, check the data; then start again{resume}."
        )

    def evaluate(self) -> float | None:
        from train.evaluate import evaluate_datasets

        if not self.eval_sets:
            return None
        batch = self.config["eval"]["batch_size"]
        batch += -batch % self.accelerator.num_processes  # split evenly between processes
        report = evaluate_datasets(
            self.model, self.eval_sets, batch_size=batch, num_workers=0, accelerator=self.accelerator
        )
        score = report["summary"]["overall"]
        entry = {
            "step": self.step,
            "overall": score,
            **{f"val/{k}": v for k, v in report["summary"].items() if isinstance(v, float)},
        }
        self.history.append(entry)
        self.accelerator.log({k: v for k, v in entry.items() if k != "step" and v is not None}, step=self.step)
        improved = score is not None and (self.best_score is None or score > self.best_score)
        if improved:
            self.best_score, self.best_step, self.evals_without_gain = score, self.step, 0
            self.save_best()
        else:
            self.evals_without_gain += 1
        if self.main:
            print_validation(self.step, report["summary"], improved, self.best_score)
        return score

    def save_best(self) -> None:
        from safetensors.torch import save

        if self.main:
            with disk_full_is_said(self.out / BEST_WEIGHTS):
                atomic_write_bytes(self.out / BEST_WEIGHTS, save(trainable_state(self.core)))
        self.accelerator.wait_for_everyone()

    def loop(self, on_step: Callable[[int], None] | None = None) -> None:
        from tqdm.auto import tqdm

        config = self.config
        train, every, keep_every = config["train"], config["eval"]["every"], config["checkpoint"]["every"]
        accum, patience = train["grad_accum"], config["eval"]["patience"]
        loader = self.accelerator.skip_first_batches(self.loader, self.step * accum) if self.step else self.loader
        batches = iter(loader)
        bar = tqdm(total=train["max_steps"], initial=self.step, desc="train", unit="step", disable=not self.main)
        started, seen = time.perf_counter(), 0
        try:
            while self.step < train["max_steps"]:
                logged = self.train_step_or_explain([next(batches) for _ in range(accum)])
                self.step += 1
                seen += train["batch_size"] * accum
                images_per_s = seen / (time.perf_counter() - started)
                self.accelerator.log({**logged, "images_per_s": images_per_s}, step=self.step)
                bar.update(1)
                bar.set_postfix(loss=f"{logged['loss']:.3f}", img_s=f"{images_per_s:.1f}")
                if self.main:
                    self.history.append(
                        {
                            "step": self.step,
                            **{k: v for k, v in logged.items() if "/" not in k or k.startswith("loss/")},
                        }
                    )
                if every and self.step % every == 0 and self.step < train["max_steps"]:
                    self.evaluate()
                    if patience and self.evals_without_gain >= patience:
                        print(f"early stop at step {self.step}: no gain in {patience} evaluations", file=sys.stderr)
                        break
                if keep_every and self.step % keep_every == 0:
                    self.save_checkpoint()
                if on_step is not None:
                    on_step(self.step)
        except KeyboardInterrupt:
            folder = self.save_checkpoint() if self.last_saved_step != self.step else checkpoints_in(self.out)[-1]
            raise Interrupted(folder, self.step) from None
        finally:
            bar.close()
        self.images_per_s = seen / max(1e-9, time.perf_counter() - started)
        if not self.eval_sets:
            self.save_best()  # nothing to select on: the final weights ship
        elif not self.history or self.history[-1].get("step") != self.step or "overall" not in self.history[-1]:
            self.evaluate()

    # ------------------------------------------------------------------------------------ end
    def finish(self) -> dict[str, Any]:
        """best/ with adapters merged, test results beside it, curves and a summary (main process)."""
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        if not self.main:
            return {}
        from safetensors.torch import load_file

        best = build_model(self.config)  # fresh fp32 weights: frozen ones exactly as the backbone's
        freeze_tasks(best, self.untrained)
        weights = load_file(str(self.out / BEST_WEIGHTS))
        missing = [n for n, p in best.named_parameters() if p.requires_grad and n not in weights]
        if missing:
            raise TrainingError(f"{BEST_WEIGHTS} lacks {missing[:3]}...; the run folder is incomplete.")
        best.load_state_dict(weights, strict=False)
        return self.ship(best)

    def ship(self, model) -> dict[str, Any]:
        parameters = model.parameter_report()  # before merging: the adapters count as trained
        model.merge_adapters()
        model.eval().save_pretrained(self.out / "best")
        summary = {
            "method": self.config["method"]["name"],
            "steps": self.step,
            "best_step": self.best_step,
            "best_validation_overall": self.best_score,
            "label_coverage": getattr(self, "coverage", None),
            "untrained_heads": getattr(self, "untrained", []),
            "images_per_s": round(getattr(self, "images_per_s", 0.0), 2),
            "processes": self.accelerator.num_processes,
            "validation": [h for h in self.history if "overall" in h],
            "parameters": parameters,
            "best": str(self.out / "best"),
        }
        summary["test"] = self.test(model)
        if self.history:
            summary["curves"] = plot_curves(self.history, self.out / "training_curves.png")
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def test(self, model) -> dict[str, Any] | None:
        """Test results of the shipped model through train.evaluate, for the datasets that have the split."""
        from train.evaluate import EvaluationError, open_split, predict, write_evaluation

        data = self.config["data"]
        splits = {}
        for path in data["eval"] or data["train"]:
            try:
                split = open_split(path, data["test_split"])
            except EvaluationError:
                print(f"note: {path} has no {data['test_split']!r} split; not in the test results", file=sys.stderr)
                continue
            splits[split.unique("dataset")[0] if len(split) else Path(path).name] = split
        if not splits:
            return None
        out = self.out / "eval"
        out.mkdir(parents=True, exist_ok=True)
        model.to(self.accelerator.device)
        batch = self.config["eval"]["batch_size"]
        predictions = {
            name: predict(model, split, batch_size=batch, desc=f"test {name}") for name, split in splits.items()
        }
        report = {"model": str(self.out / "best"), "name": self.out.name, "split": data["test_split"]}
        report = write_evaluation(out, report, predictions, model.config)
        return report["summary"]


def print_validation(step: int, summary: dict[str, Any], improved: bool, best: float | None) -> None:
    """One console line per validation (above the progress bar): the study's columns and whether it is the best."""
    from tqdm.auto import tqdm

    columns = ", ".join(f"{task} {summary[task]:.2f}" for task in ("emotion", "age", "gender") if summary.get(task))
    overall = "n/a" if summary.get("overall") is None else f"{summary['overall']:.2f}"
    verdict = "new best" if improved else f"best {best:.2f}" if best is not None else ""
    tqdm.write(f"step {step}: validation overall {overall} ({columns}); {verdict}".rstrip("; "))


class Interrupted(Exception):
    def __init__(self, folder: Path, step: int):
        super().__init__(f"interrupted at step {step}")
        self.folder, self.step = folder, step


def claim_output_dir(out: Path, resume, overwrite: bool):
    """
    The run's output folder, held for the whole run (softbio_hf.safe_files.lock_exclusively: never left stuck by a
    killed run). A folder holding another run is refused without --resume or --overwrite;
    --overwrite empties it. Processes other than the first of a launcher share their first process's claim.
    """
    from softbio_hf.safe_files import LockUnsupported, lock_exclusively

    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file; give a folder (--set output_dir=...).")
    if os.environ.get("RANK", "0") != "0":
        return None
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = lock_exclusively(out / ".lock")
    except LockUnsupported as error:
        raise ConfigError(f"output_dir {out}: {error.strerror}.") from None
    except OSError as error:
        raise ConfigError(f"output_dir {out} cannot be written ({error.strerror}); choose a writable folder.") from None
    if lock is None:
        raise ConfigError(
            f"output_dir {out} is in use by another training run; wait for it to end, or choose another output_dir."
        )
    held = sorted(p.name for p in out.iterdir() if p.name != ".lock")
    if held and not resume:
        if not overwrite:
            lock.close()
            raise ConfigError(
                f"output_dir {out} already holds a run ({', '.join(held[:5])}). Continue it with --resume, replace "
                "it with --overwrite, or choose another folder with --set output_dir=..."
            )
        for name in held:
            path = out / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return lock


def check_training_data(config: dict[str, Any]) -> None:
    """Every data.train folder is a prepared dataset with a non-empty train split, an image column and valid
    labels: said before the model is built (the model takes minutes to load)."""
    from train.data import load_prepared

    if config["method"]["name"] == "zs":
        return
    for folder in config["data"]["train"]:
        if not Path(folder).is_dir():
            raise TrainingError(
                f"data.train: {folder} is not there. Prepare it first: python -m train.data prepare --dataset NAME "
                f"--root DATASET_FOLDER --out {folder}"
            )
        try:
            part = load_prepared([folder], "train")
        except (FileNotFoundError, ValueError) as error:
            raise TrainingError(f"data.train: {error}") from None
        if not len(part):
            raise TrainingError(f"data.train: {folder} has an empty train split; prepare it again or leave it out.")
        if "image" not in part.column_names or not set(TASKS) & set(part.column_names):
            raise TrainingError(
                f"data.train: {folder} has columns {part.column_names}; training needs 'image' and at least one of "
                f"{list(TASKS)}. Prepare it with python -m train.data prepare."
            )


def check_hub_target(repo_id: str | None) -> None:
    """--push-to-hub is checked before training: the repo id by huggingface_hub's rule, and a token to push."""
    if not repo_id:
        return
    from huggingface_hub import get_token

    from train.hub import check_repo_id

    check_repo_id(repo_id, "--push-to-hub")
    if not get_token():
        raise ConfigError(
            "--push-to-hub needs a Hugging Face token and none is set: run `hf auth login` or set HF_TOKEN, then "
            "start again. Nothing was trained."
        )


def checkpoints_in(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.partial` folder is a save that did not finish)."""
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if not p.name.endswith(".partial") and (p / TRAINER_STATE).is_file())


def checkpoint_state(folder: Path) -> dict[str, Any]:
    """A checkpoint's trainer state, once its files have been checked: a ValueError says what is broken."""
    from safetensors import safe_open

    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"its {TRAINER_STATE} cannot be read ({error})") from None
    for weights in folder.glob("*.safetensors"):
        try:
            with safe_open(str(weights), "pt") as opened:
                for name in opened.keys():  # noqa: SIM118 (safe_open is not iterable): every tensor must be there
                    opened.get_slice(name)
        except Exception as error:  # safetensors raises its own error types for a torn file
            raise ValueError(f"{weights.name} is damaged ({error})") from None
    return state


@contextlib.contextmanager
def disk_full_is_said(path: Path):
    """A save that runs out of space (torch's serializer says 'enforce fail at inline_container') is said so."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        text = str(error)
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text or "inline_container" in text:
            raise TrainingError(f"disk full at {path}: free some space and continue with --resume.") from None
        raise


def load_prepared_or_explain(load_prepared, paths: Sequence[str], split: str):
    try:
        return load_prepared(paths, split)
    except (FileNotFoundError, ValueError) as error:
        raise TrainingError(f"data.train: {error}") from error


def plot_curves(history: list[dict[str, Any]], path: Path) -> str:
    """Training loss per task and the validation overall score against the step, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [h for h in history if "loss" in h]
    for key in ["loss", *sorted({k for h in steps for k in h if k.startswith("loss/")})]:
        points = [(h["step"], h[key]) for h in steps if key in h]
        left.plot(*zip(*points, strict=True), label=key.replace("loss/", ""), linewidth=1)
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    left.legend(fontsize=7)
    evals = [(h["step"], h["overall"]) for h in history if h.get("overall") is not None]
    if evals:
        right.plot(*zip(*evals, strict=True), marker="o")
    right.set_xlabel("step")
    right.set_ylabel("validation overall accuracy %")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def run_training(
    config: dict[str, Any],
    resume: str | bool | None = None,
    on_step: Callable[[int], None] | None = None,
    push_to_hub: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """The whole run; `on_step(step)` is called after every optimizer step (progress hooks, tests); with
    `push_to_hub`, best/ and its test results go to that Hub repo at the end (train.hub's push)."""
    check_hub_target(push_to_hub)
    summary = train_and_ship(config, resume, on_step, overwrite)
    if push_to_hub and summary:
        from train.hub import HubError, push_model

        out = Path(config["output_dir"])
        results = out / "eval" / "results.json"
        try:
            summary["pushed"] = push_model(out / "best", push_to_hub, results=results if results.is_file() else None)
        except HubError as error:
            retry = f"python -m train.hub push --model {out / 'best'} --repo-id {push_to_hub}"
            retry += f" --results {results}" if results.is_file() else ""
            raise HubError(f"{error}\nThe run is trained and saved in {out}; push it again with: {retry}") from None
        print(summary["pushed"])
    return summary


def train_and_ship(config: dict[str, Any], resume, on_step, overwrite: bool = False) -> dict[str, Any]:
    run = Run(config, resume, overwrite)
    try:
        check_training_data(config)
        return train_in(run, config, on_step)
    finally:
        if run.lock is not None:
            run.lock.close()  # the claim on output_dir ends with the run (also when it fails)


def train_in(run: Run, config: dict[str, Any], on_step) -> dict[str, Any]:
    import torch

    run.setup()
    if run.main:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        print(yaml.safe_dump(config, sort_keys=False))
        print(format_parameter_report(run.model))
    if config["method"]["name"] == "zs":  # evaluation only: the zero-shot model is the result
        return run.ship(run.model) if run.main else {}
    run.prepare_training()
    run.accelerator.init_trackers("softbio", config=tracker_config(config))
    if run.resume_from is not None:
        run.restore(run.resume_from)
        if run.main:
            print(f"resuming from {run.resume_from} at step {run.step}", file=sys.stderr)
    try:
        run.loop(on_step)
    except torch.OutOfMemoryError as error:
        raise TrainingError(
            f"out of memory at train.batch_size={config['train']['batch_size']}: use a smaller batch with "
            "train.grad_accum to keep the global batch (e.g. --set train.batch_size=32 train.grad_accum=2), or "
            "--set train.gradient_checkpointing=true."
        ) from error
    return run.finish()


def tracker_config(config: dict[str, Any]) -> dict[str, Any]:
    """TensorBoard's hparams take scalars and strings only."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(config).items()}


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.train",
        description="Train one row of the study from a YAML config (train/configs: zs, lp, ft4, lora, dora, "
        "loraplus, mtlora). The same command runs under `torchrun --nproc_per_node N -m train.train` or "
        "`accelerate launch -m train.train` on several devices; train.batch_size is the global batch.",
    )
    parser.add_argument("--config", required=True, help="a YAML file, or a name in train/configs (e.g. lora)")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, values in YAML: train.max_steps=2000 'data.train=[data/utkface]' "
        "model.backbone=PATH output_dir=runs/x",
    )
    parser.add_argument(
        "--push-to-hub",
        default=None,
        metavar="REPO_ID",
        help="at the end, upload best/ with its model card and test results (python -m train.hub push)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what output_dir holds (without it, a folder holding another run is refused)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue the latest checkpoint in output_dir, or the given checkpoint folder",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    from train.hub import HubError

    args = build_parser().parse_args(argv)
    try:
        if args.resume and args.overwrite:
            raise ConfigError("--resume continues output_dir's run and --overwrite replaces it: choose one.")
        config = load_config(args.config, args.overrides)
        summary = run_training(config, args.resume, push_to_hub=args.push_to_hub, overwrite=args.overwrite)
    except (ConfigError, TrainingError, HubError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Interrupted as stop:
        print(
            f"interrupted at step {stop.step}; checkpoint in {stop.folder}. Continue with the same command and "
            "--resume.",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if summary:
        print(
            json.dumps(
                {k: summary[k] for k in ("method", "steps", "best_step", "test", "best") if k in summary}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
