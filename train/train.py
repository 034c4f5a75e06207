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
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from softbio_hf.safe_files import atomic_write_text, release
from train.build import format_parameter_report
from train.checkpoints import Interrupted
from train.config import load_config, tracker_config
from train.errors import (
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    ConfigError,
    MissingExtra,
    TrainingError,
    require_train_extra,
)
from train.loop import Run
from train.schema import TASKS

# ---------------------------------------------------------------------------------------------- config


# --------------------------------------------------------------------------------------------- model


# ---------------------------------------------------------------------------------------------- data


# ------------------------------------------------------------------------------------------- schedule


# -------------------------------------------------------------------------------------------- the run


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
        release(run.lock)  # the claim on output_dir ends with the run (also when it fails); no .lock is left


def train_in(run: Run, config: dict[str, Any], on_step) -> dict[str, Any]:
    import torch

    run.setup()
    if run.main:
        run.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
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


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.train",
        description="Train one row of the study from a YAML config (train/configs: zs, lp, ft4, lora, dora, "
        "loraplus, mtlora). The same command runs under `torchrun --nproc_per_node N -m train.train` or "
        "`accelerate launch -m train.train` on several devices; train.batch_size is the global batch.",
    )
    from softbio_hf.version import add_version_argument  # stdlib only: --version needs no torch

    add_version_argument(parser)
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
        require_train_extra("python -m train.train", "datasets", "accelerate", "matplotlib", "tensorboard")
        if config["method"]["name"] in ("lora", "dora", "loraplus", "mtlora"):
            require_train_extra(f"method {config['method']['name']}", "peft")
        summary = run_training(config, args.resume, push_to_hub=args.push_to_hub, overwrite=args.overwrite)
    except (ConfigError, TrainingError, HubError, MissingExtra) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Interrupted as stop:
        where = f"checkpoint in {stop.folder}" if stop.folder else "no checkpoint was written yet"
        print(
            f"{stop.signal_name or 'interrupted'}: stopped at step {stop.step}; {where}. Continue with the same "
            "command and --resume.",
            file=sys.stderr,
        )
        return stop.exit_code
    except KeyboardInterrupt:  # before the training loop began (loading data or the model): nothing to keep
        print("interrupted before training began; nothing was trained. Start the command again.", file=sys.stderr)
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
