"""softbio demo: age group, gender and emotion of every face in a photo (Gradio; runs as a Hugging Face Space).

python app.py                       # zero-shot model from CLIP ViT-L/14@336, built once and cached
python app.py --model DIR_OR_REPO   # a softbio checkpoint, or a CLIP one (its zero-shot model); or SOFTBIO_MODEL
"""

# No `from __future__ import annotations`: gradio finds the `gr.Request` parameter by its evaluated annotation.
import argparse
import base64
import hashlib
import html
import io
import json
import logging
import os
import secrets
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger("softbio.app")
DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
MAX_UPLOAD = "10mb"
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# Gradio's upload cache: every minute, uploads older than two minutes are deleted (no photo is kept longer).
# SOFTBIO_CACHE_SWEEP="EVERY,AGE" in seconds changes it (the tests use a few seconds).
CACHE_SWEEP = tuple(int(v) for v in os.environ.get("SOFTBIO_CACHE_SWEEP", "60,120").split(","))
DETECTOR_CHOICES = ["auto", "yunet", "haar", "none"]
TASK_TITLES = {"age": "Age group", "gender": "Gender", "emotion": "Emotion"}
BOX_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"]

ABOUT = """
### How it works
Each face is found by a face detector (OpenCV's YuNet when its small model file can be fetched, otherwise
OpenCV's Haar cascade), cropped with a margin and aligned on the eyes, then classified by **one forward
pass** of a CLIP vision transformer with three heads: age group (9 bins; *years* is the expectation over the
bins), gender and emotion (7 classes). The default model is **zero-shot**: its heads are CLIP text embeddings
of prompts such as "a photo of a smiling face", so no face data trained it. Fine-tuned checkpoints
(LoRA, MTLoRA, ...) are much more accurate; pass one with `--model`.

### Limits and biases
- These are *apparent* attributes read from pixels: not identity, not self-described gender, not felt emotion.
  Gender is a binary label here because the public benchmarks are; it cannot represent everyone.
- Accuracy differs across age groups, skin tones and image conditions. The benchmarks behind it
  (UTKFace, FairFace, RAF-DB) are imbalanced: few children under 3 and few people over 70, few fearful
  or disgusted faces. Expect more errors on under-represented groups.
- Do not use it to make decisions about people (access, hiring, policing, age verification).
- Uploaded images are analysed in memory, only for the browser that sent them; the server's upload cache is
  emptied of photos older than two minutes, every minute. Nothing is stored.
"""


# ------------------------------------------------------------------------------------------------ model
class ModelUnavailable(RuntimeError):
    """The model could not be loaded or built; the message says what to pass instead."""


def cache_root() -> Path:
    return Path(os.environ.get("SOFTBIO_CACHE", Path.home() / ".cache" / "softbio"))


def zero_shot_cache_dir(clip: str, config_path: Path) -> Path:
    """The cache folder of the zero-shot model of this CLIP checkpoint as it is now: a folder is known by its
    resolved path and its files (name, size, modification time: re-saved in place, it is another model), a Hub
    checkpoint by its id and the commit its config came from (snapshots/<commit>/config.json)."""
    folder = Path(clip)
    if folder.is_dir():
        files = sorted(p for p in folder.resolve().iterdir() if p.is_file())
        parts = [str(folder.resolve()), *(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)]
    else:
        parts = [clip, config_path.parent.name]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return cache_root() / f"zero-shot--{folder.name or clip.replace('/', '--')}--{digest}"


def checkpoint_config(name: str) -> Path | None:
    """config.json of a local folder or Hub repo: the cached copy first, the Hub only if it answers."""
    from huggingface_hub import hf_hub_download

    from softbio_hf.hub_access import hub_reachable

    path = Path(name) / "config.json"
    if path.is_file():
        return path
    if Path(name).exists():
        return None
    try:
        return Path(hf_hub_download(name, "config.json", local_files_only=not hub_reachable()))
    except Exception:  # not cached and unreachable, or no such repo
        return None


