"""pipeline("soft-biometrics") on real photos: faces found, cropped, classified; bad inputs named."""

from __future__ import annotations

import io
import logging
import textwrap

import numpy as np
import pytest
import torch
from photos import (
    ASTRONAUT_KEYPOINTS,
    GRACE_HOPPER_KEYPOINTS,
    assert_same_answers,
    astronaut,
    covers,
    grace_hopper,
    grace_hopper_path,
    lfw_patch,
    tiled_faces,
)
from PIL import Image
from remote import run_isolated
from serving import serving
from transformers import pipeline

from softbio_hf import SoftBiometricsPipeline, SoftBioModel, load_image
from softbio_hf.faces import Face, crop_matrix, make_detector
from softbio_hf.images import ImageInputError
from softbio_hf.pipeline_softbio import fast_bf16_available, resolve_dtype


@pytest.fixture(scope="module")
def tiny_saved(tmp_path_factory):
    from tiny import TINY_VISION

    from softbio_hf import SoftBioConfig

    torch.manual_seed(0)
    model = SoftBioModel(SoftBioConfig(vision_config={"model_type": "clip_vision_model", **TINY_VISION}))
    folder = tmp_path_factory.mktemp("tiny-softbio")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipe(tiny_saved):
    return pipeline("soft-biometrics", model=SoftBioModel.from_pretrained(tiny_saved), dtype="float32")


def jpeg_bytes(array: np.ndarray, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=92, **save_kwargs)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------- results
def test_astronaut_gives_one_face_with_the_full_schema(pipe):
    faces = pipe(astronaut(), detector="haar")
    assert len(faces) == 1
    face = faces[0]
    assert covers(face["box"], ASTRONAUT_KEYPOINTS), face["box"]
    assert 0 < face["detection_score"] <= 1
    config = pipe.model.config
    for task, labels in config.tasks.items():
        result = face[task]
        assert set(result["scores"]) == set(labels)
        assert result["label"] == max(result["scores"], key=result["scores"].get)
        assert result["score"] == max(result["scores"].values())
        assert sum(result["scores"].values()) == pytest.approx(1.0, abs=1e-3)
    expectation = sum(
        face["age"]["scores"][label] * y for label, y in zip(config.tasks["age"], config.age_years, strict=True)
    )
    # the expectation, kept within the predicted group ("30-39" -> 30..39, "70+" -> 70 and up)
    low, _, high = face["age"]["label"].partition("-")
    low, high = float(low.rstrip("+")), float(high) if high else float("inf")
    assert low <= face["age"]["years"] <= high
    assert face["age"]["years"] == pytest.approx(min(max(expectation, low), high), abs=0.2)


def test_grace_hopper_from_a_path_gives_one_face(pipe):
    faces = pipe(grace_hopper_path(), detector="haar")
    assert len(faces) == 1 and covers(faces[0]["box"], GRACE_HOPPER_KEYPOINTS), faces


def test_non_face_patches_give_no_face(pipe):
    results = pipe([lfw_patch(i) for i in range(100, 200)], detector="haar", batch_size=16)
    assert len(results) == 100
    assert sum(len(r) for r in results) == 0


def test_tiled_faces_are_all_found_largest_first(pipe):
    faces = pipe(tiled_faces(), detector="haar")
    assert len(faces) == 4
    areas = [(f["box"]["xmax"] - f["box"]["xmin"]) * (f["box"]["ymax"] - f["box"]["ymin"]) for f in faces]
    assert areas == sorted(areas, reverse=True)
    offset_astronaut = [(x, y) for x, y in ASTRONAUT_KEYPOINTS]  # top-left tile
    assert any(covers(f["box"], offset_astronaut) for f in faces)
    assert len(pipe(tiled_faces(), detector="haar", max_faces=2)) == 2


def test_batch_size_does_not_change_results(pipe):
    images = [astronaut(), tiled_faces(), lfw_patch(150), grace_hopper()]
    one = pipe(images, detector="haar", batch_size=1)
    eight = pipe(images, detector="haar", batch_size=8)
    assert [len(r) for r in one] == [1, 4, 0, 1]
    assert [[f["box"] for f in r] for r in one] == [[f["box"] for f in r] for r in eight]
    for faces_one, faces_eight in zip(one, eight, strict=True):
        for a, b in zip(faces_one, faces_eight, strict=True):
            for task in ("age", "gender", "emotion"):
                assert a[task]["label"] == b[task]["label"]
                for label, score in a[task]["scores"].items():
                    assert score == pytest.approx(b[task]["scores"][label], abs=1e-3)


