"""An HTTP API for an exported softbio model, without torch or transformers (FastAPI on uvicorn).

    python -m softbio_hf.serve --model softbio-onnx [--backend onnx|openvino] [--host 127.0.0.1] [--port 8000]
    curl -F file=@photo.jpg http://127.0.0.1:8000/v1/analyze

POST /v1/analyze   one image as the raw body (Content-Type image/*), or several as multipart/form-data parts;
                   options as query parameters (detector, threshold, margin, max_faces, min_face_size, top_k,
                   batch_size, detection_max_side): {"backend", "results": [the pipeline's JSON per image]}
GET  /health       {"status": "ok"}
GET  /v1/model     tasks, labels, versions, backend
GET  /docs         OpenAPI docs (/openapi.json)

Errors are JSON {"error": reason} with a 4xx status: 401 (a wrong or missing token when SOFTBIO_API_TOKEN is set),
413 (a body or an image over the caps), 415 (not an image type), 422 (an image that does not decode, a wrong
option), 429 with Retry-After (the queue is full). One model per process, one forward pass at a time; run more
processes behind a proxy for more cores.
"""

import argparse
import asyncio
import hmac
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_BODY_MB = 20.0
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_QUEUE = 16
DEFAULT_MAX_IMAGES = 16
RETRY_AFTER_S = 1
TOKEN_VARIABLE = "SOFTBIO_API_TOKEN"
# Query parameters /v1/analyze takes, and how each is read.
OPTION_TYPES = {
    "detector": str,
    "threshold": float,
    "margin": float,
    "max_faces": int,
    "min_face_size": float,
    "detection_max_side": int,
    "top_k": int,
    "batch_size": int,
}
RAW_TYPES = ("image/", "application/octet-stream")