def checkpoint_type(config_path: Path | None) -> str | None:
    try:
        return json.loads(config_path.read_text()).get("model_type") if config_path else None
    except (OSError, ValueError):
        return None


def load_model(name: str | None):
    """A SoftBioModel and a description of it: a softbio checkpoint, or the zero-shot model of a CLIP one."""
    from softbio_hf import SoftBioModel
    from softbio_hf.hub_access import hub_repo_id

    name = name or DEFAULT_CLIP
    if not Path(name).exists() and hub_repo_id(name) is None:  # meant as a folder, and not there
        raise ModelUnavailable(
            f"--model {name}: no such folder. Pass a folder written by save_pretrained or python -m train.train "
            "(its best/ folder), a CLIP folder, or a Hub repo id."
        )
    config_path = checkpoint_config(name)
    kind = checkpoint_type(config_path)
    if kind == "clip" or (name == DEFAULT_CLIP and kind is None):
        return zero_shot(name, config_path)
    if kind != "softbio":
        found = f"a {kind!r} checkpoint" if kind else "no readable config.json (not cached, or the Hub is out of reach)"
        raise ModelUnavailable(
            f"--model {name}: {found}. Pass a softbio checkpoint (a folder written by save_pretrained or "
            "python -m train.train, or its Hub id) or a CLIP checkpoint, which becomes the zero-shot model."
        )
    from softbio_hf.modeling_softbio import refuse_untrained_heads

    try:
        model = SoftBioModel.from_pretrained(name)
    except Exception as error:  # a broken checkpoint fails in many ways; each is reported, none as a traceback
        raise ModelUnavailable(
            f"Could not load the softbio checkpoint {name!r}: {type(error).__name__}: {str(error)[:500]}\n"
            "Pass --model with a folder written by save_pretrained or a Hub repo id of a softbio model."
        ) from error
    try:
        refuse_untrained_heads(model)
    except ValueError as error:
        raise ModelUnavailable(str(error)) from None
    return model, name


def zero_shot(clip: str, config_path: Path | None):
    """The zero-shot model of a CLIP checkpoint (folder or Hub id), built once and cached under SOFTBIO_CACHE."""
    from softbio_hf import SoftBioModel

    if config_path is None:  # a Hub id whose config is neither cached nor reachable
        raise ModelUnavailable(
            f"The zero-shot model is built from {clip} on the Hugging Face Hub, which is out of reach, and it is not "
            f"cached yet.\nConnect once to build and cache it, or pass a model you have on disk: "
            "python app.py --model DIR (a softbio checkpoint, or a CLIP folder such as a saved "
            "openai/clip-vit-large-patch14-336), or set SOFTBIO_MODEL."
        )
    cached = zero_shot_cache_dir(clip, config_path)
    if (cached / "config.json").is_file():
        return SoftBioModel.from_pretrained(cached), f"zero-shot {clip} (cached at {cached})"
    try:
        model = SoftBioModel.from_clip(clip)
    except OSError as error:
        raise ModelUnavailable(f"Could not build the zero-shot model from {clip}: {error}") from error
    model.save_pretrained(cached)  # later starts load only the vision tower from here
    return model, f"zero-shot {clip}"


def build_pipeline(model, backend: str = "torch"):
    from transformers import pipeline

    return pipeline("soft-biometrics", model=model, dtype="auto", backend=backend)


def compile_for_serving(pipe) -> None:
    """Compile once at start-up, so no visitor waits for it; if it cannot (no C++ compiler, say), serve plain."""
    logger.info("compiling the model for this machine (once per start; --no-compile skips it)")
    try:
        logger.info("compiled in %.1f s", pipe.compile(batch_size=1))
    except Exception as error:
        logger.warning("could not compile the model (%s: %s); serving it uncompiled", type(error).__name__, error)


