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
    """A tiny checkpoint, and its ONNX and OpenVINO export written to a folder of its own by the command a user runs."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model = SoftBioModel(SoftBioConfig(vision_config={"model_type": "clip_vision_model", **TINY_VISION}))
    # conformal thresholds (as train.evaluate --conformal stores them) travel in the export's manifest
    thresholds = {"age": [0.95] * 9, "gender": [0.5, 0.5], "emotion": [0.95] * 7}
    model.config.calibration = {
        "conformal": {"level": 0.9, "score": "lac", "class_conditional": False, "thresholds": thresholds}
    }
    model.save_pretrained(root / "model")
    command = [
        sys.executable,
        "-m",
        "softbio_hf.export",
        "--model",
        str(root / "model"),
        "--format",
        "onnx",
        "openvino",
    ]
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
                urllib.request.urlopen(f"{url}/health/ready", timeout=2)
                break
            time.sleep(0.25)
        yield {"url": url, "pid": process.pid, "port": port, "process": process, "log": tmp_path / f"serve-{port}.log"}
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=60)
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
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "dot.png")
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
        seventeen = post(analyze, *multipart(*[str(tmp_path / "dot.png")] * 17))
        yunet = post(f"{analyze}?detector=yunet", photo)
        huge = post(f"{analyze}?min_face_size=1e308", photo)
        missing = post(f"{served['url']}/v2/nothing", photo)
        wrong_method = post(f"{served['url']}/health/live", photo)
        ok = post(f"{analyze}?detector=haar&top_k=1", photo)
    assert wrong_token[0] == no_token[0] == 401 and wrong_token[2]["www-authenticate"] == "Bearer"
    assert "Bearer" in wrong_token[1]["error"]
    assert text[0] == 415 and "text/plain is not an image" in text[1]["error"]
    assert not_decodable[0] == 422 and "is not an image" in not_decodable[1]["error"]
    assert oversized[0] == 413 and "cap" in oversized[1]["error"]
    assert too_many_pixels[0] == 413 and "800x800" in too_many_pixels[1]["error"]
    assert bad_option[0] == 422 and "threshold='2'" in bad_option[1]["error"] and "0.0 to 1.0" in bad_option[1]["error"]
    assert misspelt[0] == 422 and "treshold" in misspelt[1]["error"]
    assert url[0] == 403 and "--allow-urls" in url[1]["error"]
    assert seventeen[0] == 413 and "16 images" in seventeen[1]["error"]
    assert yunet[0] == 422 and "--yunet-path" in yunet[1]["error"]  # offline: named with its fix, never a 500
    assert huge[0] == 422 and "min_face_size" in huge[1]["error"]
    assert missing[0] == 404 and wrong_method[0] == 405 and missing[1]["error"] and wrong_method[1]["error"]
    assert ok[0] == 200 and len(ok[1]["results"][0][0]["age"]["scores"]) == 1


def test_a_full_queue_answers_429_with_a_retry_after_from_its_depth(checkpoint_and_export, tmp_path):
    _, export = checkpoint_and_export
    photo = Path(GRACE).read_bytes()
    with server(tmp_path, export, "--max-queue", "1", "--max-wait-ms", "3000") as served:
        first: list = []
        holder = threading.Thread(target=lambda: first.append(post(f"{served['url']}/v1/analyze?detector=haar", photo)))
        holder.start()
        wait_for(lambda: metric(served["url"], "softbio_queue_depth") == 1)  # admitted, in the batch window
        busy = post(f"{served['url']}/v1/analyze", photo)
        holder.join()
    assert busy[0] == 429 and "busy" in busy[1]["error"] and int(busy[2]["retry-after"]) >= 1
    assert first[0][0] == 200


def test_retry_after_is_the_faces_ahead_at_the_measured_rate():
    from softbio_hf.serve_limits import Admission

    admission = Admission(max_queue=2)
    admission.pending_faces = 50
    assert admission.retry_after(seconds_per_face=0.1) == 5
    assert admission.retry_after(seconds_per_face=0.0) == 1  # nothing measured yet
    assert admission.retry_after(seconds_per_face=100.0) == 120  # capped


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


def test_the_docs_serving_block_runs_as_written(checkpoint_and_export, tmp_path):
    checkpoint, _ = checkpoint_and_export
    section = (REPO / "docs" / "serving.md").read_text()
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)[0]
    (tmp_path / "examples").symlink_to(REPO / "examples")
    port = str(free_port())
    script = block.replace("tiny/softbio", str(checkpoint)).replace("8000", port)
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


def wait_for(condition, timeout: float = 60.0) -> None:
    """Poll `condition` until true: an ordering need (the server has taken something in), not a timing assertion."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the server never got there"
        time.sleep(0.1)


