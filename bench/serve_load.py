"""The torch-free server under load: locust (headless) at several concurrencies against one server, beside the same
backend's batched model-alone throughput measured in the same run (bench/serve.py prints the table).

Each level runs `locust -f bench/serve_locustfile.py --headless -u N -r N -t Ss` (one photo, one face per request)
and reads its CSV: requests/s, p50/p95/p99 (milliseconds, over every answer, 429s included), and the share answered
429. Faces/s of the server at a level, divided by faces/s of the model alone on full batches, is the share of the
model's throughput the server delivers (goal >= 85% at concurrency >= 4).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = REPO / "bench" / "serve_locustfile.py"
CONCURRENCY = (1, 4, 16, 64)


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("error: the server exited before it was ready.")
        try:
            urllib.request.urlopen(f"{url}/health/ready", timeout=5)
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("error: the server was not ready in time.")


def locust_level(url: str, users: int, seconds: int, photo: Path) -> dict:
    """One headless locust run at `users` concurrent clients; its aggregated row."""
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "level")
        command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r"]
        command += [str(users), "-t", f"{seconds}s", "--host", url, "--csv", prefix, "--only-summary"]
        env = {**os.environ, "SOFTBIO_BENCH_PHOTO": str(photo)}
        subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=seconds + 120)
        with open(f"{prefix}_stats.csv") as handle:
            row = next(r for r in csv.DictReader(handle) if r["Name"] == "Aggregated")
        with open(f"{prefix}_failures.csv") as handle:
            refused = sum(int(r["Occurrences"]) for r in csv.DictReader(handle) if "429" in r["Error"])
    count = int(row["Request Count"])
    return {
        "users": users,
        "requests": count,
        "answered_per_s": (count - refused) / seconds,
        "p50_ms": float(row["50%"]),
        "p95_ms": float(row["95%"]),
        "p99_ms": float(row["99%"]),
        "share_429": refused / count if count else 0.0,
        "other_failures": int(row["Failure Count"]) - refused,
    }


def model_alone(folder: Path, backend: str, batch: int, photo: Path, seconds: float = 10) -> float:
    """Faces/s of the same backend's forward pass alone on full batches of `batch` crops of the photo's face."""
    code = (
        "import json, sys, time, numpy as np\n"
        "from softbio_hf.runtime_light import ExportedPipeline\n"
        "run = ExportedPipeline(sys.argv[1], sys.argv[2])\n"
        "_, crops = run.crops_of(sys.argv[4], run.checked({'detector': 'haar'}))\n"
        "batch = np.repeat(crops[:1], int(sys.argv[3]), axis=0)\n"
        "run.probabilities(batch)\n"
        "start, done = time.perf_counter(), 0\n"
        "while time.perf_counter() - start < float(sys.argv[5]):\n"
        "    run.probabilities(batch); done += len(batch)\n"
        "print(json.dumps(done / (time.perf_counter() - start)))\n"
    )
    command = [sys.executable, "-c", code, str(folder), backend, str(batch), str(photo), str(seconds)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return float(json.loads(done.stdout.strip().splitlines()[-1]))


def load(folder: Path, backend: str, port: int, photo: Path, seconds: int, levels=CONCURRENCY) -> dict:
    """Every level against one server (default options), then the model alone; the server's share of it."""
    from importlib.util import find_spec

    from softbio_hf.serve_batching import DEFAULT_MAX_BATCH

    if find_spec("locust") is None:  # the load tool: a benchmark's own, not a dependency of softbio or its tests
        raise SystemExit("The load rows run locust: pip install locust, or pass --load-seconds 0 to leave them out.")
    command = [sys.executable, "-m", "softbio_hf.serve", "--model", str(folder), "--backend", backend]
    process = subprocess.Popen(
        [*command, "--port", str(port)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        rows = [locust_level(url, users, seconds, photo) for users in levels]
    finally:
        process.terminate()
        process.wait(timeout=60)
    alone = model_alone(folder, backend, DEFAULT_MAX_BATCH, photo)
    for row in rows:
        row["share_of_model_alone"] = row["answered_per_s"] / alone  # one face per photo
    return {"backend": backend, "seconds_per_level": seconds, "model_alone_faces_per_s": alone, "levels": rows}


def markdown(result: dict) -> str:
    lines = [
        f"Load ({result['backend']}, locust headless, {result['seconds_per_level']} s per level, one face per "
        f"request); the model alone on full batches: {result['model_alone_faces_per_s']:.2f} faces/s",
        "",
        "| concurrency | answered/s | share of model alone | p50 ms | p95 ms | p99 ms | share 429 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["levels"]:
        lines.append(
            f"| {row['users']} | {row['answered_per_s']:.2f} | {row['share_of_model_alone']:.0%} | "
            f"{row['p50_ms']:.0f} | {row['p95_ms']:.0f} | {row['p99_ms']:.0f} | {row['share_429']:.0%} |"
        )
    return "\n".join(lines)
