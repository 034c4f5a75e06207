"""schemathesis against the served app in this process (ASGI), where torch cannot be imported; prints the failures.

    python tests/serve_fuzz.py EXPORT_DIR MAX_EXAMPLES PHOTO [PHOTO ...]

Every operation of /openapi.json is run with and without the bearer token; image/* bodies are real photos (and a
small PNG), so the generated requests reach the model. Runs outside the test process (tests/exported_run.py says
why the test process never loads a runtime).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from softbio_hf.runtime_light import ExportedPipeline
from softbio_hf.serve_app import build_app
from softbio_hf.serve_limits import Limits

TOKEN = "fuzz-token"


def small_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def fuzz(operation, headers: dict[str, str], max_examples: int) -> None:
    """`max_examples` generated requests to one operation, each checked against the contract."""

    @given(case=operation.as_strategy())
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def check(case) -> None:
        case.call_and_validate(headers=headers)

    check()


def main() -> None:
    folder, max_examples, *photos = sys.argv[1:]
    images = [Path(photo).read_bytes() for photo in photos] + [small_png()]
    photo = st.sampled_from(images)
    schemathesis.openapi.media_type("image/*", photo, aliases=["image/jpeg", "image/png"])
    schemathesis.openapi.format("binary", photo)  # multipart file parts: real images too
    app = build_app(ExportedPipeline(folder, "onnx"), Limits(token=TOKEN), max_wait_ms=0)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures, runs = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for headers in ({"Authorization": f"Bearer {TOKEN}"}, {}):
            runs += 1
            try:
                fuzz(operation, headers, int(max_examples))
            except BaseException as error:  # schemathesis's FailureGroup (an exception group): reported, not raised
                failures.append(f"{operation.label} {'with' if headers else 'without'} token: {str(error)[:1500]}")
    print(json.dumps({"runs": runs, "failures": failures}))


if __name__ == "__main__":
    main()