def metrics(url: str) -> dict[str, float]:
    """GET /metrics parsed by prometheus_client's own text parser: {'name{label="v",...}': value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def metric(url: str, name: str) -> float:
    return metrics(url).get(name, 0.0)


def same_answers(first: list, second: list) -> None:
    """The same faces, boxes and labels, and scores within rounding (a batch's size may move the last float bit)."""
    assert len(first) == len(second)
    for faces_a, faces_b in zip(first, second, strict=True):
        assert [face["box"] for face in faces_a] == [face["box"] for face in faces_b]
        for face_a, face_b in zip(faces_a, faces_b, strict=True):
            for task in ("age", "gender", "emotion"):
                assert face_a[task]["label"] == face_b[task]["label"]
                assert face_a[task]["scores"] == pytest.approx(face_b[task]["scores"], abs=2e-4)


@pytest.fixture(scope="module")
def batched(checkpoint_and_export, tmp_path_factory) -> Iterator[dict]:
    """One server for the tests that only read it: a wide batch window, URLs allowed, short body and fetch limits."""
    _, export = checkpoint_and_export
    root = tmp_path_factory.mktemp("batched")
    options = (
        "--max-wait-ms",
        "800",
        "--allow-urls",
        "--fetch-timeout",
        "5",
        "--body-timeout",
        "3",
        "--header-timeout",
        "3",
    )
    with server(root, export, *options, "--max-queue", "8", "--cors-origin", "https://app.example") as served:
        yield served


def test_n_concurrent_requests_answer_as_n_sequential_ones_in_fewer_forward_passes(batched):
    photos = [Path(path).read_bytes() for path in (GRACE, ASTRONAUT, GRACE, ASTRONAUT, GRACE, ASTRONAUT)]
    analyze = f"{batched['url']}/v1/analyze?detector=haar"
    before = metric(batched["url"], "softbio_forward_passes_total")
    sequential = [post(analyze, photo) for photo in photos]
    between = metric(batched["url"], "softbio_forward_passes_total")
    concurrent: list = [None] * len(photos)
    start = threading.Barrier(len(photos))

    def client(index: int) -> None:
        start.wait()
        concurrent[index] = post(analyze, photos[index])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(photos))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = metric(batched["url"], "softbio_forward_passes_total")
    assert [answer[0] for answer in sequential + concurrent] == [200] * 12
    for alone, together in zip(sequential, concurrent, strict=True):
        same_answers(alone[1]["results"], together[1]["results"])  # each request got exactly its own faces
    assert between - before == len(photos)
    assert after - between < len(photos), (between - before, after - between)


