"""python -m softbio_hf.serve: an export in a folder of its own, served over HTTP where torch cannot be imported."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from serving import free_port
from tiny import TINY_VISION
from torch_free import REPO, run_torch_free, torch_free_env
from transformers import pipeline

from softbio_hf import SoftBioConfig, SoftBioModel

ASTRONAUT = str(REPO / "examples" / "astronaut.jpg")
GRACE = str(REPO / "examples" / "grace_hopper.jpg")
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def checkpoint_and_export(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny checkpoint, and its ONNX export written to a folder of its own by the command a user runs."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model = SoftBioModel(SoftBioConfig(vision_config={"model_type": "clip_vision_model", **TINY_VISION}))
    # conformal thresholds (as train.evaluate --conformal stores them) travel in the export's manifest
    thresholds = {"age": [0.95] * 9, "gender": [0.5, 0.5], "emotion": [0.95] * 7}
    model.config.calibration = {
        "conformal": {"level": 0.9, "score": "lac", "class_conditional": False, "thresholds": thresholds}
    }
    model.save_pretrained(root / "model")
    command = [sys.executable, "-m", "softbio_hf.export", "--model", str(root / "model"), "--format", "onnx"]
    done = subprocess.run([*command, "--out", str(root / "served")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (root / "served" / "model.safetensors").exists()  # the export alone
    return root / "model", root / "served"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@contextlib.contextmanager
def server(tmp_path: Path, export: Path, *args: str, token: str | None = TOKEN) -> Iterator[dict]:
    """`python -m softbio_hf.serve` in a process that cannot import torch or transformers, until it answers."""
    port = free_port()
    env = torch_free_env(tmp_path)
    if token:
        env["SOFTBIO_API_TOKEN"] = token
    log = (tmp_path / f"serve-{port}.log").open("w")
    command = [sys.executable, "-m", "softbio_hf.serve", "--model", str(export), "--port", str(port), *args]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            assert process.poll() is None, (tmp_path / f"serve-{port}.log").read_text()
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            time.sleep(0.25)
        yield {"url": url, "pid": process.pid, "port": port}
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def post(url: str, body: bytes, content_type: str = "image/jpeg", token: str | None = TOKEN, **headers):
    """(status, JSON answer, headers) of a POST; urllib, so nothing here needs the server's own stack."""
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type, **headers})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read()), dict(answer.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def multipart(*paths: str) -> tuple[bytes, str]:
    boundary = "softbio-test-boundary"
    parts = []
    for path in paths:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{Path(path).name}"\r\n'
        parts.append(head.encode() + b"Content-Type: image/jpeg\r\n\r\n" + Path(path).read_bytes() + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_an_export_of_its_own_serves_the_pipelines_json_where_torch_cannot_be_imported(checkpoint_and_export, tmp_path):
    checkpoint, export = checkpoint_and_export
    expected = pipeline("soft-biometrics", model=str(checkpoint), dtype="float32")([ASTRONAUT, GRACE], detector="haar")
    body, kind = multipart(ASTRONAUT, GRACE)
    with server(tmp_path, export) as served:
        status, answer, _ = post(f"{served['url']}/v1/analyze?detector=haar", body, kind)
        model = json.loads(
            urllib.request.urlopen(
                urllib.request.Request(f"{served['url']}/v1/model", headers={"Authorization": f"Bearer {TOKEN}"})
            ).read()
        )
        docs = json.loads(urllib.request.urlopen(f"{served['url']}/openapi.json").read())
        maps = Path(f"/proc/{served['pid']}/maps").read_text()
    assert status == 200 and answer["backend"] == "onnx"
    assert "libtorch" not in maps and "onnxruntime" in maps  # the process ran the runtime, not torch
    assert model["tasks"] == ["age", "gender", "emotion"] and model["labels"]["gender"] == ["male", "female"]
    assert model["backend"] == "onnx" and "onnx" in model["versions"]
    assert "/v1/analyze" in docs["paths"] and "multipart/form-data" in json.dumps(docs["paths"]["/v1/analyze"])
    for faces_expected, faces_got in zip(expected, answer["results"], strict=True):
        assert len(faces_expected) == len(faces_got) >= 1
        for face_expected, face_got in zip(faces_expected, faces_got, strict=True):
            assert face_got["box"] == face_expected["box"]
            assert face_got["age"]["years"] == pytest.approx(face_expected["age"]["years"], abs=0.1)
            for task in ("age", "gender", "emotion"):
                assert face_got[task]["label"] == face_expected[task]["label"]
                assert face_got[task]["set"] == face_expected[task]["set"]  # the same conformal sets, torch-free
                for label, p in face_expected[task]["scores"].items():
                    assert face_got[task]["scores"][label] == pytest.approx(p, abs=1e-4)
            assert face_got["gender"]["set"] == [face_got["gender"]["label"]]  # 1 - p <= 0.5 for the top one only


def test_the_server_refuses_with_a_status_and_a_reason(checkpoint_and_export, tmp_path):
    _, export = checkpoint_and_export
    Image.fromarray(np.zeros((800, 800, 3), np.uint8)).save(tmp_path / "big.png")  # 640,000 pixels, a small file
    photo = Path(GRACE).read_bytes()
    with server(tmp_path, export, "--max-body-mb", "0.5", "--max-pixels", "500000") as served:
        analyze = f"{served['url']}/v1/analyze"
        wrong_token = post(analyze, photo, token="not-it")
        no_token = post(analyze, photo, token=None)
        text = post(analyze, b"hello", content_type="text/plain")
        not_decodable = post(analyze, b"hello, not a JPEG", content_type="image/jpeg")
        oversized = post(analyze, photo * 8, content_type="image/jpeg")  # 650 kB > 0.5 MB
        too_many_pixels = post(analyze, (tmp_path / "big.png").read_bytes(), content_type="image/png")
        bad_option = post(f"{analyze}?threshold=2", photo)
        misspelt = post(f"{analyze}?treshold=0.5", photo)
        url = post(analyze, json.dumps({"urls": ["http://169.254.169.254/latest"]}).encode(), "application/json")
        ok = post(f"{analyze}?detector=haar&top_k=1", photo)
    assert wrong_token[0] == no_token[0] == 401 and wrong_token[2]["www-authenticate"] == "Bearer"
    assert "Bearer" in wrong_token[1]["error"]
    assert text[0] == 415 and "text/plain is not an image" in text[1]["error"]
    assert not_decodable[0] == 422 and "is not an image" in not_decodable[1]["error"]
    assert oversized[0] == 413 and "cap" in oversized[1]["error"]
    assert too_many_pixels[0] == 413 and "800x800" in too_many_pixels[1]["error"]
    assert bad_option[0] == 422 and "threshold=2.0" in bad_option[1]["error"]
    assert misspelt[0] == 422 and "treshold" in misspelt[1]["error"]
    assert url[0] == 403 and "--allow-urls" in url[1]["error"]
    assert ok[0] == 200 and len(ok[1]["results"][0][0]["age"]["scores"]) == 1


def test_a_full_queue_answers_429_with_retry_after_not_a_backlog(checkpoint_and_export, tmp_path):
    _, export = checkpoint_and_export
    photo = Path(GRACE).read_bytes()
    with server(tmp_path, export, "--max-queue", "1") as served:
        # One request holds the only place: its headers are sent, half its body is still to come.
        held = socket.create_connection(("127.0.0.1", served["port"]))
        head = (
            f"POST /v1/analyze HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {len(photo)}\r\n\r\n"
        )
        held.sendall(head.encode() + photo[: len(photo) // 2])
        time.sleep(0.5)  # for the server to take it in: an ordering need, not a timing assertion
        busy = post(f"{served['url']}/v1/analyze", photo)
        held.sendall(photo[len(photo) // 2 :])
        first = held.recv(65536).decode(errors="replace")
        held.close()
        after = post(f"{served['url']}/v1/analyze?detector=haar", photo)
    assert busy[0] == 429 and busy[2]["retry-after"] == "1" and "busy" in busy[1]["error"]
    assert first.startswith("HTTP/1.1 200") and after[0] == 200


def test_8_clients_times_25_requests_are_all_answered_with_flat_memory(checkpoint_and_export, tmp_path):
    _, export = checkpoint_and_export
    photo = Path(GRACE).read_bytes()
    answers: list[tuple[int, str]] = []
    with server(tmp_path, export, "--max-queue", "16") as served:
        analyze = f"{served['url']}/v1/analyze?detector=haar"

        def client(requests: int) -> None:
            for _ in range(requests):
                status, answer, _ = post(analyze, photo)
                answers.append((status, json.dumps(answer["results"]) if status == 200 else answer["error"]))

        def round_of(requests: int) -> None:
            threads = [threading.Thread(target=client, args=(requests,)) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        round_of(3)  # warm: the runtime's arenas and the detector reach their working size
        warm = rss_mb(served["pid"])
        round_of(25)
        after = rss_mb(served["pid"])
    assert len(answers) == 8 * 28 and {status for status, _ in answers} == {200}
    assert len({text for _, text in answers}) == 1  # every answer the same
    assert after - warm < 40, (warm, after)


def test_the_readme_serving_block_runs_as_written(checkpoint_and_export, tmp_path):
    checkpoint, _ = checkpoint_and_export
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Serving", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)[1]  # the first is the install line
    (tmp_path / "examples").symlink_to(REPO / "examples")
    port = str(free_port())
    script = block.replace("runs/lora/best", str(checkpoint)).replace("8000", port)
    env = {**torch_free_env(tmp_path), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    env["PYTHONPATH"] = str(REPO)  # the export step runs where torch is, as the block says
    done = subprocess.run(["bash", "-ec", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["backend"] == "onnx" and answer["results"][0][0]["gender"]["label"] in ("male", "female")


def test_the_light_runtime_imports_neither_torch_nor_transformers(checkpoint_and_export, tmp_path):
    _, export = checkpoint_and_export
    done = run_torch_free(tmp_path, str(REPO / "tests" / "light_run.py"), str(export), "onnx", "1", GRACE, ASTRONAUT)
    answer = json.loads(done.stdout)
    assert done.returncode == 0 and answer["torch_loaded"] is False, done.stderr[-2000:]
    assert [len(faces) for faces in answer["faces"]] == [1, 1]
    help_text = run_torch_free(tmp_path, "-m", "softbio_hf.serve", "--help")
    assert help_text.returncode == 0 and "/v1/analyze" in help_text.stdout
