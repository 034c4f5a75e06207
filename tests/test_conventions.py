"""SoftBioModel follows transformers' model conventions (the checks the library's common suite makes)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from safetensors.torch import load_file
from tiny import TINY_VISION
from transformers import PreTrainedModel, set_seed

from softbio_hf import SoftBioConfig, SoftBioModel

VISION = {"model_type": "clip_vision_model", **TINY_VISION}
LAYERS, TOKENS, HEADS = TINY_VISION["num_hidden_layers"], 17, TINY_VISION["num_attention_heads"]


def config(**overrides) -> SoftBioConfig:
    return SoftBioConfig(
        **{"vision_config": VISION, "projection_dim": 16, "loss_weighting": "uncertainty", **overrides}
    )


def pixels(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = SoftBioModel(config()).eval()
    model.save_pretrained(tmp_path / "m")
    return model, tmp_path / "m"


# ------------------------------------------------------------------------------------- forward arguments
def test_hidden_states_and_attentions_come_back_with_their_shapes(saved, tmp_path):
    _, folder = saved
    model = SoftBioModel.from_pretrained(folder, attn_implementation="eager").eval()
    out = model(pixels(), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == LAYERS + 1  # embeddings, then every block
    assert all(h.shape == (3, TOKENS, 32) for h in out.hidden_states)
    assert len(out.attentions) == LAYERS
    assert all(a.shape == (3, HEADS, TOKENS, TOKENS) for a in out.attentions)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(3, HEADS, TOKENS))  # softmax rows
    plain = model(pixels(), output_hidden_states=False, output_attentions=False)
    assert plain.hidden_states is None and plain.attentions is None
    torch.testing.assert_close(plain.logits["age"], out.logits["age"])


def test_attentions_asked_of_sdpa_go_on_as_clip_does(saved):
    """transformers' common test_eager_matches_sdpa_inference (its output_attentions=True cases, the three that
    failed while we raised): a model loaded with SDPA and one switched to eager, given output_attentions=True and
    output_hidden_states=True on a batch of 7, agree on the last hidden state. SDPA never forms the weights:
    transformers logs that and the backbone returns none, as CLIPVisionModel does."""
    _, folder = saved
    sdpa = SoftBioModel.from_pretrained(folder, attn_implementation="sdpa").eval()
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    clip = sdpa.backbone  # the library's own model, for what it returns
    inputs = {"pixel_values": pixels(7), "output_attentions": True, "output_hidden_states": True}
    with torch.no_grad():
        out_eager, out_sdpa = eager(**inputs), sdpa(**inputs)
        clip_out = clip(**inputs)
    torch.testing.assert_close(out_sdpa.hidden_states[-1], out_eager.hidden_states[-1], rtol=1e-4, atol=1e-6)
    for task, logits in out_eager.logits.items():
        torch.testing.assert_close(out_sdpa.logits[task], logits, rtol=1e-4, atol=1e-5)
    assert len(out_eager.attentions) == LAYERS
    assert tuple(out_sdpa.attentions) == tuple(clip_out.attentions) == ()


def test_return_dict_false_gives_a_tuple_in_field_order(tiny_model):
    as_tuple = tiny_model(pixels(), gender=torch.tensor([0, 1, 1]), return_dict=False)
    as_output = tiny_model(pixels(), gender=torch.tensor([0, 1, 1]))
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_output.loss)
    assert as_tuple[1].keys() == as_output.logits.keys()


def test_unknown_keyword_is_a_type_error_naming_it(tiny_model):
    with pytest.raises(TypeError, match=r"\['colour'\].*age=, gender=, emotion=.*labels="):
        tiny_model(pixels(), colour=torch.tensor([1, 0, 1]))


def test_eager_and_sdpa_attention_agree(saved):
    _, folder = saved
    eager = SoftBioModel.from_pretrained(folder, attn_implementation="eager").eval()
    sdpa = SoftBioModel.from_pretrained(folder, attn_implementation="sdpa").eval()
    assert eager.backbone.config._attn_implementation == "eager"
    assert sdpa.backbone.config._attn_implementation == "sdpa"
    with torch.no_grad():
        for task, logits in eager(pixels()).logits.items():
            torch.testing.assert_close(sdpa(pixels()).logits[task], logits, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------- initialisation
def assert_intended_init(model: SoftBioModel) -> None:
    for name, tensor in model.state_dict().items():
        assert torch.isfinite(tensor).all(), name
    hidden = model.config.vision_config.hidden_size
    probes = torch.cat([p.flatten() for p in model.pooling.probes.values()])
    assert 0.5 * hidden**-0.5 < probes.std() < 2 * hidden**-0.5  # normal(0, hidden^-1/2), not zeros
    assert all(v.item() == 0.0 for v in model.loss_weights.log_vars.values())


def test_every_parameter_is_initialised_after_construction():
    assert_intended_init(SoftBioModel(config()))


def test_meta_device_construction_then_initialisation_leaves_nothing_undefined():
    with torch.device("meta"):
        model = SoftBioModel(config())
    model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))  # what uninitialised memory may hold
    model.init_weights()
    assert_intended_init(model)


def test_a_partial_checkpoint_initialises_the_missing_weights_and_keeps_the_rest(saved):
    model, folder = saved
    state = load_file(str(folder / "model.safetensors"))
    dropped = [k for k in state if ".probes." in k or "log_vars" in k or k == "heads.age.classifier.bias"]
    dropped.append("backbone.encoder.layers.0.self_attn.q_proj.weight")
    partial = {k: v for k, v in state.items() if k not in dropped}
    loaded, info = SoftBioModel.from_pretrained(
        None, config=model.config, state_dict=partial, output_loading_info=True
    )  # the config-plus-state-dict form works offline (the tests run with HF_HUB_OFFLINE=1)
    assert sorted(info["missing_keys"]) == sorted(dropped)  # the load report names them
    assert_intended_init(loaded)
    kept = loaded.state_dict()
    for key, value in partial.items():
        torch.testing.assert_close(kept[key], value)
    q = kept["backbone.encoder.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q, state["backbone.encoder.layers.0.self_attn.q_proj.weight"])
    assert 0 < q.std() < 0.2  # CLIP's own init scale, not zeros or memory


def test_mtlora_pairs_are_initialised_when_a_checkpoint_lacks_them(tmp_path):
    torch.manual_seed(0)
    model = SoftBioModel(config()).apply_method("mtlora", rank=4, task_rank=2).merge_adapters()
    model.save_pretrained(tmp_path / "mt")
    state = load_file(str(tmp_path / "mt" / "model.safetensors"))
    dropped = [k for k in state if ".task_A." in k or ".task_B." in k or ".shared_" in k]
    assert dropped
    loaded = SoftBioModel.from_pretrained(
        None, config=model.config, state_dict={k: v for k, v in state.items() if k not in dropped}
    )
    params = dict(loaded.named_parameters())
    for key in dropped:
        assert torch.isfinite(params[key]).all(), key
        if "_B" in key:
            assert torch.count_nonzero(params[key]) == 0, key  # B starts at zero: the identity change
        else:
            assert params[key].abs().max() > 0, key


# ------------------------------------------------------------------------------------------- dtypes, I/O
def test_log_variances_stay_float32_whatever_the_default_dtype(saved):
    _, folder = saved
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        built = SoftBioModel(config())
    finally:
        torch.set_default_dtype(previous)
    assert built.pooling.probes["age"].dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in built.loss_weights.log_vars.values())
    loaded = SoftBioModel.from_pretrained(folder, dtype=torch.bfloat16)
    assert loaded.backbone.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in loaded.loss_weights.log_vars.values())
    out = loaded(pixels(), age=torch.tensor([1, 2, -100]))
    assert out.logits["age"].dtype == torch.bfloat16 and torch.isfinite(out.loss)


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_save_load_round_trip_is_safetensors_and_exact(saved, tmp_path, safe_serialization):
    model, _ = saved
    model.save_pretrained(tmp_path / "again", safe_serialization=safe_serialization)
    assert (tmp_path / "again" / "model.safetensors").is_file()
    assert not list((tmp_path / "again").glob("*.bin"))  # never a pickle, whatever is asked
    again = SoftBioModel.from_pretrained(tmp_path / "again").eval()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients(saved):
    _, folder = saved
    labels = {"age": torch.tensor([0, 3, -100]), "gender": torch.tensor([1, 0, 1])}
    gradients = []
    for checkpointing in (False, True):
        fresh = SoftBioModel.from_pretrained(folder).train()
        fresh.requires_grad_(True)
        if checkpointing:
            fresh.activation_checkpointing_enable({"use_reentrant": False})
            assert fresh.is_activation_checkpointing
        fresh(pixels(), **labels).loss.backward()
        gradients.append({n: p.grad.clone() for n, p in fresh.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, rtol=1e-5, atol=1e-6)


def test_logits_as_a_tuple_for_export(tiny_model):
    from softbio_hf.export import tuple_outputs

    program = torch.export.export(tuple_outputs(tiny_model), (pixels(),))
    outputs = program.module()(pixels())
    expected = tiny_model(pixels()).logits
    for task, value in zip(tiny_model.config.tasks, outputs, strict=True):
        torch.testing.assert_close(value, expected[task])


def test_a_load_with_no_weights_at_all_initialises_everything_as_transformers_does():
    """The gist of transformers' common test_can_init_all_missing_weights: nothing in the checkpoint, nothing
    refused at load time, every parameter initialised (finite, and not all zeros where a rule draws it)."""
    model = SoftBioModel.from_pretrained(None, config=config(), state_dict={})
    assert sorted(model.untrained_heads) == sorted(model.config.tasks)  # and so the pipeline would refuse it
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
    assert all(head.classifier.weight.abs().sum() > 0 for head in model.heads.values())


@contextlib.contextmanager
def seeded_weight_init():
    """As transformers' tests do: the same seed before each module's initialisation, so that two ways of building
    the model must give bit-identical weights when every weight goes through `_init_weights`."""
    original = PreTrainedModel._initialize_weights

    def seeded(self, module, *args, **kwargs):
        set_seed(0)
        original(self, module, *args, **kwargs)

    PreTrainedModel._initialize_weights = seeded
    try:
        yield
    finally:
        PreTrainedModel._initialize_weights = original


@pytest.mark.parametrize(
    "overrides",
    [{}, {"pooling": "cls", "loss_weighting": "sum"}, {"head_hidden_size": 8}, {"projection_dim": None}],
    ids=["attention-uncertainty", "cls-sum", "mlp-heads", "no-projection"],
)
def test_can_init_all_missing_weights(overrides):
    """transformers' common test of that name, reproduced (its suite is not in the wheel): a model built by
    __init__ and one loaded from an empty state dict (built on the meta device, then initialised by
    `_init_weights` alone) hold the same weights, bit for bit. CLIP's q/k/v/out and fc1/fc2 used to differ."""
    with seeded_weight_init():
        from_init = SoftBioModel(config(**overrides))
        from_meta = SoftBioModel.from_pretrained(None, config=config(**overrides), state_dict={})
    assert not [k for k, v in [*from_meta.named_parameters(), *from_meta.named_buffers()] if v.device.type == "meta"]
    loaded = from_meta.state_dict()
    assert sorted(loaded) == sorted(from_init.state_dict())
    different = [k for k, v in from_init.state_dict().items() if not (v == loaded[k]).all()]
    assert different == []
