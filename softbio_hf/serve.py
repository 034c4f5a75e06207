"""An HTTP API for an exported softbio model, without torch or transformers (FastAPI on uvicorn).

    python -m softbio_hf.serve --model softbio-onnx [--backend onnx|openvino] [--host 127.0.0.1] [--port 8000]
    curl -F file=@photo.jpg http://127.0.0.1:8000/v1/analyze

POST /v1/analyze   one image as the raw body (Content-Type image/*), or several as multipart/form-data parts;
                   options as query parameters (detector, threshold, margin, max_faces, min_face_size, top_k,
                   detection_max_side), each bounded: {"backend", "model_digest", "max_faces", "truncated",
                   "results": [the pipeline's JSON per image]}
GET  /health/live  the process answers; /health/ready: the model is loaded, warmed and answers (503 if not)
GET  /metrics      Prometheus text: requests, latency, queue depth, faces per forward pass and per image
GET  /v1/model     tasks, labels, versions, backend, model digest
GET  /docs         OpenAPI docs (/openapi.json)

Faces from requests that arrive together share a forward pass (--max-batch, --max-wait-ms). A request takes a
queue place only once its body is in (--body-timeout); 429 with Retry-After when --max-queue are in progress.
Errors are JSON {"error": reason}: 401 (a wrong or missing token when SOFTBIO_API_TOKEN is set), 403, 404, 405,
408, 413 (a body, an image count, an image or a request's pixels over the caps), 415, 422, 429, 503, 504.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

from .serve_batching import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT_MS
from .serve_limits import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_FETCH_TIMEOUT_S,
    DEFAULT_MAX_BODY_MB,
    DEFAULT_MAX_DETECTION_SIDE,
    DEFAULT_MAX_FACES,
    DEFAULT_MAX_IMAGES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_REQUEST_PIXELS,
    DEFAULT_REQUEST_TIMEOUT_S,
    MAX_FACES_CAP,
    TOKEN_VARIABLE,
    Limits,
)

ARGS_VARIABLE = "SOFTBIO_SERVE_ARGS"  # how --workers hands the command line to each worker process
DEFAULT_CONNECTIONS = 128
DEFAULT_DRAIN_S = 20


def positive(kind: type):
    """An argparse type: a finite number > 0 of `kind`, else a clear error (never a traceback)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{text!r}: use a finite number > 0")
        return value

    return parse


def port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: a port is a whole number from 0 to 65535")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m softbio_hf.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from .version import add_version_argument  # stdlib only: --version needs no torch

    add_version_argument(parser)
    add = parser.add_argument
    add("--model", required=True, help="an export folder (python -m softbio_hf.export) or a Hub id")
    add("--backend", choices=("onnx", "openvino"), default="onnx")
    add("--host", default="127.0.0.1", help="0.0.0.0 to answer other machines")
    add("--port", type=port, default=8000)
    add("--max-body-mb", type=positive(float), default=DEFAULT_MAX_BODY_MB, help="413 above this")
    add("--max-pixels", type=positive(int), default=DEFAULT_MAX_PIXELS, help="413 for an image above this")
    add("--max-request-pixels", type=positive(int), default=DEFAULT_MAX_REQUEST_PIXELS, help="all a request's images")
    add("--max-images", type=positive(int), default=DEFAULT_MAX_IMAGES, help="images a request may hold (413 above)")
    add("--max-faces", type=positive(int), default=DEFAULT_MAX_FACES, help="faces per image unless ?max_faces says")
    add("--max-faces-cap", type=positive(int), default=MAX_FACES_CAP, help="the most ?max_faces may ask for")
    add("--max-detection-side", type=positive(int), default=DEFAULT_MAX_DETECTION_SIDE, help="?detection_max_side cap")
    add("--max-queue", type=positive(int), default=DEFAULT_MAX_QUEUE, help="requests in progress; 429 above")
    add("--max-batch", type=positive(int), default=DEFAULT_MAX_BATCH, help="faces per forward pass, across requests")
    add("--max-wait-ms", type=float, default=DEFAULT_MAX_WAIT_MS, help="how long a batch waits for more faces")
    add("--header-timeout", type=positive(float), default=10.0, help="seconds a request's headers may take")
    add("--body-timeout", type=positive(float), default=DEFAULT_BODY_TIMEOUT_S, help="seconds a body may take (408)")
    add("--request-timeout", type=positive(float), default=DEFAULT_REQUEST_TIMEOUT_S, help="seconds to answer (504)")
    add("--fetch-timeout", type=positive(float), default=DEFAULT_FETCH_TIMEOUT_S, help="seconds a URL fetch may take")
    add("--limit-concurrency", type=positive(int), default=DEFAULT_CONNECTIONS, help="open connections (503 above)")
    add("--drain-timeout", type=positive(int), default=DEFAULT_DRAIN_S, help="seconds SIGTERM waits for requests")
    add("--allow-urls", action="store_true", help='fetch {"urls": [...]} bodies (an SSRF risk)')
    add("--threads", type=positive(int), default=None, help="the runtime's threads (default: the CPUs this may use)")
    add("--prepare-threads", type=positive(int), default=2, help="threads that decode images and find faces")
    add("--workers", type=positive(int), default=1, help="processes, each with its own model (memory x N)")
    add("--cors-origin", action="append", default=[], help="an origin browsers may call from (repeat; default none)")
    add("--yunet-path", default=None, help="a local YuNet .onnx (else the Hub cache, else Haar)")
    return parser


