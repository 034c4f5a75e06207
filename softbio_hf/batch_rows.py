"""The batch command's rows: a model loaded once, photos in, one table row per face (or one status row) out.

`FaceRows` is the unit every engine maps photos through: the local command (python -m softbio_hf.predict) feeds it
face crops from its DataLoader workers, and the Ray engine (softbio_hf.predict_ray) hands it batches of encoded
images on an actor pool. It does not import Ray, and this module imports neither torch nor transformers at import
time, so the command's --help and argument checks answer in a second.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

STATUS_OK, STATUS_NO_FACE = "ok", "no face"
# Columns whose type is not a string, for a table whose batches must all have one schema (Parquet parts).
INTEGER_COLUMNS = ("index", "face", "faces", "xmin", "ymin", "xmax", "ymax", "frame", "track_id")


class PredictError(ValueError):
    """A user error (bad option, output exists, unknown format): reported without a traceback, exit code 2."""


def optional_import(module: str, extra: str, needed_for: str):
    """A package of one of softbio's extras, or a PredictError that says how to install it."""
    from .extras import MissingExtra, require

    try:
        return require(module, extra, needed_for)
    except MissingExtra as error:
        raise PredictError(str(error)) from None


def exit_code(stats: dict[str, Any], out: str) -> int:
    """0, or 1 when every photo of the run failed (all missing, say): a script or scheduler must not take a table
    of error rows for a finished job. Said on every process (the counts are the whole run's)."""
    if stats["photos"] and stats["errors"] == stats["photos"]:
        if "rows" in stats:
            print(
                f"error: none of the {stats['photos']} inputs could be read; the status column of {out} says why.",
                file=sys.stderr,
            )
        return 1
    return 0


# ------------------------------------------------------------------------------------------------ the model
MODEL_ADVICE = (
    "Pass a folder written by save_pretrained or `python -m train.train` (its best/ folder), a softbio Hub id, or "
    "clip:ID_OR_FOLDER for the zero-shot model."
)


def check_model_spec(spec: str) -> None:
    """What can be said of --model without loading anything (no torch, no Hub): a folder that is not there, a file,
    a folder without a checkpoint. A name that can only be a path is never sent to the Hub as a repo id."""
    from .checkpoint_files import refuse_pickled_weights
    from .hub_access import hub_repo_id

    if spec.startswith("clip:"):
        return  # from_clip names its own problems (a folder, a Hub id or an OpenAI checkpoint)
    path = Path(spec).expanduser()
    if not path.exists():
        if hub_repo_id(spec) is None:  # e.g. runs/lora/best, ./model: a path, not a Hub id
            raise PredictError(f"--model {spec}: no such folder (looked in {os.getcwd()}). {MODEL_ADVICE}")
        return  # a Hub id: from_pretrained finds it (or says it cannot)
    if not path.is_dir():
        raise PredictError(f"--model {spec} is a file; pass the folder that holds it. {MODEL_ADVICE}")
    try:
        refuse_pickled_weights(path)
    except ValueError as error:
        raise PredictError(f"--model {spec} cannot be used: {error}") from None
    if not (path / "config.json").is_file():
        raise PredictError(f"--model {spec} holds no config.json, so it is not a checkpoint folder. {MODEL_ADVICE}")


def load_model(spec: str):
    """
    What a command's --model names: a softbio checkpoint (folder or Hub id, in fp32) or `clip:ID_OR_FOLDER`, the
    zero-shot model built from that CLIP checkpoint. Raises a ValueError that says what to pass instead.
    """
    import torch

    from . import SoftBioModel
    from .checkpoint_files import CheckpointFileError

    check_model_spec(spec)
    try:
        if spec.startswith("clip:"):
            return SoftBioModel.from_clip(spec.removeprefix("clip:"))
        return SoftBioModel.from_pretrained(spec, dtype=torch.float32)
    except CheckpointFileError as error:  # it names the file and the fix already
        raise ValueError(f"--model {spec}: {error}") from None
    except ImportError as error:  # an extra the checkpoint needs (peft for unmerged adapters): the message says it
        raise ValueError(f"--model {spec}: {error}") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--model {spec} could not be loaded: {str(error).rstrip('.')}. {MODEL_ADVICE}") from error


def load_pipeline(model: str, device: str | None, dtype: str, detector: str, backend: str = "torch"):
    import torch
    from transformers import pipeline

    import softbio_hf

    softbio_hf.register()  # the soft-biometrics task (`python -m softbio_hf.predict` defers it to here)

    if device == "cuda" and not torch.cuda.is_available():
        raise PredictError("--device cuda: this machine has no CUDA device; use --device cpu.")
    try:
        loaded = load_model(model)
    except ValueError as error:
        raise PredictError(str(error)) from error
    try:
        pipe = pipeline("soft-biometrics", model=loaded, dtype=dtype, device=device, backend=backend)
    except (ValueError, FileNotFoundError, ImportError) as error:  # an untrained head, no export, no runtime
        raise PredictError(str(error)) from error
    try:
        pipe.detector(detector)  # built once here, so a bad name fails before any work
    except (ValueError, FileNotFoundError, ImportError) as error:
        raise PredictError(f"--detector {detector}: {error}") from error
    return pipe


