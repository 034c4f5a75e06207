"""What the server tells its operators: Prometheus metrics (GET /metrics), an X-Request-ID on every answer and one
JSON access-log line per request (logger "softbio.access", on stderr)."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

ROUTES = ("/v1/analyze", "/v1/model", "/health", "/health/live", "/health/ready", "/metrics", "/openapi.json", "/docs")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a caller's id is kept only if it is this tame (log-safe)
access_log = logging.getLogger("softbio.access")


class Metrics:
    """The server's counters on a registry of its own (two apps in one process do not mix)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "softbio_requests", "Requests answered, by route and status", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "softbio_request_seconds",
            "Seconds from the request's first byte to its answer, by route",
            ["route"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "softbio_queue_depth", "Requests admitted and not yet answered", registry=self.registry
        )
        self.batch_size = Histogram(
            "softbio_batch_faces",
            "Faces per forward pass (batches gathered across requests)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.forward_passes = Counter("softbio_forward_passes", "Forward passes run", registry=self.registry)
        self.faces = Histogram(
            "softbio_faces_per_image",
            "Faces found per image",
            buckets=(0, 1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )

    def on_batch(self, faces: int, _seconds: float) -> None:
        self.forward_passes.inc()
        self.batch_size.observe(faces)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def route_of(path: str) -> str:
    """The route label: a known path, else "other" (a scanner's paths must not grow the metrics without end)."""
    return path if path in ROUTES else "other"


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's X-Request-ID when it is a tame token, else a fresh one."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            text = value.decode("latin-1")
            if REQUEST_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex


class Operations:
    """ASGI middleware: the request id in (scope["state"]) and out (header), the access-log line and the metrics."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        rid = request_id(scope.get("headers", []))
        scope.setdefault("state", {})["request_id"] = rid
        answer: dict[str, Any] = {"status": 500, "bytes": 0}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            elif message["type"] == "http.response.body":
                answer["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.monotonic() - started
            route = route_of(scope.get("path", ""))
            self.metrics.requests.labels(route, str(answer["status"])).inc()
            self.metrics.latency.labels(route).observe(seconds)
            client = scope.get("client") or ("", 0)
            line = {
                "request_id": rid,
                "method": scope.get("method"),
                "path": scope.get("path"),
                "status": answer["status"],
                "seconds": round(seconds, 4),
                "bytes": answer["bytes"],
                "client": client[0],
            }
            access_log.info(json.dumps(line))
