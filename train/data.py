"""The public face benchmarks in one `datasets` schema: read, prepare once, describe, combine, sample, collate.

    python -m train.data prepare --dataset utkface --root UTKFace/ --out data/utkface
    python -m train.data stats data/utkface data/fairface data/rafdb [--json]

Unified row (DESIGN.md): image, age, gender, emotion (class ids; -100 = no label), age_years (exact age or
None), race (fairness reports only), dataset, split. Label orders are the canonical ones of softbio_hf.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from softbio_hf.safe_files import atomic_write_json, replace_folder, staging_folder

IGNORE = -100
TASKS = ("age", "gender", "emotion")  # the unified schema's label columns (DESIGN.md), canonical order
SPLITS = ("train", "validation", "test")


def is_finite_number(value: Any) -> bool:
    """A real number (not a bool), neither NaN nor infinite: what a setting or a score must be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Age labels in these datasets are model estimates: reported apart, left out of the age average (as the study).
SYNTHETIC_AGE_DATASETS = {"vggface2"}
SOURCES = {
    "utkface": "UTKFace (https://susanqq.github.io/UTKFace/): a folder of age_gender_race_date.jpg files "
    "(or the aligned set, ...jpg.chip.jpg)",
    "fairface": "FairFace (https://github.com/joojs/fairface): fairface_label_train.csv, fairface_label_val.csv "
    "and the train/ and val/ image folders (margin 0.25 or 1.25)",
    "rafdb": "RAF-DB basic (http://www.whdeng.cn/raf/model1.html, on request): EmoLabel/list_patition_label.txt "
    "and Image/aligned/",
    "vggface2": "VGGFace2 (identity_meta.csv, train/ and test/ identity folders) plus your own age CSV "
    "(columns file,age)",
    "folder": "your own image folder with a metadata.csv (file_name plus any of age, gender, emotion, race, split)",
}


