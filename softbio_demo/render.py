"""What the demo shows: boxes and labels drawn on the photo, the result as HTML, a clip as an inline GIF.

Nothing is written to the server's disk: pictures go to the page as data: URLs.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

TASK_TITLES = {"age": "Age group", "gender": "Gender", "emotion": "Emotion"}
BOX_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"]


def short_label(face: dict[str, Any]) -> str:
    parts = []
    if "gender" in face:
        parts.append(face["gender"]["label"][0].upper())
    if "age" in face:
        parts.append(face["age"]["label"])
    if "emotion" in face:
        parts.append(face["emotion"]["label"])
    return " ".join(parts)


def annotate(rgb, faces: list[dict[str, Any]], numbers: list[int] | None = None):
    """Boxes and short labels on the photo; `numbers` names the faces (a video's track ids), else 1, 2, ..."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    width = max(2, round(max(image.size) / 300))
    font = ImageFont.load_default(size=max(12, round(max(image.size) / 40)))
    for i, face in enumerate(faces):
        box = face["box"]
        number = numbers[i] if numbers else i + 1
        colour = BOX_COLOURS[(number - 1) % len(BOX_COLOURS)]
        draw.rectangle([box["xmin"], box["ymin"], box["xmax"], box["ymax"]], outline=colour, width=width)
        text = f"{number}: {short_label(face)}"
        left, top, right, bottom = draw.textbbox((box["xmin"], box["ymin"]), text, font=font)
        y = max(0, box["ymin"] - (bottom - top) - 2 * width)
        draw.rectangle([left, y, right + 2 * width, y + (bottom - top) + 2 * width], fill=colour)
        draw.text((box["xmin"] + width, y), text, fill="white", font=font)
    return image


# The Video tab: a clip is analysed at VIDEO_FPS frames a second, at most VIDEO_MAX_FRAMES of them, and refused past


def gif_data_url(images: list, fps: float, max_side: int = 480) -> str:
    """The frames as an inline animated GIF, each at most `max_side` pixels a side, played at `fps`."""
    frames = []
    for image in images:  # shrunk in place: the caller's full-size frames are not kept twice
        image.thumbnail((max_side, max_side))
        frames.append(image.convert("P", palette=1, colors=128))
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return "data:image/gif;base64," + base64.b64encode(buffer.getvalue()).decode()


def tracks_html(gif: str, tracks: list[dict[str, Any]], note: str | None = None, detector: str = "") -> str:
    """A clip's result: the animation, the detector that ran (detector_html), a note when it stopped decoding
    early, the per-track table and each person's emotion timeline."""
    parts = [f'<img class="sb-photo" alt="the clip with each person\'s box and steady label" src="{gif}">', detector]
    if note:
        parts.append(f'<p class="sb-note">{html.escape(note)}</p>')
    if not tracks:
        parts.append('<p class="sb-none">No face found in the analysed frames.</p>')
        return "".join(parts)
    parts.append(tracks_table(tracks))
    parts.append(
        "<p>Each person's answer is the mean of the probabilities over their frames, each frame weighted by its "
        "detection score and face size; agreement is how often a single frame said the same.</p>"
    )
    parts.extend(timeline_html(track) for track in tracks if track.get("timeline"))
    return "".join(parts)


def tracks_table(tracks: list[dict[str, Any]]) -> str:
    header = "".join(f"<th>{html.escape(title)} (agreement)</th>" for title in TASK_TITLES.values())
    rows = []
    for track in tracks:
        cells = "".join(
            f"<td>{html.escape(track[task]['label'])} {100 * track[task]['score']:.0f}% "
            f"({100 * track[task]['agreement']:.0f}%)</td>"
            for task in TASK_TITLES
            if task in track
        )
        rows.append(
            f'<tr class="sb-track"><td>Track {track["track_id"]}</td><td>{track["first_time_s"]:.2f}-'
            f"{track['last_time_s']:.2f} s</td><td>{track['frames']}</td>{cells}</tr>"
        )
    head = f"<tr><th>person</th><th>seen</th><th>frames</th>{header}</tr>"
    # in a box of its own that scrolls sideways: on a phone the table is wider than the page
    return f'<div class="sb-scroll"><table class="sb-tracks">{head}{"".join(rows)}</table></div>'


def timeline_html(track: dict[str, Any]) -> str:
    """A person's emotion over the clip, drawn by the library (the batch command's --timeline draws the same)."""
    from softbio_hf.video import timeline_image

    number = track["track_id"]
    return (
        f'<figure class="sb-timeline"><img alt="Track {number}: emotion over time" '
        f'src="{image_data_url(timeline_image(track), max_side=1024, png=True)}">'
        f"<figcaption>Track {number}: emotion over time</figcaption></figure>"
    )


def live_html(picture: str, tracks: list[dict[str, Any]], seen: int, detector: str = "") -> str:
    """A webcam frame with each person's steady label, the detector that ran (detector_html), and the table of the
    people in view."""
    alt = "the webcam frame with each person's steady label"
    parts = [f'<img class="sb-photo" alt="{alt}" src="{picture}">', detector]
    if tracks:
        parts.append(tracks_table(tracks))
    else:
        parts.append('<p class="sb-none">No face found in this frame.</p>')
    parts.append(
        f'<p class="sb-live">{seen} people seen in this stream; each label is the mean over that person\'s '
        "frames so far. Stop the stream for a few seconds to start afresh.</p>"
    )
    return "".join(parts)


def image_data_url(image, max_side: int = 1024, png: bool = False) -> str:
    """Inline JPEG (PNG for a plot's sharp lines): the picture is never written to the server's disk."""
    image = image.copy()
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    kind = "png" if png else "jpeg"
    image.convert("RGB").save(buffer, format=kind.upper(), **({} if png else {"quality": 88}))
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode()


def bars_html(scores: dict[str, float]) -> str:
    rows = []
    for label, score in sorted(scores.items(), key=lambda item: item[1], reverse=True):
        rows.append(
            f'<div class="sb-row"><span class="sb-label">{html.escape(label)}</span>'
            f'<span class="sb-bar"><span style="width:{100 * score:.1f}%"></span></span>'
            f'<span class="sb-score">{100 * score:.1f}%</span></div>'
        )
    return "".join(rows)


def set_html(members: list[str], level: float | None) -> str:
    """A task's conformal set (softbio_hf.conformal): the labels that hold the true one at the fitted level."""
    names = " or ".join(html.escape(label) for label in members) if members else "none of the labels"
    return f"<p class='sb-set'>{set_name(level)}: {names}</p>"


def set_name(level: float | None) -> str:
    return f"{100 * level:.0f}% set" if level else "calibrated set"


def set_explanation(level: float | None) -> str:
    """What a set means, in words on the page (a tooltip never shows on a touch screen)."""
    share = f"{100 * level:.0f}% of the time" if level else "at the level it was calibrated for"
    return (
        f"<p class='sb-set-help'>The <b>{set_name(level)}</b> lists the labels that hold the true one {share} on "
        "data like the model's calibration split (conformal prediction): one label means the model is sure of it, "
        "several mean it cannot tell them apart.</p>"
    )


DETECTOR_NAMES = {"yunet": "OpenCV's YuNet", "haar": "OpenCV's Haar cascade", "none": "none (the photo is one face)"}


def detector_html(ran: str | None, asked: str | None = None) -> str:
    """Which face detector found the faces (with "auto", the one it chose)."""
    if not ran:
        return ""
    chosen = ""
    if asked == "auto":
        chosen = " (chosen by auto: YuNet's model file is not available here)" if ran == "haar" else " (chosen by auto)"
    return f"<p class='sb-detector'>Face detector: {DETECTOR_NAMES.get(ran, html.escape(ran))}{chosen}</p>"


def badge_html(kind: str, headline: str, detail: str, name: str) -> str:
    """The model in use, and whether it is trained, zero-shot or untrained random weights."""
    return (
        f"<div class='sb-model sb-model-{kind}'><span class='sb-badge'>{html.escape(headline)}</span> "
        f"<b>Model in use:</b> <code>{html.escape(name)}</code><br><span class='sb-model-detail'>"
        f"{html.escape(detail)}</span></div>"
    )


def result_html(annotated, faces: list[dict[str, Any]], set_level: float | None = None, detector: str = "") -> str:
    """The annotated photo, the detector that found the faces (`detector`, as detector_html gives it) and one card
    per face; `set_level` is the model's conformal level, if it holds one."""
    parts = [f'<img class="sb-photo" alt="photo with face boxes" src="{image_data_url(annotated)}">', detector]
    if any("set" in face.get(task, {}) for face in faces for task in TASK_TITLES):
        parts.append(set_explanation(set_level))
    if not faces:
        parts.append(
            '<p class="sb-none">No face found. Try another detector, a lower threshold, or detector "none" '
            "if the photo is already a face crop.</p>"
        )
    for i, face in enumerate(faces):
        colour = BOX_COLOURS[i % len(BOX_COLOURS)]
        cards = []
        for task, title in TASK_TITLES.items():
            if task not in face:
                continue
            headline = face[task]["label"]
            if task == "age" and "years" in face[task]:
                headline += f" (about {face[task]['years']:.0f} years)"
            conformal = set_html(face[task]["set"], set_level) if "set" in face[task] else ""
            cards.append(
                f"<div class='sb-task'><h4>{title}: {html.escape(headline)}</h4>{conformal}"
                f"{bars_html(face[task]['scores'])}</div>"
            )
        parts.append(f'<div class="sb-face" style="border-color:{colour}"><h3>Face {i + 1}</h3>{"".join(cards)}</div>')
    return f'<div class="sb-result">{"".join(parts)}</div>'


CSS = """
.sb-photo {max-width: 100%; border-radius: 8px;}
.sb-face {border-left: 6px solid; padding: 4px 12px; margin: 12px 0;}
.sb-task h4 {margin: 6px 0 2px;}
.sb-row {display: flex; align-items: center; gap: 8px; font-size: 0.9em;}
.sb-label {width: 80px;}
.sb-set {margin: 0 0 4px; font-size: 0.9em; color: #555;}
.sb-set-help, .sb-detector, .sb-model-detail {font-size: 0.9em;}
.sb-scroll {overflow-x: auto; max-width: 100%;}
.sb-tracks {white-space: nowrap;}
.sb-badge {display: inline-block; padding: 1px 8px; border-radius: 10px; color: white; background: #4363d8;}
.sb-model-random .sb-badge {background: #b45309;}
.sb-model-zero-shot .sb-badge {background: #6b7280;}
.sb-model-trained .sb-badge {background: #15803d;}
.sb-bar {flex: 1; background: #eee; border-radius: 4px; height: 10px; overflow: hidden;}
.sb-bar span {display: block; height: 100%; background: #4363d8;}
.sb-score {width: 52px; text-align: right;}
.sb-timeline {margin: 8px 0;}
.sb-note {color: #b45309;}
"""
