"""The Gradio demo, launched for real on 127.0.0.1: API via gradio_client, page via headless Chromium."""

from __future__ import annotations

import json
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

from softbio_demo import analysis, models
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
    root = tmp_path_factory.mktemp("app")
    # HF_HOME empty: no cached YuNet file, as on a fresh machine offline
    with serve_tiny_model(root, {"SOFTBIO_CACHE_SWEEP": "2,3", "HF_HOME": str(root / "hf")}) as served:
        yield served


def test_api_analyze_returns_the_astronaut_face(app):
    deadline = time.monotonic() + 60  # the line follows the server's start by a moment
    while "INFO ready at" not in app["log"].read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    log = app["log"].read_text()
    # a tiny model is not worth compiling (seconds at start-up for nothing): judged, decided, and said
    assert "softbio.app INFO not compiling the model: a face is" in log and "compiled in" not in log
    ready = [line for line in log.splitlines() if "INFO ready at" in line]
    print(f"tiny model's demo: {ready} (answered after {app['ready_s']:.1f} s, on this machine's load)")
    assert len(ready) == 1 and app["url"] in ready[0]
    assert "share=True" not in log  # gradio's advice for a public link is not this demo's to give
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
    # a detector that cannot run here is the visitor's to change: said, not "the analysis failed on the server"
    with pytest.raises(Exception, match=r"Could not get the YuNet model.*choose the face detector auto or haar"):
        client.predict(handle_file(str(REPO / "examples" / "astronaut.jpg")), "yunet", 0, api_name="/analyze")
    faces = client.predict(handle_file(str(REPO / "examples" / "grace_hopper.jpg")), "haar", 0, api_name="/analyze")
    assert len(faces) == 1
    log = app["log"].read_text()
    assert "rejected 'notes.txt'" in log and "Traceback" not in log  # one line per rejected input
    assert "rejected 'astronaut.jpg': Could not get the YuNet model" in log


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
            badge = page.inner_text("#sb-model")  # what the model is, on the page
            assert "untrained random weights" in badge and "Model in use" in badge and "meaningless" in badge
            page.set_input_files("#photo input[type=file]", str(REPO / "examples" / "astronaut.jpg"))
            page.wait_for_timeout(500)
            page.click("#analyze")
            page.wait_for_selector("#sb-result .sb-face", timeout=60_000)
            text = page.inner_text("#sb-result")
            for expected in ("Face 1", "Age group", "Gender", "Emotion", "years", "90% set: "):
                assert expected in text
            assert text.count("90% set: ") == 3  # one per task, beside its top label
            # the set explained in words on the page, not only in a tooltip (touch screens never show one)
            assert page.locator(".sb-set-help").is_visible()
            assert "labels that hold the true one 90% of the time" in page.inner_text(".sb-set-help")
            detector = page.inner_text("#sb-result .sb-detector")  # the one that ran: auto chose Haar offline
            assert "Haar cascade" in detector and "chosen by auto" in detector
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

            assert page.locator("#sb-result .sb-face").count() == 1
            page.set_input_files("#photo input[type=file]", str(broken))
            page.wait_for_timeout(500)
            page.click("#analyze")
            page.wait_for_selector("text=truncated or corrupt", timeout=60_000)
            # the earlier photo's result is gone: nothing under the error reads as this file's answer
            page.wait_for_selector("#sb-result .sb-face", state="detached", timeout=30_000)
            assert page.locator("#sb-result img").count() == 0

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

            # On a phone the table is wider than the page: its box scrolls sideways to every column.
            page.set_viewport_size({"width": 390, "height": 844})
            page.wait_for_timeout(500)
            reached = page.eval_on_selector("#sb-result .sb-tracks", REACH_EVERY_COLUMN)
            assert [name.split(" (")[0] for name, _ in reached] == [
                "person",
                "seen",
                "frames",
                "Age group",
                "Gender",
                "Emotion",
            ]
            assert all(visible for _, visible in reached), reached
            page.screenshot(path=str(shots / "app-video-phone.png"), full_page=True)
        finally:
            browser.close()


# Scroll the track table's nearest box that scrolls sideways to each header cell in turn; each must then be on the
# screen and be what a finger touching its middle would touch (not clipped, not covered).
REACH_EVERY_COLUMN = """
table => {
    let box = table.parentElement;
    while (box && !["auto", "scroll"].includes(getComputedStyle(box).overflowX)) box = box.parentElement;
    if (!box || box.clientWidth > window.innerWidth) return [["no box that scrolls within the screen", false]];
    box.scrollIntoView({block: "center"});
    return [...table.querySelectorAll("th")].map(th => {
        box.scrollLeft += th.getBoundingClientRect().left - box.getBoundingClientRect().left;
        const r = th.getBoundingClientRect();
        const x = r.left + Math.min(r.width, 40) / 2, y = r.top + r.height / 2;
        const inside = x >= 0 && x < window.innerWidth && y >= 0 && y < window.innerHeight;
        return [th.textContent, inside && th.contains(document.elementFromPoint(x, y))];
    });
}
"""


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
    shown = page.locator("#sb-result img")
    before = shown.first.get_attribute("src") if shown.count() else None  # none after a failure cleared it
    start()
    page.wait_for_function(
        "src => { const img = document.querySelector('#sb-result img'); return img && img.src !== src; }",
        arg=before,
        timeout=60_000,
    )
    return page.inner_text("#sb-result")


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


def test_a_busy_port_says_to_use_another_one_before_the_model_loads(app, tmp_path):
    port = app["url"].rsplit(":", 1)[1].strip("/")
    # a model that is not there: the port is checked first, so its message is the one said
    result = app_run_to_exit(REPO / "app.py", "--model", str(tmp_path / "no-model"), "--port", port)
    assert result.returncode == 2
    assert f"could not serve on 127.0.0.1:{port}" in result.stderr and "no such folder" not in result.stderr
    assert result.stderr.count("could not serve") == 1 and "launch()" not in result.stderr  # once, no gradio advice
    assert "Traceback" not in result.stderr


def test_the_api_names_its_inputs_and_output(app):
    api = Client(app["url"], verbose=False).view_api(return_format="dict", print_info=False)
    endpoint = api["named_endpoints"]["/analyze"]
    assert [p["label"] for p in endpoint["parameters"]] == ["image", "detector", "threshold"]
    assert [r["label"] for r in endpoint["returns"]] == ["faces"]
    names = [p["parameter_name"] for p in endpoint["parameters"]]
    assert names == ["payload", "detector", "threshold"]  # what a keyword call must say
    assert f"(inputs {', '.join(f'`{name}`' for name in names)}; output `faces`)" in (REPO / "docs/demo.md").read_text()
    photo = handle_file(str(REPO / "examples" / "astronaut.jpg"))
    faces = Client(app["url"], verbose=False).predict(payload=photo, detector="haar", threshold=0, api_name="/analyze")
    assert len(faces) == 1  # docs/demo.md's keyword call, as written there
