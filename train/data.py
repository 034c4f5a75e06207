"""The public face benchmarks in one `datasets` schema: read, prepare once, describe, combine, sample, collate.

    python -m train.data prepare --dataset utkface --root UTKFace/ --out data/utkface
    python -m train.data stats data/utkface data/fairface data/rafdb [--json]

Unified row (DESIGN.md): image, age, gender, emotion (class ids; -100 = no label), age_years (exact age or
None), race (fairness reports only), dataset, split. Label orders are the canonical ones of softbio_hf.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from softbio_hf.safe_files import atomic_write_json, replace_folder, staging_folder, unwritable_reason
from train.errors import MissingExtra, require_train_extra
from train.readers import READERS, SOURCES, SkipReport, fairface_from_hub, inside
from train.sampling import Balancing, balanced_weights, draw_shares, label_columns
from train.schema import IGNORE, SPLITS, TASKS, task_labels


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
    from softbio_hf.images import ImageInputError, load_image

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
    if reason := unwritable_reason(out / "dataset_dict.json"):
        raise ValueError(f"--out {out} cannot be written: {reason}. Choose a folder you can write.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} is not empty; choose another folder or pass --overwrite to replace it.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return staging_folder(out)
    except OSError as error:
        raise ValueError(f"--out {out}: cannot write beside it ({error.strerror}); choose a writable folder.") from None


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
    from softbio_hf.version import add_version_argument  # stdlib only: --version needs no torch

    add_version_argument(parser)
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
    prep.add_argument(
        "--per-identity",
        type=int,
        default=None,
        metavar="N",
        help="VGGFace2: keep N images of each identity (chosen by hash; the study's mix implies about 50k images, "
        "which --per-identity 5 or 6 brackets: see docs/STUDY.md)",
    )
    prep.add_argument(
        "--identities", type=int, default=None, metavar="N", help="VGGFace2: keep N identities (chosen by hash)"
    )
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
        require_train_extra(f"python -m train.data {args.command}", "datasets")
        if args.command == "prepare":
            options: dict[str, Any] = {}
            if args.dataset == "fairface":
                options["margin"] = args.margin
            if args.dataset == "vggface2":
                options.update(age_csv=args.age_csv, per_identity=args.per_identity, identities=args.identities)
            elif args.per_identity is not None or args.identities is not None:
                raise ValueError("--per-identity and --identities choose a VGGFace2 subset: use them with vggface2.")
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
                from train.config import add_present_folders, load_config

                data = load_config(args.config)["data"]
                add_present_folders(data)
                balancing, paths = Balancing.from_config(data), paths or data["train"]
            if not paths:
                raise ValueError("stats: give prepared dataset folders, or --config with data.train.")
            result = stats(load_prepared(paths, args.split), balancing, split=args.split)
            print(json.dumps(result, indent=2) if args.json else format_stats(result))
    except (OSError, ValueError, MissingExtra) as error:  # a missing or unwritable path, a bad value, an extra
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