def age_to_bin(years: float) -> int:
    """Exact age -> canonical bin: 0-2, 3-9, 10-19, ..., 60-69, 70+."""
    if years < 3:
        return 0
    if years < 10:
        return 1
    return min(8, int(years // 10) + 1)


_GENDER_STRINGS = {"male": 0, "m": 0, "man": 0, "0": 0, "female": 1, "f": 1, "woman": 1, "1": 1}


@functools.cache
def task_labels() -> dict[str, tuple[str, ...]]:
    """The canonical label names per task, from softbio_hf: imported on first use (it takes seconds), so the
    command line answers --help at once."""
    from softbio_hf.configuration_softbio import DEFAULT_TASKS

    return {task: tuple(DEFAULT_TASKS[task]) for task in TASKS}


@functools.cache
def _label_strings(task: str) -> dict[str, int]:
    """Label cell -> class id: the canonical names plus the spellings the benchmarks use."""
    names = {label: i for i, label in enumerate(task_labels()[task])}
    if task == "age":
        return names | {"more than 70": 8, "70-130": 8}
    if task == "gender":
        return names | _GENDER_STRINGS
    return names | {"happiness": 3, "sadness": 4, "anger": 5, "surprised": 0, "fearful": 1, "disgusted": 2}


def parse_age(value: str) -> tuple[int, float | None]:
    """An age cell: exact years ('27', '27.5') or a bin label ('20-29', 'more than 70'). Raises ValueError."""
    text = str(value).strip().lower()
    if text in _label_strings("age"):
        return _label_strings("age")[text], None
    years = float(text)
    if not 0 <= years <= 130:
        raise ValueError(f"age {value!r} is outside 0..130")
    return age_to_bin(years), years


def parse_label(value: str, task: str) -> int:
    """A gender or emotion cell: a name (any case) or a canonical class id. Raises ValueError."""
    text = str(value).strip().lower()
    names = _label_strings(task)
    if text in names:
        return names[text]
    if text.isdigit() and int(text) < len(task_labels()[task]):
        return int(text)
    raise ValueError(f"unknown {task} label {value!r}; expected one of {list(task_labels()[task])}")


def hashed_split(key: str, validation: float = 0.1, test: float = 0.1) -> str:
    """A deterministic split from a stable hash of the file name (the same on every machine)."""
    bucket = int(hashlib.md5(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if bucket < test else "validation" if bucket < test + validation else "train"


def make_row(source: str, dataset: str, split: str, **labels: Any) -> dict[str, Any]:
    row = {"source": source, "age": IGNORE, "gender": IGNORE, "emotion": IGNORE, "age_years": None, "race": None}
    row.update(labels)
    row.update(dataset=dataset, split=split)
    return row


@dataclass
class SkipReport:
    """Rows left out, by reason, with a few examples of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, item: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(item)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "counts": dict(self.counts), "examples": self.examples}

    def summary(self) -> str:
        if not self.total:
            return "skipped: none"
        return "skipped: " + ", ".join(f"{count} {reason}" for reason, count in self.counts.most_common())


def files_under(root: Path, skips: SkipReport) -> list[Path]:
    """Every file below root; a folder that cannot be read is reported, not silently passed over."""
    found = []

    def unreadable(error: OSError) -> None:
        skips.add("unreadable folder", f"{error.filename} ({error.strerror})")

    for folder, _dirs, names in os.walk(root, onerror=unreadable):
        found.extend(Path(folder) / name for name in names)
    return found


@contextlib.contextmanager
def open_table(path: Path):
    """A CSV/text file of labels: UTF-8 (a byte-order mark is fine); other bytes or no access are named errors."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            yield handle
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8."
        ) from None
    except csv.Error as error:
        raise ValueError(f"{path}: {error}; check that file's rows (a field over 131,072 characters?).") from None
    except PermissionError as error:
        raise ValueError(f"{path} cannot be read ({error.strerror}); check its permissions.") from None


def inside(root: Path, path: str | Path) -> bool:
    """Whether `path` (symlinks resolved) lies in `root`: a label file never makes prepare read elsewhere."""
    return Path(path).resolve().is_relative_to(root.resolve())


def _missing(dataset: str, expected: Path) -> FileNotFoundError:
    return FileNotFoundError(f"Expected {expected} for --dataset {dataset}. The dataset is {SOURCES[dataset]}.")


# ------------------------------------------------------------------------------------------- readers
_UTK_NAME = re.compile(r"^(\d{1,3})_([01])_([0-4])_(\d{17})\.jpg(\.chip\.jpg)?$")
_UTK_RACES = ("White", "Black", "Asian", "Indian", "Others")


def read_utkface(root: Path, skips: SkipReport) -> list[dict]:
    """UTKFace raw or aligned (`.chip.jpg`) folder. No official split: `hashed_split` of the file name (80/10/10)."""
    files = sorted(p for p in files_under(root, skips) if ".jpg" in p.name.lower())
    if not files:
        raise _missing("utkface", root / "<age>_<gender>_<race>_<date>.jpg")
    rows = []
    for path in files:
        match = _UTK_NAME.match(path.name)
        if not match:  # e.g. a missing race field, a stray space, a missing dot: known in the public archive
            skips.add("malformed file name", path.name)
            continue
        years, gender, race = int(match[1]), int(match[2]), int(match[3])
        if years > 116:
            skips.add("age out of range", path.name)
            continue
        rows.append(
            make_row(
                str(path),
                "utkface",
                hashed_split(path.name),
                age=age_to_bin(years),
                age_years=float(years),
                gender=gender,
                race=_UTK_RACES[race],
            )
        )
    return rows


def _fairface_image_root(root: Path, margin: str) -> Path:
    tag = {"0.25": "025", "1.25": "125"}.get(margin)
    if tag is None:
        raise ValueError(f"--margin {margin!r}: FairFace ships margins 0.25 and 1.25.")
    for candidate in (root / f"fairface-img-margin{tag}-trainval", root / f"margin{tag}", root):
        if (candidate / "train").is_dir() or (candidate / "val").is_dir():
            return candidate
    raise _missing("fairface", root / f"fairface-img-margin{tag}-trainval" / "train")


def carved_split(official: str, key: str) -> str:
    """A benchmark that publishes train and test (or val, reported as test) but no validation set: its official
    held-out rows stay test, and 10% of its training rows (by a hash of `key`, the same everywhere) become the
    validation split, so a best checkpoint is never chosen on the rows that are reported."""
    if official != "train":
        return "test"
    return "validation" if hashed_split(key, validation=0.1, test=0.0) == "validation" else "train"


def read_fairface(root: Path, skips: SkipReport, margin: str = "0.25") -> list[dict]:
    """FairFace CSVs (`file,age,gender,race,service_test`) and images. Papers report on its val set, so val is our
    test split; validation is carved from train by the name hash (carved_split)."""
    images = _fairface_image_root(root, margin)
    rows = []
    for csv_name, official in (("fairface_label_train.csv", "train"), ("fairface_label_val.csv", "test")):
        table = root / csv_name
        if not table.is_file():
            raise _missing("fairface", table)
        with open_table(table) as handle:
            for line, record in enumerate(csv.DictReader(handle), start=2):
                where = f"{csv_name}:{line}"
                try:
                    age, _ = parse_age(record["age"])
                    gender = parse_label(record["gender"], "gender")
                except (KeyError, ValueError, TypeError, AttributeError) as error:
                    skips.add("bad label", f"{where} ({error})")
                    continue
                if not record.get("file"):
                    skips.add("short row", where)
                    continue
                rows.append(
                    make_row(
                        str(images / record["file"]),
                        "fairface",
                        carved_split(official, record["file"]),
                        age=age,
                        gender=gender,
                        race=(record.get("race") or None),
                    )
                )
    return rows


def fairface_from_hub(dataset_dict) -> list[dict]:
    """The Hub copy `HuggingFaceM4/FairFace` (ClassLabel columns age, gender, race) as unified rows."""
    rows = []
    for hub_split, official in (("train", "train"), ("validation", "test")):
        if hub_split not in dataset_dict:
            continue
        part = dataset_dict[hub_split]
        names = {c: part.features[c].names for c in ("age", "gender", "race")}
        for index, record in enumerate(part):
            image = record["image"]
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
            rows.append(
                make_row(
                    f"hub:{hub_split}/{index}",
                    "fairface",
                    carved_split(official, f"{hub_split}/{index}"),
                    image_bytes=buffer.getvalue(),
                    age=parse_age(names["age"][record["age"]])[0],
                    gender=parse_label(names["gender"][record["gender"]], "gender"),
                    race=names["race"][record["race"]],
                )
            )
    return rows


def rafdb_split(name: str) -> str:
    """RAF-DB's official test set stays test; 10% of its training images become the validation split."""
    return carved_split("train" if name.startswith("train") else "test", name)


def read_rafdb(root: Path, skips: SkipReport) -> list[dict]:
    """RAF-DB basic: `train_00001.jpg 5` lines (ids 1..7 = surprise..neutral) and aligned images."""
    partition = root / "EmoLabel" / "list_patition_label.txt"
    if not partition.is_file():
        raise _missing("rafdb", partition)
    aligned = root / "Image" / "aligned"
    rows = []
    with open_table(partition) as handle:
        lines = handle.read().splitlines()
    for number, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].isdigit() or not 1 <= int(parts[1]) <= 7:
            skips.add("bad line", f"line {number}: {line!r}")
            continue
        name, label = parts
        image = aligned / name.replace(".jpg", "_aligned.jpg")
        if not image.is_file():
            skips.add("missing image", str(image.relative_to(root)) if image.is_relative_to(root) else name)
            continue
        rows.append(make_row(str(image), "rafdb", rafdb_split(name), emotion=int(label) - 1))
    return rows


def read_vggface2(root: Path, skips: SkipReport, age_csv: Path | None = None) -> list[dict]:
    """VGGFace2 with gender from identity_meta.csv and, optionally, ages from a user CSV (`file,age`, file as
    class/img.jpg; model estimates, so kept apart in reports). Without the CSV every row is a gender row."""
    meta = root / "identity_meta.csv"
    if not meta.is_file():
        raise _missing("vggface2", meta)
    genders = {}
    with open_table(meta) as handle:
        for record in csv.DictReader(handle, skipinitialspace=True):
            record = {k.strip(): (v or "").strip() for k, v in record.items() if k}
            if record.get("Gender") in ("m", "f"):
                genders[record["Class_ID"]] = _GENDER_STRINGS[record["Gender"]]
    ages: dict[str, str] = {}
    if age_csv is not None:
        if not Path(age_csv).is_file():
            raise FileNotFoundError(f"--age-csv {age_csv}: no such file (columns: file,age).")
        with open_table(Path(age_csv)) as handle:
            ages = {(r.get("file") or "").strip(): r.get("age") or "" for r in csv.DictReader(handle)}
    rows = []
    for split_dir in ("train", "test"):
        for path in sorted((root / split_dir).glob("*/*.jpg")):
            key = f"{path.parent.name}/{path.name}"
            labels: dict[str, Any] = {"gender": genders.get(path.parent.name, IGNORE)}
            if key in ages:
                try:
                    labels["age"], labels["age_years"] = parse_age(ages[key])
                except ValueError as error:
                    skips.add("bad age", f"{key} ({error})")
            if labels["gender"] == IGNORE and "age" not in labels:
                skips.add("no label", key)
                continue
            # By identity: its official test identities are unseen in train, and so are the validation ones.
            rows.append(make_row(str(path), "vggface2", carved_split(split_dir, path.parent.name), **labels))
    if not rows:
        raise _missing("vggface2", root / "train" / "<class_id>" / "<image>.jpg")
    return rows


def read_folder(root: Path, skips: SkipReport) -> list[dict]:
    """An image folder with metadata.csv: file_name plus any of age (years or bin), gender, emotion, race, split."""
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise _missing("folder", meta)
    rows = []
    with open_table(meta) as handle:
        reader = csv.DictReader(handle)
        if "file_name" not in (reader.fieldnames or []):
            raise ValueError(f"{meta} has no file_name column; its columns are {reader.fieldnames}.")
        for line, record in enumerate(reader, start=2):
            if not (record.get("file_name") or "").strip():
                skips.add("short row", f"metadata.csv:{line}")
                continue
            labels: dict[str, Any] = {}
            try:
                if (record.get("age") or "").strip():
                    labels["age"], labels["age_years"] = parse_age(record["age"])
                for task in ("gender", "emotion"):
                    if (record.get(task) or "").strip():
                        labels[task] = parse_label(record[task], task)
            except ValueError as error:
                skips.add("bad label", f"metadata.csv:{line} ({error})")
                continue
            split = (record.get("split") or "").strip() or hashed_split(record["file_name"])
            if split not in SPLITS:
                skips.add("bad split", f"metadata.csv:{line} ({split!r})")
                continue
            race = (record.get("race") or "").strip() or None
            rows.append(
                make_row(str(root / record["file_name"].strip()), root.name or "folder", split, race=race, **labels)
            )
    return rows


READERS = {
    "utkface": read_utkface,
    "fairface": read_fairface,
    "rafdb": read_rafdb,
    "vggface2": read_vggface2,
    "folder": read_folder,
}


# ------------------------------------------------------------------------------------------- prepare
def features():
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    return Features(
        {
            "image": ImageFeature(),
            "age": Value("int16"),
            "gender": Value("int16"),
            "emotion": Value("int16"),
            "age_years": Value("float32"),
            "race": Value("string"),
            "dataset": Value("string"),
            "split": Value("string"),
        }
    )


def decode_and_resize(row: dict[str, Any], image_size: int) -> dict[str, Any]:
    """Decode once (EXIF, modes, bomb cap as in the pipeline), resize the shorter side, store as JPEG."""
    from softbio_hf.pipeline_softbio import ImageInputError, load_image

    try:
        data = row.get("image_bytes")
        source = data if data else row["source"]
        if not data and Path(source).stat().st_size == 0:
            return {"image": None, "error": "empty file"}
        rgb = Image.fromarray(load_image(source, name=row["source"]))
    except (ImageInputError, OSError) as error:
        reason = "missing image" if isinstance(error, FileNotFoundError) else "unreadable image"
        return {"image": None, "error": reason}
    scale = image_size / min(rgb.size)
    rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BICUBIC)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=95)
    return {"image": {"bytes": buffer.getvalue(), "path": None}, "error": None}


