"""What one request may cost the server, and the door: options within bounds, a body read within a deadline,
and a queue place taken only once the body is in (admission, 429 with a Retry-After from the queue's depth)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

from .faces import DETECTORS

DEFAULT_MAX_BODY_MB = 20.0
DEFAULT_MAX_PIXELS = 40_000_000  # one image, decoded
DEFAULT_MAX_REQUEST_PIXELS = 80_000_000  # all the images of one request, decoded
DEFAULT_MAX_QUEUE = 16
DEFAULT_MAX_IMAGES = 16
DEFAULT_MAX_FACES = 16  # per image, when the request does not say
MAX_FACES_CAP = 64  # per image, whatever the request says
DEFAULT_MAX_DETECTION_SIDE = 2048
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_REQUEST_TIMEOUT_S = 60.0
DEFAULT_FETCH_TIMEOUT_S = 10.0
MAX_RETRY_AFTER_S = 120
TOKEN_VARIABLE = "SOFTBIO_API_TOKEN"


class Refused(Exception):
    """A request answered with a status and a reason (JSON {"error": reason})."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


class ClientGone(Exception):
    """The client closed its connection before its answer: nothing is left to send (logged as 499)."""


@dataclass
class Limits:
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 1024 * 1024)
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    max_queue: int = DEFAULT_MAX_QUEUE
    max_images: int = DEFAULT_MAX_IMAGES
    max_faces: int = DEFAULT_MAX_FACES
    max_faces_cap: int = MAX_FACES_CAP
    max_detection_side: int = DEFAULT_MAX_DETECTION_SIDE
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    allow_urls: bool = False
    token: str | None = None
    detectors: tuple[str, ...] = DETECTORS  # those that can run here (YuNet needs its file)


def option_bounds(limits: Limits) -> dict[str, tuple[type, Any, Any, str]]:
    """Each query option of /v1/analyze: (type, lowest, highest, what it is); the schema publishes the same."""
    return {
        "detector": (str, None, None, f"one of {list(limits.detectors)} (yunet needs its file: --yunet-path)"),
        "threshold": (float, 0.0, 1.0, "the detector's score a face needs"),
        "margin": (float, 0.0, 2.0, "context around a face, as a fraction of its size"),
        "max_faces": (int, 1, limits.max_faces_cap, f"faces per image, largest first (default {limits.max_faces})"),
        "min_face_size": (float, 1.0, 4096.0, "the smallest face, in pixels"),
        "detection_max_side": (int, 32, limits.max_detection_side, "the side detection runs at, in pixels"),
        "top_k": (int, 1, 100, "scores kept per task"),
    }


def read_options(query, limits: Limits) -> dict[str, Any]:
    """The query's options, each parsed and within its bounds; anything else is a 422 naming what it takes."""
    bounds = option_bounds(limits)
    unknown = sorted(set(query) - set(bounds))
    if unknown:
        raise Refused(422, f"unknown query parameter(s) {unknown}; the options are {sorted(bounds)}.")
    options: dict[str, Any] = {"max_faces": limits.max_faces}
    for name, text in query.items():
        kind, low, high, _ = bounds[name]
        if kind is str:
            if text not in limits.detectors:
                fix = " (YuNet's file is not here: start the server with --yunet-path FILE)" if text == "yunet" else ""
                raise Refused(422, f"{name}={text!r}: choose one of {list(limits.detectors)}{fix}.")
            options[name] = text
            continue
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or (kind is float and not math.isfinite(value)) or not low <= value <= high:
            what = "a whole number" if kind is int else "a number"
            raise Refused(422, f"{name}={text!r}: expected {what} from {low} to {high} ({bounds[name][3]}).")
        options[name] = value
    return options


async def read_body(receive_stream, declared: str | None, limit: int, timeout_s: float) -> bytes:
    """The whole body within `timeout_s` (a slow upload cannot hold a connection forever) and `limit` bytes."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"the body is {int(declared):,} bytes, over the {limit:,}-byte cap; send smaller images.")
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in receive_stream:
            size += len(chunk)
            if size > limit:
                raise Refused(413, f"the body is over the {limit:,}-byte cap; send smaller images.")
            chunks.append(chunk)

    from starlette.requests import ClientDisconnect

    try:
        await asyncio.wait_for(read(), timeout_s)
    except ClientDisconnect:
        raise ClientGone() from None
    except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
        raise Refused(
            408, f"the body did not arrive within {timeout_s:g}s (the server's --body-timeout); send it faster."
        ) from None
    return b"".join(chunks)


class Admission:
    """At most `max_queue` requests past their body at once; faces admitted and not yet answered, for Retry-After."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.active = 0
        self.pending_faces = 0

    def take(self, seconds_per_face: float) -> None:
        """Take a place, or a 429 saying when one is likely free. Called on the event loop: no await inside."""
        if self.active >= self.max_queue:
            wait = self.retry_after(seconds_per_face)
            raise Refused(
                429,
                f"the server is busy ({self.active} requests in progress); retry after {wait}s.",
                {"Retry-After": str(wait)},
            )
        self.active += 1

    def release(self) -> None:
        self.active -= 1

    def retry_after(self, seconds_per_face: float) -> int:
        """Seconds until the faces ahead are through the model at the measured rate (1 before any is measured)."""
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(self.pending_faces * seconds_per_face)))
