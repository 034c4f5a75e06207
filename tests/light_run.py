"""The torch-free runtime on photos, in a process of its own, printing its answers (or its error) as JSON.

    python tests/light_run.py EXPORT_DIR BACKEND BATCH_SIZE PHOTO [PHOTO ...]

Runtimes run outside the test process (tests/exported_run.py says why).
"""

from __future__ import annotations

import json
import sys

from softbio_hf.runtime_light import ExportedPipeline


def main() -> None:
    folder, backend, batch_size, *photos = sys.argv[1:]
    try:
        analyze = ExportedPipeline(folder, backend=backend)
        faces = analyze(photos, detector="haar", batch_size=int(batch_size) if batch_size != "-" else None)
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(json.dumps({"error": str(error), "kind": type(error).__name__}))
        return
    torch_loaded = "torch" in sys.modules or "transformers" in sys.modules
    print(json.dumps({"backend": backend, "faces": faces, "torch_loaded": torch_loaded}))


if __name__ == "__main__":
    main()