def prepare(
    dataset: str,
    root: str | Path,
    out: str | Path,
    image_size: int = 336,
    num_proc: int | None = None,
    overwrite: bool = False,
    **reader_options: Any,
):
    """
    Read a benchmark, decode and resize every image once, save a DatasetDict (one entry per split). Only files
    inside `root` are read. The result is written into a temporary folder beside `out` and renamed into place at
    the end, so a crash leaves an existing `out` as it was and no half-written folder under its name.
    """
    from datasets import Dataset, DatasetDict

    root, out = Path(root), Path(out)
    from_hub = str(root).startswith("hub:")
    if dataset not in READERS:
        raise ValueError(f"Unknown --dataset {dataset!r}; choose one of {sorted(READERS)}.")
    if not root.is_dir() and not from_hub:
        raise FileNotFoundError(f"--root {root} is not a folder. The dataset is {SOURCES[dataset]}.")
    if not 16 <= image_size <= 4096:
        raise ValueError(f"--image-size {image_size}: use 16 to 4096 pixels (the shorter side; 336 for ViT-L/14@336).")
    staging = check_out(out, None if from_hub else root, overwrite)
    try:
        skips = SkipReport()
        start = time.perf_counter()
        rows = (
            fairface_from_hub(load_fairface_hub(str(root)[4:]))
            if from_hub
            else read_rows(dataset, root, skips, reader_options)
        )
        if not rows:
            raise ValueError(f"--root {root}: no usable row ({skips.summary()}). The dataset is {SOURCES[dataset]}.")
        raw = Dataset.from_list([{"image_bytes": None, **r} for r in rows])  # hub rows carry their bytes
        num_proc = num_proc if num_proc and num_proc > 1 and len(raw) >= 64 else None  # tiny sets: no workers
        decoded = raw.map(
            decode_and_resize,
            fn_kwargs={"image_size": image_size},
            num_proc=num_proc,
            remove_columns=["image_bytes"],
            desc=f"decode + resize {dataset}",
        )
        for source, error in zip(decoded["source"], decoded["error"], strict=True):
            if error:  # named as every other example is: relative to --root
                skips.add(
                    error, source if from_hub or not inside(root, source) else str(Path(source).relative_to(root))
                )
        kept = decoded.filter(lambda error: error is None, input_columns="error", desc="drop unreadable")
        if not len(kept):
            raise ValueError(f"--root {root}: no image could be read ({skips.summary()}).")
        kept = kept.remove_columns(["source", "error"]).cast(features())
        splits = DatasetDict({s: kept.filter(lambda v, s=s: v == s, input_columns="split") for s in SPLITS})
        splits = DatasetDict({name: part for name, part in splits.items() if len(part)})
        seconds = time.perf_counter() - start
        splits.save_to_disk(str(staging))
        report = {
            "dataset": dataset,
            "root": str(root),
            "image_size": image_size,
            "rows": {name: len(part) for name, part in splits.items()},
            "skipped": skips.to_dict(),
            "seconds": round(seconds, 2),
            "images_per_second": round(len(raw) / seconds, 1) if seconds else None,
        }
        atomic_write_json(staging / "prepare_report.json", report)
        replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    from datasets import load_from_disk

    return load_from_disk(str(out)), report


