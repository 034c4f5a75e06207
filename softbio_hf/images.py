"""Images in, RGB arrays out: every input kind the pipeline and the server take, checked and named (torch-free)."""

from __future__ import annotations

import contextlib
import io
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# A decoded image is at most this many pixels (decompression-bomb guard), e.g. 8000 x 8000.
MAX_IMAGE_PIXELS = 64_000_000
MAX_DOWNLOAD_BYTES = 25 * 1024 * 1024
DEFAULT_TIMEOUT_S = 10.0
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class ImageInputError(ValueError):
    """An input that is not a usable image; the message names the input."""


class ImageTooLarge(ImageInputError):
    """An image over the pixel cap (the server answers 413 for it)."""


def describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        return repr(text if len(text) <= 200 else f"{text[:120]}...{text[-60:]}")  # an error stays readable
    if isinstance(source, (bytes, bytearray)):
        return f"bytes ({len(source)} bytes)"
    if isinstance(source, np.ndarray):
        return f"array of shape {list(source.shape)} and dtype {source.dtype}"
    if isinstance(source, Image.Image):
        return f"PIL image ({source.mode}, {source.width}x{source.height})"
    return f"object of type {type(source).__name__}"


class _SameSchemeRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are followed only within the URL's own scheme (never http -> ftp or file)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme, target = urllib.parse.urlsplit(req.full_url).scheme, urllib.parse.urlsplit(newurl).scheme
        if target.lower() != scheme.lower():
            raise urllib.error.HTTPError(
                newurl, code, f"a redirect from {scheme}:// to {target or 'a relative'}:// is not followed", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_SameSchemeRedirects)


def _read_all(url: str, timeout: float, name: str, max_bytes: int) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "softbio"})
    chunks, size = [], 0
    with _OPENER.open(request, timeout=timeout) as response:
        while chunk := response.read1(64 * 1024):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise ImageInputError(f"{name} is larger than {max_bytes:,} bytes; download and downscale it first.")
    return b"".join(chunks)


