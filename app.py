"""softbio demo: age group, gender and emotion of every face in a photo (Gradio; runs as a Hugging Face Space).

python app.py                       # zero-shot model from CLIP ViT-L/14@336, built once and cached
python app.py --model DIR_OR_REPO   # a softbio checkpoint, or a CLIP one (its zero-shot model); or SOFTBIO_MODEL

This file is the page's layout, its arguments and the launch; the parts a Space needs beside it (the model and its
cache, upload ownership, the analyses and their rendering) are the package softbio_demo/.
"""

# No `from __future__ import annotations`: gradio finds the `gr.Request` parameter by its evaluated annotation.
import argparse
import logging
import os
import socket
import sys
import time
from pathlib import Path

from softbio_demo.analysis import (
    LIVE_RESET_S,
    VIDEO_FPS,
    VIDEO_MAX_FRAMES,
    VIDEO_MAX_SECONDS,
    analyze_bytes,
    analyze_clip,
    analyze_live_frame,
    detector_that_ran,
)
from softbio_demo.models import (
    DEFAULT_CLIP,
    ModelUnavailable,
    build_pipeline,
    compile_for_serving,
    describe_model,
    load_model,
)
from softbio_demo.render import CSS, annotate, badge_html, result_html
from softbio_demo.uploads import (
    API_NAME,
    CACHE_SWEEP,
    MAX_UPLOAD,
    RecordUploads,
    UploadOwners,
    data_url_bytes,
    read_upload,
    requester_key,
    upload_path,
)

# softbio_hf registers with transformers (importing torch: seconds) when first imported, unless its __main__ defers
# it: --help and --version then answer at once, and build_pipeline registers before the pipeline is made.
DEFER_SOFTBIO_REGISTRATION = True

# the start-up the log reports, from here (the imports above are light) until the page answers
STARTED = time.monotonic()
logger = logging.getLogger("softbio.app")
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
DETECTOR_CHOICES = ["auto", "yunet", "haar", "none"]
DEMO_MODULES = ("gradio", "starlette", "yaml")  # softbio[demo]: gradio brings starlette

ABOUT = """
### How it works
Each face is found by a face detector (OpenCV's YuNet when its small model file can be fetched, otherwise
OpenCV's Haar cascade), cropped with a margin and aligned on the eyes, then classified by **one forward
pass** of a CLIP vision transformer with three heads: age group (9 bins; *years* is the expectation over the
bins), gender and emotion (7 classes). The default model is **zero-shot**: its heads are CLIP text embeddings
of prompts such as "a photo of a smiling face", so no face data trained it. Fine-tuned checkpoints
(LoRA, MTLoRA, ...) are much more accurate; pass one with `--model`.

### Limits and biases
- These are *apparent* attributes read from pixels: not identity, not self-described gender, not felt emotion.
  Gender is a binary label here because the public benchmarks are; it cannot represent everyone.
- Accuracy differs across age groups, skin tones and image conditions. The benchmarks behind it
  (UTKFace, FairFace, RAF-DB) are imbalanced: few children under 3 and few people over 70, few fearful
  or disgusted faces. Expect more errors on under-represented groups.
- Do not use it to make decisions about people (access, hiring, policing, age verification).
- Uploaded images are analysed in memory, only for the browser that sent them; the server's upload cache is
  emptied of photos older than two minutes, every minute. Nothing is stored.
"""


# ------------------------------------------------------------------------------------------------- page
def example_files() -> list[Path]:
    return sorted(EXAMPLES_DIR.glob("*.jpg"))


def requester_of(request) -> str:
    return requester_key(dict(request.cookies or {}), request.client.host if request.client else None)