def test_slow_uploads_do_not_lock_others_out(batched):
    """Ten sockets send headers and 100 bytes of a 1 MB body and stall: the queue (8) stays free for a real photo,
    and each stalled upload is answered 408 at the body deadline."""
    head = (
        "POST /v1/analyze HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: image/jpeg\r\n"
        "Content-Length: 1000000\r\n\r\n"
    ).replace("{TOKEN}", TOKEN)
    stalled = []
    for _ in range(10):
        sock = socket.create_connection(("127.0.0.1", batched["port"]))
        sock.sendall(head.encode() + b"x" * 100)
        stalled.append(sock)
    half_head = socket.create_connection(("127.0.0.1", batched["port"]))
    half_head.sendall(b"POST /v1/analyze HTTP/1.1\r\nHost: x\r\n")  # and never the rest of its headers
    time.sleep(0.5)  # for the server to take them in: an ordering need
    other = post(f"{batched['url']}/v1/analyze?detector=haar", Path(GRACE).read_bytes())
    answers = []
    for sock in stalled:
        sock.settimeout(60)
        answers.append(sock.recv(4096).decode(errors="replace"))
        sock.close()
    half_head.settimeout(60)
    closed = half_head.recv(4096)
    half_head.close()
    assert other[0] == 200 and closed == b""  # the half-sent headers' connection was closed at --header-timeout
    assert all(answer.startswith("HTTP/1.1 408") for answer in answers), answers


