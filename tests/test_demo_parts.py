"""The demo's parts without a server: its model (the zero-shot cache, what the badge says of it) and upload
ownership. The demo served for real is tests/test_app.py."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import TINY_VISION

from softbio_demo import models, uploads
from softbio_hf import SoftBioConfig, SoftBioModel


def test_default_model_is_built_once_then_loaded_from_the_cache(tiny_clip_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTBIO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "DEFAULT_CLIP", str(tiny_clip_dir))
    built, name = models.load_model(None)
    cached = models.zero_shot_cache_dir(str(tiny_clip_dir), tiny_clip_dir / "config.json")
    assert (cached / "model.safetensors").is_file() and "zero-shot" in name
    monkeypatch.setattr(SoftBioModel, "from_clip", lambda *a, **k: pytest.fail("rebuilt instead of cached"))
    again, name = models.load_model(None)
    assert "cached" in name
    assert torch.equal(again.heads["age"].classifier.weight, built.heads["age"].classifier.weight)


def test_a_clip_checkpoint_becomes_the_zero_shot_model_built_once(tiny_clip_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTBIO_CACHE", str(tmp_path / "cache"))
    model, name = models.load_model(str(tiny_clip_dir))
    assert name == f"zero-shot {tiny_clip_dir}" and model.config.zero_shot_source == str(tiny_clip_dir)
    monkeypatch.setattr(SoftBioModel, "from_clip", lambda *a, **k: pytest.fail("rebuilt instead of cached"))
    _, name = models.load_model(str(tiny_clip_dir))
    assert "cached" in name


def test_the_zero_shot_cache_knows_a_clip_folder_by_what_it_is(tiny_clip_dir, tmp_path, monkeypatch):
    """`cd a && app.py --model clip`, then `cd b && app.py --model clip`: b's model, not a's; and a CLIP folder
    re-saved in place is built again."""
    from tiny import make_tiny_clip

    monkeypatch.setenv("SOFTBIO_CACHE", str(tmp_path / "cache"))

    def weights(model):
        return model.backbone.embeddings.patch_embedding.weight

    expected = {}
    for place, seed in (("a", 1), ("b", 2)):
        make_tiny_clip(tmp_path / place / "clip", seed=seed)
        expected[place] = weights(SoftBioModel.from_clip(tmp_path / place / "clip"))
    for place in ("a", "b"):
        monkeypatch.chdir(tmp_path / place)
        assert torch.equal(weights(models.load_model("clip")[0]), expected[place]), place
    make_tiny_clip(tmp_path / "b" / "clip", seed=3)  # saved again in place
    model, name = models.load_model("clip")
    assert "cached" not in name and not torch.equal(weights(model), expected["b"])


def test_a_missing_folder_is_said_to_be_missing(tmp_path):
    with pytest.raises(models.ModelUnavailable, match=r"no such folder"):
        models.load_model(str(tmp_path / "missing" / "dir"))


def test_a_checkpoint_of_another_kind_is_refused_with_the_reason(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(models.ModelUnavailable, match=r"a 'bert' checkpoint.*softbio checkpoint.*CLIP"):
        models.load_model(str(tmp_path / "bert"))


def test_upload_records_expire_stay_bounded_and_open_the_examples_to_all(tmp_path, monkeypatch):
    example = tmp_path / "example.jpg"
    example.write_bytes(b"public example bytes")
    owners = uploads.UploadOwners(max_age_s=60, examples=[example], max_requesters=2)
    mine, theirs = tmp_path / "mine.jpg", tmp_path / "theirs.jpg"
    owners.record("cookie:a", [str(mine)])
    assert owners.owns("cookie:a", mine, b"x") and not owners.owns("cookie:b", mine, b"x")
    assert owners.owns("cookie:b", theirs, b"public example bytes")  # any copy of an example, by content

    clock = [1000.0]
    monkeypatch.setattr(uploads.time, "monotonic", lambda: clock[0])
    owners.record("cookie:a", [str(theirs)])
    clock[0] += 61
    assert not owners.owns("cookie:a", theirs, b"x")  # expired with gradio's cache
    monkeypatch.setattr(uploads, "MAX_UPLOADS_PER_REQUESTER", 3)
    owners.record("cookie:a", [str(tmp_path / f"{i}.jpg") for i in range(5)])
    assert [owners.owns("cookie:a", tmp_path / f"{i}.jpg", b"x") for i in range(5)] == [False, False, True, True, True]
    owners.record("cookie:b", [str(mine)])
    owners.record("cookie:c", [str(mine)])  # a third requester: the least recent one (a) is dropped
    assert not owners.owns("cookie:a", tmp_path / "4.jpg", b"x") and owners.owns("cookie:c", mine, b"x")
    assert uploads.requester_key({"softbio_uploader": "x" * 32}, "10.0.0.1") == "cookie:" + "x" * 32
    assert uploads.requester_key({"softbio_uploader": "short"}, "10.0.0.1") == "address:10.0.0.1"


def test_an_upload_whose_record_expired_in_the_queue_is_said_to_have_expired(tmp_path, monkeypatch):
    """Under load a request can wait past its upload's record (issue 37: told "not an upload of yours" about its own
    photo). A short record life stands in for the wait: the requester is told it expired; another is still refused
    as before."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    photo = tmp_path / "queued-photo.jpg"
    photo.write_bytes(b"private bytes")
    clock = [1000.0]
    monkeypatch.setattr(uploads.time, "monotonic", lambda: clock[0])
    owners = uploads.UploadOwners(max_age_s=180)
    owners.record("cookie:mine", [str(photo)])
    assert uploads.read_upload(str(photo), "cookie:mine", owners)[0] == b"private bytes"
    clock[0] += 181  # its turn came after the record's 180 s
    with pytest.raises(Exception, match=r"Your upload expired before its turn came \(uploads are kept about 180 s"):
        uploads.read_upload(str(photo), "cookie:mine", owners)
    with pytest.raises(Exception, match=r"not an upload of yours"):
        uploads.read_upload(str(photo), "cookie:theirs", owners)