# --------------------------------------------------------------------------------------------------- rows
def rows_for(item: dict[str, Any], records: list[dict[str, Any]], tasks, probabilities: bool) -> list[dict]:
    """Output rows of one photo: one per face, or one that says why there is none."""
    base = {"index": item["index"], "source": item["key"]}
    if "error" in item:
        return [{**base, "face": -1, "faces": 0, "status": f"error: {item['error']}"}]
    if not records:
        return [{**base, "face": -1, "faces": 0, "status": STATUS_NO_FACE}]
    rows = []
    for number, record in enumerate(records):
        box = record["box"]
        row = {**base, "face": number, "faces": len(records), "status": STATUS_OK, **box}
        row["detection_score"] = record["detection_score"]
        for task in tasks:
            row[f"{task}_label"] = record[task]["label"]
            row[f"{task}_score"] = record[task]["score"]
            if "set" in record[task]:  # conformal set, labels joined by "|" (a model with thresholds only)
                row[f"{task}_set"] = "|".join(record[task]["set"])
            if probabilities:
                row.update({f"{task}_prob_{label}": p for label, p in record[task]["scores"].items()})
        if "years" in record.get("age", {}):
            row["age_years"] = record["age"]["years"]
        rows.append(row)
    return rows


def columns(tasks: dict[str, list[str]], probabilities: bool, sets: Sequence[str] = ()) -> list[str]:
    """The table's columns; `sets`: the tasks the model holds conformal thresholds for (a `TASK_set` column)."""
    names = ["index", "source", "face", "faces", "status", "xmin", "ymin", "xmax", "ymax", "detection_score"]
    for task, labels in tasks.items():
        names += [f"{task}_label", f"{task}_score"] + ([f"{task}_set"] if task in sets else [])
        if probabilities:
            names += [f"{task}_prob_{label}" for label in labels]
    if "age" in tasks:
        names.append("age_years")
    return names


def column_type(name: str) -> str:
    """A column's type in a typed table (Parquet parts written batch by batch): int64, string or float64."""
    if name in INTEGER_COLUMNS:
        return "int64"
    if name in ("source", "status") or name.endswith(("_label", "_set")):
        return "string"
    return "float64"


class FaceRows:
    """
    The batch command's model, loaded once, as a callable over batches of photos: `FaceRows(model, ...)({"bytes":
    [...], "source": [...], "index": [...]})` gives the rows of those photos as columns (every column of the table,
    None where a row has no value): one row per face, or one status row for a photo with no face or one that
    cannot be read. A bad image never raises. Built with the batch command's options; what Ray's map_batches
    takes as a callable class (one instance per actor), and what the local command's loop writes rows through.
    """

    def __init__(
        self,
        model: str,
        *,
        backend: str = "torch",
        device: str | None = None,
        dtype: str = "auto",
        detector: str = "auto",
        probabilities: bool = False,
        compile: bool = False,
        batch_size: int = 64,
        threads: int | None = None,
    ):
        if threads:  # an actor's share of its machine's cores (Ray gives each actor num_cpus of them)
            import torch

            torch.set_num_threads(threads)
        self.pipe = load_pipeline(model, device, dtype, detector, backend)
        self.options = {"detector": detector}
        self.batch_size, self.probabilities = batch_size, probabilities
        self.compile_seconds = self.pipe.compile(batch_size) if compile else None
        self.tasks = self.pipe.model.config.tasks
        conformal = (self.pipe.model.config.calibration or {}).get("conformal") or {}
        self.names = columns(self.tasks, probabilities, sets=list(conformal.get("thresholds", {})))

    def rows(self, item: dict[str, Any], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One photo's rows from its scored faces (`item`: its index and key, or the error that stopped it)."""
        return rows_for(item, records, self.tasks, self.probabilities)

    def batcher(self):
        """Faces of many photos into forward passes of --batch-size (softbio_hf.face_stream.Batcher)."""
        from .face_stream import Batcher

        return Batcher(self.pipe, self.batch_size)

    def photo_rows(self, photos: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows of photos whose faces are found (`face_stream.photo_faces` items), scored across photos."""
        batcher, rows = self.batcher(), []
        for photo in photos:
            rows += [row for item, records in batcher.add(photo) for row in self.rows(item, records)]
        rows += [row for item, records in batcher.run() for row in self.rows(item, records)]
        return rows

    def __call__(self, batch: dict[str, Sequence]) -> dict[str, list]:
        """Encoded images (`bytes`, with their `source` names, and `index` if given; an `error` column, where
        present and not empty, says why a photo's bytes could not be read) to the table's columns."""
        from .face_stream import photo_faces
        from .images import load_image

        sources = [str(source) for source in batch["source"]]
        indices = [int(i) for i in batch["index"]] if "index" in batch else list(range(len(sources)))
        errors = list(batch["error"]) if "error" in batch else [None] * len(sources)
        photos = []
        for index, key, data, error in zip(indices, sources, batch["bytes"], errors, strict=True):
            item = {"index": index, "key": key}
            if error:
                photos.append({**item, "error": str(error)})
                continue
            decode = lambda d=data, k=key: load_image(bytes(d), name=repr(k))  # noqa: E731 - bound per photo
            photos.append(photo_faces(self.pipe, item, decode, self.options))
        rows = sorted(self.photo_rows(photos), key=lambda row: (row["index"], row["face"]))  # the batch's order
        return {name: [row.get(name) for row in rows] for name in self.names}
