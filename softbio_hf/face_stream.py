"""The batch command's streaming parts: photos to face crops in DataLoader workers, faces to forward passes.

Kept apart from predict.py, the command, so that its --help and argument checks answer without importing torch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch


class FaceStream(torch.utils.data.IterableDataset):
    """
    Photos -> their face crops, ready for the model: decoding and detection, in DataLoader worker processes
    ahead of the model. Yields one item per photo: its faces' inputs, or the reason it has none.
    """

    def __init__(self, pipe, sources: Sequence, options: dict[str, Any]):
        self.pipe, self.sources, self.options = pipe, list(sources), options
        self._datasets: dict[tuple[str, str], Any] = {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        mine = self.sources if worker is None else self.sources[worker.id :: worker.num_workers]
        for source in mine:
            yield self.faces_of(source)

    def load(self, source):
        from .images import load_image

        if isinstance(source.ref, tuple):
            folder, split, row = source.ref
            if (folder, split) not in self._datasets:
                from datasets import load_from_disk

                loaded = load_from_disk(folder)
                self._datasets[(folder, split)] = loaded[split] if split else loaded
            return load_image(self._datasets[(folder, split)][row]["image"], name=repr(source.key))
        name = repr(source.key)
        if source.ref != source.key:  # a list's relative path: say where it was looked for
            name += f" (read as {source.ref}: a list's relative paths start at the list's folder)"
        return load_image(source.ref, name=name, timeout=self.options.get("timeout", 10.0))

    def faces_of(self, source) -> dict[str, Any]:
        item: dict[str, Any] = {"index": source.index, "key": source.key}
        return photo_faces(self.pipe, item, lambda: self.load(source), self.options)


def photo_faces(pipe, item: dict[str, Any], load: Callable[[], Any], options: dict[str, Any]) -> dict[str, Any]:
    """A photo's face crops, ready for the model (`chunks`), or the reason it has none (`error`): `load()` gives
    its RGB array. Never raises on a bad image: the local command's workers and FaceRows (Ray) both use it."""
    try:
        rgb = load()
        chunks = list(pipe.preprocess(rgb, **options))
    except (ValueError, OSError) as error:  # ImageInputError and the rest: a row says why, the run goes on
        return {**item, "error": str(error)}
    return {**item, "chunks": [chunk for chunk in chunks if chunk["face"] is not None]}


def worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # the model's process keeps the cores; workers decode and detect


class Batcher:
    """Faces from many photos into forward passes of `batch_size`; a photo's rows come out once all its faces
    are scored."""

    def __init__(self, pipe, batch_size: int):
        self.pipe, self.batch_size = pipe, batch_size
        self.waiting: list[tuple[dict, int]] = []  # (photo, face number) not yet scored
        self.open: dict[int, dict[str, Any]] = {}  # photo index -> photo with its scored faces so far

    def add(self, item: dict[str, Any]) -> list[tuple[dict, list]]:
        """Queue a photo; returns the photos finished by the forward passes this made due."""
        chunks = item.get("chunks") or []
        if not chunks:
            return [(item, [])]
        item["outputs"] = [None] * len(chunks)
        self.open[item["index"]] = item
        self.waiting.extend((item, number) for number in range(len(chunks)))
        return self.run(full_only=True)

    def halve_batch(self) -> None:
        print(
            f"batch {self.batch_size} does not fit in memory: continuing with {self.batch_size // 2} faces per pass",
            file=sys.stderr,
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.batch_size //= 2
        if (self.pipe.compiled_batch_size or 0) > self.batch_size:  # the compiled graph has the old batch shape
            self.pipe.compile(self.batch_size)

    def run(self, full_only: bool = False) -> list[tuple[dict, list]]:
        finished = []
        while self.waiting and (len(self.waiting) >= self.batch_size or not full_only):
            batch = self.waiting[: self.batch_size]
            pixel_values = torch.cat([photo["chunks"][number]["pixel_values"] for photo, number in batch])
            try:
                with torch.inference_mode():
                    scored = self.pipe._forward({"pixel_values": pixel_values, "face": None, "is_last": None})
            except torch.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.halve_batch()
                continue  # the same faces again, fewer at a time
            self.waiting = self.waiting[len(batch) :]
            for row, (photo, number) in enumerate(batch):
                chunk = photo["chunks"][number]
                photo["outputs"][number] = {
                    **{k: v[row : row + 1] for k, v in scored.items() if k.startswith("probs_") or k == "embedding"},
                    "face": chunk["face"],
                    "is_last": chunk["is_last"],
                }
                if all(output is not None for output in photo["outputs"]):
                    finished.append((self.open.pop(photo["index"]), self.pipe.postprocess(photo["outputs"])))
        return finished