def test_the_badge_says_trained_zero_shot_or_random_with_the_cards_evaluation(tiny_clip_dir, tmp_path):
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    vision = {"model_type": "clip_vision_model", **TINY_VISION}
    random_model = SoftBioModel(SoftBioConfig(vision_config=vision))
    assert models.describe_model(random_model, "ckpt").kind == "random"  # neither trained nor built from CLIP
    zero_shot = SoftBioModel.from_clip(tiny_clip_dir)
    kind = models.describe_model(zero_shot, "zs")
    assert kind.kind == "zero-shot" and str(tiny_clip_dir) in kind.detail
    zero_shot.config.random_weights = True  # as python -m softbio_hf.tiny records it: its CLIP is random
    assert models.describe_model(zero_shot, "tiny/softbio").headline == "untrained random weights"

    trained = SoftBioModel(SoftBioConfig(vision_config=vision, adapter={"method": "lp"}))
    (tmp_path / "bare").mkdir()
    kind = models.describe_model(trained, str(tmp_path / "bare"))
    assert kind.headline == "trained (linear probe)" and kind.detail.startswith("Not evaluated")
    (tmp_path / "pushed" / "eval").mkdir(parents=True)  # what train.hub push uploads beside the weights
    summary = {"emotion": 71.25, "age": 55.5, "gender": 93.0, "overall": 73.25}
    (tmp_path / "pushed" / "eval" / "results.json").write_text(json.dumps({"split": "test", "summary": summary}))
    detail = models.describe_model(trained, str(tmp_path / "pushed")).detail
    assert (
        detail
        == "Accuracy on its test split (from its model card): age 55.5%, gender 93.0%, emotion 71.2%, overall 73.2%."
    )
    (tmp_path / "card").mkdir()  # a card with a model-index and no results.json
    result = EvalResult(
        task_type="image-classification",
        dataset_type="fairface",
        dataset_name="fairface gender",
        metric_type="accuracy",
        metric_name="accuracy (%)",
        metric_value=92.5,
    )
    card = ModelCard(f"---\n{ModelCardData(model_name='m', eval_results=[result]).to_yaml()}\n---\n# m\n")
    card.save(tmp_path / "card" / "README.md")
    assert "accuracy (%) on fairface gender: 92.5" in models.describe_model(trained, str(tmp_path / "card")).detail
