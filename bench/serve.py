"""Serving from an export alone: the torch-free server against the torch pipeline serving the same export.

    python -m bench.serve                       # ViT-B/16-sized random weights (no download)
    python -m bench.serve --size large          # ViT-L/14@336, the shipped model's size
    python -m bench.serve --size tiny           # a quick check of the script; numbers mean little

Rows, all from one run on one machine, as ratios:
- resident memory (peak RSS, VmHWM) of `python -m softbio_hf.serve` after answering photos over HTTP, against a
  process running `pipeline(..., backend="onnx")` on the same export (torch weights loaded too); goal <= 1/3;
- start-up to the first answer, the same two processes (the server's includes HTTP); goal <= 1/5;
- the installed size of what the server needs (requirements-serve.txt's packages and their dependencies) against
  the same plus torch and transformers with theirs; goal <= 1/4;
- photos/s of the torch-free runtime on a list of photos (detection of the next overlapped with the current
  forward pass) as a share of the limit: the best matmul rate of the fastest kernels here (torch's fp32 and bf16
  and ONNX Runtime's own MatMul) divided by the analytic FLOPs per image; goal >= 85%. A share above 100% means
  the limit is wrong, and is flagged rather than printed as a share;
- the server under load (bench/serve_load.py): locust headless at concurrency 1, 4, 16 and 64, answered/s,
  p50/p95/p99 and the share answered 429, against the same backend's batched model-alone faces/s (goal >= 85% at
  concurrency >= 4). --load-seconds 0 leaves it out.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib import metadata
from pathlib import Path

from bench.serve_load import load
from bench.serve_load import markdown as load_markdown

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "examples" / "grace_hopper.jpg"  # one face
SIZES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "image_size": 64, "patch_size": 8},
    "base": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
             "image_size": 224, "patch_size": 16},
    "large": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "image_size": 336, "patch_size": 14},
}  # fmt: skip
TORCH_PIPELINE = """
import sys, time, json
start = float(sys.argv[3])
from transformers import pipeline
import softbio_hf  # noqa: F401
pipe = pipeline("soft-biometrics", model=sys.argv[1], backend="onnx", dtype="float32")
faces = pipe(sys.argv[2], detector="haar")
first = time.time() - start
for _ in range(int(sys.argv[4])):
    pipe(sys.argv[2], detector="haar")
status = open("/proc/self/status").read()
print(json.dumps({"first_answer_s": first, "peak_rss_mb": int(re.search(r"VmHWM:\\s+(\\d+)", status)[1]) / 1024}))
""".replace("import sys, time, json", "import re, sys, time, json")


def make_checkpoint(folder: Path, size: str) -> Path:
    """A random softbio checkpoint of `size` with its ONNX export beside it (the export command, as users run it)."""
    import torch

    from softbio_hf import SoftBioConfig, SoftBioModel

    torch.manual_seed(0)
    model = SoftBioModel(SoftBioConfig(vision_config={"model_type": "clip_vision_model", **SIZES[size]}))
    model.save_pretrained(folder)
    command = [sys.executable, "-m", "softbio_hf.export", "--model", str(folder), "--format", "onnx"]
    subprocess.run([*command, "--out", str(folder)], check=True, capture_output=True, cwd=REPO)
    return folder


def peak_rss_mb(pid: int) -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1]) / 1024


def light_server(folder: Path, requests: int, port: int) -> dict:
    """Start-up to the first HTTP answer, and peak RSS after `requests` more, of `python -m softbio_hf.serve`."""
    start = time.time()
    process = subprocess.Popen(
        [sys.executable, "-m", "softbio_hf.serve", "--model", str(folder), "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1/analyze?detector=haar"
    photo = PHOTO.read_bytes()
    try:
        while True:
            if process.poll() is not None:
                raise SystemExit("error: the server exited before answering.")
            try:
                answer(url, photo)
                break
            except OSError:
                time.sleep(0.05)
        first = time.time() - start
        for _ in range(requests):
            answer(url, photo)
        return {"first_answer_s": first, "peak_rss_mb": peak_rss_mb(process.pid)}
    finally:
        process.terminate()
        process.wait(timeout=30)


def answer(url: str, photo: bytes) -> dict:
    request = urllib.request.Request(url, data=photo, method="POST", headers={"Content-Type": "image/jpeg"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def torch_pipeline(folder: Path, requests: int) -> dict:
    command = [sys.executable, "-c", TORCH_PIPELINE, str(folder), str(PHOTO), str(time.time()), str(requests)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def closure_size_mb(names: list[str]) -> tuple[float, list[str]]:
    """Installed size of the named distributions and everything they require (extras left out)."""
    seen: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = re.split(r"[<>=!~;\[ ]", todo.pop())[0].strip().lower().replace("_", "-")
        if not name or name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = dist
        todo += [r for r in dist.requires or [] if "extra ==" not in r]
    paths = [Path(dist.locate_file(f)) for dist in seen.values() for f in dist.files or []]
    total = sum(path.stat().st_size for path in paths if path.is_file())
    return total / 1e6, sorted(seen)


def serve_requirements() -> list[str]:
    lines = (REPO / "requirements-serve.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def matmul_limit(flops_per_image: float) -> tuple[float, str]:
    """Images/s the fastest matmul kernels here allow: torch fp32 and bf16, and ONNX Runtime's own MatMul."""
    import torch

    from bench.speed import matmul_peak
    from softbio_hf.pipeline_softbio import fast_bf16_available

    cpu = torch.device("cpu")
    peaks = {"torch float32": matmul_peak(torch.float32, cpu)}
    if fast_bf16_available(cpu):  # emulated bf16 is far slower than fp32: no candidate for the fastest kernel
        peaks["torch bfloat16"] = matmul_peak(torch.bfloat16, cpu)
    peaks["onnxruntime fp32"] = onnxruntime_matmul_peak()
    best = max(peaks, key=peaks.get)
    return peaks[best] / flops_per_image, f"{best} at {peaks[best] / 1e9:.0f} GFLOP/s"