class Refused(Exception):
    """A request answered with a 4xx status and a reason."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


@dataclass
class Limits:
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 1024 * 1024)
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_queue: int = DEFAULT_MAX_QUEUE
    max_images: int = DEFAULT_MAX_IMAGES
    allow_urls: bool = False
    token: str | None = None


def build_app(analyzer, limits: Limits):
    """The ASGI app serving `analyzer` (a runtime_light.ExportedPipeline) within `limits`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI(title="softbio", version=package_version(), summary="Age group, gender and emotion of every face")
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="softbio-model")  # one forward pass at a time
    queue = {"active": 0}

    @app.exception_handler(Refused)
    async def refused(_request, error: Refused):
        return JSONResponse({"error": error.reason}, status_code=error.status, headers=error.headers)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model(request: Request) -> dict[str, Any]:
        check_token(request, limits.token)
        return {**analyzer.describe(), "softbio": package_version()}

    @app.post("/v1/analyze", openapi_extra=ANALYZE_BODY)
    async def analyze(request: Request) -> dict[str, Any]:
        check_token(request, limits.token)
        if queue["active"] >= limits.max_queue:  # checked and taken with no await between: atomic in the loop
            raise Refused(
                429,
                f"the server is busy ({limits.max_queue} requests in progress); retry after {RETRY_AFTER_S}s.",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        queue["active"] += 1
        try:
            options = read_options(request.query_params)
            images = await read_images(request, limits)
            work = lambda: analyzer(images, max_pixels=limits.max_pixels, **options)  # noqa: E731
            results = await asyncio.get_running_loop().run_in_executor(worker, answer_or_refuse, work)
        finally:
            queue["active"] -= 1
        return {"backend": analyzer.backend, "results": results}

    return app


def check_token(request, token: str | None) -> None:
    if token is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise Refused(
            401, "a valid bearer token is needed: Authorization: Bearer <token>", {"WWW-Authenticate": "Bearer"}
        )


def read_options(query) -> dict[str, Any]:
    unknown = sorted(set(query) - set(OPTION_TYPES))
    if unknown:
        raise Refused(422, f"unknown query parameter(s) {unknown}; the options are {sorted(OPTION_TYPES)}.")
    options = {}
    for name, value in query.items():
        try:
            options[name] = OPTION_TYPES[name](value)
        except ValueError:
            kind = {int: "a whole number", float: "a number"}[OPTION_TYPES[name]]
            raise Refused(422, f"{name}={value!r}: expected {kind}.") from None
    return options


async def read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"the body is {int(declared):,} bytes, over the {limit:,}-byte cap; send smaller images.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"the body is over the {limit:,}-byte cap; send smaller images.")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_images(request, limits: Limits) -> list[Any]:
    """The request's images: bytes of each multipart file part or the raw body; URLs only with --allow-urls."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not kind.startswith(("multipart/form-data", "application/json", *RAW_TYPES)):
        raise Refused(
            415,
            f"Content-Type {kind or '(none)'} is not an image: send image/jpeg, image/png, ... as the body, or "
            "multipart/form-data with one file part per image.",
        )
    body = await read_body(request, limits.max_body_bytes)
    if kind.startswith(RAW_TYPES):
        images: list[Any] = [body] if body else []
    elif kind == "application/json":
        images = urls_of(body, limits.allow_urls)
    else:
        images = await multipart_files(request, body, limits.max_images)
    if not images:
        raise Refused(422, "no image in the request: send one as the body, or as multipart file parts.")
    if len(images) > limits.max_images:
        raise Refused(413, f"{len(images)} images, over the {limits.max_images} a request may hold.")
    return images


def urls_of(body: bytes, allow_urls: bool) -> list[str]:
    import json

    if not allow_urls:  # a server that fetches what it is told can be aimed at the network behind it (SSRF)
        raise Refused(403, "this server does not fetch URLs (start it with --allow-urls); send the image itself.")
    try:
        urls = json.loads(body)["urls"]
    except (ValueError, KeyError, TypeError):
        raise Refused(422, 'a JSON body must be {"urls": ["https://...", ...]}.') from None
    if not isinstance(urls, list) or not all(
        isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls
    ):
        raise Refused(422, '"urls" must be a list of http(s) URLs.')
    return urls


async def multipart_files(request, body: bytes, max_images: int) -> list[bytes]:
    from starlette.requests import Request

    async def replay():  # the body was read under the size cap; the form parser reads it from here
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_images, max_fields=max_images)
    except Exception as error:  # starlette's MultiPartException and the parser's errors
        raise Refused(422, f"the multipart body could not be read ({error}).") from None
    files = [value for _, value in form.multi_items() if hasattr(value, "read")]
    return [await part.read() for part in files]


def answer_or_refuse(work):
    """Run the model; bad images and options become 413/422 with the runtime's own message."""
    from .images import ImageInputError, ImageTooLarge

    try:
        return work()
    except ImageTooLarge as error:
        raise Refused(413, f"{error} (the server's cap: --max-pixels)") from None
    except ImageInputError as error:
        raise Refused(422, str(error)) from None
    except (ValueError, TypeError) as error:  # an option out of range, an unknown detector
        raise Refused(422, str(error)) from None


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("softbio")
    except PackageNotFoundError:
        return "source"


ANALYZE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {
                "schema": {"type": "object", "properties": {"urls": {"type": "array", "items": {"type": "string"}}}}
            },
        },
    },
    "parameters": [
        {"name": name, "in": "query", "required": False, "schema": {"type": kind.__name__.replace("str", "string")}}
        for name, kind in OPTION_TYPES.items()
    ],
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m softbio_hf.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from .version import add_version_argument  # stdlib only: --version needs no torch

    add_version_argument(parser)
    parser.add_argument("--model", required=True, help="an export folder (python -m softbio_hf.export) or a Hub id")
    parser.add_argument("--backend", choices=("onnx", "openvino"), default="onnx")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to answer other machines")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB, help="413 above this")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="413 for an image above this")
    parser.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES, help="images a request may hold")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, help="requests in progress; 429 above")
    parser.add_argument("--allow-urls", action="store_true", help='fetch {"urls": [...]} bodies (an SSRF risk)')
    parser.add_argument("--threads", type=int, default=None, help="the runtime's threads (default: all cores)")
    parser.add_argument("--yunet-path", default=None, help="a local YuNet .onnx (else the Hub cache, else Haar)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("max_body_mb", "max_pixels", "max_images", "max_queue"):
        if getattr(args, name) <= 0:
            print(f"error: --{name.replace('_', '-')} must be positive.", file=sys.stderr)
            return 2
    from .runtime_light import ExportedPipeline

    try:
        analyzer = ExportedPipeline(args.model, args.backend, yunet_path=args.yunet_path, threads=args.threads)
    except (ValueError, FileNotFoundError, ImportError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    limits = Limits(
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        max_queue=args.max_queue,
        max_images=args.max_images,
        allow_urls=args.allow_urls,
        token=os.environ.get(TOKEN_VARIABLE) or None,
    )
    import uvicorn

    print(f"softbio serving {args.model} ({args.backend}) at http://{args.host}:{args.port}", file=sys.stderr)
    uvicorn.run(build_app(analyzer, limits), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
