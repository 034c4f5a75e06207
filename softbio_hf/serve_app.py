"""The HTTP routes of the torch-free server (FastAPI): a request's images are read, decoded and their faces found
in a pool of preparing threads; their crops join other requests' in the batching scheduler's forward passes."""

import asyncio
import contextlib
import ctypes
import hmac
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .serve_batching import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT_MS, BatchScheduler, DeadlineExceeded
from .serve_limits import Admission, ClientGone, Limits, Refused, read_body, read_options
from .serve_metrics import Metrics, Operations
from .serve_schema import openapi

RAW_TYPES = ("image/", "application/octet-stream")
LARGE_REQUEST_PIXELS = 8_000_000  # after a request this large, freed memory is handed back to the system


def build_app(
    analyzer,
    limits: Limits,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    prepare_threads: int = 2,
    cors_origins: tuple[str, ...] = (),
):
    """The ASGI app serving `analyzer` (a runtime_light.ExportedPipeline) within `limits`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    version = package_version()
    limits.detectors = available_detectors(analyzer.yunet_path)
    app = FastAPI(title="softbio", version=version, docs_url="/docs", redoc_url=None)
    app.openapi = lambda: openapi(limits, version)  # type: ignore[method-assign]
    metrics = Metrics()
    scheduler = BatchScheduler(analyzer.probabilities, max_batch, max_wait_ms / 1000, metrics.on_batch)
    admission = Admission(limits.max_queue)
    prepare_pool = ThreadPoolExecutor(prepare_threads, thread_name_prefix="softbio-prepare")
    fetch_pool = ThreadPoolExecutor(4, thread_name_prefix="softbio-fetch")  # URLs never wait on the model's thread
    digest = analyzer.model.digest
    app.state.scheduler, app.state.admission, app.state.ready = scheduler, admission, False

    @app.exception_handler(Refused)
    async def refused(_request, error: Refused):
        return JSONResponse({"error": error.reason}, status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request, error: HTTPException):  # 404 and 405 answer {"error"} too
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, error: RequestValidationError):
        return JSONResponse({"error": f"the request is not valid: {error.errors()[:3]}"}, status_code=422)

    @app.exception_handler(ClientGone)
    async def gone(_request, _error: ClientGone):  # nobody reads it; the access log and metrics say 499
        return JSONResponse({"error": "the client closed the connection"}, status_code=499)

    @app.exception_handler(Exception)
    async def unexpected(request, error: Exception):
        rid = request.scope.get("state", {}).get("request_id", "")
        return JSONResponse({"error": f"the server failed ({type(error).__name__}); request id {rid}"}, 500)

    @app.get("/health")
    @app.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready():
        reason = not_ready_reason(app, analyzer, scheduler)
        if reason:
            return JSONResponse({"error": reason}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text():
        metrics.queue_depth.set(admission.active)
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/model")
    async def model(request: Request) -> dict[str, Any]:
        check_token(request, limits.token)
        return {**analyzer.describe(), "model_digest": digest, "softbio": version}

    @app.post("/v1/analyze")
    async def analyze(request: Request):
        check_token(request, limits.token)
        options = read_options(request.query_params, limits)
        images = await read_images(request, limits)
        admission.take(scheduler.seconds_per_face)  # only now, with the body in: a slow upload holds no place
        metrics.queue_depth.set(admission.active)
        try:
            work = answer(images, options, time.monotonic() + limits.request_timeout_s)
            results, truncated = await until_answered_or_gone(request, work, limits.request_timeout_s)
        finally:
            admission.release()
            metrics.queue_depth.set(admission.active)
        body = {
            "backend": analyzer.backend,
            "model_digest": digest,
            "max_faces": options["max_faces"],
            "truncated": truncated,
            "results": results,
        }
        return JSONResponse(body, headers={"X-Model-Digest": digest})

    async def answer(images: list, options: dict[str, Any], deadline: float) -> tuple[list, list[bool]]:
        loop = asyncio.get_running_loop()
        if any(isinstance(image, str) for image in images):
            images = await asyncio.gather(*(loop.run_in_executor(fetch_pool, fetched, i, limits) for i in images))
        pixels = request_pixels(images, limits)
        checked = analyzer.checked({**options, "max_faces": options["max_faces"] + 1, "max_pixels": limits.max_pixels})
        found = await asyncio.gather(
            *(loop.run_in_executor(prepare_pool, faces_of, analyzer, image, checked) for image in images)
        )
        keep = options["max_faces"]
        truncated = [len(faces) > keep for faces, _ in found]
        found = [(faces[:keep], crops[:keep] if crops is not None else None) for faces, crops in found]
        for faces, _ in found:
            metrics.faces.observe(len(faces))
        crops = [crops for _, crops in found if crops is not None]
        probs: dict[str, np.ndarray] = {}
        if crops:
            batch = np.concatenate(crops)
            admission.pending_faces += len(batch)
            try:
                probs = await asyncio.wrap_future(scheduler.submit(batch, deadline))
            except DeadlineExceeded:
                raise Refused(504, deadline_message(limits)) from None
            finally:
                admission.pending_faces -= len(batch)
        results, start = [], 0
        for faces, _ in found:
            rows = {task: values[start : start + len(faces)] for task, values in probs.items()}
            results.append(analyzer.records(faces, rows, options.get("top_k")) if faces else [])
            start += len(faces)
        if pixels > LARGE_REQUEST_PIXELS:
            await loop.run_in_executor(prepare_pool, give_memory_back)
        return results, truncated

    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "X-Model-Digest", "Retry-After"],
        )
    warm_up(analyzer, scheduler)
    app.state.ready = True
    return Operations(app, metrics)


def available_detectors(yunet_path: str | None) -> tuple[str, ...]:
    """The detectors this server can run: YuNet only with its file (given, cached or downloadable once)."""
    from .faces import DETECTORS, yunet_model_path

    return tuple(name for name in DETECTORS if name != "yunet" or yunet_model_path(yunet_path) is not None)


def not_ready_reason(app, analyzer, scheduler: BatchScheduler) -> str | None:
    from .runtimes import MANIFEST

    if not app.state.ready:
        return "the model is still loading and warming up"
    if not (analyzer.model.folder / MANIFEST).is_file():
        return f"the export folder {analyzer.model.folder} is gone; the served model cannot be restarted from it"
    if scheduler.failed:
        return f"the model's last forward pass failed ({scheduler.failed})"
    return None


def warm_up(analyzer, scheduler: BatchScheduler) -> None:
    """One forward pass before the server says it is ready (the runtimes allocate on their first call)."""
    size = int(analyzer.manifest["image_size"])
    scheduler.submit(np.zeros((1, 3, size, size), np.uint8), time.monotonic() + 600).result(timeout=600)


async def until_answered_or_gone(request, work, timeout_s: float):
    """`work`'s answer, or 504 at the request's deadline, or ClientGone when the client closed the connection;
    either way the request's place in the scheduler is cancelled, so it costs no forward pass that is to come."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task in done:
        return task.result()
    task.cancel()
    if gone in done:
        raise ClientGone()
    raise Refused(504, f"the request was not answered within {timeout_s:g}s (--request-timeout); it was dropped.")


