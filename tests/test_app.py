"""The Gradio demo, launched for real on 127.0.0.1: API via gradio_client, page via headless Chromium."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch
from gradio_client import Client, handle_file
from photos import ASTRONAUT_KEYPOINTS, covers
from PIL import Image
from serving import app_run_to_exit, find_chromium, running_app
from tiny import TINY_VISION

from softbio_demo import analysis, models, uploads
from softbio_hf import SoftBioConfig, SoftBioModel

REPO = Path(__file__).resolve().parents[1]


def artifacts(tmp_path: Path) -> Path:
    """Where the screenshots go: SOFTBIO_ARTIFACTS when set (to keep them), else the test's tmp_path, never the
    checkout (a test run leaves nothing in it)."""
    folder = Path(os.environ.get("SOFTBIO_ARTIFACTS") or tmp_path / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def serve_tiny_model(root, env: dict[str, str]):
    """app.py on a tiny random softbio checkpoint saved under root."""
    torch.manual_seed(0)
    model = SoftBioModel(SoftBioConfig(vision_config={"model_type": "clip_vision_model", **TINY_VISION}))
    # conformal thresholds as train.evaluate --conformal 0.9 stores them: the page shows each task's set
    thresholds = {task: [0.95] * len(labels) for task, labels in model.config.tasks.items()}
    model.config.calibration = {
        "conformal": {"level": 0.9, "score": "lac", "class_conditional": False, "thresholds": thresholds}
    }
    model.save_pretrained(root / "ckpt")
    return running_app(REPO / "app.py", root / "ckpt", root, env=env)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with serve_tiny_model(tmp_path_factory.mktemp("app"), {"SOFTBIO_CACHE_SWEEP": "2,3"}) as served:
        yield served


def test_api_analyze_returns_the_astronaut_face(app):
    assert "softbio.app INFO compiled in" in app["log"].read_text()  # compiled before serving, by default
    client = Client(app["url"], verbose=False)
    faces = client.predict(handle_file(str(REPO / "examples" / "astronaut.jpg")), "haar", 0, api_name="/analyze")
    assert len(faces) == 1
    assert covers(faces[0]["box"], ASTRONAUT_KEYPOINTS)
    assert {"age", "gender", "emotion", "box", "detection_score"} <= set(faces[0])
    assert faces[0]["gender"]["set"] == ["male", "female"] or faces[0]["gender"]["set"] == ["female", "male"]


def test_api_bad_upload_is_a_readable_error_and_the_app_keeps_serving(app, tmp_path):
    client = Client(app["url"], verbose=False)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(Exception, match=r"notes\.txt.*is not an image"):
        client.predict(handle_file(str(notes)), "auto", 0, api_name="/analyze")
    with pytest.raises(Exception, match=r"threshold='abc': use a number between 0 and 1"):
        client.predict(handle_file(str(REPO / "examples" / "astronaut.jpg")), "haar", "abc", api_name="/analyze")
    faces = client.predict(handle_file(str(REPO / "examples" / "grace_hopper.jpg")), "haar", 0, api_name="/analyze")
    assert len(faces) == 1
    log = app["log"].read_text()
    assert "rejected 'notes.txt'" in log and "Traceback" not in log  # one line per rejected input


def test_uploads_over_the_size_cap_are_refused_with_a_message(app, tmp_path):
    big = tmp_path / "huge.jpg"
    big.write_bytes(os.urandom(11 * 1024 * 1024))  # over the 10 MB cap
    client = Client(app["url"], verbose=False)
    with pytest.raises(Exception, match=r"(?i)(exceed|too large|maximum)"):
        client.predict(handle_file(str(big)), "auto", 0, api_name="/analyze")
    assert len(client.predict(handle_file(str(REPO / "examples" / "astronaut.jpg")), "haar", 0, api_name="/analyze"))


def test_uploads_are_not_kept_on_disk(app, tmp_path):
    upload = tmp_path / "private-upload-7f3a.jpg"  # a private photo: not one of the public examples
    Image.open(REPO / "examples" / "astronaut.jpg").save(upload, quality=80)
    client = Client(app["url"], verbose=False)
    assert len(client.predict(handle_file(str(upload)), "haar", 0, api_name="/analyze")) == 1
    body = upload.read_bytes()

    def leftovers():
        return [p for p in app["temp"].rglob("*") if p.is_file() and (p.name == upload.name or p.read_bytes() == body)]

    deadline = time.monotonic() + 60  # the app sweeps every 2 s for files older than 3 s (SOFTBIO_CACHE_SWEEP)
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert leftovers() == []


def test_the_same_photo_from_eight_clients_at_once_then_again_all_succeed(app):
    from concurrent.futures import ThreadPoolExecutor

    photo = str(REPO / "examples" / "grace_hopper.jpg")

    def analyse(_):
        return Client(app["url"], verbose=False).predict(handle_file(photo), "haar", 0, api_name="/analyze")

    for _ in range(2):  # one file in gradio's cache serves them all: no request may delete it under another
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(analyse, range(8)))
        assert [len(faces) for faces in results] == [1] * 8


def test_a_crafted_path_outside_the_uploads_is_refused_and_left_alone(app, tmp_path):
    secret = tmp_path / "someone-elses.jpg"
    secret.write_bytes((REPO / "examples" / "astronaut.jpg").read_bytes())
    crafted = {"path": str(secret), "meta": {"_type": "gradio.FileData"}, "orig_name": "x.jpg"}
    status, answer = refused_api_call(app["url"], [crafted, "haar", 0])  # gradio_client would upload the file
    assert status == 422 and "not an upload of this demo" in answer  # a reason, not {"error": null}
    assert str(tmp_path) not in answer  # no server path comes back
    assert secret.is_file()


@pytest.mark.parametrize("payload", [42, "photo.jpg", {"path": 7}, None])
def test_a_payload_of_the_wrong_kind_gets_the_reason_and_how_to_call(app, payload):
    status, answer = refused_api_call(app["url"], [payload, "haar", 0])
    assert status == 422 and "handle_file('photo.jpg')" in answer and "pydantic" not in answer


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/tmp/" + "a" * 5000 + ".jpg", "5009 characters long, over the 1024"),
        ("/tmp/" + "/".join(["b" * 300] * 3) + ".jpg", "not an upload of this demo"),  # each part too long
        ("/tmp/photo\x00.jpg", "NUL byte"),
    ],
)
def test_a_path_the_file_system_refuses_gets_a_4xx_with_the_reason(app, path, reason):
    crafted = {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": "x.jpg"}
    status, answer = refused_api_call(app["url"], [crafted, "haar", 0])
    assert status == 422 and reason in answer and "Traceback" not in answer
    assert "Traceback" not in app["log"].read_text()


def test_without_the_demo_extra_the_app_says_what_to_install(tmp_path):
    """The library installed alone has no starlette or gradio: a run names the extra instead of a traceback."""
    import subprocess

    code = (
        "import runpy, sys\n"
        "sys.modules['starlette'] = None  # as where only softbio (no [demo]) is installed\n"
        f"sys.argv = ['app.py', '--model', {str(tmp_path)!r}]\n"
        f"runpy.run_path({str(REPO / 'app.py')!r}, run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2
    assert "the demo needs starlette" in result.stderr and 'pip install "softbio[demo]"' in result.stderr
    assert "Traceback" not in result.stderr


def refused_api_call(url: str, data: list) -> tuple[int, str]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"{url}gradio_api/call/analyze",
        data=json.dumps({"data": data}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def raw_api_call(url: str, endpoint: str, data: list, cookie: str | None = None) -> str:
    """The HTTP API without gradio_client: a payload exactly as sent, and the event stream that answers it."""
    import json
    import urllib.request

    headers = {"Content-Type": "application/json", **({"Cookie": cookie} if cookie else {})}
    request = urllib.request.Request(
        f"{url}gradio_api/call/{endpoint}", data=json.dumps({"data": data}).encode(), headers=headers
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        event_id = json.loads(response.read())["event_id"]
    stream = urllib.request.Request(f"{url}gradio_api/call/{endpoint}/{event_id}", headers=headers)
    with urllib.request.urlopen(stream, timeout=60) as response:
        return response.read().decode()


def raw_upload(url: str, path: Path, cookie: str | None = None) -> tuple[str, str | None]:
    """POST one file to gradio's upload route as a browser form would: its server path, and any cookie set."""
    import json
    import urllib.request
    import uuid

    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{path.name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", **({"Cookie": cookie} if cookie else {})}
    request = urllib.request.Request(f"{url}gradio_api/upload", data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        set_cookie = response.headers.get("Set-Cookie")
        return json.loads(response.read())[0], set_cookie.split(";")[0] if set_cookie else None


def page_cookie(url: str) -> str:
    """The cookie the demo gives a new browser with its page."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as response:
        return response.headers["Set-Cookie"].split(";")[0]


def file_data(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": Path(path).name}


@pytest.fixture(scope="module")
def app_keeping_uploads(tmp_path_factory):
    """The app with gradio's default upload sweep (minutes): an upload outlives the test that makes it."""
    with serve_tiny_model(tmp_path_factory.mktemp("app-keeping"), {"SOFTBIO_COMPILE": "0"}) as served:
        yield served


def test_a_crafted_call_naming_another_clients_upload_is_refused_and_the_file_kept(app_keeping_uploads, tmp_path):
    url = app_keeping_uploads["url"]
    private = tmp_path / "private-photo-31c9.jpg"
    Image.open(REPO / "examples" / "astronaut.jpg").save(private, quality=85)
    owner_cookie = page_cookie(url)  # a browser: the page first, then the upload
    assert owner_cookie.startswith("softbio_uploader=")
    owner_path, cookie_set = raw_upload(url, private, cookie=owner_cookie)
    assert cookie_set is None  # a requester keeps its cookie
    assert '"box"' in raw_api_call(url, "analyze", [file_data(owner_path), "haar", 0], cookie=owner_cookie)

    for cookie in (page_cookie(url), None):  # another browser, and a caller without cookies (known by address)
        answer = raw_api_call(url, "analyze", [file_data(owner_path), "haar", 0], cookie=cookie)
        assert "event: error" in answer and "not an upload of yours" in answer and '"box"' not in answer
    assert Path(owner_path).is_file()
    assert '"box"' in raw_api_call(url, "analyze", [file_data(owner_path), "haar", 0], cookie=owner_cookie)
    log = app_keeping_uploads["log"].read_text()
    assert "refused private-photo-31c9.jpg: uploaded by another requester (this one known by address)" in log


def test_requests_leave_no_empty_temporary_files(app_keeping_uploads):
    client = Client(app_keeping_uploads["url"], verbose=False)
    for _ in range(3):
        client.predict(handle_file(str(REPO / "examples" / "astronaut.jpg")), "haar", 0, api_name="/analyze")
    empty = [p for p in app_keeping_uploads["temp"].rglob("*") if p.is_file() and p.stat().st_size == 0]
    assert empty == []


def test_a_caller_that_keeps_no_cookies_can_analyse_its_own_upload(app_keeping_uploads, tmp_path):
    url = app_keeping_uploads["url"]
    private = tmp_path / "cookieless-5e1d.jpg"
    Image.open(REPO / "examples" / "grace_hopper.jpg").save(private, quality=85)
    path, _ = raw_upload(url, private)
    assert '"box"' in raw_api_call(url, "analyze", [file_data(path), "haar", 0])


def test_offline_without_a_model_says_what_to_pass(tmp_path):
    result = app_run_to_exit(REPO / "app.py", env={"SOFTBIO_CACHE": str(tmp_path / "empty"), "SOFTBIO_MODEL": ""})
    assert result.returncode == 2
    assert "--model" in result.stderr and "Traceback" not in result.stderr


def test_default_model_is_built_once_then_loaded_from_the_cache(tiny_clip_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTBIO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "DEFAULT_CLIP", str(tiny_clip_dir))
    built, name = models.load_model(None)
    cached = models.zero_shot_cache_dir(str(tiny_clip_dir), tiny_clip_dir / "config.json")
    assert (cached / "model.safetensors").is_file() and "zero-shot" in name
    monkeypatch.setattr(SoftBioModel, "from_clip", lambda *a, **k: pytest.fail("rebuilt instead of cached"))
    again, name = models.load_model(None)
    assert "cached" in name
    assert torch.equal(again.heads["age"].classifier.weight, built.heads["age"].classifier.weight)


def test_help_explains_the_options():
    result = app_run_to_exit(REPO / "app.py", "--help", timeout=120)
    assert result.returncode == 0
    for option in ("--model", "--host", "--port", "SOFTBIO_MODEL"):
        assert option in result.stdout


def test_browser_uploads_a_photo_and_sees_the_labels(app, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = find_chromium()
    assert chromium, "needs a Chromium: Debian's (apt-get install -y chromium) or python -m playwright install chromium"
    shots = artifacts(tmp_path)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((REPO / "examples" / "astronaut.jpg").read_bytes()[:4000])
    transparent = tmp_path / "astronaut-rgba.png"
    Image.open(REPO / "examples" / "astronaut.jpg").convert("RGBA").save(transparent)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--use-fake-device-for-media-stream",  # a synthetic camera: a test pattern, no face
                "--use-fake-ui-for-media-stream",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100}, permissions=["camera"])
            page.goto(app["url"], wait_until="load")
            page.wait_for_selector("#analyze", timeout=60_000)
            assert "Model in use" in page.content()
            page.set_input_files("#photo input[type=file]", str(REPO / "examples" / "astronaut.jpg"))
            page.wait_for_timeout(500)
            page.click("#analyze")
            page.wait_for_selector("#sb-result .sb-face", timeout=60_000)
            text = page.inner_text("#sb-result")
            for expected in ("Face 1", "Age group", "Gender", "Emotion", "years", "90% set: "):
                assert expected in text
            assert text.count("90% set: ") == 3  # one per task, beside its top label
            page.screenshot(path=str(shots / "app.png"), full_page=True)

            # An example photo can be analysed twice: its cached copy must survive the first request.
            page.locator("img[src*='grace_hopper']").first.click()
            page.wait_for_timeout(800)
            assert "Face 1" in next_result(page, lambda: page.click("#analyze"))
            page.locator("img[src*='grace_hopper']").first.click()
            page.locator("input[type=number]").first.fill("0.99")  # no Haar face scores that high
            page.locator("input[type=number]").first.press("Enter")
            page.wait_for_timeout(500)
            page.click("#analyze")
            page.wait_for_selector("text=No face found", timeout=60_000)

            # A photo with transparency: analysed from the upload itself (gradio's RGB copy would not be the
            # requester's upload).
            page.locator("input[type=number]").first.fill("0")  # back to the detector's default threshold
            page.locator("input[type=number]").first.press("Enter")
            page.set_input_files("#photo input[type=file]", str(transparent))
            page.wait_for_timeout(500)
            assert "Face 1" in next_result(page, lambda: page.click("#analyze"))

            page.set_input_files("#photo input[type=file]", str(broken))
            page.wait_for_timeout(500)
            page.click("#analyze")
            page.wait_for_selector("text=truncated or corrupt", timeout=60_000)

            # The live webcam: its frames reach the analysis (the fake camera's pattern has no face in it).
            page.get_by_role("tab", name="Webcam (live)").click()
            page.get_by_text("Click to Access Webcam").click()
            assert "No face found" in next_result(page, lambda: page.get_by_label("capture photo").click())
        finally:
            browser.close()


def test_browser_analyses_a_clip_in_the_video_tab(app, tmp_path):
    from clips import make_clip
    from playwright.sync_api import sync_playwright

    make_clip(tmp_path / "walk.mp4")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=find_chromium(),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(app["url"], wait_until="load")
            page.get_by_role("tab", name="Video").click()
            page.set_input_files("#clip input[type=file]", str(tmp_path / "walk.mp4"))
            page.wait_for_timeout(1500)
            page.click("#analyze-clip")
            page.wait_for_selector("#sb-result .sb-tracks", timeout=120_000)
            text = page.inner_text("#sb-result")
            assert "Track 1" in text and "Track 2" in text and "agreement" in text
            assert page.get_attribute("#sb-result img", "src").startswith("data:image/gif;base64,")
            shots = artifacts(tmp_path)
            page.screenshot(path=str(shots / "app-video.png"), full_page=True)
        finally:
            browser.close()


def live_tracks(page) -> list[tuple[str, int, str]]:
    """The webcam result's per-track table: (track, frames, labels) per row."""
    rows = []
    for row in page.locator("#sb-result tr.sb-track").all_inner_texts():
        cells = row.split("\t")
        rows.append((cells[0], int(cells[2]), " ".join(cell.split(" ")[0] for cell in cells[3:])))
    return rows


def test_browser_webcam_streams_steady_labels_and_tracks_per_session(app, tmp_path):
    """Chromium's fake camera plays two people; each browser session keeps its own two tracks, their labels steady."""
    from clips import two_people_frame, write_y4m
    from playwright.sync_api import sync_playwright

    camera = write_y4m(tmp_path / "camera.y4m", [two_people_frame()] * 10)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=find_chromium(),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--use-fake-device-for-media-stream",
                "--use-fake-ui-for-media-stream",
                f"--use-file-for-fake-video-capture={camera}",
            ],
        )
        try:
            pages = []
            for _ in range(2):  # two visitors: separate browser contexts, so separate cookies and sessions
                context = browser.new_context(viewport={"width": 1400, "height": 1100}, permissions=["camera"])
                page = context.new_page()
                page.goto(app["url"], wait_until="load")
                page.get_by_role("tab", name="Webcam (live)").click()
                page.get_by_text("Click to Access Webcam").click()
                pages.append(page)
            first, second = pages
            first.get_by_label("capture photo").click()
            seen = []
            deadline = time.monotonic() + 900  # only to catch a stream that never steadies, however slow the machine
            while time.monotonic() < deadline and (not seen or min(frames for _, frames, _ in seen[-1]) < 5):
                first.wait_for_timeout(500)
                rows = live_tracks(first)
                if rows and (not seen or rows != seen[-1]):
                    seen.append(rows)
            assert seen and [name for name, _, _ in seen[-1]] == ["Track 1", "Track 2"], seen[-3:]
            assert min(frames for _, frames, _ in seen[-1]) >= 5  # the same two tracks, frame after frame
            assert len({tuple(labels for _, _, labels in rows) for rows in seen[-3:]}) == 1  # steady labels
            first.screenshot(path=str(artifacts(tmp_path) / "app-webcam.png"), full_page=True)

            second.get_by_label("capture photo").click()  # another visitor: their own tracks, from their frame 1
            second.wait_for_selector("#sb-result tr.sb-track", timeout=120_000)
            theirs = live_tracks(second)
            assert [name for name, _, _ in theirs] == ["Track 1", "Track 2"]
            assert max(frames for _, frames, _ in theirs) < min(frames for _, frames, _ in live_tracks(first))
        finally:
            browser.close()