def test_many_photos_give_each_photo_exactly_its_answer_alone(pipe):
    """The list path (decoding and detection overlapped with the forward pass, faces batched across photos)
    against each photo alone (transformers' path); exported backends: test_export's served JSON."""
    images = [astronaut(), tiled_faces(), lfw_patch(150), grace_hopper(), tiled_faces()]  # 1, 4, 0, 1, 4 faces
    alone = [pipe(image, detector="haar", top_k=2) for image in images]
    assert pipe(images, detector="haar", top_k=2) == alone  # one face per pass: to the last digit
    batched = pipe(images, detector="haar", top_k=2, batch_size=3)  # passes of 3 faces span photos
    assert_same_answers(batched, alone)
    streamed = pipe((image for image in images), detector="haar", top_k=2, batch_size=8)
    assert not isinstance(streamed, list)  # a generator's answers stream
    assert_same_answers(list(streamed), alone)


def test_a_folder_gives_each_image_file_its_answer_alone_and_skips_a_corrupt_one(pipe, tmp_path, caplog):
    images = {"a.png": astronaut(), "b/c.PNG": tiled_faces(), "b/d.jpg": grace_hopper(), "e.webp": lfw_patch(150)}
    for name, array in images.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(array).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a photo, not listed")
    (tmp_path / "b" / "broken.jpg").write_bytes(jpeg_bytes(grace_hopper())[:600])  # refused at its header
    half = jpeg_bytes(grace_hopper())
    (tmp_path / "b" / "half.jpg").write_bytes(half[: len(half) // 2])  # a good header: fails while decoding
    (tmp_path / "fake.png").write_text("not a png")
    with caplog.at_level("WARNING", logger="softbio_hf.pipeline_softbio"):
        found = pipe(str(tmp_path), detector="haar", top_k=2, batch_size=3, num_workers=2)
    order = ["a.png", "b/c.PNG", "b/d.jpg", "e.webp"]
    assert list(found) == [str(tmp_path / name) for name in order]  # sorted by path; the bad files left out
    for name in order:
        assert_same_answers([found[str(tmp_path / name)]], [pipe(str(tmp_path / name), detector="haar", top_k=2)])
    assert [len(found[str(tmp_path / name)]) for name in order] == [1, 4, 1, 0]
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert "3 of 7 image files" in warning and all(name in warning for name in ("broken.jpg", "half.jpg", "fake.png"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageInputError, match="holds no image files"):
        pipe(str(tmp_path / "empty"))


def test_several_preparing_threads_keep_the_order_and_each_has_its_own_detector(pipe):
    import threading

    from softbio_hf.runtime_light import overlapped

    started, met, both_running = [], [], threading.Event()

    def prepare(count: int):
        started.append(count)
        if len(started) >= 2:
            both_running.set()
        # the first photo's thread waits here until a second thread starts: it never could with one worker (a
        # hang bound of 60 s, not a timing)
        met.append(both_running.wait(60))
        return [{"face": i} for i in range(count)], np.full((count, 1), count, dtype=np.uint8)

    answers = list(overlapped([3, 1, 2, 0, 2], prepare, lambda c: {"t": c.astype(np.float32)}, 2, workers=2))
    assert [len(faces) for faces, _ in answers] == [3, 1, 2, 0, 2] and all(met) and len(met) == 5
    with pytest.raises(ValueError, match="num_workers=0"):
        list(overlapped([1], prepare, lambda c: {"t": c}, workers=0))
    with pytest.raises(ValueError, match="num_workers=0"):
        pipe([astronaut(), astronaut()], num_workers=0)
    detectors = []
    thread = threading.Thread(target=lambda: detectors.append(pipe.detector("haar")))
    thread.start()
    thread.join()
    assert detectors[0] is not pipe.detector("haar")  # OpenCV's detectors are not shared between threads
    assert pipe.detector("haar") is pipe.detector("haar")


def test_the_next_photos_are_prepared_during_the_forward_pass_and_faces_share_passes():
    import threading

    from softbio_hf.runtime_light import overlapped

    prepared_during_pass, passes = [], []
    in_pass = threading.Event()

    def prepare(count: int):
        prepared_during_pass.append(in_pass.is_set())
        return [{"face": i} for i in range(count)], np.full((count, 1), count, dtype=np.uint8)

    def score(crops: np.ndarray) -> dict:
        in_pass.set()
        passes.append(len(crops))
        threading.Event().wait(0.05)  # the pass takes a while: the next photo is prepared meanwhile
        in_pass.clear()
        return {"task": crops.astype(np.float32)}

    answers = list(overlapped([2, 0, 3, 1, 2], prepare, score, batch_size=3))
    assert [len(faces) for faces, _ in answers] == [2, 0, 3, 1, 2]
    assert [probs["task"].ravel().tolist() if faces else [] for faces, probs in answers] == [
        [2, 2],
        [],
        [3, 3, 3],
        [1],
        [2, 2],
    ]
    assert passes == [3, 3, 2]  # full passes of 3 across photos, the rest at the end
    assert any(prepared_during_pass)
    passes.clear()
    list(overlapped([2, 0, 3], prepare, score, batch_size=None))
    assert passes == [2, 3]  # no batch size: each photo's faces in a pass of their own


def test_the_compiled_pipeline_gives_the_plain_results_and_compiles_once(tiny_saved):
    from torch._dynamo.utils import counters

    plain = pipeline("soft-biometrics", model=SoftBioModel.from_pretrained(tiny_saved), dtype="float32")
    compiled = pipeline(
        "soft-biometrics", model=SoftBioModel.from_pretrained(tiny_saved), dtype="float32", compile=True, batch_size=3
    )
    assert compiled.compiled_batch_size == 3 and compiled.compile_seconds > 0
    graphs = counters["stats"]["unique_graphs"]
    images = [astronaut(), tiled_faces(), lfw_patch(150), grace_hopper()]  # 1, 4, 0 and 1 faces
    for batch_size in (1, 3, 8):  # batches of 1 to 6 crops: padded or split to the compiled 3, never recompiled
        expected, got = (
            plain(images, detector="haar", batch_size=batch_size),
            compiled(images, detector="haar", batch_size=batch_size),
        )
        assert [len(r) for r in got] == [1, 4, 0, 1]
        for faces_plain, faces_compiled in zip(expected, got, strict=True):
            for a, b in zip(faces_plain, faces_compiled, strict=True):
                assert a["box"] == b["box"]
                for task in ("age", "gender", "emotion"):
                    assert a[task]["label"] == b[task]["label"]
                    for label, score in a[task]["scores"].items():
                        assert score == pytest.approx(b[task]["scores"][label], abs=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs
    with pytest.raises(ValueError, match="positive number of face crops"):
        compiled.compile(batch_size=0)


@pytest.mark.parametrize("side", [57, 336, 700])  # upscaled, as is, downscaled
def test_crop_pixels_normalised_on_the_device_equal_the_image_processors(side):
    from softbio_hf import SoftBioConfig, image_processor_for
    from softbio_hf.pipeline_softbio import face_pixels, normalize_pixels

    config = SoftBioConfig()
    crop = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    pixels = face_pixels(crop, config.image_size)
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 3, 336, 336)
    expected = image_processor_for(config)(images=crop, return_tensors="pt")["pixel_values"]
    assert torch.allclose(normalize_pixels(pixels, config), expected, atol=2e-6)


def test_detector_none_and_top_k(pipe):
    faces = pipe(grace_hopper(), detector="none", top_k=2)
    assert len(faces) == 1
    assert faces[0]["box"] == {"xmin": 0, "ymin": 0, "xmax": 512, "ymax": 600}
    assert all(len(faces[0][task]["scores"]) == 2 for task in ("age", "gender", "emotion"))


def test_large_image_is_downscaled_for_detection_but_boxed_in_original_coordinates(pipe):
    big = np.asarray(Image.fromarray(astronaut()).resize((3072, 3072), Image.BICUBIC))
    faces = pipe(big, detector="haar")
    assert len(faces) == 1
    scaled = [(6 * x, 6 * y) for x, y in ASTRONAUT_KEYPOINTS]
    assert covers(faces[0]["box"], scaled), faces[0]["box"]


# -------------------------------------------------------------------------------------------- inputs
def test_every_input_kind_gives_the_same_face(pipe, tmp_path):
    array = astronaut()
    path = tmp_path / "astronaut.png"
    Image.fromarray(array).save(path)
    inputs = [array, Image.fromarray(array), str(path), path, path.read_bytes()]
    results = pipe(inputs, detector="haar")
    boxes = [r[0]["box"] for r in results]
    assert all(box == boxes[0] for box in boxes), boxes


def test_a_generator_streams_results(pipe):
    images = (image for image in [astronaut(), lfw_patch(150), grace_hopper()])
    results = list(pipe(images, detector="haar", batch_size=4))
    assert [len(faces) for faces in results] == [1, 0, 1]


def test_image_modes_are_converted(tmp_path):
    rgb = astronaut()
    gray = Image.fromarray(rgb).convert("L")
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=-1)
    rgba[:10, :10, 3] = 0  # transparent corner becomes white, not black
    sixteen = (np.asarray(gray).astype(np.uint16) * 257).astype(np.uint16)
    cmyk_buffer = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk_buffer, format="JPEG")
    palette = Image.fromarray(rgb).convert("P")
    cases = {
        "gray": gray,
        "rgba": Image.fromarray(rgba, "RGBA"),
        "rgba-array": rgba,
        "16-bit": Image.fromarray(sixteen),
        "cmyk": cmyk_buffer.getvalue(),
        "palette": palette,
        "float": rgb.astype(np.float32) / 255.0,
    }
    for name, value in cases.items():
        out = load_image(value)
        assert out.dtype == np.uint8 and out.shape == (512, 512, 3), name
    assert (load_image(Image.fromarray(rgba, "RGBA"))[0, 0] == 255).all()
    assert abs(int(load_image(Image.fromarray(sixteen))[200, 200, 0]) - int(np.asarray(gray)[200, 200])) <= 1


def test_exif_orientation_is_applied(pipe):
    rotated = np.rot90(astronaut(), k=1)  # stored sideways ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... with the tag that tells viewers to rotate it back upright
    upright = load_image(jpeg_bytes(np.ascontiguousarray(rotated), exif=exif))
    assert upright.shape == (512, 512, 3)
    assert np.abs(upright.astype(int) - astronaut().astype(int)).mean() < 8
    faces = pipe(jpeg_bytes(np.ascontiguousarray(rotated), exif=exif), detector="haar")
    assert len(faces) == 1 and covers(faces[0]["box"], ASTRONAUT_KEYPOINTS)


def test_urls_are_fetched_with_a_timeout(pipe):
    with serving(jpeg_bytes(astronaut()), slow_path="/slow.jpg") as base:
        faces = pipe(f"{base}/astronaut.jpg", detector="haar")
        assert len(faces) == 1 and covers(faces[0]["box"], ASTRONAUT_KEYPOINTS)
        with pytest.raises(ValueError, match=r"slow\.jpg.*within 0\.5s"):
            pipe(f"{base}/slow.jpg", timeout=0.5)


def test_downloads_over_the_byte_cap_are_refused(monkeypatch):
    import softbio_hf.images as images_module  # load_image's home (the torch-free runtime's too)

    body = jpeg_bytes(astronaut())
    monkeypatch.setattr(images_module, "MAX_DOWNLOAD_BYTES", len(body) - 1)
    with serving(body) as base, pytest.raises(ValueError, match=r"big\.jpg.*is larger than"):
        load_image(f"{base}/big.jpg")


# ----------------------------------------------------------------------------------------- bad input
def test_a_text_file_is_named_in_the_error(pipe, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    with pytest.raises(ValueError, match=r"notes\.txt.*not an image"):
        pipe(str(notes))


def test_a_truncated_jpeg_is_named_in_the_error(pipe, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(jpeg_bytes(astronaut())[:5000])
    with pytest.raises(ValueError, match=r"broken\.jpg.*truncated or corrupt"):
        pipe(str(broken))


def test_one_bad_image_in_a_list_is_named_before_any_model_work(pipe, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pipe.model, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match=r"input 2 \(object of type dict\) is not a supported input"):
        pipe([astronaut(), grace_hopper(), {"not": "an image"}])
    with pytest.raises(ValueError, match=r"input 1 .*missing.jpg.*no such image file"):
        pipe([astronaut(), str(tmp_path / "missing.jpg")])
    assert calls == []


def test_decompression_bombs_are_refused(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20_000, 20_000)).save(bomb)  # 400 Mpx that compresses to a few kB
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(ValueError, match=r"bomb\.png.*(too large|cap)"):
        load_image(str(bomb))
    with pytest.raises(ValueError, match=r"512x512 = 262,144 pixels, over the 100,000-pixel cap"):
        load_image(astronaut().tobytes() and jpeg_bytes(astronaut()), max_pixels=100_000)


def test_bad_arrays_and_options_are_clear(pipe):
    with pytest.raises(ValueError, match=r"array of shape \[4, 4, 5\].*not an image"):
        pipe(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="Unknown face detector 'mtcnn'"):
        pipe(astronaut(), detector="mtcnn")
    with pytest.raises(ValueError, match="margin"):
        pipe(astronaut(), margin=-1)


# --------------------------------------------------------------------------------- detectors and dtype
def test_auto_detector_falls_back_to_haar_offline_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        detector = make_detector("auto")
    assert detector.name == "haar"
    assert "Haar" in caplog.text


def test_missing_yunet_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.onnx.*detector='haar'"):
        make_detector("yunet", yunet_path=str(tmp_path / "missing.onnx"))


def test_alignment_levels_the_eyes():
    landmarks = np.array([[100, 120], [160, 100], [130, 140], [110, 170], [150, 160]], dtype=np.float32)
    face = Face((80, 80, 180, 190), 0.9, landmarks)
    matrix, side = crop_matrix(face, margin=0.25)
    eyes = np.c_[landmarks[:2], np.ones(2)] @ matrix.T
    assert abs(eyes[0, 1] - eyes[1, 1]) < 1e-3  # level after alignment
    assert eyes[0, 0] < eyes[1, 0] and eyes.min() > 0 and eyes.max() < side


def test_dtype_argument(tiny_saved):
    pipe_bf16 = pipeline("soft-biometrics", model=SoftBioModel.from_pretrained(tiny_saved), dtype="bfloat16")
    assert pipe_bf16.model.dtype == torch.bfloat16
    faces = pipe_bf16(astronaut(), detector="haar")
    assert len(faces) == 1 and faces[0]["gender"]["label"] in ("male", "female")
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if fast_bf16_available(cpu) else torch.float32)
    assert resolve_dtype("float16", cpu) == torch.float16 and resolve_dtype(None, cpu) is None
    with pytest.raises(ValueError, match="Unknown dtype 'float99'"):
        resolve_dtype("float99", torch.device("cpu"))


def test_registered_task_builds_our_pipeline(pipe):
    assert isinstance(pipe, SoftBiometricsPipeline)


REMOTE_PIPELINE = textwrap.dedent(
    """
    import sys
    sys.modules["softbio_hf"] = None
    import numpy as np
    from transformers import pipeline
    pipe = pipeline(model=sys.argv[1], trust_remote_code=True, dtype="float32")
    faces = pipe(sys.argv[2], detector="haar")
    print(type(pipe).__module__, len(faces), faces[0]["box"]["xmin"], sorted(faces[0]))
    """
)


def test_pipeline_loads_as_remote_code_without_our_package(tiny_saved, tmp_path):
    photo = tmp_path / "astronaut.png"
    Image.fromarray(astronaut()).save(photo)
    stdout = run_isolated(tmp_path, REMOTE_PIPELINE, str(tiny_saved), str(photo))
    module, count, _xmin, keys = stdout.split(" ", 3)
    assert module.startswith("transformers_modules") and count == "1"
    assert "'age'" in keys and "'emotion'" in keys and "'box'" in keys


def test_a_saved_folder_needs_no_trust_remote_code_when_softbio_is_imported(tiny_saved):
    import json

    assert "custom_pipelines" in json.loads((tiny_saved / "config.json").read_text())  # still there for remote use
    by_folder = pipeline("soft-biometrics", model=str(tiny_saved), dtype="float32")
    assert isinstance(by_folder, SoftBiometricsPipeline)
    assert type(by_folder.model).__module__ == "softbio_hf.modeling_softbio"  # our registered code, not a copy
    assert len(by_folder(grace_hopper_path(), detector="haar")) == 1


def test_a_misspelt_option_names_the_closest_valid_one(pipe):
    with pytest.raises(TypeError, match=r"'detectr' \(did you mean 'detector'\?\)"):
        pipe(grace_hopper_path(), detectr="haar")