async def disconnected(request) -> None:
    """Returns once the client has closed its connection (the body is already read: only that can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def deadline_message(limits: Limits) -> str:
    return f"the request was not answered within {limits.request_timeout_s:g}s (--request-timeout); it was dropped."


def faces_of(analyzer, image, options: dict[str, Any]):
    """An image's faces and crops (a preparing thread), its errors as the statuses they deserve."""
    from .images import ImageInputError, ImageTooLarge

    try:
        return analyzer.crops_of(image, options)
    except ImageTooLarge as error:
        raise Refused(413, f"{error} (the server's cap: --max-pixels)") from None
    except ImageInputError as error:
        raise Refused(422, str(error)) from None
    except FileNotFoundError as error:  # YuNet's file, offline
        raise Refused(422, f"{error} (start the server with --yunet-path, or ask for ?detector=haar)") from None
    except (ValueError, TypeError, OverflowError) as error:
        raise Refused(422, str(error)) from None


def fetched(url: Any, limits: Limits) -> Any:
    """A URL's bytes (a fetching thread, never the model's), within --fetch-timeout from its first byte."""
    from .images import ImageInputError, fetch_url

    if not isinstance(url, str):
        return url
    try:
        return fetch_url(url, limits.fetch_timeout_s, repr(url), max_bytes=limits.max_body_bytes)
    except ImageInputError as error:
        raise Refused(422, str(error)) from None
    except OSError as error:
        raise Refused(422, f"could not fetch {url!r}: {getattr(error, 'reason', error)}") from None


