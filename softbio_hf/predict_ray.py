"""The batch command on a Ray cluster: `python -m softbio_hf.predict INPUTS --engine ray --out DIR`.

Photos are listed on the driver (local folders, .txt lists, datasets folders, and object-store URIs such as
s3://bucket/photos/ or gs://..., through pyarrow's file systems), read by Ray tasks, mapped through FaceRows (the
local command's rows, softbio_hf.batch_rows) on an actor pool that holds the model once per actor (with GPUs where
--gpus-per-actor asks), and written by the driver as whole Parquet files into DIR, one per finished batch. A lost
actor's batch is retried on another; a run stopped anywhere continues with --resume, which skips the photos whose
rows are already in DIR. Needs `pip install 'softbio[ray]'`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import safe_files
from .batch_inputs import IMAGE_EXTENSIONS, Source, expand_inputs, is_video_source
from .batch_rows import FaceRows, PredictError, check_model_spec, column_type, exit_code, optional_import
from .images import MAX_DOWNLOAD_BYTES

PART_GLOB = "part-*.parquet"


class FaceTable(FaceRows):
    """FaceRows answering with a typed Arrow table: every batch has the table's one schema, also a batch whose
    every photo failed (whose columns would otherwise be typed null and clash with the others' in Parquet)."""

    def __call__(self, batch: dict[str, Sequence]):
        import pyarrow

        columns = super().__call__(batch)
        schema = pyarrow.schema([(name, column_type(name)) for name in self.names])
        return pyarrow.Table.from_pydict(columns, schema=schema)


# ------------------------------------------------------------------------------------------------ inputs
def is_uri(item: str) -> bool:
    """An object-store or other file-system URI (s3://, gs://, abfs://, hdfs://, file://), read through pyarrow;
    http(s) URLs are single photos, as for the local engine."""
    return "://" in item and not item.startswith(("http://", "https://"))


def uri_refs(uri: str) -> list[tuple[str, str]]:
    """The images under a URI (a folder, recursively, in name order) or the URI itself."""
    from pyarrow import fs

    try:
        filesystem, path = fs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(path)
        if info.type == fs.FileType.File:
            return [(uri, uri)]
        if info.type == fs.FileType.NotFound:
            return [(uri, uri)]  # its row will say so, as for a local name that is not there
        found = filesystem.get_file_info(fs.FileSelector(path, recursive=True))
    except (OSError, ValueError) as error:  # a scheme pyarrow lacks, credentials, a bucket that is not there
        raise PredictError(f"{uri} cannot be listed ({error}); check the URI and its credentials.") from None
    scheme = uri.split("://", 1)[0]
    files = sorted(
        i.path for i in found if i.type == fs.FileType.File and Path(i.path).suffix.lower() in IMAGE_EXTENSIONS
    )
    return [(f"{scheme}://{name}", f"{scheme}://{name}") for name in files]


def expand_sources(inputs: Sequence[str], limit: int | None) -> list[Source]:
    """Every photo the inputs name, in the local engine's order; URIs listed through pyarrow."""
    refs: list[tuple[str, Any]] = []
    for item in inputs:
        if is_uri(item):
            refs += uri_refs(item)
        else:
            refs += [(source.key, source.ref) for source in expand_inputs([item])]
        if limit is not None and len(refs) >= limit:
            break
    refs = refs[:limit] if limit is not None else refs
    sources = [Source(index, key, ref) for index, (key, ref) in enumerate(refs)]
    videos = [source.key for source in sources if is_video_source(source)]
    if videos:
        raise PredictError(
            f"--engine ray analyses photos; {len(videos)} inputs are clips ({videos[0]}, ...): run them with the "
            "local engine (leave out --engine ray), which tracks faces through a clip."
        )
    return sources


_DATASETS: dict[tuple[str, str], Any] = {}  # a Ray worker's open datasets folders, kept across its tasks


def dataset_row_bytes(folder: str, split: str, row: int) -> bytes:
    """A datasets folder's image, encoded, as stored (never decoded here)."""
    import datasets

    if (folder, split) not in _DATASETS:
        loaded = datasets.load_from_disk(folder)
        part = loaded[split] if split else loaded
        _DATASETS[(folder, split)] = part.cast_column("image", datasets.Image(decode=False))
    image = _DATASETS[(folder, split)][row]["image"]
    return image["bytes"] if image.get("bytes") else Path(image["path"]).read_bytes()


def ref_bytes(ref: Any) -> bytes:
    """A photo's encoded bytes, at most MAX_DOWNLOAD_BYTES (a file that large is not a photo to analyse)."""
    from .images import fetch_url

    if isinstance(ref, list):  # (folder, split, row) of a datasets folder
        return dataset_row_bytes(*ref)
    if ref.startswith(("http://", "https://")):
        return fetch_url(ref, 10.0, repr(ref))
    if is_uri(ref):
        from pyarrow import fs

        filesystem, path = fs.FileSystem.from_uri(ref)
        with filesystem.open_input_file(path) as handle:
            if handle.size() > MAX_DOWNLOAD_BYTES:
                raise ValueError(f"{ref!r} is larger than {MAX_DOWNLOAD_BYTES:,} bytes; downscale it first")
            return handle.read()
    path = Path(ref)
    if not path.is_file():
        raise ValueError("no such image file; check the path" if not path.exists() else "not a file")
    if path.stat().st_size > MAX_DOWNLOAD_BYTES:
        raise ValueError(f"larger than {MAX_DOWNLOAD_BYTES:,} bytes; downscale it first")
    return path.read_bytes()


def read_photos(batch: dict[str, Any]) -> dict[str, list]:
    """Ray task: each photo's bytes, or why they could not be read (an `error` the rows then say); never raises."""
    data, errors = [], []
    for key, ref in zip(batch["source"], batch["ref"], strict=True):
        try:
            data.append(ref_bytes(json.loads(ref)))
            errors.append("")
        except (OSError, ValueError) as error:
            data.append(b"")
            errors.append(f"{key!r}: {error}")
    return {"index": list(batch["index"]), "source": list(batch["source"]), "bytes": data, "error": errors}


# ------------------------------------------------------------------------------------------------ output
def part_files(out: str) -> list[tuple[Any, str]]:
    """(file system, path) of every Parquet part under --out, local or a URI."""
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(out) if is_uri(out) else (fs.LocalFileSystem(), str(Path(out).resolve()))
    if filesystem.get_file_info(root).type != fs.FileType.Directory:
        return []
    found = filesystem.get_file_info(fs.FileSelector(root))
    return sorted((filesystem, i.path) for i in found if Path(i.path).match(PART_GLOB))


def done_photos(out: str) -> set[tuple[int, str]]:
    """(index, source) of every photo with rows in --out: what --resume skips. Parts are written whole, so a part
    that cannot be read was not written by this command: named, never taken for done."""
    import pyarrow.parquet as parquet

    done = set()
    for filesystem, path in part_files(out):
        try:
            table = parquet.read_table(path, filesystem=filesystem, columns=["index", "source"])
        except Exception as error:  # pyarrow's errors have no one base class (ArrowInvalid, OSError)
            raise PredictError(f"--resume: {path} cannot be read ({error}); move it out of --out and resume.") from None
        done |= set(zip(table.column("index").to_pylist(), table.column("source").to_pylist(), strict=True))
    return done


def write_part(out: str, name: str, table) -> None:
    """One part, whole: a local file through safe_files (renamed into place); an object store writes an object
    whole by itself."""
    import pyarrow.parquet as parquet

    if is_uri(out):
        from pyarrow import fs

        filesystem, root = fs.FileSystem.from_uri(out)
        parquet.write_table(table, f"{root.rstrip('/')}/{name}", filesystem=filesystem)
        return
    with safe_files.atomic_path(Path(out) / name) as partial:
        parquet.write_table(table, partial)


def check_out_folder(out: str, resume: bool, overwrite: bool) -> None:
    """--out for the Ray engine is a folder of Parquet parts: everything about it that can be said before any work."""
    if resume and overwrite:
        raise PredictError("--resume continues an output and --overwrite replaces it: choose one.")
    if is_uri(out):
        has_parts = bool(part_files(out))
    else:
        folder = Path(out)
        if folder.exists() and not folder.is_dir():
            raise PredictError(f"--out {out} is a file; --engine ray writes a folder of Parquet files: name a folder.")
        problem = safe_files.unwritable_reason(folder / "part.parquet")
        if problem:
            raise PredictError(f"--out {out} cannot be written: {problem}. Choose --out in a folder you can write.")
        has_parts = bool(part_files(out))
        if folder.is_dir() and any(folder.iterdir()) and not has_parts:
            raise PredictError(f"--out {out} holds files that are not this command's; choose an empty or new folder.")
    if has_parts and not (resume or overwrite):
        raise PredictError(f"--out {out} exists; continue it with --resume, or replace it with --overwrite.")


def parse_actors(text: str) -> tuple[int, int]:
    """--actors N (a fixed pool) or MIN,MAX (autoscaled between them)."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 1 or sizes[0] > sizes[-1]:
        raise PredictError(f"--actors {text}: give N (at least 1) or MIN,MAX with 1 <= MIN <= MAX.")
    return sizes[0], sizes[-1]


# --------------------------------------------------------------------------------------------------- run
def predict_ray(
    inputs: Sequence[str],
    model: str,
    out: str,
    *,
    actors: tuple[int, int] = (1, 1),
    gpus_per_actor: float = 0,
    cpus_per_actor: float = 1,
    photos_per_task: int = 32,
    address: str | None = None,
    detector: str = "auto",
    batch_size: int = 64,
    device: str | None = None,
    dtype: str = "auto",
    compile: bool = False,
    backend: str = "torch",
    limit: int | None = None,
    probabilities: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    on_part: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The Ray engine; `on_part(photos_so_far)` is called after each part is written (progress hooks, tests)."""
    ray = optional_import("ray", "ray", "--engine ray")
    optional_import("ray.data", "ray", "--engine ray")
    check_out_folder(out, resume, overwrite)
    check_model_spec(model)
    lock = None if is_uri(out) else Path(out).with_name(Path(out).name + ".lock")  # an object store: no lock
    busy = f"--out {out} is being written by another run of this command; wait for it to end, or choose another."
    options = {
        "model": model, "backend": backend, "device": device or ("cuda" if gpus_per_actor else "cpu"), "dtype": dtype,
        "detector": detector, "probabilities": probabilities, "compile": compile, "batch_size": batch_size,
        "threads": max(1, int(cpus_per_actor)),
    }  # fmt: skip
    pool = {"actors": actors, "gpus_per_actor": gpus_per_actor, "cpus_per_actor": cpus_per_actor}
    try:
        with safe_files.holding(lock, busy) if lock else contextlib.nullcontext():
            sources = expand_sources(inputs, limit)
            done = done_photos(out) if resume else set()
            pending = [source for source in sources if (source.index, source.key) not in done]
            before = [path for _fs, path in part_files(out)] if overwrite else []
            stats = run_pool(ray, pending, out, options, pool, photos_per_task, address, on_part)
            if not is_uri(out):
                for path in before:  # --overwrite: the old run's parts go once the new run's are all written
                    Path(path).unlink(missing_ok=True)
            return stats
    except (safe_files.LockBusy, safe_files.LockUnsupported) as error:
        raise PredictError(str(error)) from None


def run_pool(
    ray,
    pending: list[Source],
    out: str,
    options: dict[str, Any],
    pool: dict[str, Any],
    photos_per_task: int,
    address: str | None,
    on_part: Callable[[int], None] | None,
) -> dict[str, Any]:
    """The photos through the actor pool, each finished batch written as a part as it comes back."""
    from tqdm.auto import tqdm

    started_here = not ray.is_initialized()  # a cluster the caller joined (ray.init) stays up after the run
    if started_here:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts photos; Ray's count blocks
    run_id, stats = uuid.uuid4().hex[:8], {"photos": 0, "faces": 0, "no_face": 0, "errors": 0, "rows": 0}
    started = time.perf_counter()
    try:
        if not is_uri(out):
            Path(out).mkdir(parents=True, exist_ok=True)
        if pending:
            items = [{"index": s.index, "source": s.key, "ref": json.dumps(s.ref)} for s in pending]
            photos = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // photos_per_task)))
            # Reading waits on disks and networks: its tasks take no CPU of the pool's, or actors holding every CPU
            # would leave none to read with (a deadlock on a small cluster); two readers per actor at most, since
            # Ray would otherwise start a worker process for every zero-CPU task at once.
            readers = ray.data.TaskPoolStrategy(size=2 * pool["actors"][1])
            read = photos.map_batches(read_photos, batch_size=photos_per_task, num_cpus=0, compute=readers)
            rows = read.map_batches(
                FaceTable,
                fn_constructor_kwargs=options,
                batch_size=photos_per_task,
                compute=ray.data.ActorPoolStrategy(min_size=pool["actors"][0], max_size=pool["actors"][1]),
                num_gpus=pool["gpus_per_actor"] or None,
                num_cpus=pool["cpus_per_actor"],
            )  # Ray Data's actor pools restart a lost actor and retry its batch (max_restarts, max_task_retries -1)
            bar = tqdm(total=len(pending), desc="photos", unit="photo")
            for number, table in enumerate(rows.iter_batches(batch_size=None, batch_format="pyarrow")):
                if table.num_rows:
                    write_part(out, f"part-{run_id}-{number:06d}.parquet", table)
                    count(stats, table)
                    bar.update(len(set(table.column("index").to_pylist())))
                    bar.set_postfix(faces=stats["faces"])
                    if on_part is not None:
                        on_part(stats["photos"])
            bar.close()
    except ray.exceptions.RayError as error:  # a model that fails to load in the actors, a cluster gone
        raise PredictError(f"the Ray run failed: {ray_cause(error)}") from None
    finally:
        if started_here:
            ray.shutdown()
    stats["seconds"] = round(time.perf_counter() - started, 2)
    return stats


def count(stats: dict[str, int], table) -> None:
    """A written part's photos, faces, photos without one and unreadable ones, added to the run's counts."""
    rows = table.select(["index", "face", "status"]).to_pylist()
    stats["photos"] += len({row["index"] for row in rows})
    stats["faces"] += sum(row["face"] >= 0 for row in rows)
    stats["no_face"] += sum(row["status"] == "no face" for row in rows)
    stats["errors"] += sum(row["status"].startswith("error") for row in rows)
    stats["rows"] += len(rows)


def ray_cause(error: Exception) -> str:
    """The user's error inside Ray's wrapping (a PredictError raised in an actor's constructor, say)."""
    cause = getattr(error, "cause", None) or error.__cause__
    text = str(cause or error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


def main_ray(args: argparse.Namespace) -> int:
    """`python -m softbio_hf.predict --engine ray ...`: the options that belong to the local engine refused, the
    run, and the summary."""
    local_only = [name for name in ("tracks", "timeline") if getattr(args, name) is not None]
    if local_only:
        raise PredictError(f"--{local_only[0]} is for clips, which the local engine analyses; leave out --engine ray.")
    if args.ray_batch < 1 or args.cpus_per_actor <= 0 or args.gpus_per_actor < 0:
        raise PredictError("--ray-batch must be at least 1, --cpus-per-actor above 0, --gpus-per-actor at least 0.")
    stats = predict_ray(
        args.inputs,
        args.model,
        args.out,
        actors=parse_actors(args.actors),
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        photos_per_task=args.ray_batch,
        address=args.ray_address,
        detector=args.detector,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        backend=args.backend,
        limit=args.limit,
        probabilities=args.probabilities,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    print(
        f"{stats['photos']} photos this run: {stats['faces']} faces, {stats['no_face']} without a face, "
        f"{stats['errors']} unreadable; {stats['rows']} rows added to {args.out} ({stats['seconds']} s)"
    )
    return exit_code(stats, args.out)