def read_rows(dataset: str, root: Path, skips: SkipReport, reader_options: dict[str, Any]) -> list[dict]:
    """The reader's rows whose files lie inside root (a list entry such as ../../x.jpg, an absolute path or a
    symlink pointing out is skipped and reported)."""
    rows = []
    for row in READERS[dataset](root, skips, **reader_options):
        if inside(root, row["source"]):
            rows.append(row)
        else:
            skips.add("outside --root", row["source"])
    return rows


def load_fairface_hub(margin: str):
    import datasets

    from softbio_hf.hub_access import hub_reachable

    if not hub_reachable():  # one probe: datasets would retry a dead network for tens of seconds
        datasets.config.HF_HUB_OFFLINE = True  # its cache only
    try:
        return datasets.load_dataset("HuggingFaceM4/FairFace", margin or "0.25")
    except Exception as error:  # offline, unknown config, hub errors: all end the same way for the user
        raise ValueError(
            f"--root hub:{margin}: could not load HuggingFaceM4/FairFace from the Hub ({type(error).__name__}: "
            f"{str(error)[:200]}). Check the network, or download FairFace and give its folder as --root."
        ) from None


def check_out(out: Path, root: Path | None, overwrite: bool) -> Path:
    """Refuse an --out that would lose or mix data; return the (created) staging folder beside it."""
    resolved = out.resolve()
    if root is not None and (resolved.is_relative_to(root.resolve()) or root.resolve().is_relative_to(resolved)):
        raise ValueError(f"--out {out} and --root {root} overlap; write the prepared dataset elsewhere.")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} is not empty; choose another folder or pass --overwrite to replace it.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return staging_folder(out)
    except OSError as error:
        raise ValueError(f"--out {out}: cannot write beside it ({error.strerror}); choose a writable folder.") from None