def request_pixels(images: list[bytes], limits: Limits) -> int:
    """The request's decoded pixels, from the image headers alone; 413 above --max-request-pixels."""
    import io

    from PIL import Image

    total = 0
    for image in images:
        try:
            with Image.open(io.BytesIO(image)) as opened:
                total += opened.width * opened.height
        except Exception:  # not an image: the preparing thread names it with the decoder's own words
            continue
    if total > limits.max_request_pixels:
        raise Refused(
            413,
            f"the request's images hold {total:,} pixels, over the {limits.max_request_pixels:,} a request may "
            "(--max-request-pixels); send fewer or smaller images.",
        )
    return total


def give_memory_back() -> None:
    """Hand the heap's free pages back to the system (glibc keeps them otherwise): a large request's peak stays
    a peak, not the server's new size."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def check_token(request, token: str | None) -> None:
    if token is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise Refused(
            401, "a valid bearer token is needed: Authorization: Bearer <token>", {"WWW-Authenticate": "Bearer"}
        )


async def read_images(request, limits: Limits) -> list[Any]:
    """The request's images: bytes of each multipart file part or the raw body; URLs only with --allow-urls."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not kind.startswith(("multipart/form-data", "application/json", *RAW_TYPES)):
        raise Refused(
            415,
            f"Content-Type {kind or '(none)'} is not an image: send image/jpeg, image/png, ... as the body, or "
            "multipart/form-data with one file part per image.",
        )
    declared = request.headers.get("content-length")
    body = await read_body(request.stream(), declared, limits.max_body_bytes, limits.body_timeout_s)
    if kind.startswith(RAW_TYPES):
        images: list[Any] = [body] if body else []
    elif kind == "application/json":
        images = urls_of(body, limits.allow_urls)
    else:
        images = multipart_files(request.headers.get("content-type", ""), body, limits.max_images)
    if not images:
        raise Refused(422, "no image in the request: send one as the body, or as multipart file parts.")
    if len(images) > limits.max_images:
        raise Refused(413, f"{len(images)} images, over the {limits.max_images} a request may hold (--max-images).")
    return images


def urls_of(body: bytes, allow_urls: bool) -> list[str]:
    if not allow_urls:  # a server that fetches what it is told can be aimed at the network behind it (SSRF)
        raise Refused(403, "this server does not fetch URLs (start it with --allow-urls); send the image itself.")
    try:
        urls = json.loads(body)["urls"]
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: JSON nested thousands deep
        raise Refused(422, 'a JSON body must be {"urls": ["https://...", ...]}.') from None
    if not isinstance(urls, list) or not all(
        isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls
    ):
        raise Refused(422, '"urls" must be a list of http(s) URLs.')
    return urls


def multipart_files(content_type: str, body: bytes, max_images: int) -> list[bytes]:
    """The raw bytes of each `file` part (or any part with a filename) of a multipart body read under the size cap;
    a part under another name is refused rather than ignored."""
    from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise Refused(422, "a multipart/form-data body needs a boundary in its Content-Type.")
    parts: list[dict[str, Any]] = []
    header: dict[str, bytes] = {}

    def on_part_begin() -> None:
        parts.append({"headers": {}, "data": []})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] = header.get("field", b"") + data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] = header.get("value", b"") + data[start:end]

    def on_header_end() -> None:
        parts[-1]["headers"][header.pop("field", b"").lower()] = header.pop("value", b"")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"].append(data[start:end])

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, ValueError) as error:
        raise Refused(422, f"the multipart body could not be read ({error}).") from None
    files = []
    for part in parts:
        disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))[1]
        if disposition.get(b"name") != b"file" and b"filename" not in disposition:
            name = disposition.get(b"name", b"").decode("latin-1")
            raise Refused(422, f"the multipart part {name!r} is not an image: send each image as a part named 'file'.")
        files.append(b"".join(part["data"]))
        if len(files) > max_images:
            raise Refused(413, f"over the {max_images} images a request may hold (--max-images).")
    return files


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("softbio")
    except PackageNotFoundError:
        return "source"