# --------------------------------------------------------------------------------------------- analysis
def analyze_bytes(pipe, data: bytes, name: str, detector: str = "auto", threshold: float | None = None):
    """
    Decode and run the pipeline. A bad input becomes the product's own message on the page and in the API, and
    one line in the server log; anything else is logged there and the client sees no internals.
    """
    import gradio as gr

    from softbio_hf import load_image

    try:
        rgb = load_image(data, name=name)
        return rgb, pipe(rgb, detector=detector, threshold=threshold or None)  # threshold 0: detector default
    except (ValueError, TypeError) as error:  # the input or an option: the message names it and the fix
        logger.warning("rejected %s: %s", name, error)
        raise gr.Error(str(error), print_exception=False) from None
    except Exception:
        logger.exception("analysis of %s failed", name)
        message = "The analysis failed on the server; it was logged. Try another photo."
        raise gr.Error(message, print_exception=False) from None


def read_upload(path: str | None, requester: str, owners: "UploadOwners") -> tuple[bytes, str]:
    """
    The upload's bytes, read into memory, if `requester` uploaded it (or it is a public example). Nothing is
    deleted here: gradio keeps uploads under a hash of their content, so the same photo sent twice, or by two
    people at once, is one file, and deleting it would break the other request. Gradio's cache is emptied of old
    uploads instead (delete_cache in build_demo).
    """
    import gradio as gr

    if not path:
        raise gr.Error("No image: upload a photo (JPEG, PNG or WebP) first.", print_exception=False)
    file = Path(path)
    if outside_uploads(file):
        logger.warning("refused a path outside the uploads: %s", path)
        raise gr.Error(NOT_AN_UPLOAD, print_exception=False)
    if not file.is_file():
        message = f"The upload is gone (uploads are kept about {CACHE_SWEEP[1]} s): upload the photo again."
        raise gr.Error(message, print_exception=False)
    with file.open("rb") as handle:
        data = handle.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise gr.Error(f"The photo is over {MAX_UPLOAD}: downscale it first.", print_exception=False)
    if not owners.owns(requester, file, data):
        logger.warning(
            "refused %s: uploaded by another requester (this one known by %s)", file.name, requester.split(":")[0]
        )
        raise gr.Error("That file is not an upload of yours: upload the photo itself.", print_exception=False)
    return data, repr(file.name)


# ---------------------------------------------------------------------------------------- upload owners
UPLOADER_COOKIE = "softbio_uploader"
API_NAME = "analyze"  # gradio_client: api_name="/analyze"
MAX_UPLOADS_PER_REQUESTER = 1000  # the records stay small whatever a client sends


def requester_key(cookies: Mapping[str, str], host: str | None) -> str:
    """Who is asking: the browser or client holding our cookie, else (a caller that keeps no cookies) its address."""
    token = cookies.get(UPLOADER_COOKIE, "")
    if 16 <= len(token) <= 64 and token.replace("-", "").replace("_", "").isalnum():
        return f"cookie:{token}"
    return f"address:{host or 'unknown'}"