def fetch_url(url: str, timeout: float, name: str, max_bytes: int | None = None) -> bytes:
    """
    The URL's bytes within `timeout` seconds in all, from the connection to the last byte (a socket timeout bounds
    each read, not the whole, and a remote trickling its headers is never timed by read1): the fetch runs in a
    daemon thread that is abandoned at the deadline. Images and videos (video.py) are fetched here alike.
    """
    done: dict[str, Any] = {}
    max_bytes = MAX_DOWNLOAD_BYTES if max_bytes is None else max_bytes  # read now: tests lower the module's cap

    def fetch() -> None:
        try:
            done["bytes"] = _read_all(url, timeout, name, max_bytes)
        except BaseException as error:  # handed to the caller's thread
            done["error"] = error

    worker = threading.Thread(target=fetch, name="softbio-download", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():  # it stops at its socket's next timeout; its bytes are dropped
        raise ImageInputError(f"Could not download {name} within {timeout:g}s; pass a larger timeout.")
    if "error" in done:
        raise done["error"]
    return done["bytes"]


def _open(source: Any, timeout: float, name: str) -> Image.Image:
    """An unloaded PIL image (header read only) for any supported input kind."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray)):
        return Image.open(io.BytesIO(bytes(source)))
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        try:
            return Image.open(io.BytesIO(fetch_url(source, timeout, name)))
        except OSError as error:
            if isinstance(error, UnidentifiedImageError):
                raise
            reason = getattr(error, "reason", error)  # urllib wraps the socket's error
            if isinstance(reason, TimeoutError) or "timed out" in str(reason):
                raise ImageInputError(
                    f"Could not download {name} within {timeout:g}s; pass a larger timeout."
                ) from error
            raise ImageInputError(f"Could not download {name}: {reason}.") from error
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            is_file = path.is_file()
        except OSError as error:  # e.g. a name too long for the file system
            raise ImageInputError(f"{name} is not a usable path on this system ({error.strerror}).") from error
        if not is_file:
            raise ImageInputError(f"{name}: no such image file; check the path.")
        return Image.open(path)
    raise ImageInputError(
        f"{name} is not a supported input. Pass a file path, an http(s) URL, a PIL image, "
        "a numpy array (H x W x 3 RGB) or the image's bytes."
    )


def _check_pixels(width: int, height: int, name: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{name} is {width}x{height} = {width * height:,} pixels, over the {max_pixels:,}-pixel cap that guards "
            "against decompression bombs; downscale it first, or raise the cap for this call: "
            "pipe(image, max_pixels=N)."
        )


def _check_array(array: np.ndarray, name: str, max_pixels: int) -> None:
    shape = array.shape
    channels_ok = array.ndim == 2 or (array.ndim == 3 and shape[2] in (1, 3, 4))
    if not channels_ok or min(shape[:2], default=0) < 1:
        raise ImageInputError(f"{name} is not an image: expected H x W, H x W x 3 (RGB) or H x W x 4 (RGBA).")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ImageInputError(f"{name} is not an image: its values are {array.dtype}, not numbers.")
    _check_pixels(shape[1], shape[0], name, max_pixels)


def _array_to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = (array.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        scale = 255.0 if float(np.nanmax(array)) <= 1.0 else 1.0
        array = np.clip(np.nan_to_num(array) * scale, 0, 255).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.shape[2] == 4:
        return np.asarray(_flatten_alpha(Image.fromarray(array, "RGBA")))
    return np.ascontiguousarray(array)


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Transparent pixels become white, as a viewer shows them, not the black of a plain convert()."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(image).astype(np.float32)
        if image.mode != "F" and array.max() > 255:  # 16-bit data
            array = array / 257.0
        return _array_to_rgb(np.clip(array, 0, 255).round().astype(np.uint8), "image")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return np.asarray(_flatten_alpha(image))
    return np.asarray(image.convert("RGB"))


def image_files(folder: Path, extensions: set[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Every file under `folder` (subfolders included) whose extension is one of `extensions`, case-insensitive,
    sorted by path: the same order on every machine and every run."""
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in extensions and path.is_file())


def load_image(
    source: Any, *, timeout: float = DEFAULT_TIMEOUT_S, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None
) -> np.ndarray:
    """
    Any supported input -> an RGB uint8 array, EXIF orientation applied. Errors are `ImageInputError`s
    (a ValueError) that name the input and say what would fix it.
    """
    name = name or describe(source)
    if isinstance(source, np.ndarray):
        _check_array(source, name, max_pixels)
        return _array_to_rgb(source, name)
    with _image_errors(name):
        image = _open(source, timeout, name)
        _check_pixels(image.width, image.height, name, max_pixels)  # before decoding a single pixel
        image = ImageOps.exif_transpose(image)  # decodes
        return _pil_to_rgb(image)


def check_image(source: Any, *, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None) -> None:
    """
    What `load_image` checks that costs no decoding: the kind of input, that a file exists, its header and its
    size. URLs are checked when they are fetched. Raises the same `ImageInputError`s.
    """
    name = name or describe(source)
    if isinstance(source, np.ndarray):
        _check_array(source, name, max_pixels)
        return
    if isinstance(source, Image.Image):  # the caller's image: checked, never closed
        _check_pixels(source.width, source.height, name, max_pixels)
        return
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        return
    with _image_errors(name), _open(source, 0, name) as image:  # reads the header only
        _check_pixels(image.width, image.height, name, max_pixels)


@contextlib.contextmanager
def _image_errors(name: str):
    """PIL's and the OS's errors for an input, as ImageInputErrors that name it and say what to do."""
    try:
        yield
    except ImageInputError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageInputError(f"{name} is too large to decode safely ({error}); downscale it first.") from error
    except UnidentifiedImageError as error:
        raise ImageInputError(f"{name} is not an image: expected a JPEG, PNG, WebP, BMP, GIF or TIFF file.") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageInputError(
            f"{name} could not be decoded ({error}); the file may be truncated or corrupt."
        ) from error