def test_live_sessions_keep_their_own_tracks_and_restart_after_a_pause(monkeypatch):
    import io

    from clips import two_people_frame

    torch.manual_seed(0)
    model = SoftBioModel(SoftBioConfig(vision_config={"model_type": "clip_vision_model", **TINY_VISION}))
    pipe = models.build_pipeline(model)
    buffer = io.BytesIO()
    Image.fromarray(two_people_frame()).save(buffer, format="PNG")
    mine = theirs = None
    for _ in range(3):
        html, mine = analysis.analyze_live_frame(pipe, mine, buffer.getvalue(), "haar", 0)
    html, theirs = analysis.analyze_live_frame(pipe, theirs, buffer.getvalue(), "haar", 0)
    assert [t["frames"] for t in mine.faces.summaries()] == [3, 3] and html.count('class="sb-track"') == 2
    assert [t["frames"] for t in theirs.faces.summaries()] == [1, 1]  # nobody else's frames joined them
    monkeypatch.setattr(analysis, "LIVE_RESET_S", 0.0)  # the stream stopped and started again
    _, again = analysis.analyze_live_frame(pipe, mine, buffer.getvalue(), "haar", 0)
    assert again is not mine and [t["frames"] for t in again.faces.summaries()] == [1, 1]


def test_a_clip_is_refused_past_the_demos_length_with_the_reason(tmp_path, monkeypatch):
    from clips import make_clip, write_clip

    from softbio_hf.video import read_frames

    make_clip(tmp_path / "walk.mp4")  # 3 s
    torch.manual_seed(0)
    model = SoftBioModel(SoftBioConfig(vision_config={"model_type": "clip_vision_model", **TINY_VISION}))
    pipe = models.build_pipeline(model)
    html, tracks = analysis.analyze_clip(pipe, str(tmp_path / "walk.mp4"), "'walk.mp4'", "haar")
    assert len(tracks) == 2 and html.count('class="sb-track"') == 2
    assert html.count('class="sb-timeline"') == 2 and "stopped decoding" not in html  # each person's emotion plot
    cut = tmp_path / "cut.mp4"
    frames = [frame.rgb for frame in read_frames(tmp_path / "walk.mp4")]
    write_clip(cut, frames, [i / 8 for i in range(len(frames))], movflags="faststart")
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    html, _ = analysis.analyze_clip(pipe, str(cut), "'cut.mp4'", "haar")
    assert "cut.mp4&#x27; stopped decoding after" in html and f"of the {len(frames)} it announces" in html
    in_memory = (tmp_path / "walk.mp4").read_bytes()  # as the Video tab reads an upload: the sweep cannot race it
    assert analysis.analyze_clip(pipe, in_memory, "'walk.mp4'", "haar")[1] == tracks
    monkeypatch.setattr(analysis, "VIDEO_MAX_SECONDS", 1.0)
    with pytest.raises(Exception, match=r"'walk.mp4' is 3 s long, over the 1 s"):
        analysis.analyze_clip(pipe, in_memory, "'walk.mp4'", "haar")


