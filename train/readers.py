"""The benchmarks' on-disk formats (docs/DATASETS.md) read into unified rows: UTKFace, FairFace (folder or Hub),
RAF-DB, VGGFace2 and a folder of your own. Reading only: train.data prepares, decodes and saves."""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.schema import IGNORE, SPLITS, task_labels

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


def read_vggface2(
    root: Path,
    skips: SkipReport,
    age_csv: Path | None = None,
    per_identity: int | None = None,
    identities: int | None = None,
) -> list[dict]:
    """VGGFace2 with gender from identity_meta.csv and, optionally, ages from a user CSV (`file,age`, file as
    class/img.jpg; model estimates, so kept apart in reports). Without the CSV every row is a gender row.

    A subset, as the study's totals imply one (about 50k images, docs/STUDY.md): `per_identity` images of each
    identity and at most `identities` identities, each chosen by the MD5 of its name (the same on every machine,
    spread over the set rather than the first files of each folder)."""
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
        for path in vggface2_subset(sorted((root / split_dir).glob("*/*.jpg")), per_identity, identities):
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


def by_hash(names: list[str]) -> list[str]:
    return sorted(names, key=lambda name: hashlib.md5(name.encode()).hexdigest())


def vggface2_subset(paths: list[Path], per_identity: int | None, identities: int | None) -> list[Path]:
    """The images kept of a VGGFace2 split: per identity folder, the first `per_identity` by hash; the first
    `identities` identities by hash (None: all)."""
    for name, value in (("per_identity", per_identity), ("identities", identities)):
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: give a number of at least 1, or leave it out.")
    folders: dict[str, list[Path]] = {}
    for path in paths:
        folders.setdefault(path.parent.name, []).append(path)
    kept_ids = set(by_hash(list(folders))[:identities] if identities else folders)
    kept = []
    for identity, files in folders.items():
        if identity in kept_ids:
            chosen = set(by_hash([p.name for p in files])[:per_identity] if per_identity else [p.name for p in files])
            kept += [p for p in files if p.name in chosen]
    return kept


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