def build_demo(pipe, model_name: str, owners: UploadOwners):
    import gradio as gr

    # Every event takes its inputs unprocessed (preprocess=False): the upload's own path, which gradio would
    # otherwise replace by a converted copy (an RGBA or grey photo) or shadow with an empty temporary file
    # (gr.File, one per call), and which read_upload checks is the requester's.
    set_level = ((pipe.model.config.calibration or {}).get("conformal") or {}).get("level")

    def analyze_upload(payload, detector, threshold, request: gr.Request):
        data, name = read_upload(upload_path(payload), requester_of(request), owners)
        rgb, faces = analyze_bytes(pipe, data, name, detector, threshold)
        return result_html(annotate(rgb, faces), faces, set_level, detector_that_ran(pipe, detector)), faces

    def analyze_clip_upload(payload, detector, threshold, request: gr.Request):
        video = payload.get("video") if isinstance(payload, dict) and "video" in payload else payload
        data, name = read_upload(upload_path(video), requester_of(request), owners)  # the requester's own upload
        return analyze_clip(pipe, data, name, detector, threshold)

    def analyze_frame(frame, detector, threshold, session, request: gr.Request):
        """A webcam frame, tracked with this browser session's earlier frames (its own tracker, in gr.State)."""
        if not frame:
            return "", session
        url = frame.get("url") if isinstance(frame, dict) else None
        if isinstance(url, str) and url.startswith("data:"):
            data = data_url_bytes(url)
        else:
            data, _ = read_upload(upload_path(frame), requester_of(request), owners)
        return analyze_live_frame(pipe, session, data, detector, threshold)

    def analyze_api(payload, detector="auto", threshold=0.0, request: gr.Request = None):
        """Every face in the image: box, age group (and years), gender and emotion, with probabilities."""
        data, name = read_upload(upload_path(payload), requester_of(request), owners)
        return analyze_bytes(pipe, data, name, detector or "auto", threshold)[1]

    with gr.Blocks(title="softbio: age, gender and emotion from one CLIP pass", delete_cache=CACHE_SWEEP) as demo:
        gr.Markdown(
            "# softbio\nAge group, gender and emotion of every face in a photo, from one forward pass of a CLIP "
            "vision model."
        )
        kind = describe_model(pipe.model, model_name)
        gr.HTML(badge_html(kind.kind, kind.headline, kind.detail, model_name), elem_id="sb-model")
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Tab("Photo"):
                    photo = gr.Image(label="Photo", type="filepath", sources=["upload", "clipboard"], elem_id="photo")
                    run = gr.Button("Analyze", variant="primary", elem_id="analyze")
                    examples = [str(path) for path in example_files()]
                    if examples:
                        gr.Examples(examples=examples, inputs=photo, label="Public-domain examples")
                with gr.Tab("Video"):
                    clip = gr.Video(label="Clip", sources=["upload"], elem_id="clip")
                    run_clip = gr.Button("Analyze clip", variant="primary", elem_id="analyze-clip")
                    gr.Markdown(
                        f"Up to {VIDEO_MAX_SECONDS:.0f} s and {MAX_UPLOAD}; {VIDEO_FPS:g} frames a second are "
                        f"analysed (at most {VIDEO_MAX_FRAMES}), and each person is followed from frame to frame "
                        "(by where their face is and what it looks like), with their emotion over time."
                    )
                with gr.Tab("Webcam (live)"):
                    webcam = gr.Image(
                        label="Webcam", sources=["webcam"], streaming=True, type="numpy", elem_id="webcam"
                    )
                    gr.Markdown(
                        "Two frames a second are analysed; each person keeps a track for as long as this page "
                        f"streams, with a steady label (the mean over their frames so far). A pause of "
                        f"{LIVE_RESET_S:.0f} s or more starts afresh; nothing is kept after the page closes."
                    )
                    # One tracker per browser session: never shared with another visitor, dropped with the session.
                    live_session = gr.State(None, time_to_live=LIVE_RESET_S * 60)
                detector = gr.Dropdown(DETECTOR_CHOICES, value="auto", label="Face detector")
                threshold = gr.Slider(
                    0.0, 1.0, value=0.0, step=0.05, label="Detection threshold (0 = detector default)"
                )
            with gr.Column(scale=1):
                result = gr.HTML(label="Result", elem_id="sb-result")
                with gr.Accordion("JSON", open=False):
                    as_json = gr.JSON(label="Pipeline output")
        with gr.Accordion("How it works, limits and biases", open=False):
            gr.Markdown(ABOUT)

        for button, analysis, source in ((run_clip, analyze_clip_upload, clip), (run, analyze_upload, photo)):
            button.click(
                analysis, [source, detector, threshold], [result, as_json], preprocess=False, api_visibility="private"
            ).failure(  # an error toast, and no earlier photo's result under it as if it were this one's
                lambda: ("", None), None, [result, as_json], queue=False, api_visibility="private"
            )
        webcam.clear(lambda: None, None, live_session, api_visibility="private")  # the stream stopped: forget it
        webcam.stream(
            analyze_frame,
            [webcam, detector, threshold, live_session],
            [result, live_session],
            stream_every=0.5,
            time_limit=120,
            preprocess=False,
            api_visibility="private",
        )
        # The API endpoint: a file in, the pipeline's JSON out (gradio_client: api_name="/analyze").
        api_file = gr.File(visible=False, type="filepath", label="image")
        api_detector = gr.Textbox(visible=False, value="auto", label="detector")
        api_threshold = gr.Number(visible=False, value=0.0, label="threshold")
        api_out = gr.JSON(visible=False, label="faces")
        api_trigger = gr.Button(visible=False)
        api_trigger.click(
            analyze_api, [api_file, api_detector, api_threshold], api_out, preprocess=False, api_name=API_NAME
        )
    return demo


