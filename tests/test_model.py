"""SoftBioConfig / SoftBioModel: config round trip, masked multi-task loss, zero-shot heads, remote code."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from remote import run_without_softbio
from safetensors import safe_open
from tiny import TINY_VISION, one_prompt_each
from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPModel, CLIPTokenizer

from softbio_hf import DEFAULT_TASKS, SoftBioConfig, SoftBioModel

VISION = {"model_type": "clip_vision_model", **TINY_VISION}


def pixels(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ config
def test_config_round_trips_and_keeps_canonical_task_order(tmp_path):
    config = SoftBioConfig(
        vision_config=VISION, projection_dim=16, pooling="cls", head_hidden_size=8, head_dropout=0.1, trainable_blocks=1
    )
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "softbio"
    assert saved["vision_config"]["model_type"] == "clip_vision_model"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SoftBioConfig)
    assert list(loaded.tasks) == ["age", "gender", "emotion"]  # JSON sorts keys; the config restores the order
    assert loaded.tasks == {task: list(labels) for task, labels in DEFAULT_TASKS.items()}
    assert loaded.tasks["emotion"] == ["surprise", "fear", "disgust", "happy", "sad", "angry", "neutral"]
    for key in ("projection_dim", "pooling", "head_hidden_size", "head_dropout", "trainable_blocks", "image_mean"):
        assert getattr(loaded, key) == getattr(config, key), key
    assert loaded.vision_config.hidden_size == 32 and loaded.image_size == 32
    assert loaded.id2label_of("gender") == {0: "male", 1: "female"}


def test_default_config_is_the_studys_backbone():
    config = SoftBioConfig()
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers, config.image_size) == (
        1024,
        24,
        336,
    )
    assert config.vision_config.patch_size == 14 and config.projection_dim == 768


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pooling": "mean"}, "pooling"),
        ({"trainable_blocks": 3}, "trainable_blocks"),
        ({"tasks": {"gender": ["male"]}}, "at least 2"),
        ({"loss_weighting": "gradnorm"}, "loss_weighting"),
    ],
)
def test_config_rejects_bad_settings_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        SoftBioConfig(vision_config=VISION, **overrides)


# ----------------------------------------------------------------------------------------------- forward
def test_forward_gives_logits_per_task_and_uses_sdpa(tiny_model):
    out = tiny_model(pixels(3))
    assert {task: tuple(v.shape) for task, v in out.logits.items()} == {
        "age": (3, 9),
        "gender": (3, 2),
        "emotion": (3, 7),
    }
    assert out.loss is None and out.task_losses is None
    assert tiny_model.backbone.config._attn_implementation == "sdpa"


def test_missing_labels_are_masked_per_task(tiny_model):
    x = pixels(4)
    age = torch.tensor([1, -100, 3, -100])
    gender = torch.tensor([0, 1, -100, 1])
    out = tiny_model(x, age=age, gender=gender, emotion=torch.full((4,), -100))
    expected_age = F.cross_entropy(out.logits["age"][[0, 2]], age[[0, 2]])
    expected_gender = F.cross_entropy(out.logits["gender"][[0, 1, 3]], gender[[0, 1, 3]])
    assert set(out.task_losses) == {"age", "gender"}  # emotion has no label in the batch: absent, not zero
    torch.testing.assert_close(out.task_losses["age"], expected_age)
    torch.testing.assert_close(out.loss, expected_age + expected_gender)
    assert torch.isfinite(out.loss)


def test_a_task_without_labels_sends_no_gradient_to_its_head(tiny_config):
    tiny_config.loss_weighting = "uncertainty"
    model = SoftBioModel(tiny_config).train()
    out = model(pixels(2), gender=torch.tensor([0, 1]), age=torch.tensor([-100, -100]))
    out.loss.backward()
    assert model.heads["gender"].classifier.weight.grad is not None
    assert model.heads["age"].classifier.weight.grad is None
    assert model.heads["emotion"].classifier.weight.grad is None
    assert model.loss_weights.log_vars["gender"].grad is not None
    assert model.loss_weights.log_vars["age"].grad is None  # an absent task's s_t must not drift


def test_uncertainty_weighting_matches_the_formula(tiny_config):
    tiny_config.loss_weighting = "uncertainty"
    model = SoftBioModel(tiny_config).eval()
    with torch.no_grad():
        model.loss_weights.log_vars["age"].fill_(0.7)
    out = model(pixels(2), age=torch.tensor([0, 8]), gender=torch.tensor([1, 0]))
    expected = torch.exp(torch.tensor(-0.7)) * out.task_losses["age"] + 0.35 + out.task_losses["gender"]
    torch.testing.assert_close(out.loss, expected)


def test_labels_dict_and_return_tuple(tiny_model):
    out = tiny_model(pixels(2), labels={"emotion": torch.tensor([3, 6])}, return_dict=False)
    loss, logits = out[0], out[1]
    assert loss.ndim == 0 and set(logits) == {"age", "gender", "emotion"}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.randn(3, 32, 32), r"\[batch, 3, 32, 32\]"),
        (torch.randn(1, 1, 32, 32), r"\[batch, 3, 32, 32\]"),
        (torch.randn(1, 3, 64, 64), r"expected \[batch, 3, 32, 32\]"),
    ],
)
def test_wrong_pixel_values_name_the_expected_shape(tiny_model, bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(bad)


def test_unknown_task_lists_the_known_ones(tiny_model):
    with pytest.raises(ValueError, match=r"\['race'\].*\['age', 'gender', 'emotion'\]"):
        tiny_model(pixels(1), labels={"race": torch.tensor([1])})
    # an unknown keyword is a TypeError, as for any Python function, naming it and the label keywords
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['race'\].*age=, gender=, emotion="):
        tiny_model(pixels(1), race=torch.tensor([1]))


def test_out_of_range_label_names_task_and_value(tiny_model):
    with pytest.raises(ValueError, match=r"Label 7 for task 'gender'"):
        tiny_model(pixels(2), gender=torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"Label -3 for task 'age'"):
        tiny_model(pixels(1), age=torch.tensor([-3]))


def test_bf16_forward_runs_and_stays_close(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    bf16 = SoftBioModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert bf16.backbone.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    x = pixels(2)
    with torch.no_grad():
        ref, low = tiny_model(x).logits["age"], bf16(x).logits["age"]
    assert low.dtype == torch.bfloat16
    assert (ref - low.float()).abs().max() < 0.1


# ------------------------------------------------------------------------------------------- zero-shot
def test_from_clip_reproduces_clip_zero_shot_logits(tiny_clip_dir, tmp_path):
    prompts = one_prompt_each({task: list(labels) for task, labels in DEFAULT_TASKS.items()})
    model = SoftBioModel.from_clip(tiny_clip_dir, prompts=prompts)
    clip = CLIPModel.from_pretrained(tiny_clip_dir, dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip_dir)
    x = pixels(4, seed=3)
    with torch.no_grad():
        ours = model(x).logits
        for task, labels in prompts.items():
            texts = [texts[0] for texts in labels.values()]
            tokens = tokenizer(texts, padding=True, return_tensors="pt")
            reference = clip(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=x)
            assert (ours[task] - reference.logits_per_image).abs().max() < 1e-4, task
            # prompts must differ, or equal logits would prove little
            assert reference.logits_per_image.std(dim=1).min() > 1e-3

    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert not [n for n in names if "text" in n], "the zero-shot model must carry no text tower"
    assert any(n.startswith("backbone.encoder.layers.1.") for n in names)
    assert model.config.zero_shot_source == str(tiny_clip_dir) and model.config.pooling == "cls"


def test_from_clip_with_default_prompts_builds_every_head(tiny_clip_dir):
    model = SoftBioModel.from_clip(tiny_clip_dir)
    for task, labels in DEFAULT_TASKS.items():
        weight = model.heads[task].classifier.weight
        assert weight.shape[0] == len(labels)
        torch.testing.assert_close(weight.norm(dim=1), torch.full((len(labels),), model.config.logit_scale))


def test_from_clip_rejects_empty_prompts(tiny_clip_dir):
    with pytest.raises(ValueError, match=r"prompts\['gender'\]\['female'\]"):
        SoftBioModel.from_clip(tiny_clip_dir, prompts={"gender": {"male": ["a man"], "female": []}})


# -------------------------------------------------------------------------------------------- freezing
def _trainable_parts(model) -> set[str]:
    return {row["part"] for row in model.parameter_report() if row["trainable"] and row["part"] != "total"}


def test_linear_probe_trains_pooling_and_heads_only(tiny_model):
    tiny_model.apply_trainable_blocks(0)
    assert _trainable_parts(tiny_model) == {"pooling", "heads"}


def test_last_k_blocks_train_with_final_norm(tiny_model):
    tiny_model.apply_trainable_blocks(1)
    assert tiny_model.config.trainable_blocks == 1
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert any(n.startswith("backbone.encoder.layers.1.") for n in trainable)
    assert not any(n.startswith("backbone.encoder.layers.0.") for n in trainable)
    assert "backbone.post_layernorm.weight" in trainable and "backbone.embeddings.class_embedding" not in trainable


def test_full_backbone_and_parameter_report_totals(tiny_model):
    tiny_model.apply_trainable_blocks(-1)
    report = {row["part"]: row for row in tiny_model.parameter_report()}
    total = sum(p.numel() for p in tiny_model.parameters())
    assert report["total"]["total"] == report["total"]["trainable"] == total
    assert sum(r["total"] for part, r in report.items() if part != "total") == total
    with pytest.raises(ValueError, match="trainable_blocks"):
        tiny_model.apply_trainable_blocks(5)


# ------------------------------------------------------------------------------------- save and reload
def test_save_writes_safetensors_processor_and_auto_map(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path, safe_serialization=False)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert {"modeling_softbio.py", "configuration_softbio.py", "preprocessor_config.json"} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_softbio.SoftBioModel"
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 32, "width": 32}
    assert processor["image_mean"] == pytest.approx(tiny_model.config.image_mean)


def test_checkpoint_loads_as_remote_code_without_our_package(tiny_model, tmp_path):
    model_dir = tmp_path / "ckpt"
    tiny_model.save_pretrained(model_dir)
    x = pixels(2, seed=5)
    remote = run_without_softbio(tmp_path, model_dir, x)
    with torch.no_grad():
        local = tiny_model(x).logits
    for task in local:
        assert (remote[task] - local[task]).abs().max() < 1e-5, task


def test_auto_classes_are_registered_on_import(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path, dtype=torch.float32)
    assert isinstance(model, SoftBioModel)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    batch = processor(
        images=[torch.zeros(3, 50, 40, dtype=torch.uint8).numpy().transpose(1, 2, 0)], return_tensors="pt"
    )
    assert batch["pixel_values"].shape == (1, 3, 32, 32)


def test_checkpoint_with_other_labels_is_a_clear_error(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    swapped = {**tiny_model.config.tasks, "gender": ["female", "male"]}
    with pytest.raises(ValueError, match=r"'gender' labels are \['male', 'female'\] in the checkpoint"):
        SoftBioModel.from_pretrained(tmp_path, tasks=swapped)
    with pytest.raises(ValueError, match="does not match the requested tasks"):
        AutoModel.from_pretrained(tmp_path, tasks={"emotion": tiny_model.config.tasks["emotion"]})
    same = SoftBioModel.from_pretrained(tmp_path, tasks=tiny_model.config.tasks)
    assert same.config.tasks == tiny_model.config.tasks


def test_years_stay_within_the_predicted_age_group():
    from softbio_hf.modeling_softbio import expected_age_years

    labels = ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+"]
    years = [1.0, 6.0, 14.5, 24.5, 34.5, 44.5, 54.5, 64.5, 77.0]
    bimodal = torch.tensor([[0.35, 0, 0, 0.25, 0, 0, 0, 0, 0.40]])  # "70+" on top, much weight on the young
    assert float((bimodal @ torch.tensor(years))[0]) < 40  # the plain expectation contradicts "70+"
    assert float(expected_age_years(bimodal, years, labels)[0]) == pytest.approx(70.0)
    skewed = torch.tensor([0.0, 0, 0, 0.5, 0, 0, 0, 0, 0.5 - 1e-3]) + 1e-4  # "20-29" by a hair
    assert 20 <= float(expected_age_years(skewed, years, labels)) <= 29
    peaked = torch.tensor([0, 0, 0, 0.1, 0.8, 0.1, 0, 0, 0])
    assert float(expected_age_years(peaked, years, labels)) == pytest.approx(34.5)  # inside: untouched
    assert float(expected_age_years(bimodal, years, ["baby", *labels[1:]])[0]) < 40  # unparsed labels: plain