def test_a_64_face_photo_and_a_huge_detection_side_stay_within_the_caps(batched, tmp_path):
    face = Image.open(GRACE).convert("RGB").crop((110, 60, 420, 370)).resize((120, 120))
    sheet = Image.new("RGB", (960, 960), "white")
    for index in range(64):
        sheet.paste(face, ((index % 8) * 120, (index // 8) * 120))
    sheet.save(tmp_path / "sheet.jpg")
    photo = (tmp_path / "sheet.jpg").read_bytes()
    analyze = f"{batched['url']}/v1/analyze?detector=haar"
    default = post(analyze, photo)
    asked = post(f"{analyze}&max_faces=64", photo)
    too_many = post(f"{analyze}&max_faces=65", photo)
    huge_side = post(f"{analyze}&detection_max_side={10**9}", photo)
    assert default[0] == 200 and default[1]["max_faces"] == 16 and len(default[1]["results"][0]) == 16
    assert default[1]["truncated"] == [True]  # said in the answer, never a silent cut
    assert asked[0] == 200 and len(asked[1]["results"][0]) == 64 and asked[1]["truncated"] == [False]
    assert too_many[0] == 422 and "from 1 to 64" in too_many[1]["error"]
    assert huge_side[0] == 422 and "from 32 to 2048" in huge_side[1]["error"]


class TricklingHeaders:
    """A loopback 'HTTP server' that sends its status line and headers one byte every 0.3 s, for 30 s."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/photo.jpg"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.trickle, args=(connection,), daemon=True).start()

    @staticmethod
    def trickle(connection: socket.socket) -> None:
        with contextlib.suppress(OSError), connection:
            connection.recv(4096)
            for byte in (b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100)[:100]:
                connection.sendall(bytes([byte]))
                time.sleep(0.3)

    def close(self) -> None:
        self.listener.close()


def test_a_trickling_url_does_not_delay_another_clients_photo(batched):
    trickling = TricklingHeaders()
    finished: list[tuple[str, tuple]] = []
    url_body = json.dumps({"urls": [trickling.url]}).encode()
    fetching = threading.Thread(
        target=lambda: finished.append(("url", post(f"{batched['url']}/v1/analyze", url_body, "application/json")))
    )
    fetching.start()
    time.sleep(0.5)  # the fetch has begun: an ordering need
    finished.append(("photo", post(f"{batched['url']}/v1/analyze?detector=haar", Path(GRACE).read_bytes())))
    fetching.join()
    trickling.close()
    nested = post(f"{batched['url']}/v1/analyze", b"[" * 100_000 + b"]" * 100_000, "application/json")
    assert [name for name, _ in finished] == ["photo", "url"]  # the photo did not wait behind the fetch
    assert finished[0][1][0] == 200
    assert finished[1][1][0] == 422 and "within 5s" in finished[1][1][1]["error"]
    assert nested[0] == 422 and "urls" in nested[1]["error"]


def test_the_one_url_fetch_keeps_its_total_deadline_for_videos_and_follows_no_redirect_to_another_scheme(monkeypatch):
    import http.server

    from softbio_hf import video
    from softbio_hf.images import ImageInputError, fetch_url

    trickling = TricklingHeaders()
    monkeypatch.setattr(video, "VIDEO_DOWNLOAD_TIMEOUT_S", 1.0)
    with pytest.raises(video.VideoInputError, match="within 1s"):
        video.read_frames(trickling.url.replace("photo.jpg", "clip.mp4"), max_frames=1).__next__()
    trickling.close()

    class ToFtp(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/photo.jpg")
            self.end_headers()

        def log_message(self, *args):
            pass

    redirecting = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ToFtp)
    threading.Thread(target=redirecting.serve_forever, daemon=True).start()
    try:
        with pytest.raises(urllib.error.HTTPError, match="ftp:// is not followed"):
            fetch_url(f"http://127.0.0.1:{redirecting.server_address[1]}/", 5, "the photo")
    finally:
        redirecting.shutdown()
    assert issubclass(ImageInputError, ValueError)


def test_an_abandoned_request_costs_no_forward_pass(batched):
    url = batched["url"]
    before = metrics(url)
    photo = Path(GRACE).read_bytes()
    head = (
        f"POST /v1/analyze?detector=haar HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: image/jpeg\r\nContent-Length: {len(photo)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", batched["port"])) as sock:
        sock.sendall(head.encode() + photo)
        time.sleep(0.3)  # the client gives up inside the 800 ms batch window
    gone = 'softbio_requests_total{route="/v1/analyze",status="499"}'
    wait_for(lambda: metrics(url).get(gone, 0) > before.get(gone, 0))
    time.sleep(1.5)  # past the batch window the request would have joined
    after = metrics(url)
    assert after["softbio_forward_passes_total"] == before["softbio_forward_passes_total"]
    assert after["softbio_batch_faces_sum"] == before["softbio_batch_faces_sum"]


def test_metrics_parse_and_a_request_id_is_echoed_and_logged(batched):
    photo = Path(GRACE).read_bytes()
    given = post(f"{batched['url']}/v1/analyze?detector=haar", photo, **{"X-Request-ID": "trace-42"})
    made = post(f"{batched['url']}/v1/analyze?detector=haar", photo, Origin="https://elsewhere.example")
    allowed = post(f"{batched['url']}/v1/analyze?detector=haar", photo, Origin="https://app.example")
    found = metrics(batched["url"])
    assert given[2]["x-request-id"] == "trace-42" and re.fullmatch(r"[0-9a-f]{32}", made[2]["x-request-id"])
    assert given[2]["x-model-digest"] == given[1]["model_digest"]
    assert allowed[2]["access-control-allow-origin"] == "https://app.example"  # --cors-origin, and only it
    assert "access-control-allow-origin" not in made[2]
    assert found['softbio_requests_total{route="/v1/analyze",status="200"}'] >= 2
    assert found['softbio_request_seconds_count{route="/v1/analyze"}'] >= 2
    assert found["softbio_faces_per_image_count"] >= 2 and found["softbio_batch_faces_count"] >= 1
    assert "softbio_queue_depth" in found
    lines = [json.loads(line) for line in batched["log"].read_text().splitlines() if line.startswith("{")]
    assert any(line["request_id"] == "trace-42" and line["status"] == 200 for line in lines)


def test_a_swapped_or_truncated_weights_file_changes_nothing_and_a_vanished_export_is_not_ready(
    checkpoint_and_export, tmp_path
):
    import shutil

    _, export = checkpoint_and_export
    folder = tmp_path / "served"
    shutil.copytree(export, folder)
    weights = folder / "openvino" / "openvino_model.bin"
    photo = Path(GRACE).read_bytes()
    with server(tmp_path, folder, "--backend", "openvino", "--max-wait-ms", "0") as served:
        analyze = f"{served['url']}/v1/analyze?detector=haar"
        first = post(analyze, photo)
        data = weights.read_bytes()
        with weights.open("r+b") as handle:  # in place: what a mapped file would show the runtime
            handle.write(bytes(reversed(data)))
        swapped = post(analyze, photo)
        with weights.open("r+b") as handle:
            handle.truncate(0)  # a mapped file would now end the process with SIGBUS
        truncated = post(analyze, photo)
        shutil.rmtree(folder)
        live = urllib.request.urlopen(f"{served['url']}/health/live", timeout=30).status
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"{served['url']}/health/ready", timeout=30)
    assert first[0] == swapped[0] == truncated[0] == 200
    assert swapped[1]["results"] == first[1]["results"] == truncated[1]["results"]
    assert live == 200 and not_ready.value.code == 503 and "is gone" in json.loads(not_ready.value.read())["error"]


def test_labels_edited_in_the_manifest_are_refused(checkpoint_and_export, tmp_path):
    import shutil

    _, export = checkpoint_and_export
    folder = tmp_path / "edited"
    shutil.copytree(export, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["labels"]["gender"] = manifest["labels"]["gender"][::-1]  # "male" would be served as "female"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    done = run_torch_free(tmp_path, "-m", "softbio_hf.serve", "--model", str(folder), timeout=120)
    assert done.returncode == 2 and "was edited since the export" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_sigterm_with_requests_in_flight_drains_them_and_exits_0(checkpoint_and_export, tmp_path):
    import signal

    _, export = checkpoint_and_export
    photo = Path(GRACE).read_bytes()
    options = ("--max-wait-ms", "5000", "--drain-timeout", "10")
    with server(tmp_path, export, *options) as served:
        answers: list = []
        clients = [
            threading.Thread(target=lambda: answers.append(post(f"{served['url']}/v1/analyze?detector=haar", photo)))
            for _ in range(3)
        ]
        for client in clients:
            client.start()
        stalled = socket.create_connection(("127.0.0.1", served["port"]))
        stalled.sendall(
            f"POST /v1/analyze HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: image/jpeg\r\n"
            "Content-Length: 1000\r\n\r\n0123456789".encode()  # a body stalled after 10 bytes
        )
        wait_for(lambda: metric(served["url"], "softbio_queue_depth") == 3)
        served["process"].send_signal(signal.SIGTERM)
        for client in clients:
            client.join()
        code = served["process"].wait(timeout=60)
        stalled.close()
    assert [answer[0] for answer in answers] == [200, 200, 200]
    assert code == 0


def test_two_worker_processes_serve_one_port(checkpoint_and_export, tmp_path):
    _, export = checkpoint_and_export
    photo = Path(GRACE).read_bytes()
    with server(tmp_path, export, "--workers", "2", "--max-wait-ms", "0") as served:
        answers = [post(f"{served['url']}/v1/analyze?detector=haar", photo) for _ in range(4)]
        children = Path(f"/proc/{served['pid']}/task/{served['pid']}/children").read_text().split()
        workers = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert [answer[0] for answer in answers] == [200] * 4
    assert len(workers) == 2


def test_bad_command_lines_are_named_not_tracebacks(tmp_path):
    for option, value, said in (("--max-body-mb", "nan", "finite number"), ("--port", "99999", "0 to 65535")):
        done = run_torch_free(tmp_path, "-m", "softbio_hf.serve", "--model", "x", option, value, timeout=120)
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_schemathesis_finds_no_failure_in_the_contract_with_and_without_the_token(checkpoint_and_export, tmp_path):
    _, export = checkpoint_and_export
    fuzz = str(REPO / "tests" / "serve_fuzz.py")
    done = run_torch_free(tmp_path, fuzz, str(export), "8", GRACE, ASTRONAUT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["runs"] == 12 and answer["failures"] == [], answer["failures"]


def test_runtime_threads_follow_the_cpus_this_process_may_use(tmp_path):
    """Pinned to one CPU (as a container or taskset pins it), the runtimes get one thread, not os.cpu_count()."""
    code = "from softbio_hf.runtimes import usable_cpus; print(usable_cpus())"
    done = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr
