"""Batch analysis: photos in, one table row per face out. Streams, resumes, and splits across processes.

    python -m softbio_hf.predict photos/ more.jpg urls.txt --model runs/lora/best --out faces.csv
    python -m softbio_hf.predict data/fairface --model you/softbio-lora --out faces.parquet --probabilities
    torchrun --nproc_per_node 4 -m softbio_hf.predict photos/ --model M --out faces.jsonl  # or accelerate launch
    python -m softbio_hf.predict s3://bucket/photos/ --model M --engine ray --actors 2,8 --gpus-per-actor 1 --out s3://bucket/faces/

INPUT is image files, folders (searched recursively for images), text files listing paths or URLs (one a
line), or folders written by `datasets` (`save_to_disk`, e.g. by python -m train.data prepare). Each face gets
a row: source, face index, box, detection score, each task's label and score, age in years (and with
--probabilities every class's probability). A photo without a face, or one that cannot be read, gets one row
saying so; the run goes on. Rows are kept in OUT.parts/ (JSON Lines, one block per photo) while the run goes,
so an interrupted run continues with --resume; at the end they are merged, in input order, into OUT.
With --engine ray (softbio_hf/predict_ray.py, docs/scaling.md) the photos go through the same rows on a Ray
actor pool, and OUT is a folder of Parquet files.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import safe_files
from .batch_inputs import Source, expand_inputs, is_video_source
from .batch_rows import FaceRows, PredictError, check_model_spec, exit_code, optional_import, rows_for
from .safe_files import atomic_path, atomic_write

VIDEO_COLUMNS = ["frame", "time_s", "track_id"]
FORMATS = (".csv", ".jsonl", ".parquet")


# -------------------------------------------------------------------------------------------- the work
def video_rows(
    pipe, source: Source, options: dict[str, Any], tasks, probabilities: bool, on_frame=None, timeline=None
) -> tuple[list[dict], int]:
    """One row per face per analysed frame (with frame, time_s, track_id), then one `kind: track` row per person
    (written to --tracks): the video's block, written at once like a photo's. A clip that stopped decoding early
    says so in its rows' status, never "ok". `on_frame(entry)` is called per analysed frame (the progress bar);
    `timeline` is the --timeline folder. Returns the rows and the number of frames analysed."""
    from .video import VideoInputError

    item = {"index": source.index, "key": source.key}
    try:
        result = pipe(source.ref, on_analysed=on_frame, **options)
    except (VideoInputError, ValueError, OSError) as error:
        return rows_for({**item, "error": str(error)}, [], tasks, probabilities), 0
    faces = [face for frame in result["frames"] for face in frame["faces"]]
    rows = rows_for(item, faces, tasks, probabilities)
    decoding = result["decoding"]
    if decoding["status"] != "complete":  # analysed up to where it stopped: the rows say it is not the whole clip
        for row in rows:
            row["status"] = f"truncated: {decoding['reason']}; {len(result['frames'])} frames analysed"
    if faces:
        for row, face in zip(rows, faces, strict=True):
            row.update({key: face[key] for key in VIDEO_COLUMNS})
    for track in result["tracks"]:
        row = {"kind": "track", "index": source.index, "source": source.key, "face": -2, "faces": len(faces)}
        row.update({k: track[k] for k in ("track_id", "first_frame", "last_frame", "first_time_s", "last_time_s")})
        row["frames"] = track["frames"]
        for task in tasks:
            row.update({f"{task}_{key}": track[task][key] for key in ("label", "score", "agreement")})
        if "years" in track.get("age", {}):
            row["age_years"] = track["age"]["years"]
        rows.append(row)
        if timeline is not None and "timeline" in track:
            write_timeline(Path(timeline), source, track)
    return rows, len(result["frames"])


def write_timeline(folder: Path, source: Source, track: dict[str, Any]) -> None:
    """--timeline: a track's emotion over the clip as a PNG and a CSV (time_s, frame, one column per emotion)."""
    import csv
    import io

    from .safe_files import atomic_write_bytes, atomic_write_text
    from .video import timeline_image

    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{source.index:05d}-{Path(str(source.key)).stem}-track{track['track_id']}"
    picture = io.BytesIO()
    timeline_image(track).save(picture, format="PNG")
    atomic_write_bytes(stem.with_suffix(".png"), picture.getvalue())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(track["timeline"][0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(track["timeline"])
    atomic_write_text(stem.with_suffix(".csv"), text.getvalue())


def track_columns(tasks: dict[str, list[str]]) -> list[str]:
    names = ["index", "source", "track_id", "first_frame", "last_frame", "first_time_s", "last_time_s", "frames"]
    for task in tasks:
        names += [f"{task}_label", f"{task}_score", f"{task}_agreement"]
    return [*names, "age_years"] if "age" in tasks else names


# ---------------------------------------------------------------------------------------------- output
def parts_folder(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def block_text(rows: list[dict[str, Any]]) -> str:
    """A photo's or video's rows as one block of JSON lines for its part file. Each row carries the block's length:
    a video's block (faces, then one row per track) torn anywhere, also after its first track row, is then known
    unfinished on --resume."""
    return "".join(json.dumps({**row, "block": len(rows)}) + "\n" for row in rows)


def json_rows(lines: list[str]) -> tuple[list[dict[str, Any]], int]:
    """The JSON object rows among `lines` (blank ones skipped) and how many lines were not one (damaged)."""
    rows, damaged = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            damaged += 1
            continue
        if isinstance(row, dict) and "index" in row and "source" in row:
            rows.append(row)
        else:
            damaged += 1
    return rows, damaged


def complete_blocks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the photos whose block is whole: a photo with a row lost (torn or damaged) is done again."""
    counts: dict[Any, int] = {}
    for row in rows:
        counts[row["index"]] = counts.get(row["index"], 0) + 1
    # parts written before `block` lack it: a photo's rows are then its faces (or its one status row)
    return [r for r in rows if counts[r["index"]] >= r.get("block", max(1, int(r.get("faces") or 0)))]


def read_part(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """A part file's whole photos: without an unfinished last line or photo (a crash mid-write), nor a damaged line
    and its photo (a disk or copy that garbled it), which `repair` also cuts off the file, so those photos are done
    again."""
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    rows, damaged = json_rows(complete.decode(errors="replace").splitlines())
    whole = complete_blocks(rows)
    if damaged:
        print(f"{path}: {damaged} damaged line(s) skipped; their photos are analysed again.", file=sys.stderr)
    if len(whole) != len(rows) or damaged:
        complete = "".join(json.dumps(r) + "\n" for r in whole).encode()
    if repair and complete != data:
        safe_files.atomic_write_bytes(path, complete)
    return whole


def output_format(out: Path) -> str:
    """The table's format, from its suffix in any case (faces.CSV is a CSV file): the one rule for every reader
    and writer here."""
    return out.suffix.lower()


def read_output(out: Path) -> list[dict[str, Any]]:
    """Rows of a finished output file (for --resume after a finished run); a table that cannot be read back (cut
    short, edited, not ours) is a PredictError naming it: its rows are never taken for done or dropped silently."""
    damaged = f"--resume: {out} cannot be read back as this command's table"
    fix = "restore it, or start again with --overwrite (it replaces the table)"
    if output_format(out) == ".jsonl":
        lines = out.read_text(encoding="utf-8", errors="replace").splitlines()
        rows, bad = json_rows(lines)
        if bad:
            raise PredictError(f"{damaged}: {bad} of its {len(lines)} lines are not JSON rows (cut short?); {fix}.")
        return rows
    if output_format(out) == ".csv":
        with out.open(newline="", encoding="utf-8", errors="replace") as handle:
            rows = list(csv.DictReader(handle))
        try:
            for row in rows:
                row.update({key: int(row[key]) for key in ("index", "face", "faces", "track_id") if row.get(key)})
        except (ValueError, TypeError) as error:
            raise PredictError(f"{damaged} ({error}); {fix}.") from None
        if rows and not {"index", "source"} <= set(rows[0]):
            raise PredictError(f"{damaged}: it has no index and source columns; {fix}.")
        return rows
    parquet = optional_import("pyarrow.parquet", "train", "a .parquet table")
    pyarrow = optional_import("pyarrow", "train", "a .parquet table")
    try:
        return parquet.read_table(out).to_pylist()
    except (pyarrow.ArrowException, OSError) as error:
        raise PredictError(f"{damaged} ({error}); {fix}.") from None


def write_output(out: Path, rows: list[dict[str, Any]], names: list[str]) -> None:
    """The final table, in input order, written whole (safe_files): a crash never leaves half a file."""
    rows = sorted(rows, key=lambda r: (int(r["index"]), int(r["face"])))
    kind = output_format(out)
    if kind == ".csv":
        with atomic_write(out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=names, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    elif kind == ".jsonl":
        with atomic_write(out, "w") as handle:
            for row in rows:
                handle.write(json.dumps({k: row.get(k) for k in names}) + "\n")
    else:
        pyarrow = optional_import("pyarrow", "train", "a .parquet table")
        parquet = optional_import("pyarrow.parquet", "train", "a .parquet table")
        with atomic_path(out) as partial:
            parquet.write_table(pyarrow.Table.from_pylist([{k: row.get(k) for k in names} for row in rows]), partial)


def check_output(out: Path, resume: bool, overwrite: bool, option: str = "--out") -> None:
    """Everything about an output table that can be said before any work: format, place, an earlier run's."""
    if output_format(out) not in FORMATS:
        kind = out.suffix or "a file without extension"
        raise PredictError(f"{option} {out}: cannot write {kind}; use one of {', '.join(FORMATS)}.")
    if resume and overwrite:
        raise PredictError("--resume continues an output and --overwrite replaces it: choose one.")
    if out.is_dir():
        raise PredictError(f"{option} {out} is a folder; give a file ending in {', '.join(FORMATS)}.")
    if parts_folder(out).exists() and not parts_folder(out).is_dir():
        raise PredictError(f"{option} {out}: {parts_folder(out)} (where rows wait) is a file; move it away.")
    problem = safe_files.unwritable_reason(out)
    if problem:
        raise PredictError(f"{option} {out} cannot be written: {problem}. Choose {option} in a folder you can write.")
    if output_format(out) == ".parquet":  # refused now, not after all the work
        optional_import("pyarrow.parquet", "train", f"{option} {out} (a .parquet table)")
    exists = out.exists() or parts_folder(out).exists()
    if exists and not (resume or overwrite):
        raise PredictError(f"{option} {out} exists; continue it with --resume, or replace it with --overwrite.")


def check_tracks(out: Path, tracks: Path | None, resume: bool, overwrite: bool) -> None:
    if tracks is None:
        return
    if tracks.resolve() == out.resolve():
        raise PredictError(f"--tracks {tracks} is --out too: the track table would replace the faces; give another.")
    check_output(tracks, resume, overwrite, "--tracks")


@contextlib.contextmanager
def holding(out: Path, option: str = "--out") -> Iterator[None]:
    """The output, held for the run: a second run on the same --out (or --tracks) is refused while the first writes
    it (two runs appending to one part file would duplicate rows; two writing one track table would lose one's)."""
    busy = (
        f"{option} {out} is being written by another run of this command; wait for it to end, or choose another "
        f"{option}."
    )
    try:
        with safe_files.holding(out.with_name(out.name + ".lock"), busy):
            yield
    except (safe_files.LockBusy, safe_files.LockUnsupported) as error:
        raise PredictError(str(error)) from None
    except OSError as error:  # the place changed since check_output, or a file system that refuses
        raise PredictError(f"{option} {out} cannot be written ({error.strerror}); choose another {option}.") from None


@contextlib.contextmanager
def holding_outputs(out: Path, tracks: Path | None) -> Iterator[None]:
    with contextlib.ExitStack() as held:
        held.enter_context(holding(out))
        if tracks is not None:
            held.enter_context(holding(tracks, "--tracks"))
        yield


# ------------------------------------------------------------------------------------------------- run
class SingleProcess:
    """What `predict` needs of accelerate's PartialState when no launcher started several processes, so the
    command runs with the package's own dependencies (accelerate is in the [train] extra)."""

    is_main_process, process_index = True, 0

    def __init__(self, device: str | None):
        import torch

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def wait_for_everyone(self) -> None:
        pass

    @contextlib.contextmanager
    def split_between_processes(self, items: list) -> Iterator[list]:
        yield items


def process_state(device: str | None):
    """accelerate's PartialState under torchrun / accelerate launch (it splits the photos), else one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SingleProcess(device)
    import torch

    PartialState = optional_import("accelerate", "train", "running on several processes").PartialState
    # cpu=True lets accelerate join processes started by torchrun with gloo when there is no GPU to use
    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


def needs_torch(backend: str) -> None:
    """The command decodes, finds faces and batches them with torch whichever runtime does the forward pass: on
    an install without torch (the server's), say what to install, or how to serve the export without it."""
    try:
        import torch  # noqa: F401
    except ImportError:
        extra = backend if backend in ("onnx", "openvino") else "train"
        served = (
            f" (or, without torch, serve the export: python -m softbio_hf.serve --model EXPORT_DIR --backend {backend})"
            if backend in ("onnx", "openvino")
            else ""
        )
        raise PredictError(
            f"python -m softbio_hf.predict needs torch, also with --backend {backend}: it decodes, finds the faces "
            f"and batches them with torch. Install softbio with it: pip install 'softbio[{extra}]'{served}."
        ) from None


def summed_over_processes(stats: dict[str, int]) -> dict[str, int]:
    """Each count added up over the processes torchrun / accelerate launch started (each analysed its share)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return stats
    shares: list[dict[str, int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, stats)
    return {key: sum(share[key] for share in shares if share) for key in stats}


def predict(
    inputs: Sequence[str],
    model: str,
    out: str | Path,
    *,
    detector: str = "auto",
    batch_size: int = 64,
    num_workers: int = 2,
    device: str | None = None,
    dtype: str = "auto",
    compile: bool = False,
    backend: str = "torch",
    limit: int | None = None,
    probabilities: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    on_photo=None,
    tracks: str | Path | None = None,
    every: int | None = None,
    timeline: str | Path | None = None,
) -> dict[str, Any]:
    """The whole command; `on_photo(count)` is called after each photo is written (progress hooks, tests)."""
    out, tracks = Path(out), Path(tracks) if tracks is not None else None
    check_output(out, resume, overwrite)  # before the heavy imports: a wrong --out is said at once
    check_tracks(out, tracks, resume, overwrite)
    check_model_spec(model)  # a folder that is not there is said now, not after the imports (or as a Hub id)
    needs_torch(backend)

    state = process_state(device)
    # With --overwrite the old table stays until the new one replaces it (write_output renames over it), so a
    # run that fails early loses nothing.
    with holding_outputs(out, tracks) if state.is_main_process else contextlib.nullcontext():
        import shutil

        import torch
        from tqdm.auto import tqdm

        from .face_stream import FaceStream, worker_init

        if overwrite and state.is_main_process:
            shutil.rmtree(parts_folder(out), ignore_errors=True)  # an unfinished older run's rows, not the table
        state.wait_for_everyone()
        sources = expand_inputs(inputs, limit)
        face_rows = FaceRows(
            model,
            backend=backend,
            device=device or str(state.device),
            dtype=dtype,
            detector=detector,
            probabilities=probabilities,
            compile=compile,
            batch_size=batch_size,
        )
        pipe, tasks, names = face_rows.pipe, face_rows.tasks, list(face_rows.names)
        if compile and state.is_main_process:
            print(
                f"compiled the model for batches of {batch_size} in {face_rows.compile_seconds:.1f} s", file=sys.stderr
            )
        if any(is_video_source(source) for source in sources):
            names += VIDEO_COLUMNS
        parts = parts_folder(out)
        parts.mkdir(parents=True, exist_ok=True)
        if state.is_main_process:  # cut what a crash left half-written, once, before anyone reads or appends
            for path in parts.glob("part-*.jsonl"):
                read_part(path, repair=True)
        state.wait_for_everyone()
        # A photo is known by its place in the inputs and its name: the same file listed twice is analysed twice.
        done_before = {(int(r["index"]), r["source"]) for r in read_output(out)} if resume and out.exists() else set()
        for path in sorted(parts.glob("part-*.jsonl")):
            done_before |= {(r["index"], r["source"]) for r in read_part(path)}
        state.wait_for_everyone()  # every process has read the parts before any appends
        pending = [s for s in sources if (s.index, s.key) not in done_before]
        options = {"detector": detector}
        stats = {"photos": 0, "faces": 0, "no_face": 0, "errors": 0}
        stats |= {"clips": 0, "clip_frames": 0, "clip_faces": 0, "truncated": 0}  # clips count among the photos
        started = time.perf_counter()
        with state.split_between_processes(pending) as mine:
            videos = [source for source in mine if is_video_source(source)]
            loader = torch.utils.data.DataLoader(
                FaceStream(pipe, [source for source in mine if not is_video_source(source)], options),
                batch_size=None,
                num_workers=num_workers,
                worker_init_fn=worker_init if num_workers else None,
                prefetch_factor=4 if num_workers else None,  # a bounded queue: memory stays flat
            )
            batcher = face_rows.batcher()
            bar = tqdm(total=len(mine), desc="photos", unit="photo", disable=not state.is_main_process)
            with (parts / f"part-{state.process_index:03d}.jsonl").open("a") as part:

                def write(finished):
                    for item, records in finished:
                        rows = face_rows.rows(item, records)
                        part.write(block_text(rows))  # one block per photo
                        part.flush()
                        stats["photos"] += 1
                        stats["faces"] += len(records)
                        stats["errors"] += "error" in item
                        stats["no_face"] += "error" not in item and not records
                        bar.update(1)
                        speed = stats["photos"] / (time.perf_counter() - started)
                        bar.set_postfix(faces=stats["faces"], img_s=f"{speed:.1f}")
                        if on_photo is not None:
                            on_photo(stats["photos"])

                for item in loader:
                    write(batcher.add(item))
                write(batcher.run())
                for video in videos:  # frames are decoded here; their faces go through the model in batches
                    frames_bar = tqdm(desc=f"frames of {video.key}", unit="frame", leave=False, disable=bar.disable)
                    rows, frames = video_rows(
                        pipe,
                        video,
                        {**options, "every": every},
                        tasks,
                        probabilities,
                        lambda _entry, bar=frames_bar: bar.update(1),  # moves as each frame is analysed
                        timeline,
                    )
                    frames_bar.close()
                    stats["clip_frames"] += frames
                    part.write(block_text(rows))
                    part.flush()
                    clip_faces = sum(row.get("kind") != "track" and row["face"] >= 0 for row in rows)
                    stats["clips"] += 1
                    stats["clip_faces"] += clip_faces
                    stats["faces"] += clip_faces
                    stats["errors"] += rows[0]["status"].startswith("error")
                    stats["truncated"] += rows[0]["status"].startswith("truncated")
                    bar.update(1)
            bar.close()
        state.wait_for_everyone()
        stats = summed_over_processes(stats)  # the summary speaks for the whole run, not the first process's share
        if state.is_main_process:
            rows = read_output(out) if resume and out.exists() else []
            if resume and tracks is not None and tracks.exists():
                rows += [{**row, "kind": "track", "face": int(row["track_id"])} for row in read_output(tracks)]
            for path in sorted(parts.glob("part-*.jsonl")):
                rows += read_part(path)
            track_rows = [row for row in rows if row.get("kind") == "track"]
            rows = [row for row in rows if row.get("kind") != "track"]
            if tracks is not None:
                write_output(tracks, [{**row, "face": row["track_id"]} for row in track_rows], track_columns(tasks))
            write_output(out, rows, names)
            shutil.rmtree(parts, ignore_errors=True)
            stats["rows"] = len(rows)
        stats["seconds"] = round(time.perf_counter() - started, 2)
        return stats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m softbio_hf.predict",
        description=__doc__.split("\n\n", 2)[2] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .version import add_version_argument  # stdlib only: --version needs no torch

    add_version_argument(parser)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="images, folders, .txt lists, or datasets folders")
    parser.add_argument("--model", required=True, help="softbio checkpoint (folder or Hub id), or clip:ID_OR_FOLDER")
    parser.add_argument("--out", required=True, help=f"output table: {', '.join(FORMATS)} (by extension)")
    parser.add_argument("--probabilities", action="store_true", help="add every class's probability per task")
    parser.add_argument("--detector", default="auto", help="auto (YuNet, else Haar), yunet, haar, none (face crops)")
    parser.add_argument("--batch-size", type=int, default=64, help="faces per forward pass, across photos (64)")
    parser.add_argument(
        "--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="processes that decode and detect"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where native), float32, bfloat16")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model first (inductor, frozen weights): faster passes after a one-off compilation "
        "of about 20 s on a CPU for ViT-L/14@336; worth it from a few dozen photos",
    )
    parser.add_argument(
        "--backend",
        default="torch",
        choices=("torch", "onnx", "openvino", "auto"),
        help="where the forward pass runs: torch (default), the model's ONNX / OpenVINO export (python -m "
        "softbio_hf.export; CPU only), or auto (OpenVINO on a CPU where its export is there, the fastest measured; "
        "else torch, said once)",
    )
    parser.add_argument(
        "--tracks",
        default=None,
        metavar="OUT2",
        help="videos: also write one row per tracked person (first and last frame and time, frames, each task's "
        "label, mean probability and agreement) to this table (.csv, .jsonl, .parquet)",
    )
    parser.add_argument("--every", type=int, default=None, help="videos: analyse one frame in N (default: every)")
    parser.add_argument(
        "--timeline",
        default=None,
        metavar="DIR",
        help="videos: write each tracked person's emotion over the clip to DIR, as a PNG plot and a CSV "
        "(time_s, frame, one probability column per emotion)",
    )
    parser.add_argument("--limit", type=int, default=None, help="analyse at most N photos")
    parser.add_argument(
        "--engine",
        default="local",
        choices=("local", "ray"),
        help="local (default: this machine, or the processes torchrun starts) or ray: an actor pool on a Ray "
        "cluster, --out a folder of Parquet files (pip install 'softbio[ray]'; docs/scaling.md)",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="ray: the cluster (default: RAY_ADDRESS, else a cluster started on this machine)",
    )
    parser.add_argument("--actors", default="1", metavar="N|MIN,MAX", help="ray: model copies, fixed or autoscaled (1)")
    parser.add_argument("--gpus-per-actor", type=float, default=0, metavar="G", help="ray: GPUs each actor holds (0)")
    parser.add_argument("--cpus-per-actor", type=float, default=1, metavar="C", help="ray: CPUs each actor holds (1)")
    parser.add_argument("--ray-batch", type=int, default=32, metavar="N", help="ray: photos per task (32)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run: done photos are skipped")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.batch_size < 1 or args.num_workers < 0 or (args.limit is not None and args.limit < 1):
            raise PredictError("--batch-size and --limit must be at least 1, --num-workers at least 0.")
        if args.compile and args.backend not in ("torch", "auto"):
            raise PredictError(f"--compile is torch's; the {args.backend} runtime compiles its model itself.")
        if args.every is not None and args.every < 1:
            raise PredictError(f"--every {args.every}: analyse one frame in N, N at least 1 (1: every frame).")
        if args.engine == "ray":
            from .predict_ray import main_ray

            return main_ray(args)
        stats = predict(
            args.inputs,
            args.model,
            args.out,
            detector=args.detector,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=args.device,
            dtype=args.dtype,
            compile=args.compile,
            backend=args.backend,
            tracks=args.tracks,
            every=args.every,
            timeline=args.timeline,
            limit=args.limit,
            probabilities=args.probabilities,
            resume=args.resume,
            overwrite=args.overwrite,
        )
    except PredictError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the rows so far are kept. Continue with the same command and --resume.", file=sys.stderr)
        return 130
    if "rows" in stats:
        clips = (
            f" and {stats['clips']} clips ({stats['clip_frames']} frames analysed, {stats['clip_faces']} faces"
            + (f"; {stats['truncated']} cut short" if stats["truncated"] else "")
            + ")"
            if stats.get("clips")
            else ""
        )
        print(
            f"{stats['photos']} photos{clips} this run: {stats['faces']} faces, {stats['no_face']} without a face, "
            f"{stats['errors']} unreadable; {stats['rows']} rows in {args.out} ({stats['seconds']} s)"
        )
    return exit_code(stats, args.out)


if __name__ == "__main__":
    sys.exit(main())