def space_model() -> str | None:
    """On a Space, the model it serves: the first entry of `models:` in the README's YAML header."""
    readme = Path(__file__).resolve().parent / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if not text.startswith("---\n"):
        return None
    import yaml

    header = yaml.safe_load(text.split("---\n", 2)[1]) or {}
    models = header.get("models") or []
    return str(models[0]) if models else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="softbio demo: age group, gender and emotion of every face in a photo.",
        epilog="Without --model the zero-shot model is built from "
        f"{DEFAULT_CLIP} once (needs the Hub) and cached under $SOFTBIO_CACHE (default ~/.cache/softbio).",
    )
    from softbio_hf.version import add_version_argument  # stdlib only: --version needs no torch

    add_version_argument(parser)
    parser.add_argument(
        "--model",
        default=os.environ.get("SOFTBIO_MODEL") or space_model(),
        help="a softbio checkpoint, or a CLIP checkpoint (becomes the zero-shot model, built once and cached): a "
        "local folder or a Hub repo id (env SOFTBIO_MODEL; on a Space, the first of `models:` in its README "
        "header). Default: zero-shot openai/clip-vit-large-patch14-336.",
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), help="address to bind")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")), help="port")
    parser.add_argument("--concurrency", type=int, default=1, help="requests analysed at once (default 1)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default={"1": True, "0": False}.get(os.environ.get("SOFTBIO_COMPILE", "")),
        help="torch.compile the model at start-up, before serving (env SOFTBIO_COMPILE=1 or 0): each photo is then "
        "faster (6-18%% on a 2-core CPU in bench.speed's runs), for about 20 s more at every start. Default: "
        "only where that pays, a model over a billion multiply-adds a face (ViT-L/14@336, not a tiny model); "
        "the log says what was decided",
    )
    parser.add_argument(
        "--backend",
        default=os.environ.get("SOFTBIO_BACKEND", "torch"),
        choices=("torch", "onnx", "openvino", "auto"),
        help="where the forward pass runs (env SOFTBIO_BACKEND): torch (default), the model's ONNX / OpenVINO "
        "export, made once with python -m softbio_hf.export --model DIR --out DIR, or auto (OpenVINO where its "
        "export is there, the fastest measured on CPUs; else torch, said once)",
    )
    return parser.parse_args(argv)


def missing_demo_package() -> str | None:
    """The first module the demo serves with that is not installed (found without importing it), or None."""
    from importlib.util import find_spec

    return next((module for module in DEMO_MODULES if find_spec(module) is None), None)


def port_in_use(host: str, port: int) -> OSError | None:
    """Why (host, port) cannot be served on, found in a moment before the model loads; None when it can."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closed port is free
        try:
            probe.bind((host, port))
        except OSError as error:
            return error
    return None


def cannot_serve(host: str, port: int, error: OSError) -> int:
    print(
        f"softbio: could not serve on {host}:{port} ({error.strerror or error}). Pass another port with --port, "
        f"e.g. --port {port + 1}.",
        file=sys.stderr,
    )
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_demo_package()
    if missing:  # the library installed alone (pip install softbio) has no web server
        print(
            f'softbio: the demo needs {missing}, which is not installed here: pip install "softbio[demo]" '
            "(or pip install -r requirements.txt).",
            file=sys.stderr,
        )
        return 2
    busy = port_in_use(args.host, args.port)
    if busy:  # said now, not after the model's load
        return cannot_serve(args.host, args.port, busy)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        model, name = load_model(args.model)
    except ModelUnavailable as error:
        print(f"softbio: {error}", file=sys.stderr)
        return 2
    from starlette.middleware import Middleware

    owners = UploadOwners(max_age_s=sum(CACHE_SWEEP), examples=example_files())  # gradio's sweep is gone by then
    try:
        pipe = build_pipeline(model, args.backend)
    except (ValueError, FileNotFoundError, ImportError) as error:  # no export, no runtime
        print(f"softbio: {error}", file=sys.stderr)
        return 2
    if pipe.exported is None:  # an exported model is compiled by its runtime
        compile_for_serving(pipe, args.compile)
    demo = build_demo(pipe, name, owners)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=64)
    try:
        # show_error=False: an unexpected exception's text (paths, library internals) never reaches a client
        demo.launch(
            server_name=args.host,
            server_port=args.port,
            max_file_size=MAX_UPLOAD,
            css=CSS,
            show_error=False,
            app_kwargs={"middleware": [Middleware(RecordUploads, owners=owners)]},
            prevent_thread_lock=True,
            quiet=True,  # its lines advise launch(share=True), not ours to give: the address is in ours below
        )
    except OSError as error:  # taken while the model loaded; gradio's own advice is to change launch(): not here
        return cannot_serve(args.host, args.port, error)
    logger.info("ready at %s in %.1f s since start-up", demo.local_url, time.monotonic() - STARTED)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
