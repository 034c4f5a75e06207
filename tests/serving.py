"""Start app.py for real on 127.0.0.1 in a subprocess and wait until it answers."""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Only to catch an app that never answers: a start-up imports torch and gradio and compiles the model cold, which
# takes minutes on a loaded 2-core machine; a process that dies is reported at once, whatever this bound.
STARTUP_HANG_S = 900.0


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = STARTUP_HANG_S) -> None:
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


def app_run_to_exit(app_py: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300):
    """app.py run until it exits (a start-up error, --help): offline unless `env` says otherwise, output captured."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
    return subprocess.run(
        [sys.executable, str(app_py), *args],
        cwd=app_py.parent,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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
    started = time.monotonic()
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
        ready_s = time.monotonic() - started  # the start-up a user waits for, whatever the machine's load
        yield {"url": url, "root": root, "temp": root / "gradio-tmp", "log": log, "ready_s": ready_s}
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextlib.contextmanager
def serving(body: bytes, slow_path: str | None = None, trickle_path: str | None = None):
    """
    A loopback HTTP server that answers every GET with `body`: after 2 s on `slow_path`, and one byte every
    0.3 s on `trickle_path` (each read is quick; the whole is not).
    """

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == slow_path:
                time.sleep(2)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path == trickle_path:
                for i in range(min(len(body), 60)):
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.3)
                return
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def find_chromium() -> str | None:
    """A Chromium to drive: Debian's (or any on PATH), else the one `python -m playwright install chromium` put
    in Playwright's cache. None when there is neither."""
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        bundled = playwright.chromium.executable_path
    return bundled if Path(bundled).exists() else None