# ------------------------------------------------------------------------------------------ balancing
CLASS_BALANCE_MODES = ("mix", "power")


@dataclass(frozen=True)
class Balancing:
    """
    How training draws its rows (the `data` section of a training config).

    Within each task, class c gets a target share of the draws labelled for that task:
    - `mix` (the study's Table 4.2 "Weighted %"): (1 - class_mix) x share_c + class_mix / K, K the classes present;
    - `power`: n_c^(1 - class_alpha), normalised (0: as the data comes, 1: uniform).
    Across tasks, task t's rows start in proportion to N_t^(1 - task_alpha) (0: as the data comes, 1: balanced).
    """

    class_balance: str = "mix"
    class_mix: float = 0.5
    class_alpha: float = 0.5
    task_alpha: float = 0.5

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> Balancing:
        return cls(**{key: data[key] for key in ("class_balance", "class_mix", "class_alpha", "task_alpha")})

    def class_targets(self, counts: np.ndarray) -> np.ndarray:
        """Target share of draws per class (0 for a class with no row)."""
        present = counts > 0
        if not present.any():
            return np.zeros(len(counts))
        if self.class_balance == "mix":
            shares = counts / counts.sum()
            return np.where(present, (1 - self.class_mix) * shares + self.class_mix / present.sum(), 0.0)
        if self.class_balance == "power":
            powered = np.where(present, counts.astype(float) ** (1.0 - self.class_alpha), 0.0)
            return powered / powered.sum()
        raise ValueError(f"class_balance={self.class_balance!r}; choose one of {CLASS_BALANCE_MODES}.")

    def describe(self) -> str:
        rule = (
            f"(1 - {self.class_mix}) x share + {self.class_mix} / classes"
            if self.class_balance == "mix"
            else f"n_c^(1 - {self.class_alpha}), normalised"
        )
        return f"class balance {self.class_balance}: {rule}; task_alpha {self.task_alpha}"


