"""One training run (class Run): accelerator, model, data, optimizer; the step, validation, checkpoints and
their restore, and shipping best/ with its test results. `python -m train.train` drives it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from softbio_hf.safe_files import atomic_write_bytes, atomic_write_text, folder_written_whole, replace_folder
from train.build import build_model, freeze_tasks, trainable_state
from train.checkpoints import (
    BEST_WEIGHTS,
    TRAINER_STATE,
    Interrupted,
    checkpoint_state,
    checkpoints_in,
    claim_output_dir,
    disk_full_is_said,
)
from train.config import add_present_folders
from train.errors import ConfigError, EvaluationError, TrainingError
from train.report import plot_curves
from train.sampling import DrawnRows, label_coverage, training_draw


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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


def load_prepared_or_explain(load_prepared, paths: Sequence[str], split: str):
    try:
        return load_prepared(paths, split)
    except (FileNotFoundError, ValueError) as error:
        raise TrainingError(f"data.train: {error}") from error


class StopRequests:
    """
    SIGTERM (what Slurm, Kubernetes and preemptible machines send) and Ctrl-C ask the run to stop after the
    current step, which then writes a checkpoint that --resume continues: a step is never cut in half. A second
    signal stops at once (KeyboardInterrupt). Installed only in the main thread, where Python runs handlers.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self.handle) for number in self.SIGNALS}
        return self

    def handle(self, number: int, _frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(number).name
        print(
            f"\n{self.received}: stopping after this step with a checkpoint (send it again to stop at once).",
            file=sys.stderr,
        )

    def __exit__(self, *_exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


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
            train["lr"],
            loraplus_ratio=ratio,
            weight_decay=train["weight_decay"],
            head_lr=train["head_lr"],
            loss_weight_lr=train["loss_weight_lr"],
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
        from train.evaluate import open_splits

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
                partial.mkdir(parents=True)
            self.accelerator.wait_for_everyone()
            self.accelerator.save_state(str(partial))
            # Every process writes its own files (RNG states) into the folder: none may still be writing when the
            # first renames it (two processes crashed here, 2 runs in 7, before this barrier).
            self.accelerator.wait_for_everyone()
            if self.main:
                atomic_write_text(partial / TRAINER_STATE, json.dumps(self.trainer_state(), indent=1))
                if (self.out / BEST_WEIGHTS).is_file():  # so --resume never meets best weights from a later step
                    shutil.copy2(self.out / BEST_WEIGHTS, partial / BEST_WEIGHTS)
                replace_folder(partial, folder)  # an older step-N is moved aside and removed once this is in
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
        with StopRequests() as stops:
            self._loop(on_step, stops)

    def stop_agreed(self, stops: StopRequests) -> bool:
        """Whether any process was asked to stop: all of them stop at the same step, or the checkpoint's
        collective save would wait forever for the ones that went on."""
        if self.accelerator.num_processes == 1:
            return stops.received is not None
        import torch

        flag = torch.tensor([0.0 if stops.received is None else 1.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def checkpoint_for_stop(self) -> Path | None:
        """The checkpoint a stopped run continues from: this step's, written now unless it was just written."""
        if self.last_saved_step != self.step:
            return self.save_checkpoint()
        return (checkpoints_in(self.out) or [None])[-1]

    def _loop(self, on_step: Callable[[int], None] | None, stops: StopRequests) -> None:
        from tqdm.auto import tqdm

        config = self.config
        train, every, keep_every = config["train"], config["eval"]["every"], config["checkpoint"]["every"]
        accum, patience = train["grad_accum"], config["eval"]["patience"]
        loader = self.accelerator.skip_first_batches(self.loader, self.step * accum) if self.step else self.loader
        batches = iter(loader)
        bar = tqdm(total=train["max_steps"], initial=self.step, desc="train", unit="step", disable=not self.main)
        started, seen = time.perf_counter(), 0
        stepping = False
        try:
            while self.step < train["max_steps"]:
                stepping = True
                logged = self.train_step_or_explain([next(batches) for _ in range(accum)])
                self.step += 1
                stepping = False
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
                if self.stop_agreed(stops):
                    raise Interrupted(self.checkpoint_for_stop(), self.step, stops.received)
        except KeyboardInterrupt:
            # A second signal, or one outside the handler: a step cut in half is never saved as if whole, and under
            # a launcher the other processes may not be here to save with this one (a collective save would hang).
            alone = self.accelerator.num_processes == 1
            folder = self.checkpoint_for_stop() if alone and not stepping else (checkpoints_in(self.out) or [None])[-1]
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
        with disk_full_is_said(self.out / "best"), folder_written_whole(self.out / "best") as staging:
            model.eval().save_pretrained(staging)
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
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        return summary

    def test(self, model) -> dict[str, Any] | None:
        """Test results of the shipped model through train.evaluate, for the datasets that have the split."""
        from train.evaluate import open_split, predict, write_evaluation

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