class UploadOwners:
    """
    Which requester uploaded which file. Gradio names an upload by a hash of its content and reads any upload
    whose path a caller names, whoever uploaded it; the demo analyses only files the caller uploaded itself, or
    the public examples (which anyone may use, matched by content). Records expire with gradio's upload cache.
    """

    def __init__(self, max_age_s: float, examples: Iterable[Path] = (), max_requesters: int = 10_000):
        self.max_age_s = max_age_s
        self.max_requesters = max_requesters
        self.example_digests = {hashlib.sha256(path.read_bytes()).hexdigest() for path in examples}
        self._uploads: OrderedDict[str, dict[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, requester: str, paths: Iterable[str]) -> None:
        now = time.monotonic()
        with self._lock:
            uploads = {name: expiry for name, expiry in self._uploads.pop(requester, {}).items() if expiry >= now}
            uploads.update({str(Path(path).resolve()): now + self.max_age_s for path in paths})
            while len(uploads) > MAX_UPLOADS_PER_REQUESTER:  # oldest first: dicts keep insertion order
                del uploads[next(iter(uploads))]
            self._uploads[requester] = uploads  # most recent last: the oldest requester is dropped first
            while len(self._uploads) > self.max_requesters:
                self._uploads.popitem(last=False)

    def owns(self, requester: str, path: Path, data: bytes) -> bool:
        now = time.monotonic()
        with self._lock:
            uploads = self._uploads.get(requester, {})
            for name in [name for name, expiry in uploads.items() if expiry < now]:
                del uploads[name]
            if str(path.resolve()) in uploads:
                return True
        return hashlib.sha256(data).hexdigest() in self.example_digests


class RecordUploads:
    """
    ASGI middleware: gives each browser or client a random cookie, and records the paths that gradio's upload
    route answers with under the requester who sent them, before the answer leaves (so no later call can come
    first).
    """

    def __init__(self, app, owners: UploadOwners):
        self.app = app
        self.owners = owners

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.requests import Request

        request = Request(scope)
        if scope["method"] == "POST" and scope["path"].rstrip("/").endswith(f"/call/{API_NAME}"):
            body = await read_body(receive)
            refusal = api_payload_refusal(body)
            if refusal:  # gradio would refuse it too, but with no reason ({"error": null}) or pydantic's internals
                from starlette.responses import JSONResponse

                logger.warning("refused an API call: %s", refusal)
                await JSONResponse({"error": refusal}, status_code=422)(scope, receive, send)
                return
            receive = replay(body)
        requester = requester_key(request.cookies, request.client.host if request.client else None)
        new_token = None if requester.startswith("cookie:") else secrets.token_urlsafe(24)
        is_upload = scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/upload")
        status, body = 0, bytearray()

        async def send_and_record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if new_token:
                    cookie = f"{UPLOADER_COOKIE}={new_token}; Path=/; HttpOnly; SameSite=Lax"
                    message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
            elif is_upload and message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if not message.get("more_body", False) and status == 200:
                    paths = uploaded_paths(bytes(body))
                    self.owners.record(requester, paths)
                    if new_token:  # a caller that keeps the cookie from this answer on owns the upload too
                        self.owners.record(f"cookie:{new_token}", paths)
            await send(message)

        await self.app(scope, receive, send_and_record)


async def read_body(receive) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        body.extend(message.get("body", b""))
        if not message.get("more_body", False):
            return bytes(body)


def replay(body: bytes):
    """An ASGI receive that hands the app the body read already."""
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def api_payload_refusal(body: bytes) -> str | None:
    """Why an API call's image cannot be analysed (its ownership is checked later, by read_upload), or None."""
    try:
        data = json.loads(body).get("data")
    except (ValueError, AttributeError):
        return 'The request must be JSON: {"data": [image, detector, threshold]}.'
    image = data[0] if isinstance(data, list) and data else None
    meta = image.get("meta") if isinstance(image, dict) else None
    path = image.get("path") if isinstance(image, dict) else None
    if not (isinstance(meta, dict) and meta.get("_type") == "gradio.FileData" and isinstance(path, str)):
        return (
            "The image must be a file uploaded to this demo: with gradio_client, "
            "Client(url).predict(handle_file('photo.jpg'), 'auto', 0, api_name='/analyze')."
        )
    return NOT_AN_UPLOAD if outside_uploads(Path(path)) else None


NOT_AN_UPLOAD = "That file is not an upload of this demo: upload the photo itself."


def outside_uploads(file: Path) -> bool:
    """A path that gradio's upload route did not write (a link, or anywhere else on the server)."""
    from gradio.utils import get_upload_folder

    return file.is_symlink() or not file.resolve().is_relative_to(Path(get_upload_folder()).resolve())


def uploaded_paths(body: bytes) -> list[str]:
    """The paths in gradio's answer to an upload: a JSON list of strings."""
    try:
        paths = json.loads(body)
    except ValueError:
        return []
    return [path for path in paths if isinstance(path, str)] if isinstance(paths, list) else []


def upload_path(payload) -> str | None:
    """The server path in a file input's unprocessed payload (gradio's FileData as a dict)."""
    if isinstance(payload, dict):
        path = payload.get("path")
        return path if isinstance(path, str) else None
    return None


def data_url_bytes(url: str) -> bytes:
    """The bytes of a base64 `data:` URL (a webcam frame), capped like an upload."""
    import gradio as gr

    header, _, payload = url.partition(",")
    if not header.endswith(";base64") or len(payload) > MAX_UPLOAD_BYTES * 4 // 3 + 4:
        raise gr.Error(f"A webcam frame must be a base64 image under {MAX_UPLOAD}.", print_exception=False)
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:
        raise gr.Error("The webcam frame is not valid base64.", print_exception=False) from None


def short_label(face: dict[str, Any]) -> str:
    parts = []
    if "gender" in face:
        parts.append(face["gender"]["label"][0].upper())
    if "age" in face:
        parts.append(face["age"]["label"])
    if "emotion" in face:
        parts.append(face["emotion"]["label"])
    return " ".join(parts)


def annotate(rgb, faces: list[dict[str, Any]], numbers: list[int] | None = None):
    """Boxes and short labels on the photo; `numbers` names the faces (a video's track ids), else 1, 2, ..."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    width = max(2, round(max(image.size) / 300))
    font = ImageFont.load_default(size=max(12, round(max(image.size) / 40)))
    for i, face in enumerate(faces):
        box = face["box"]
        number = numbers[i] if numbers else i + 1
        colour = BOX_COLOURS[(number - 1) % len(BOX_COLOURS)]
        draw.rectangle([box["xmin"], box["ymin"], box["xmax"], box["ymax"]], outline=colour, width=width)
        text = f"{number}: {short_label(face)}"
        left, top, right, bottom = draw.textbbox((box["xmin"], box["ymin"]), text, font=font)
        y = max(0, box["ymin"] - (bottom - top) - 2 * width)
        draw.rectangle([left, y, right + 2 * width, y + (bottom - top) + 2 * width], fill=colour)
        draw.text((box["xmin"] + width, y), text, fill="white", font=font)
    return image


# The Video tab: a clip is analysed at VIDEO_FPS frames a second, at most VIDEO_MAX_FRAMES of them, and refused past
# VIDEO_MAX_SECONDS (a demo's bounds; python -m softbio_hf.predict takes longer clips).
VIDEO_FPS, VIDEO_MAX_FRAMES, VIDEO_MAX_SECONDS = 4.0, 120, 60.0


def analyze_clip(pipe, path: str, name: str, detector: str = "auto", threshold: float | None = None):
    """A clip's tracks as HTML (an animated GIF of the analysed frames, each face labelled with its track's steady
    answer, and the per-track table) and as JSON. Nothing is written to disk: the GIF is inline."""
    import gradio as gr

    from softbio_hf.video import VideoInputError, read_frames

    limits = {"fps": VIDEO_FPS, "max_frames": VIDEO_MAX_FRAMES, "max_seconds": VIDEO_MAX_SECONDS}
    try:
        result = pipe.analyze_video(path, detector=detector, threshold=threshold or None, **limits)
        frames = [frame.rgb for frame in read_frames(path, **limits)]
    except (VideoInputError, ValueError) as error:
        logger.warning("rejected %s: %s", name, error)
        raise gr.Error(str(error).replace(path, name), print_exception=False) from None
    except Exception:
        logger.exception("analysis of %s failed", name)
        raise gr.Error(
            "The analysis failed on the server; it was logged. Try another clip.", print_exception=False
        ) from None
    tracks = {track["track_id"]: track for track in result["tracks"]}
    images = []
    for rgb, entry in zip(frames, result["frames"], strict=True):
        steady = [
            {**face, **{t: tracks[face["track_id"]][t] for t in TASK_TITLES if t in face}} for face in entry["faces"]
        ]
        image = annotate(rgb, steady, [face["track_id"] for face in steady])
        image.thumbnail((480, 480))
        images.append(image.convert("P", palette=1, colors=128))
    buffer = io.BytesIO()
    images[0].save(
        buffer, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / VIDEO_FPS), loop=0
    )
    gif = "data:image/gif;base64," + base64.b64encode(buffer.getvalue()).decode()
    return tracks_html(gif, result["tracks"]), result["tracks"]


def tracks_html(gif: str, tracks: list[dict[str, Any]]) -> str:
    parts = [f'<img class="sb-photo" alt="the clip with each person\'s box and steady label" src="{gif}">']
    if not tracks:
        parts.append('<p class="sb-none">No face found in the analysed frames.</p>')
    else:
        header = "".join(f"<th>{html.escape(title)} (agreement)</th>" for title in TASK_TITLES.values())
        rows = []
        for track in tracks:
            cells = "".join(
                f"<td>{html.escape(track[task]['label'])} {100 * track[task]['score']:.0f}% "
                f"({100 * track[task]['agreement']:.0f}%)</td>"
                for task in TASK_TITLES
                if task in track
            )
            rows.append(
                f'<tr class="sb-track"><td>Track {track["track_id"]}</td><td>{track["first_time_s"]:.2f}-'
                f"{track['last_time_s']:.2f} s</td><td>{track['frames']}</td>{cells}</tr>"
            )
        parts.append(
            f'<table class="sb-tracks"><tr><th>person</th><th>seen</th><th>frames</th>{header}</tr>{"".join(rows)}'
            "</table><p>Each person's answer is the mean of the probabilities over their frames; agreement is how "
            "often a single frame said the same.</p>"
        )
    return "".join(parts)


def image_data_url(image, max_side: int = 1024) -> str:
    """Inline JPEG: the annotated photo is never written to the server's disk."""
    image = image.copy()
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def bars_html(scores: dict[str, float]) -> str:
    rows = []
    for label, score in sorted(scores.items(), key=lambda item: item[1], reverse=True):
        rows.append(
            f'<div class="sb-row"><span class="sb-label">{html.escape(label)}</span>'
            f'<span class="sb-bar"><span style="width:{100 * score:.1f}%"></span></span>'
            f'<span class="sb-score">{100 * score:.1f}%</span></div>'
        )
    return "".join(rows)