def label_columns(dataset, tasks: Sequence[str] = TASKS) -> dict[str, np.ndarray]:
    """Each task's label column as integers (-100 where a row has none or the dataset lacks the column)."""
    return {
        task: np.asarray(dataset[task], dtype=np.int64)
        if task in dataset.column_names
        else np.full(len(dataset), IGNORE, dtype=np.int64)
        for task in tasks
    }


def draw_shares(labels: dict[str, np.ndarray], weights: np.ndarray) -> dict[str, np.ndarray]:
    """
    The expected class frequencies of a long weighted draw, per task, among the drawn rows labelled for it: what
    the loss of that task really sees (a row drawn for one task also brings its labels of the others).
    """
    shares = {}
    for task, column in labels.items():
        labelled = column != IGNORE
        classes = len(task_labels()[task])
        mass = np.bincount(column[labelled], weights=weights[labelled], minlength=classes)
        shares[task] = mass / mass.sum() if mass.sum() > 0 else mass
    return shares


def balanced_weights(
    dataset, balancing: Balancing | None = None, tasks: Sequence[str] = TASKS, iterations: int = 200
) -> np.ndarray:
    """
    Row weights for torch's WeightedRandomSampler whose draws give every task exactly its target class shares.

    Start: per task, class c's rows share the task's mass N_t^(1 - task_alpha) in proportion to the class target;
    a row labelled for several tasks takes its largest weight. Then raking (iterative proportional fitting):
    rescale each task's classes to their targets in turn until all agree at once, since a row drawn for one
    task also carries its labels of the others. Unlabelled rows get 0.
    """
    balancing = balancing or Balancing()
    labels = label_columns(dataset, tasks)
    targets, weights = {}, np.zeros(len(dataset), dtype=np.float64)
    for task, column in labels.items():
        labelled = column != IGNORE
        if not labelled.any():
            continue
        counts = np.bincount(column[labelled], minlength=len(task_labels()[task])).astype(float)
        targets[task] = balancing.class_targets(counts)
        per_row = np.divide(targets[task], counts, out=np.zeros_like(counts), where=counts > 0)
        task_weights = np.zeros(len(dataset))
        task_weights[labelled] = labelled.sum() ** (1.0 - balancing.task_alpha) * per_row[column[labelled]]
        weights = np.maximum(weights, task_weights)
    for _ in range(iterations):
        shares = draw_shares({t: labels[t] for t in targets}, weights)
        if all(np.abs(shares[t] - targets[t]).max() < 1e-9 for t in targets):
            break
        for task, target in targets.items():
            column = labels[task]
            labelled = column != IGNORE
            current = draw_shares({task: column}, weights)[task]
            factor = np.divide(target, current, out=np.zeros_like(target), where=current > 0)
            weights[labelled] *= factor[column[labelled]]
    return weights


def balanced_sampler(dataset, num_samples: int | None = None, seed: int = 0, balancing: Balancing | None = None):
    import torch

    weights = torch.as_tensor(balanced_weights(dataset, balancing))
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.WeightedRandomSampler(weights, num_samples or len(dataset), True, generator=generator)


# --------------------------------------------------------------------------------------------- stats
def load_prepared(paths: Iterable[str | Path], split: str = "train"):
    """
    Several prepared datasets as one: the given split of each, concatenated (they share the unified schema,
    with -100 where a dataset has no label for a task). Validation and test sets stay per dataset.
    """
    from datasets import concatenate_datasets, load_from_disk
    from tqdm.auto import tqdm

    parts = []
    for path in tqdm(list(paths), desc="load prepared datasets", unit="dataset"):
        try:
            loaded = load_from_disk(str(path))
        except FileNotFoundError:
            raise
        except (IndexError, KeyError, ValueError, OSError) as error:  # e.g. a split saved with no row
            raise ValueError(
                f"{path} cannot be loaded as a prepared dataset ({type(error).__name__}: {error}; a split saved "
                "without rows is one cause). Prepare it again with python -m train.data prepare"
            ) from None
        if split not in loaded:
            raise ValueError(
                f"{path} has no {split!r} split (it has {list(loaded)}). A benchmark without one cannot serve "
                f"here: leave it out of this list, or prepare it again with python -m train.data prepare, which "
                "writes train, validation and test where the benchmark has them"
            )
        check_labels(loaded[split], f"{path} ({split})")
        parts.append(loaded[split])
    filled = [part for part in parts if len(part)]  # datasets cannot concatenate an empty table
    return concatenate_datasets(filled) if filled else parts[0]


