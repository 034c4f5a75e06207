"""The batch command's inputs: image files, folders, lists of paths or URLs, datasets folders, object-store URIs,
expanded into a fixed order of sources (the same on every process and every engine), and read.

Torch-free: the local engine (softbio_hf.predict) and the Ray engine (softbio_hf.predict_ray) both start here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .batch_rows import PredictError, optional_import
from .images import IMAGE_EXTENSIONS, image_files

VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm"}  # softbio_hf.video's (kept light: no cv2 here)


@dataclass(frozen=True)
class Source:
    """One input image: `key` names it in the output; `ref` is what loads it."""

    index: int
    key: str
    ref: Any  # a path or URL string, or (dataset folder, split, row)


def is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "dataset_info.json").is_file()


def expand_inputs(inputs: Sequence[str], limit: int | None = None) -> list[Source]:
    """Every image the inputs name, in a fixed order (the same on every process)."""
    refs: list[tuple[str, Any]] = []
    for item in inputs:
        path = Path(item)
        if item.startswith(("http://", "https://")):
            refs.append((item, item))
        elif path.is_dir() and is_saved_dataset(path):
            refs.extend(dataset_refs(path))
        elif path.is_dir():
            refs.extend((str(p), str(p)) for p in image_files(path, IMAGE_EXTENSIONS | VIDEO_EXTENSIONS))
        elif path.suffix.lower() == ".txt" and path.is_file():
            refs.extend(list_refs(path))
        else:  # an image, or a name that is not there: its row will say so
            refs.append((item, item))
        if limit is not None and len(refs) >= limit:
            break
    refs = refs[:limit] if limit is not None else refs
    return [Source(index, key, ref) for index, (key, ref) in enumerate(refs)]


def list_refs(listing: Path) -> list[tuple[str, str]]:
    """A text file of paths (relative ones against the list's folder) or URLs; blank lines and # comments skipped."""
    refs = []
    for line in listing.read_text(encoding="utf-8", errors="replace").splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if entry.startswith(("http://", "https://")) or Path(entry).is_absolute():
            refs.append((entry, entry))
        else:
            refs.append((entry, str(listing.parent / entry)))
    return refs


def dataset_refs(folder: Path) -> list[tuple[str, Any]]:
    datasets = optional_import("datasets", "train", f"reading the datasets folder {folder}")
    loaded = datasets.load_from_disk(str(folder))
    splits = {"": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)
    refs = []
    for split, part in splits.items():
        if "image" not in part.column_names:
            raise PredictError(f"{folder} holds a dataset without an 'image' column ({part.column_names}).")
        name = f"{folder}:{split}" if split else str(folder)
        refs.extend((f"{name}/{row}", (str(folder), split, row)) for row in range(len(part)))
    return refs


def is_video_source(source: Source) -> bool:
    return isinstance(source.ref, str) and Path(source.ref.split("?")[0]).suffix.lower() in VIDEO_EXTENSIONS