def result_html(annotated, faces: list[dict[str, Any]]) -> str:
    parts = [f'<img class="sb-photo" alt="photo with face boxes" src="{image_data_url(annotated)}">']
    if not faces:
        parts.append(
            '<p class="sb-none">No face found. Try another detector, a lower threshold, or detector "none" '
            "if the photo is already a face crop.</p>"
        )
    for i, face in enumerate(faces):
        colour = BOX_COLOURS[i % len(BOX_COLOURS)]
        cards = []
        for task, title in TASK_TITLES.items():
            if task not in face:
                continue
            headline = face[task]["label"]
            if task == "age" and "years" in face[task]:
                headline += f" (about {face[task]['years']:.0f} years)"
            cards.append(
                f"<div class='sb-task'><h4>{title}: {html.escape(headline)}</h4>{bars_html(face[task]['scores'])}</div>"
            )
        parts.append(f'<div class="sb-face" style="border-color:{colour}"><h3>Face {i + 1}</h3>{"".join(cards)}</div>')
    return f'<div class="sb-result">{"".join(parts)}</div>'


CSS = """
.sb-photo {max-width: 100%; border-radius: 8px;}
.sb-face {border-left: 6px solid; padding: 4px 12px; margin: 12px 0;}
.sb-task h4 {margin: 6px 0 2px;}
.sb-row {display: flex; align-items: center; gap: 8px; font-size: 0.9em;}
.sb-label {width: 80px;}
.sb-bar {flex: 1; background: #eee; border-radius: 4px; height: 10px; overflow: hidden;}
.sb-bar span {display: block; height: 100%; background: #4363d8;}
.sb-score {width: 52px; text-align: right;}
"""