def check_labels(dataset, name: str) -> None:
    """Every task column holds class ids of its task or -100: a ValueError names the dataset, column, bad value
    and allowed range (at training time it would be an IndexError mid-run, on a GPU a device-side assert)."""
    for task, labels in task_labels().items():
        if task not in dataset.column_names:
            continue
        column = np.asarray(dataset[task], dtype=np.int64)
        bad = (column != IGNORE) & ((column < 0) | (column >= len(labels)))
        if bad.any():
            raise ValueError(
                f"{name}: column {task!r} holds {int(column[bad][0])} in {int(bad.sum())} row(s) (first: row "
                f"{int(np.flatnonzero(bad)[0])}); allowed are 0..{len(labels) - 1} ({', '.join(labels)}) and {IGNORE} "
                "for no label. Prepare the dataset again with python -m train.data prepare."
            )


def stats(dataset, balancing: Balancing | None = None, split: str | None = None) -> dict[str, Any]:
    """
    Per task and class: `n`, `share` (% of the task's labelled rows) and `draw_share` (% of the task's labelled
    draws that training makes under `balancing`, the exact expectation of balanced_sampler). Coverage per task
    (`draw_share`: % of draws that carry the task's label), rows per dataset.
    """
    balancing = balancing or Balancing()
    total = len(dataset)
    labels = label_columns(dataset)
    weights = balanced_weights(dataset, balancing)
    drawn = draw_shares(labels, weights)
    tables, coverage = {}, {}
    for task, names in task_labels().items():
        labelled = labels[task] != IGNORE
        counts = np.bincount(labels[task][labelled], minlength=len(names))
        tables[task] = [
            {
                "label": label,
                "n": int(n),
                "share": round(100 * n / max(1, labelled.sum()), 2),
                "draw_share": round(100 * float(d), 2),
            }
            for label, n, d in zip(names, counts, drawn[task], strict=True)
        ]
        coverage[task] = {
            "n": int(labelled.sum()),
            "share": round(100 * labelled.sum() / max(1, total), 2),
            "draw_share": round(100 * weights[labelled].sum() / max(weights.sum(), 1e-300), 2),
        }
    datasets = Counter(dataset["dataset"]) if "dataset" in dataset.column_names else Counter()
    return {
        "split": split,
        "rows": total,
        "datasets": dict(sorted(datasets.items())),
        "balancing": {**balancing.__dict__, "rule": balancing.describe()},
        "classes": tables,
        "coverage": coverage,
    }


