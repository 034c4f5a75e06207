"""Bad input to the pipeline, as an adversarial user would send it: a ValueError naming it, or a correct result."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from photos import astronaut, grace_hopper_path
from PIL import Image
from serving import serving
from tiny import TINY_VISION
from transformers import pipeline

from softbio_hf import SoftBioConfig, SoftBioModel, load_image


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    model = SoftBioModel(SoftBioConfig(vision_config={"model_type": "clip_vision_model", **TINY_VISION}))
    return pipeline("soft-biometrics", model=model, dtype="float32")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (None, r"object of type NoneType is not a supported input"),
        (42, r"object of type int is not a supported input"),
        (np.array(3), r"array of shape \[\] .*not an image"),
        (np.array([["a", "b"], ["c", "d"]]), r"array of shape \[2, 2\] and dtype <U1 is not an image"),
        (np.zeros((0, 5, 3), np.uint8), r"array of shape \[0, 5, 3\].*not an image"),
        ("x" * 5000 + ".jpg", r"not a usable path on this system"),
    ],
)
def test_bad_inputs_are_value_errors_that_name_them(pipe, bad, message):
    with pytest.raises(ValueError, match=message):
        pipe(bad)
    with pytest.raises(ValueError, match=r"^input 1 \("):
        pipe([astronaut(), bad])  # in a list: named with its index, before any model work


def test_an_empty_list_gives_an_empty_result(pipe):
    assert pipe([]) == []


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("max_faces", -1, r"max_faces=-1: use a whole number >= 1"),
        ("max_faces", 0, r"max_faces=0"),
        ("threshold", "abc", r"threshold='abc': use a number between 0 and 1"),
        ("threshold", 1.5, r"threshold=1.5"),
        ("detection_max_side", 0, r"detection_max_side=0: use pixels, >= 32"),
        ("min_face_size", 0, r"min_face_size=0"),
        ("top_k", 0, r"top_k=0"),
        ("timeout", -1, r"timeout=-1"),
    ],
)
def test_bad_options_are_named_before_any_work(pipe, option, value, message):
    with pytest.raises(ValueError, match=message):
        pipe(astronaut(), **{option: value})


def test_a_very_long_thin_image_is_analysed_not_crashed(pipe):
    strip = np.full((4, 8000, 3), 120, np.uint8)  # 2000:1; detection downscales it to under one pixel high
    assert pipe(strip, detector="haar") == []


def test_a_download_has_a_deadline_for_the_whole_body():
    buffer = __import__("io").BytesIO()
    Image.fromarray(astronaut()).save(buffer, format="JPEG")
    # 60 bytes at 0.3 s each: 18 s in all
    with (
        serving(buffer.getvalue(), trickle_path="/trickle.jpg") as base,
        pytest.raises(ValueError, match=r"trickle\.jpg.*within 1s"),
    ):
        load_image(f"{base}/trickle.jpg", timeout=1)


def test_a_long_list_streams_instead_of_decoding_everything_first(pipe, tmp_path):
    photo = tmp_path / "big.png"
    Image.fromarray(np.tile(astronaut(), (2, 2, 1))).save(photo)  # 1024 x 1024: 3 MB decoded

    def peak_bytes(count: int) -> int:
        tracemalloc.start()
        results = pipe([str(photo)] * count, detector="none")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(results) == count and all(len(faces) == 1 for faces in results)
        return peak

    peak_bytes(2)  # warm-up: first-use allocations
    short, long = peak_bytes(20), peak_bytes(200)
    assert long < 1.5 * short, (short, long)  # decoding all first would make it about ten times


def test_a_list_is_checked_cheaply_before_work(pipe, tmp_path, monkeypatch):
    import softbio_hf.pipeline_softbio as module

    decoded = []
    real = module.load_image
    monkeypatch.setattr(module, "load_image", lambda *a, **k: decoded.append(1) or real(*a, **k))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really")
    with pytest.raises(ValueError, match=r"input 2 .*broken\.jpg"):
        pipe([grace_hopper_path(), grace_hopper_path(), str(broken)])
    assert decoded == []  # the header of the third told, before anything was decoded