# ------------------------------------------------------------------------------------------------- page
def example_files() -> list[Path]:
    return sorted(EXAMPLES_DIR.glob("*.jpg"))


def requester_of(request) -> str:
    return requester_key(dict(request.cookies or {}), request.client.host if request.client else None)


def build_demo(pipe, model_name: str, owners: UploadOwners):
    import gradio as gr

    # Every event takes its inputs unprocessed (preprocess=False): the upload's own path, which gradio would
    # otherwise replace by a converted copy (an RGBA or grey photo) or shadow with an empty temporary file
    # (gr.File, one per call), and which read_upload checks is the requester's.
    def analyze_upload(payload, detector, threshold, request: gr.Request):
        data, name = read_upload(upload_path(payload), requester_of(request), owners)
        rgb, faces = analyze_bytes(pipe, data, name, detector, threshold)
        return result_html(annotate(rgb, faces), faces), faces

    def analyze_clip_upload(payload, detector, threshold, request: gr.Request):
        video = payload.get("video") if isinstance(payload, dict) and "video" in payload else payload
        _, name = read_upload(upload_path(video), requester_of(request), owners)  # the requester's own upload
        return analyze_clip(pipe, upload_path(video), name, detector, threshold)

    def analyze_frame(frame, detector, threshold, request: gr.Request):
        if not frame:
            return ""
        url = frame.get("url") if isinstance(frame, dict) else None
        if isinstance(url, str) and url.startswith("data:"):
            data, name = data_url_bytes(url), "webcam frame"
        else:
            data, name = read_upload(upload_path(frame), requester_of(request), owners)
        rgb, faces = analyze_bytes(pipe, data, name, detector, threshold)
        return result_html(annotate(rgb, faces), faces)

    def analyze_api(payload, detector="auto", threshold=0.0, request: gr.Request = None):
        """Every face in the image: box, age group (and years), gender and emotion, with probabilities."""
        data, name = read_upload(upload_path(payload), requester_of(request), owners)
        return analyze_bytes(pipe, data, name, detector or "auto", threshold)[1]

    with gr.Blocks(title="softbio: age, gender and emotion from one CLIP pass", delete_cache=CACHE_SWEEP) as demo:
        gr.Markdown(
            "# softbio\nAge group, gender and emotion of every face in a photo, from one forward pass of a CLIP "
            f"vision model.\n\n**Model in use:** `{model_name}`"
        )
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Tab("Photo"):
                    photo = gr.Image(label="Photo", type="filepath", sources=["upload", "clipboard"], elem_id="photo")
                    run = gr.Button("Analyze", variant="primary", elem_id="analyze")
                    examples = [str(path) for path in example_files()]
                    if examples:
                        gr.Examples(examples=examples, inputs=photo, label="Public-domain examples")
                with gr.Tab("Video"):
                    clip = gr.Video(label="Clip", sources=["upload"], elem_id="clip")
                    run_clip = gr.Button("Analyze clip", variant="primary", elem_id="analyze-clip")
                    gr.Markdown(
                        f"Up to {VIDEO_MAX_SECONDS:.0f} s and {MAX_UPLOAD}; {VIDEO_FPS:g} frames a second are "
                        f"analysed (at most {VIDEO_MAX_FRAMES}), and each person is followed from frame to frame."
                    )
                with gr.Tab("Webcam (live)"):
                    webcam = gr.Image(label="Webcam", sources=["webcam"], streaming=True, type="numpy")
                detector = gr.Dropdown(DETECTOR_CHOICES, value="auto", label="Face detector")
                threshold = gr.Slider(
                    0.0, 1.0, value=0.0, step=0.05, label="Detection threshold (0 = detector default)"
                )
            with gr.Column(scale=1):
                result = gr.HTML(label="Result", elem_id="sb-result")
                with gr.Accordion("JSON", open=False):
                    as_json = gr.JSON(label="Pipeline output")
        with gr.Accordion("How it works, limits and biases", open=False):
            gr.Markdown(ABOUT)

        run_clip.click(
            analyze_clip_upload,
            [clip, detector, threshold],
            [result, as_json],
            preprocess=False,
            api_visibility="private",
        )
        run.click(
            analyze_upload,
            [photo, detector, threshold],
            [result, as_json],
            preprocess=False,
            api_visibility="private",
        )
        webcam.stream(
            analyze_frame,
            [webcam, detector, threshold],
            [result],
            stream_every=0.5,
            time_limit=120,
            preprocess=False,
            api_visibility="private",
        )
        # The API endpoint: a file in, the pipeline's JSON out (gradio_client: api_name="/analyze").
        api_file = gr.File(visible=False, type="filepath", label="image")
        api_detector = gr.Textbox(visible=False, value="auto", label="detector")
        api_threshold = gr.Number(visible=False, value=0.0, label="threshold")
        api_out = gr.JSON(visible=False, label="faces")
        api_trigger = gr.Button(visible=False)
        api_trigger.click(
            analyze_api, [api_file, api_detector, api_threshold], api_out, preprocess=False, api_name=API_NAME
        )
    return demo