def limits_of(args: argparse.Namespace) -> Limits:
    return Limits(
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        max_request_pixels=args.max_request_pixels,
        max_queue=args.max_queue,
        max_images=args.max_images,
        max_faces=min(args.max_faces, args.max_faces_cap),
        max_faces_cap=args.max_faces_cap,
        max_detection_side=max(32, args.max_detection_side),
        body_timeout_s=args.body_timeout,
        request_timeout_s=args.request_timeout,
        fetch_timeout_s=args.fetch_timeout,
        allow_urls=args.allow_urls,
        token=os.environ.get(TOKEN_VARIABLE) or None,
    )


def app_of(args: argparse.Namespace):
    """The served app for parsed arguments (loads, checks and warms the model)."""
    from .runtime_light import ExportedPipeline
    from .serve_app import build_app

    analyzer = ExportedPipeline(args.model, args.backend, yunet_path=args.yunet_path, threads=args.threads)
    return build_app(
        analyzer,
        limits_of(args),
        max_batch=args.max_batch,
        max_wait_ms=max(0.0, args.max_wait_ms),
        prepare_threads=args.prepare_threads,
        cors_origins=tuple(args.cors_origin),
    )


def app_from_environment():
    """uvicorn's factory in each --workers process: the command line travels in SOFTBIO_SERVE_ARGS."""
    from .serve_http import HeaderDeadline

    args = build_parser().parse_args(json.loads(os.environ[ARGS_VARIABLE]))
    HeaderDeadline.timeout_s = args.header_timeout
    log_access()
    return app_of(args)


def log_access() -> None:
    """One JSON line per request on stderr (logger softbio.access)."""
    logger = logging.getLogger("softbio.access")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    import uvicorn

    from .serve_http import HeaderDeadline, run_draining

    HeaderDeadline.timeout_s = args.header_timeout
    served = dict(
        http=HeaderDeadline,
        host=args.host,
        port=args.port,
        log_level="warning",
        limit_concurrency=args.limit_concurrency,
        timeout_graceful_shutdown=args.drain_timeout,
    )
    print(f"softbio serving {args.model} ({args.backend}) at http://{args.host}:{args.port}", file=sys.stderr)
    if args.workers > 1:  # each worker loads its own model; uvicorn's supervisor shares the socket
        os.environ[ARGS_VARIABLE] = json.dumps(argv)
        uvicorn.run("softbio_hf.serve:app_from_environment", factory=True, workers=args.workers, **served)
        return 0
    log_access()
    try:
        app = app_of(args)
    except (ValueError, FileNotFoundError, ImportError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run_draining(app, served)
    return 0


if __name__ == "__main__":
    sys.exit(main())
