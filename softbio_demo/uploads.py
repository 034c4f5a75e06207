"""Upload ownership: a cookie per browser or client, the uploads each one made, and the paths a call may name.

Gradio names an upload by a hash of its content and reads any upload whose path a caller names; the demo analyses
only the caller's own uploads (and the public examples). The ASGI middleware here records who uploaded what and
refuses a malformed API call with its reason, before gradio sees it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path

logger = logging.getLogger("softbio.app")
MAX_UPLOAD = "10mb"
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# Gradio's upload cache: every minute, uploads older than two minutes are deleted (no photo is kept longer).
# SOFTBIO_CACHE_SWEEP="EVERY,AGE" in seconds changes it (the tests use a few seconds).
CACHE_SWEEP = tuple(int(v) for v in os.environ.get("SOFTBIO_CACHE_SWEEP", "60,120").split(","))


def read_upload(path: str | None, requester: str, owners: UploadOwners) -> tuple[bytes, str]:
    """
    The upload's bytes, read into memory, if `requester` uploaded it (or it is a public example). Nothing is
    deleted here: gradio keeps uploads under a hash of their content, so the same photo sent twice, or by two
    people at once, is one file, and deleting it would break the other request. Gradio's cache is emptied of old
    uploads instead (delete_cache in build_demo).
    """
    import gradio as gr

    if not path:
        raise gr.Error("No image: upload a photo (JPEG, PNG or WebP) first.", print_exception=False)
    refusal = path_refusal(path)
    if refusal:
        logger.warning("refused a malformed path (%d characters)", len(path))
        raise gr.Error(refusal, print_exception=False)
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
    ownership = owners.ownership(requester, file, data)
    if ownership == EXPIRED:  # theirs, but it waited longer than its record lives (a busy queue, say)
        logger.warning("refused %s: its upload record expired (kept %.0f s)", file.name, owners.max_age_s)
        message = (
            f"Your upload expired before its turn came (uploads are kept about {owners.max_age_s:.0f} s, and the demo "
            "is busy): upload the photo again."
        )
        raise gr.Error(message, print_exception=False)
    if ownership != OWNED:
        logger.warning(
            "refused %s: uploaded by another requester (this one known by %s)", file.name, requester.split(":")[0]
        )
        raise gr.Error("That file is not an upload of yours: upload the photo itself.", print_exception=False)
    return data, repr(file.name)


UPLOADER_COOKIE = "softbio_uploader"
API_NAME = "analyze"  # gradio_client: api_name="/analyze"
MAX_UPLOADS_PER_REQUESTER = 1000  # the records stay small whatever a client sends
OWNED, EXPIRED, NOT_OWNED = "owned", "expired", "not owned"


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
            # Expired records stay (within the bounds below): a request that waited past its upload's expiry is
            # told so, not that the file is someone else's.
            uploads = self._uploads.pop(requester, {})
            for path in paths:
                name = str(Path(path).resolve())
                uploads.pop(name, None)  # again: now the most recent
                uploads[name] = now + self.max_age_s
            while len(uploads) > MAX_UPLOADS_PER_REQUESTER:  # oldest first: dicts keep insertion order
                del uploads[next(iter(uploads))]
            self._uploads[requester] = uploads  # most recent last: the oldest requester is dropped first
            while len(self._uploads) > self.max_requesters:
                self._uploads.popitem(last=False)

    def ownership(self, requester: str, path: Path, data: bytes) -> str:
        """OWNED (the requester's live upload, or a public example), EXPIRED (the requester's, recorded longer
        ago than max_age_s) or NOT_OWNED."""
        with self._lock:
            expiry = self._uploads.get(requester, {}).get(str(path.resolve()))
        if (expiry is not None and expiry >= time.monotonic()) or hashlib.sha256(
            data
        ).hexdigest() in self.example_digests:
            return OWNED
        return NOT_OWNED if expiry is None else EXPIRED

    def owns(self, requester: str, path: Path, data: bytes) -> bool:
        return self.ownership(requester, path, data) == OWNED


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
    return path_refusal(path) or (NOT_AN_UPLOAD if outside_uploads(Path(path)) else None)


NOT_AN_UPLOAD = "That file is not an upload of this demo: upload the photo itself."
MAX_PATH_CHARS = 1024  # gradio's upload paths are short (its folder, a content hash, the file's name)


def path_refusal(path: str) -> str | None:
    """Why a path cannot name an upload before the file system is asked (it would raise on these), or None."""
    if "\x00" in path:
        return "The file's path holds a NUL byte, which no upload's path has: upload the photo itself."
    if len(path) > MAX_PATH_CHARS:
        return (
            f"The file's path is {len(path)} characters long, over the {MAX_PATH_CHARS} an upload's path can be: "
            "upload the photo itself."
        )
    return None


def outside_uploads(file: Path) -> bool:
    """A path that gradio's upload route did not write (a link, or anywhere else on the server)."""
    from gradio.utils import get_upload_folder

    try:
        return file.is_symlink() or not file.resolve().is_relative_to(Path(get_upload_folder()).resolve())
    except (OSError, ValueError):  # a name the file system refuses (too long a part, say): gradio wrote no such file
        return True


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
