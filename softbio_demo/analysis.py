"""The demo's analyses: a photo's bytes, a clip, each turned into what the page shows, bad input into a message."""

from __future__ import annotations

import logging

from .render import TASK_TITLES, annotate, gif_data_url, tracks_html

logger = logging.getLogger("softbio.app")


def analyze_bytes(pipe, data: bytes, name: str, detector: str = "auto", threshold: float | None = None):
    """
    Decode and run the pipeline. A bad input becomes the product's own message on the page and in the API, and
    one line in the server log; anything else is logged there and the client sees no internals.
    """
    import gradio as gr

    from softbio_hf import load_image

    try:
        rgb = load_image(data, name=name)
        return rgb, pipe(rgb, detector=detector, threshold=threshold or None)  # threshold 0: detector default
    except (ValueError, TypeError) as error:  # the input or an option: the message names it and the fix
        logger.warning("rejected %s: %s", name, error)
        raise gr.Error(str(error), print_exception=False) from None
    except Exception:
        logger.exception("analysis of %s failed", name)
        message = "The analysis failed on the server; it was logged. Try another photo."
        raise gr.Error(message, print_exception=False) from None


# The Video tab: a clip is analysed at VIDEO_FPS frames a second, at most VIDEO_MAX_FRAMES of them, and refused past
# VIDEO_MAX_SECONDS (a demo's bounds; python -m softbio_hf.predict takes longer clips).
VIDEO_FPS, VIDEO_MAX_FRAMES, VIDEO_MAX_SECONDS = 4.0, 120, 60.0


def analyze_clip(pipe, path: str, name: str, detector: str = "auto", threshold: float | None = None):
    """A clip's tracks as HTML (an animated GIF of the analysed frames, each face labelled with its track's steady
    answer, and the per-track table) and as JSON. Nothing is written to disk: the GIF is inline."""
    import gradio as gr

    from softbio_hf.video import VideoInputError, read_frames

    limits = {"fps": VIDEO_FPS, "max_frames": VIDEO_MAX_FRAMES, "max_seconds": VIDEO_MAX_SECONDS}
    try:
        result = pipe.analyze_video(path, detector=detector, threshold=threshold or None, **limits)
        frames = [frame.rgb for frame in read_frames(path, **limits)]
    except (VideoInputError, ValueError) as error:
        logger.warning("rejected %s: %s", name, error)
        raise gr.Error(str(error).replace(path, name), print_exception=False) from None
    except Exception:
        logger.exception("analysis of %s failed", name)
        raise gr.Error(
            "The analysis failed on the server; it was logged. Try another clip.", print_exception=False
        ) from None
    tracks = {track["track_id"]: track for track in result["tracks"]}
    images = []
    for rgb, entry in zip(frames, result["frames"], strict=True):
        steady = [
            {**face, **{t: tracks[face["track_id"]][t] for t in TASK_TITLES if t in face}} for face in entry["faces"]
        ]
        image = annotate(rgb, steady, [face["track_id"] for face in steady])
        images.append(image)
    return tracks_html(gif_data_url(images, VIDEO_FPS), result["tracks"]), result["tracks"]