def format_stats(result: dict[str, Any]) -> str:
    per_dataset = ", ".join(f"{name} {n:,}" for name, n in result["datasets"].items())
    lines = [
        f"{result['split'] or 'all'} split: {result['rows']:,} rows ({per_dataset}).",
        f"draw % = share of the task's labelled training draws under {result['balancing']['rule']}.",
    ]
    for task, rows in result["classes"].items():
        lines += ["", f"{task:<10} {'n':>9} {'%':>7} {'draw %':>8}"]
        lines += [f"{r['label']:<10} {r['n']:>9,} {r['share']:>6.2f}% {r['draw_share']:>7.2f}%" for r in rows]
    lines += ["", f"{'task':<10} {'n':>9} {'%':>7} {'draw %':>8}"]
    for task, row in result["coverage"].items():
        lines.append(f"{task:<10} {row['n']:>9,} {row['share']:>6.2f}% {row['draw_share']:>7.2f}%")
    lines.append(f"{'total':<10} {result['rows']:>9,} {'-':>7}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ collator
@dataclass
class FaceAugment:
    """Mild, face-safe augmentation: random resized crop, horizontal flip, colour jitter."""

    scale: tuple[float, float] = (0.8, 1.0)
    ratio: tuple[float, float] = (0.9, 1.1)
    flip: float = 0.5
    jitter: float = 0.2

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        width, height = image.size
        area = width * height * rng.uniform(*self.scale)
        aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
        crop_w = min(width, round(math.sqrt(area * aspect)))
        crop_h = min(height, round(math.sqrt(area / aspect)))
        left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
        image = image.crop((left, top, left + crop_w, top + crop_h))
        if rng.random() < self.flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            image = enhancer(image).enhance(rng.uniform(1 - self.jitter, 1 + self.jitter))
        return image


class SoftBioCollator:
    """
    Rows -> {"pixel_values", "age", "gender", "emotion"}; training rows are augmented first. A row carrying a
    "draw" number (its position in the training draw) is augmented from a seed of its own, so its augmentation
    is the same whichever process or worker collates it and after a resume.
    """

    def __init__(self, image_processor, train: bool = False, augment: FaceAugment | None = None, seed: int = 0):
        self.image_processor = image_processor
        self.augment = (augment or FaceAugment()) if train else None
        self.seed = seed
        self.rng = random.Random(seed)

    def _rng_for(self, row: dict[str, Any]) -> random.Random:
        return random.Random(f"{self.seed}:{row['draw']}") if "draw" in row else self.rng

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        images = [row["image"].convert("RGB") for row in rows]
        if self.augment is not None:
            images = [self.augment(image, self._rng_for(row)) for image, row in zip(images, rows, strict=True)]
        batch = {"pixel_values": self.image_processor(images=images, return_tensors="pt")["pixel_values"]}
        for task in TASKS:
            batch[task] = torch.tensor([IGNORE if row.get(task) is None else int(row[task]) for row in rows])
        return batch


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.data", description="Face benchmarks in the unified softbio schema."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser(
        "prepare",
        help="read a benchmark, decode and resize its images once, save_to_disk",
        description="Read a benchmark from its original layout and save a prepared DatasetDict (train/validation/"
        "test) whose images are already resized; unreadable images and bad rows are counted and skipped.",
    )
    prep.add_argument(
        "--dataset", required=True, choices=sorted(READERS), help="; ".join(f"{k}: {v}" for k, v in SOURCES.items())
    )
    prep.add_argument("--root", required=True, help="the dataset's folder (fairface also takes hub:0.25 / hub:1.25)")
    prep.add_argument("--out", required=True, help="folder for the prepared dataset")
    prep.add_argument("--image-size", type=int, default=336, help="shorter side after resizing (default 336)")
    prep.add_argument("--num-proc", type=int, default=None, help="worker processes (default: every core)")
    prep.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (kept until the end)")
    prep.add_argument("--margin", default="0.25", help="FairFace crop margin: 0.25 (default) or 1.25")
    prep.add_argument("--age-csv", default=None, help="VGGFace2: CSV of estimated ages (columns file,age)")
    show = commands.add_parser(
        "stats",
        help="class and coverage tables of prepared datasets, and what training draws",
        description="Per task and class: n, share and draw share (what training draws under the balancing of "
        "--config, or the study's default: half the class share plus half uniform); coverage per task; rows per "
        "dataset.",
    )
    show.add_argument("paths", nargs="*", help="prepared dataset folders, combined (default: --config's data.train)")
    show.add_argument("--split", default="train", help="which split to describe (default train)")
    show.add_argument(
        "--config", default=None, help="a training config (file, or a name in train/configs): its data balancing"
    )
    show.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prepare":
            options: dict[str, Any] = {}
            if args.dataset == "fairface":
                options["margin"] = args.margin
            if args.dataset == "vggface2":
                options["age_csv"] = args.age_csv
            _splits, report = prepare(
                args.dataset,
                args.root,
                args.out,
                image_size=args.image_size,
                num_proc=args.num_proc or os.cpu_count(),
                overwrite=args.overwrite,
                **options,
            )
            rows = ", ".join(f"{name} {count:,}" for name, count in report["rows"].items())
            skipped = SkipReport(Counter(report["skipped"]["counts"]))
            print(
                f"{args.dataset}: {rows} rows -> {args.out}; {skipped.summary()}; "
                f"{report['images_per_second']} images/s"
            )
        else:
            balancing, paths = Balancing(), args.paths
            if args.config:
                from train.train import add_present_folders, load_config

                data = load_config(args.config)["data"]
                add_present_folders(data)
                balancing, paths = Balancing.from_config(data), paths or data["train"]
            if not paths:
                raise ValueError("stats: give prepared dataset folders, or --config with data.train.")
            result = stats(load_prepared(paths, args.split), balancing, split=args.split)
            print(json.dumps(result, indent=2) if args.json else format_stats(result))
    except (OSError, ValueError) as error:  # a missing, unreadable or unwritable path, or a bad value
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
