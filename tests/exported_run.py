"""Run the pipeline on an exported backend in a process of its own, printing its answers as JSON:
the list's, each photo's alone, and the list's with faces batched across photos.

    python tests/exported_run.py MODEL_DIR BACKEND PHOTO [PHOTO ...]

The test process never loads OpenVINO or ONNX Runtime itself: once they have run in a process, a later fork of it
(the suite's worker pools and subprocesses) was seen to crash with a segmentation fault.
"""

from __future__ import annotations

import json
import logging
import sys

from transformers import pipeline

import softbio_hf  # noqa: F401 - registers the task


def main() -> None:
    folder, backend, *photos = sys.argv[1:]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    pipe = pipeline("soft-biometrics", model=folder, dtype="float32", backend=backend)
    chosen = pipe.exported.backend if pipe.exported is not None else "torch"
    answers = {
        "faces": pipe(photos, detector="haar"),  # the list path: photos overlapped, one face per pass
        "alone": [pipe(photo, detector="haar") for photo in photos],  # each photo by itself
        "batched": pipe(photos, detector="haar", batch_size=8),  # faces of several photos share passes
    }
    print(json.dumps({"backend": chosen, **answers}))


if __name__ == "__main__":
    main()