def space_model() -> str | None:
    """On a Space, the model it serves: the first entry of `models:` in the README's YAML header."""
    readme = Path(__file__).resolve().parent / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if not text.startswith("---\n"):
        return None
    import yaml

    header = yaml.safe_load(text.split("---\n", 2)[1]) or {}
    models = header.get("models") or []
    return str(models[0]) if models else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="softbio demo: age group, gender and emotion of every face in a photo.",
        epilog="Without --model the zero-shot model is built from "
        f"{DEFAULT_CLIP} once (needs the Hub) and cached under $SOFTBIO_CACHE (default ~/.cache/softbio).",
    )
    parser.add_argument(
        "--model",
        default=os.environ.get("SOFTBIO_MODEL") or space_model(),
        help="a softbio checkpoint, or a CLIP checkpoint (becomes the zero-shot model, built once and cached): a "
        "local folder or a Hub repo id (env SOFTBIO_MODEL; on a Space, the first of `models:` in its README "
        "header). Default: zero-shot openai/clip-vit-large-patch14-336.",
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), help="address to bind")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")), help="port")
    parser.add_argument("--concurrency", type=int, default=1, help="requests analysed at once (default 1)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get("SOFTBIO_COMPILE", "1") != "0",
        help="torch.compile the model at start-up, before serving (default on; env SOFTBIO_COMPILE=0 turns it "
        "off): each photo is then faster (6-18%% on a 2-core CPU in bench.speed's runs), for about 20 s more at "
        "every start with ViT-L/14@336",
    )
    parser.add_argument(
        "--backend",
        default=os.environ.get("SOFTBIO_BACKEND", "torch"),
        choices=("torch", "onnx", "openvino", "auto"),
        help="where the forward pass runs (env SOFTBIO_BACKEND): torch (default), the model's ONNX / OpenVINO "
        "export, made once with python -m softbio_hf.export --model DIR --out DIR, or auto (OpenVINO where its "
        "export is there, the fastest measured on CPUs; else torch, said once)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        model, name = load_model(args.model)
    except ModelUnavailable as error:
        print(f"softbio: {error}", file=sys.stderr)
        return 2
    from starlette.middleware import Middleware

    owners = UploadOwners(max_age_s=sum(CACHE_SWEEP), examples=example_files())  # gradio's sweep is gone by then
    try:
        pipe = build_pipeline(model, args.backend)
    except (ValueError, FileNotFoundError, ImportError) as error:  # no export, no runtime
        print(f"softbio: {error}", file=sys.stderr)
        return 2
    if args.compile and pipe.exported is None:  # an exported model is compiled by its runtime
        compile_for_serving(pipe)
    demo = build_demo(pipe, name, owners)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=64)
    try:
        # show_error=False: an unexpected exception's text (paths, library internals) never reaches a client
        demo.launch(
            server_name=args.host,
            server_port=args.port,
            max_file_size=MAX_UPLOAD,
            css=CSS,
            show_error=False,
            app_kwargs={"middleware": [Middleware(RecordUploads, owners=owners)]},
        )
    except OSError as error:  # gradio's own advice is to change launch(): here it is an option
        print(
            f"softbio: could not serve on {args.host}:{args.port} ({error}). Pass another port with --port, "
            "e.g. --port 7861.",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
