"""Start app.py for real on 127.0.0.1 in a subprocess and wait until it answers."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"app.py exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"app.py did not answer at {url} within {timeout}s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def running_app(app_py: Path, model: Path, root: Path, env: dict[str, str] | None = None) -> Iterator[dict]:
    """app.py --model MODEL on a free port, offline, with its own gradio temp folder under root."""
    port = free_port()
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(root / "gradio-tmp"),
        **(env or {}),
    }
    log = root / "app.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, str(app_py), "--model", str(model), "--port", str(port)],
            cwd=app_py.parent,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_up(url, process, log)
        yield {"url": url, "root": root, "temp": root / "gradio-tmp", "log": log}
    finally:
        process.terminate()
        process.wait(timeout=30)