def onnxruntime_matmul_peak(size: int = 2048, trials: int = 5) -> float:
    import numpy as np
    import onnxruntime
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    session.run(None, {"a": a, "b": a})
    best = 0.0
    for _ in range(trials):
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < 0.5:
            session.run(None, {"a": a, "b": a})
            count += 1
        best = max(best, count * 2 * size**3 / (time.perf_counter() - start))
    return best


def light_throughput(folder: Path, photos: int) -> dict:
    """Photos/s of the torch-free runtime on a list (detection overlapped), and of its forward pass alone."""
    code = (
        "import json, sys, time, numpy as np\n"
        "from softbio_hf.runtime_light import ExportedPipeline\n"
        "run = ExportedPipeline(sys.argv[1], 'onnx')\n"
        "photos = [sys.argv[2]] * int(sys.argv[3])\n"
        "run(photos[:2], detector='haar')\n"
        "start = time.perf_counter()\n"
        "run(photos, detector='haar')\n"
        "pipeline = len(photos) / (time.perf_counter() - start)\n"
        "_, crops = run.crops_of(photos[0], run.checked({'detector': 'haar'}))\n"
        "start = time.perf_counter()\n"
        "for _ in photos: run.probabilities(crops)\n"
        "alone = len(photos) / (time.perf_counter() - start)\n"
        "print(json.dumps({'pipeline_photos_per_s': pipeline, 'forward_alone_per_s': alone}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(folder), str(PHOTO), str(photos)], cwd=REPO, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(size: str, photos: int, requests: int, port: int, load_seconds: int = 0) -> dict:
    from bench.speed import cpu_description, vision_flops_per_image
    from softbio_hf import SoftBioConfig

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_checkpoint(Path(tmp) / "model", size)
        light = light_server(folder, requests, port)
        heavy = torch_pipeline(folder, requests)
        throughput = light_throughput(folder, photos)
        under_load = load(folder, "onnx", port + 1, PHOTO, load_seconds) if load_seconds else None
    serve_mb, serve_dists = closure_size_mb(serve_requirements())
    full_mb, _ = closure_size_mb([*serve_requirements(), "torch", "transformers"])
    config = SoftBioConfig(vision_config={"model_type": "clip_vision_model", **SIZES[size]})
    limit, limit_from = matmul_limit(vision_flops_per_image(config))
    share = throughput["pipeline_photos_per_s"] / limit
    return {
        "cpu": cpu_description(),
        "size": size,
        "light_server": light,
        "torch_pipeline": heavy,
        "memory_ratio": light["peak_rss_mb"] / heavy["peak_rss_mb"],
        "startup_ratio": light["first_answer_s"] / heavy["first_answer_s"],
        "env_mb": {"serve": serve_mb, "with_torch": full_mb, "ratio": serve_mb / full_mb},
        "serve_distributions": serve_dists,
        "throughput": throughput,
        "limit_images_per_s": limit,
        "limit_from": limit_from,
        "share_of_limit": None if share > 1 else share,
        "limit_flag": f"measured {share:.0%} of the limit: the limit is wrong" if share > 1 else None,
        "share_of_forward_alone": throughput["pipeline_photos_per_s"] / throughput["forward_alone_per_s"],
        "load": under_load,
    }


def markdown(result: dict) -> str:
    light, heavy, env = result["light_server"], result["torch_pipeline"], result["env_mb"]
    share = result["share_of_limit"]
    rows = [
        f"CPU: {result['cpu']}; model size: {result['size']}",
        "",
        "| measure | torch-free server | torch pipeline (same export) | ratio | goal |",
        "|---|---|---|---|---|",
        f"| peak RSS | {light['peak_rss_mb']:.0f} MB | {heavy['peak_rss_mb']:.0f} MB | "
        f"{result['memory_ratio']:.2f} | <= 0.33 |",
        f"| start-up to first answer | {light['first_answer_s']:.1f} s | {heavy['first_answer_s']:.1f} s | "
        f"{result['startup_ratio']:.2f} | <= 0.20 |",
        f"| installed size | {env['serve']:.0f} MB | {env['with_torch']:.0f} MB | {env['ratio']:.2f} | <= 0.25 |",
        "",
        f"Throughput: {result['throughput']['pipeline_photos_per_s']:.2f} photos/s with detection overlapped; limit "
        f"{result['limit_images_per_s']:.2f} images/s ({result['limit_from']}): "
        + (f"{share:.0%} of the limit (goal >= 85%)" if share is not None else f"FLAGGED: {result['limit_flag']}")
        + f"; {result['share_of_forward_alone']:.0%} of the forward pass alone.",
    ]
    if result.get("load"):
        rows += ["", load_markdown(result["load"])]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from softbio_hf.version import add_version_argument  # stdlib only: --version needs no torch

    add_version_argument(parser)
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--photos", type=int, default=16, help="photos in the throughput row (default 16)")
    parser.add_argument("--requests", type=int, default=8, help="answers before peak memory is read (default 8)")
    parser.add_argument("--port", type=int, default=8765, help="the server's port (the load run takes the next)")
    parser.add_argument("--load-seconds", type=int, default=20, help="seconds per load level (0: no load rows)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    result = run(args.size, args.photos, args.requests, args.port, args.load_seconds)
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