FOUR_K_MEMORY = """
import gc, sys
sys.path[:0] = [{tests!r}, {repo!r}]
import torch
from tiny import TINY_VISION
from softbio_hf import SoftBioConfig, SoftBioModel
from softbio_demo import analysis, models

def resident_kb(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

torch.manual_seed(0)
vision = {{"model_type": "clip_vision_model", **TINY_VISION}}
pipe = models.build_pipeline(SoftBioModel(SoftBioConfig(vision_config=vision)))
analysis.analyze_clip(pipe, {small!r}, "small.mp4", "haar")  # warm: libraries loaded, buffers made once
gc.collect()
before = resident_kb("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from here
html, tracks = analysis.analyze_clip(pipe, {big!r}, "4k.mp4", "haar")
print("TRACKS", len(tracks), "GROWTH_MB", (resident_kb("VmHWM:") - before) / 1024)
"""


def test_a_long_4k_clip_costs_the_demo_under_300_mb(tmp_path):
    """60 s of 3840x2160 at 2 frames a second (120 frames, all analysed): the demo's peak memory grows by less than
    300 MB while it analyses it (frames are decoded small and dropped; only thumbnails are kept)."""
    import subprocess

    import cv2
    from clips import make_clip, two_people_frame, write_clip

    make_clip(tmp_path / "small.mp4")
    frame = cv2.resize(two_people_frame(), (3840, 2160), interpolation=cv2.INTER_LINEAR)
    write_clip(tmp_path / "4k.mp4", [frame] * 120, [i / 2 for i in range(120)])
    assert (tmp_path / "4k.mp4").stat().st_size < 2_000_000  # a small upload: the size cap does not stop it
    code = FOUR_K_MEMORY.format(
        tests=str(REPO / "tests"), repo=str(REPO), small=str(tmp_path / "small.mp4"), big=str(tmp_path / "4k.mp4")
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert "TRACKS 2" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    growth = float(result.stdout.split("GROWTH_MB")[1])
    assert growth < 300, growth


def next_result(page, start) -> str:
    """Call `start` (it sets an analysis going), wait for the result's picture to change, return its text."""
    before = page.get_attribute("#sb-result img", "src")
    start()
    page.wait_for_function(
        "src => document.querySelector('#sb-result img').getAttribute('src') !== src", arg=before, timeout=60_000
    )
    return page.inner_text("#sb-result")


def test_a_clip_checkpoint_becomes_the_zero_shot_model_built_once(tiny_clip_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTBIO_CACHE", str(tmp_path / "cache"))
    model, name = models.load_model(str(tiny_clip_dir))
    assert name == f"zero-shot {tiny_clip_dir}" and model.config.zero_shot_source == str(tiny_clip_dir)
    monkeypatch.setattr(SoftBioModel, "from_clip", lambda *a, **k: pytest.fail("rebuilt instead of cached"))
    _, name = models.load_model(str(tiny_clip_dir))
    assert "cached" in name


def test_the_zero_shot_cache_knows_a_clip_folder_by_what_it_is(tiny_clip_dir, tmp_path, monkeypatch):
    """`cd a && app.py --model clip`, then `cd b && app.py --model clip`: b's model, not a's; and a CLIP folder
    re-saved in place is built again."""
    from tiny import make_tiny_clip

    monkeypatch.setenv("SOFTBIO_CACHE", str(tmp_path / "cache"))

    def weights(model):
        return model.backbone.embeddings.patch_embedding.weight

    expected = {}
    for place, seed in (("a", 1), ("b", 2)):
        make_tiny_clip(tmp_path / place / "clip", seed=seed)
        expected[place] = weights(SoftBioModel.from_clip(tmp_path / place / "clip"))
    for place in ("a", "b"):
        monkeypatch.chdir(tmp_path / place)
        assert torch.equal(weights(models.load_model("clip")[0]), expected[place]), place
    make_tiny_clip(tmp_path / "b" / "clip", seed=3)  # saved again in place
    model, name = models.load_model("clip")
    assert "cached" not in name and not torch.equal(weights(model), expected["b"])


def test_a_missing_folder_is_said_to_be_missing(tmp_path):
    with pytest.raises(models.ModelUnavailable, match=r"no such folder"):
        models.load_model(str(tmp_path / "missing" / "dir"))


def test_a_checkpoint_of_another_kind_is_refused_with_the_reason(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(models.ModelUnavailable, match=r"a 'bert' checkpoint.*softbio checkpoint.*CLIP"):
        models.load_model(str(tmp_path / "bert"))


def test_an_unreachable_hub_fails_at_once_and_says_what_to_pass(tmp_path):
    # Not the offline switch: a Hub address where nothing answers, as on a machine without network.
    env = {
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "SOFTBIO_CACHE": str(tmp_path / "empty"),
        "SOFTBIO_MODEL": "",
        "HF_HOME": str(tmp_path / "hf"),
    }
    result = app_run_to_exit(REPO / "app.py", env=env, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "out of reach" in result.stderr and "--model DIR" in result.stderr and "Traceback" not in result.stderr


def test_a_busy_port_says_to_use_another_one(app, tmp_path):
    port = app["url"].rsplit(":", 1)[1].strip("/")
    result = app_run_to_exit(
        REPO / "app.py", "--model", str(app["root"] / "ckpt"), "--port", port, env={"SOFTBIO_COMPILE": "0"}
    )
    assert result.returncode == 2
    assert "--port" in result.stderr and "Traceback" not in result.stderr


def test_the_api_names_its_inputs_and_output(app):
    api = Client(app["url"], verbose=False).view_api(return_format="dict", print_info=False)
    endpoint = api["named_endpoints"]["/analyze"]
    assert [p["label"] for p in endpoint["parameters"]] == ["image", "detector", "threshold"]
    assert [r["label"] for r in endpoint["returns"]] == ["faces"]
    names = [p["parameter_name"] for p in endpoint["parameters"]]
    assert names == ["payload", "detector", "threshold"]  # what a keyword call must say
    assert f"(inputs {', '.join(f'`{name}`' for name in names)}; output `faces`)" in (REPO / "README.md").read_text()
    photo = handle_file(str(REPO / "examples" / "astronaut.jpg"))
    faces = Client(app["url"], verbose=False).predict(payload=photo, detector="haar", threshold=0, api_name="/analyze")
    assert len(faces) == 1  # the README's keyword call, as written there


def test_upload_records_expire_stay_bounded_and_open_the_examples_to_all(tmp_path, monkeypatch):
    example = tmp_path / "example.jpg"
    example.write_bytes(b"public example bytes")
    owners = uploads.UploadOwners(max_age_s=60, examples=[example], max_requesters=2)
    mine, theirs = tmp_path / "mine.jpg", tmp_path / "theirs.jpg"
    owners.record("cookie:a", [str(mine)])
    assert owners.owns("cookie:a", mine, b"x") and not owners.owns("cookie:b", mine, b"x")
    assert owners.owns("cookie:b", theirs, b"public example bytes")  # any copy of an example, by content

    clock = [1000.0]
    monkeypatch.setattr(uploads.time, "monotonic", lambda: clock[0])
    owners.record("cookie:a", [str(theirs)])
    clock[0] += 61
    assert not owners.owns("cookie:a", theirs, b"x")  # expired with gradio's cache
    monkeypatch.setattr(uploads, "MAX_UPLOADS_PER_REQUESTER", 3)
    owners.record("cookie:a", [str(tmp_path / f"{i}.jpg") for i in range(5)])
    assert [owners.owns("cookie:a", tmp_path / f"{i}.jpg", b"x") for i in range(5)] == [False, False, True, True, True]
    owners.record("cookie:b", [str(mine)])
    owners.record("cookie:c", [str(mine)])  # a third requester: the least recent one (a) is dropped
    assert not owners.owns("cookie:a", tmp_path / "4.jpg", b"x") and owners.owns("cookie:c", mine, b"x")
    assert uploads.requester_key({"softbio_uploader": "x" * 32}, "10.0.0.1") == "cookie:" + "x" * 32
    assert uploads.requester_key({"softbio_uploader": "short"}, "10.0.0.1") == "address:10.0.0.1"
