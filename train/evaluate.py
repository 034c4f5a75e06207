"""Evaluate softbio models on prepared benchmarks: the study's tables, per-group fairness and calibration.

    python -m train.evaluate --model runs/lora/best --data data/utkface data/fairface data/rafdb --out runs/lora/eval
    python -m train.evaluate --model clip:openai/clip-vit-large-patch14-336 --data data/rafdb   # the ZS row
    python -m train.evaluate --model runs/lora/best --backend openvino --data data/rafdb   # its export, as served
    python -m train.evaluate compare runs/zs/eval/results.json runs/lora/eval/results.json --baseline zs

Running the model is here; the maths is train.metrics and the tables and plots train.report, which training's
validation (`evaluate_datasets`) and the model card share. Accuracies, F1 and ECE are in percent.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from softbio_hf.conformal import SCORES
from softbio_hf.safe_files import atomic_write_text, folder_written_whole
from train.errors import EvaluationError, MissingExtra, require_train_extra
from train.metrics import Predictions, build_results, fit_temperatures
from train.report import compare, strict_json, summary_table, write_outcomes, write_plots, write_report
from train.schema import task_labels
from train.uncertainty import (
    add_intervals,
    conformal_report,
    fit_conformal,
    row_outcomes,
    too_small,
    too_small_message,
)

PREPARE_HINT = "python -m train.data prepare --dataset NAME --root DATASET_FOLDER --out {path}"


# ------------------------------------------------------------------------------------------- metrics


# ---------------------------------------------------------------------------------------- predictions


def evaluated_tasks(config) -> list[str]:
    """The model's tasks that the unified schema labels; refuses a model whose label order differs from it."""
    schema = task_labels()
    problems = [
        f"{task!r}: the model's labels are {labels}, the data's are {list(schema[task])}"
        for task, labels in config.tasks.items()
        if task in schema and list(labels) != list(schema[task])
    ]
    if problems:
        raise EvaluationError(
            "The model's label lists differ from the prepared data's (same names in the same order are needed): "
            + "; ".join(problems)
            + ". Evaluate a model trained on the canonical labels, or re-map its heads first."
        )
    return [task for task in config.tasks if task in schema]


def predict(
    model,
    dataset,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    accelerator=None,
    desc: str = "evaluate",
) -> Predictions:
    """
    Logits of every row of `dataset` (one split in the unified schema). Under an `accelerate.Accelerator` the
    rows are shared between processes and collected with `gather_for_metrics` (none twice, none lost); every
    process gets the full predictions.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from softbio_hf import image_processor_for
    from train.data import SoftBioCollator

    core = accelerator.unwrap_model(model) if accelerator is not None else model
    tasks = evaluated_tasks(core.config)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=SoftBioCollator(image_processor_for(core.config)),
        num_workers=num_workers,
        persistent_workers=False,
    )
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader, device_placement=True)
    device, dtype = core.device, core.dtype
    logits: dict[str, list[np.ndarray]] = {task: [] for task in tasks}
    labels: dict[str, list[np.ndarray]] = {task: [] for task in tasks}
    was_training = model.training
    model.eval()
    main = accelerator is None or accelerator.is_main_process
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        for batch in tqdm(loader, desc=desc, unit="batch", disable=not main, leave=False):
            pixel_values = batch["pixel_values"].to(device=device, dtype=dtype)
            out = {task: value.float() for task, value in model(pixel_values=pixel_values).logits.items()}
            batch_labels = {task: batch[task].to(device) for task in tasks}
            if accelerator is not None:
                out, batch_labels = accelerator.gather_for_metrics((out, batch_labels))
            for task in tasks:
                logits[task].append(out[task].cpu().numpy())
                labels[task].append(batch_labels[task].cpu().numpy())
    model.train(was_training)
    gathered = sum(len(chunk) for chunk in next(iter(labels.values()), []))
    if tasks and gathered != len(dataset):  # gather_for_metrics must drop the padding of the last batch
        raise RuntimeError(f"{desc}: gathered {gathered} predictions for {len(dataset)} rows.")
    width = {task: len(core.config.tasks[task]) for task in tasks}
    for task, chunks in logits.items():
        broken = sum(int((~np.isfinite(chunk)).any(axis=1).sum()) for chunk in chunks)
        if broken:  # argmax would score them as class 0: a diverged model would get a number
            raise EvaluationError(
                f"{desc}: the model gives non-finite {task} logits for {broken} of {len(dataset)} rows; its weights "
                "are broken (a diverged training run?). Evaluate another checkpoint, or train again with a lower "
                "learning rate."
            )
    years = np.array([np.nan if y is None else y for y in dataset["age_years"]], dtype=np.float64)
    return Predictions(
        logits={t: np.concatenate(v) if v else np.zeros((0, width[t]), np.float32) for t, v in logits.items()},
        labels={t: np.concatenate(v) if v else np.zeros(0, np.int64) for t, v in labels.items()},
        age_years=years,
        race=list(dataset["race"]),
    )


class ExportedForEvaluation:
    """
    An export (python -m softbio_hf.export, any precision) where predict() takes a torch model: the same loader,
    rows and tables, the forward pass in its runtime (ONNX Runtime or OpenVINO), so what int8 or bf16 costs in
    accuracy is seen before it serves. `exact` keeps OpenVINO in fp32 (its default is bf16 where the CPU has it).
    """

    training = False

    def __init__(self, spec: str, backend: str, exact: bool):
        import torch

        from softbio_hf import SoftBioConfig
        from softbio_hf.runtimes import ExportedModel, exported_folder

        try:
            self.runtime = ExportedModel(backend, exported_folder(spec, backend), exact=exact)
            self.config = SoftBioConfig.from_pretrained(self.runtime.folder)
        except (OSError, ValueError, ImportError) as error:
            raise EvaluationError(f"--model {spec} --backend {backend}: {error}") from None
        if self.runtime.tasks != list(self.config.tasks):
            raise EvaluationError(
                f"--model {spec}: the {backend} export's tasks {self.runtime.tasks} are not its config's "
                f"{list(self.config.tasks)}; export it again (python -m softbio_hf.export)."
            )
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.precision = self.runtime.manifest.get("precision", "fp32")

    def __call__(self, pixel_values):
        import torch

        from softbio_hf.modeling_softbio import SoftBioOutput

        logits = self.runtime(pixel_values.numpy())
        return SoftBioOutput(logits={task: torch.from_numpy(value) for task, value in logits.items()})

    def eval(self) -> ExportedForEvaluation:
        return self

    def train(self, mode: bool = True) -> ExportedForEvaluation:
        return self


# ------------------------------------------------------------------------------------------- results


def evaluate_datasets(
    model, datasets: Mapping[str, Any], *, batch_size: int = 64, num_workers: int = 0, accelerator=None
) -> dict[str, Any]:
    """What training calls on its validation sets: model + {name: split} -> the same dictionary as results.json."""
    predictions = {
        name: predict(
            model, data, batch_size=batch_size, num_workers=num_workers, accelerator=accelerator, desc=f"eval {name}"
        )
        for name, data in datasets.items()
    }
    core = accelerator.unwrap_model(model) if accelerator is not None else model
    return build_results(predictions, core.config)


# ------------------------------------------------------------------------------------------ calibration


def apply_temperatures(model, temperatures: Mapping[str, float], fitted_on: str) -> None:
    """
    Fold T into each head's last linear layer (weights and bias / T): the logits become logits / T, so the
    saved model's probabilities are calibrated with no change at inference time. Recorded in the config.
    """
    import torch

    previous = (model.config.calibration or {}).get("temperatures", {})
    with torch.no_grad():
        for task, temperature in temperatures.items():
            classifier = model.heads[task].classifier
            classifier.weight.div_(temperature)
            classifier.bias.div_(temperature)
    combined = {t: previous.get(t, 1.0) * temperatures.get(t, 1.0) for t in sorted(set(previous) | set(temperatures))}
    model.config.calibration = {"temperatures": combined, "fitted_on": fitted_on}


# ------------------------------------------------------------------------------------- loading inputs
def open_split(path: str | Path, split: str, limit: int | None = None):
    """One split of a folder written by `python -m train.data prepare`, with errors that say what to do."""
    from datasets import DatasetDict, load_from_disk

    path = Path(path)
    hint = PREPARE_HINT.format(path=path)
    if not path.is_dir():
        raise EvaluationError(f"--data {path}: no such folder. Make one with: {hint}")
    try:
        loaded = load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as error:
        contents = sorted(p.name for p in path.iterdir())[:10]
        raise EvaluationError(
            f"--data {path} is not a prepared dataset (it holds {contents or 'nothing'}; {error}). "
            f"Make one with: {hint}"
        ) from error
    if not isinstance(loaded, DatasetDict):
        raise EvaluationError(f"--data {path} holds a single dataset, not the splits prepare writes. Re-run: {hint}")
    if split not in loaded:
        raise EvaluationError(
            f"--data {path} has no {split!r} split; it has {sorted(loaded)}. Choose one with --split, or re-run: {hint}"
        )
    data = loaded[split]
    missing = {"image", "age", "gender", "emotion", "age_years", "race", "dataset"} - set(data.column_names)
    if missing:
        raise EvaluationError(
            f"--data {path} lacks the columns {sorted(missing)} of the unified schema; re-run: {hint}"
        )
    from train.data import check_labels

    try:
        check_labels(data, str(path))
    except ValueError as error:
        raise EvaluationError(f"--data {error}") from None
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    return data


def dataset_name(data, path: Path, taken: set[str]) -> str:
    names = data.unique("dataset") if len(data) else []
    name = names[0] if len(names) == 1 else path.name
    return path.name if name in taken else name


def load_model(spec: str, *, device: str, dtype):
    """A softbio checkpoint (folder or Hub id), or `clip:ID_OR_FOLDER`: the zero-shot model built by from_clip."""
    from softbio_hf.batch_rows import load_model as load_named_model  # the one reading of --model

    try:
        model = load_named_model(spec)
    except ValueError as error:
        raise EvaluationError(str(error)) from error
    return model.to(device=device, dtype=dtype).eval()


def resolve_device(name: str | None) -> str:
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise EvaluationError("--device cuda: this machine has no CUDA device; use --device cpu.")
    if name not in ("cpu", "cuda"):
        raise EvaluationError(f"--device {name!r}: use cpu or cuda.")
    return name


# ------------------------------------------------------------------------------------------- writing


# ------------------------------------------------------------------------------------------------ CLI
def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from softbio_hf.pipeline_softbio import resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, torch.device(device))
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise EvaluationError(f"--dtype {args.dtype}: use auto, float32 or bfloat16.")
    out = writable_out(Path(args.out), args.overwrite)  # before any inference: a wrong --out is said at once
    splits = open_splits(args.data, args.split, args.limit)  # every folder is checked before the model loads
    fitting = args.calibrate or args.conformal is not None
    calibration_splits = open_calibration_splits(args, splits) if fitting else {}
    options = {"batch_size": args.batch_size, "num_workers": args.num_workers}
    if args.backend == "torch":
        model = load_model(args.model, device=device, dtype=dtype)
    else:
        model = ExportedForEvaluation(args.model, args.backend, exact=dtype == torch.float32)
        # no DataLoader worker is forked after a runtime has loaded (such forks were seen to crash)
        options["num_workers"] = 0
    evaluated_tasks(model.config)
    predictions = {name: predict(model, data, desc=name, **options) for name, data in splits.items()}
    fit_on = {
        name: predict(model, data, desc=f"{name} ({args.calibration_split})", **options)
        for name, data in calibration_splits.items()
    }
    temperatures = fit_temperatures(fit_on) if args.calibrate else None
    conformal = None
    if args.conformal is not None:  # on the probabilities the saved model gives: after its temperatures
        conformal = fit_conformal(
            scaled(fit_on, temperatures),
            args.conformal,
            args.conformal_score,
            args.class_conditional,
            args.calibration_split,
        )
    report = {"model": args.model, "name": args.name or model_name(args.model), "split": args.split}
    unfit = too_small(scaled(fit_on, temperatures), model.config, conformal) if conformal else []
    if unfit:  # said, and never saved as if fitted: the saved thresholds carry the same record
        conformal = {**conformal, "too_small": unfit}
        print(f"warning: --conformal {args.conformal}: {too_small_message(unfit, conformal)}", file=sys.stderr)
        print(f"warning: {SAVED_UNFIT}", file=sys.stderr)
    if args.backend != "torch":  # which runtime and precision gave these numbers
        report["backend"] = {"name": args.backend, "precision": model.precision, "exact": dtype == torch.float32}
    if temperatures or conformal:
        calibrated = load_model(args.model, device="cpu", dtype=torch.float32)  # full precision, not the eval dtype
        if temperatures:
            apply_temperatures(calibrated, temperatures, fitted_on=args.calibration_split)
        if conformal:
            calibrated.config.calibration = {**(calibrated.config.calibration or {}), "conformal": conformal}
        with folder_written_whole(out / "calibrated") as staging:
            calibrated.save_pretrained(staging)
        report["calibrated_model"] = str(out / "calibrated")
    uncertainty = {"conformal": conformal, "unfit": unfit, "bootstrap": args.bootstrap, "seed": args.seed}
    return write_evaluation(out, report, predictions, model.config, temperatures, **uncertainty)


def open_calibration_splits(args: argparse.Namespace, splits: Mapping[str, Any]) -> dict[str, Any]:
    """--calibration-split of each --data folder that has one (temperatures and conformal thresholds fit on it)."""
    found = {}
    for path, name in zip(args.data, splits, strict=True):
        try:
            found[name] = open_split(path, args.calibration_split, args.limit)
        except EvaluationError:
            print(f"note: {name} has no {args.calibration_split!r} split; not used for fitting", file=sys.stderr)
    if not found:
        option = "--calibrate" if args.calibrate else "--conformal"
        raise EvaluationError(f"{option}: none of the datasets has a {args.calibration_split!r} split to fit on.")
    return found


def scaled(predictions: Mapping[str, Predictions], temperatures: Mapping[str, float] | None):
    """The predictions with each task's logits divided by its temperature (what the calibrated model outputs)."""
    if not temperatures:
        return predictions
    return {
        name: Predictions(
            logits={t: v / temperatures.get(t, 1.0) for t, v in p.logits.items()},
            labels=p.labels,
            age_years=p.age_years,
            race=p.race,
            notes=p.notes,
        )
        for name, p in predictions.items()
    }


def writable_out(out: Path, overwrite: bool = False) -> Path:
    """--out checked before any work: a folder we can write, holding no earlier evaluation unless --overwrite."""
    if out.exists() and not out.is_dir():
        raise EvaluationError(f"--out {out} is a file; give a folder for results.json, report.md and the plots.")
    if (out / "results.json").exists() and not overwrite:
        raise EvaluationError(
            f"--out {out} holds an earlier evaluation (results.json); replace it with --overwrite, or choose "
            "another --out."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise EvaluationError(f"--out {out} cannot be written ({error.strerror}); choose a writable folder.") from None
    return out


def open_splits(paths: Sequence[str | Path], split: str, limit: int | None = None) -> dict[str, Any]:
    """Dataset name -> that split of each prepared folder (names made unique by the folder's name)."""
    splits: dict[str, Any] = {}
    for path in paths:
        data = open_split(path, split, limit)
        splits[dataset_name(data, Path(path), set(splits))] = data
    return splits


def write_evaluation(
    out: Path,
    report: dict[str, Any],
    predictions,
    config,
    temperatures=None,
    *,
    conformal: Mapping[str, Any] | None = None,
    unfit: Sequence[Mapping[str, Any]] = (),
    bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """
    results.json, report.md and the plots for `predictions`; `report` holds model, name and split. With
    `conformal` (thresholds from fit_conformal) the sets' coverage on these rows; with `bootstrap` replicates,
    intervals beside every accuracy, and rows.npz (each row right or wrong) for compare's paired test.
    """
    report["tasks"] = {task: list(labels) for task, labels in config.tasks.items()}  # what the scores refer to
    report.update(build_results(predictions, config, temperatures))
    if conformal:
        report["conformal"] = conformal_report(scaled(predictions, temperatures), config, conformal)
        if unfit:  # thresholds left null by a split too small for the level
            report["conformal"]["too_small"] = list(unfit)
            report["conformal"]["too_small_message"] = f"{too_small_message(unfit, conformal)} {SAVED_UNFIT}"
    if bootstrap:
        add_intervals(report, predictions, config, bootstrap, seed)
        write_outcomes(out, row_outcomes(predictions))
    report["plots"] = write_plots(out, predictions, config, temperatures)
    atomic_write_text(out / "results.json", strict_json(report))
    write_report(out, report, report["plots"])
    return report


SAVED_UNFIT = (
    "The calibrated model keeps them marked as such (calibration.conformal.too_small in its config.json), never as "
    "fitted: fit again on a larger --calibration-split before relying on its sets."
)
MAX_BOOTSTRAP = 10_000  # replicates: more only add time (hours at 10 million), not precision that matters


def model_name(spec: str) -> str:
    path = Path(spec.removeprefix("clip:"))
    name = path.parent.name if path.name == "best" else path.name
    return ("zs-" if spec.startswith("clip:") else "") + (name or spec)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.evaluate",
        description="Evaluate a softbio model on prepared datasets: per-dataset metrics (the study's Tables "
        "4.11/4.12), per-group fairness, calibration, confusion matrices. Writes results.json, report.md and PNG "
        "plots to --out. `python -m train.evaluate compare RUN.json ...` tabulates several runs.",
    )
    from softbio_hf.version import add_version_argument  # stdlib only: --version needs no torch

    add_version_argument(parser)
    parser.add_argument(
        "--model", required=True, help="softbio checkpoint folder or Hub id, or clip:ID_OR_FOLDER (zero-shot)"
    )
    parser.add_argument("--data", nargs="+", required=True, help="folders written by python -m train.data prepare")
    parser.add_argument("--split", default="test", help="split to evaluate (default test)")
    parser.add_argument("--out", default="outputs/eval", help="output folder (default outputs/eval)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier evaluation in --out (without it, refused)"
    )
    parser.add_argument("--name", default=None, help="row name in the tables (default: from --model)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    parser.add_argument("--device", default="auto", help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--dtype", default="auto", help="auto (bf16 where the device runs it natively), float32, bfloat16"
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most N rows per dataset")
    parser.add_argument(
        "--backend",
        default="torch",
        choices=("torch", "onnx", "openvino"),
        help="evaluate --model's export (python -m softbio_hf.export; fp32 or int8) in this runtime, on the CPU",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="fit one temperature per task and save a calibrated copy in OUT/calibrated",
    )
    parser.add_argument(
        "--calibration-split", default="validation", help="split temperatures and conformal thresholds are fitted on"
    )
    parser.add_argument(
        "--conformal",
        type=float,
        default=None,
        metavar="LEVEL",
        help="fit conformal prediction sets holding the true label with probability LEVEL (e.g. 0.9); saved with "
        "the model in OUT/calibrated, coverage reported on --split",
    )
    parser.add_argument(
        "--conformal-score", default="lac", choices=SCORES, help="lac (smallest sets, default) or aps (adaptive)"
    )
    parser.add_argument(
        "--class-conditional",
        action="store_true",
        help="one threshold per true label (Mondrian): the level holds for each label, not only on average",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help=f"bootstrap replicates for the intervals (default 1000, at most {MAX_BOOTSTRAP:,}; 0: none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's random seed (default 0)")
    return parser


def build_compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.evaluate compare",
        description="The study's summary table (Table 4.11) with one row per run and the difference to a baseline.",
    )
    from softbio_hf.version import add_version_argument  # stdlib only: --version needs no torch

    add_version_argument(parser)
    parser.add_argument("runs", nargs="+", help="results.json files")
    parser.add_argument("--names", nargs="+", default=None, help="row names, one per run (default: each run's name)")
    parser.add_argument("--baseline", default=None, help="row to compare against (default: the first)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = None
    try:
        if argv[:1] == ["compare"]:
            args = build_compare_parser().parse_args(argv[1:])
            print(compare(args.runs, args.names, args.baseline))
            return 0
        args = build_parser().parse_args(argv)
        require_train_extra("python -m train.evaluate", "datasets", "matplotlib")
        if args.batch_size < 1 or (args.limit is not None and args.limit < 1) or args.num_workers < 0:
            raise EvaluationError("--batch-size and --limit must be at least 1, --num-workers at least 0.")
        if args.conformal is not None and not 0 < args.conformal < 1:
            raise EvaluationError(f"--conformal {args.conformal}: give a level between 0 and 1, e.g. 0.9.")
        if args.backend != "torch" and (args.calibrate or args.conformal is not None):
            raise EvaluationError(
                f"--backend {args.backend} evaluates an export as it is: fit --calibrate / --conformal on the torch "
                "model, then export the calibrated model (python -m softbio_hf.export --model OUT/calibrated)."
            )
        if args.backend != "torch" and args.device == "cuda":
            raise EvaluationError(f"--backend {args.backend} runs on the CPU; use --backend torch on cuda.")
        if not 0 <= args.bootstrap <= MAX_BOOTSTRAP:
            raise EvaluationError(
                f"--bootstrap {args.bootstrap}: give 0 (no intervals) to {MAX_BOOTSTRAP:,} replicates; each replicate "
                "recomputes every score in a Python loop, and 1000 (the default) already place a 95% interval's "
                "ends to within a few percent of its width."
            )
        report = run(args)
    except (EvaluationError, MissingExtra) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a long bootstrap or inference stopped by hand: said, not a traceback
        where = f" in {args.out}" if hasattr(args, "out") else ""
        print(
            f"\ninterrupted: stopped before writing results.json{where} (an earlier one is left as it was). Run it "
            "again; --bootstrap 0 skips the intervals, the slowest part on large sets.",
            file=sys.stderr,
        )
        return 130
    print(summary_table([(report["name"], report["summary"])]))
    print(f"results.json, report.md and {len(report['plots'])} plots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
