"""apply_method / optimizer_groups / merge_adapters for every row of the study, on a tiny random backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from remote import run_without_softbio
from safetensors import safe_open
from tiny import TINY_VISION

from softbio_hf import SoftBioConfig, SoftBioModel
from softbio_hf.mtlora import MTLoRALinear, task_block_indices

REPO = Path(__file__).resolve().parents[1]
ADAPTER_METHODS = ["lora", "dora", "loraplus", "mtlora"]
ALL_METHODS = ["zs", "lp", "ft", *ADAPTER_METHODS]


def fresh(layers: int = 4, **config) -> SoftBioModel:
    torch.manual_seed(0)
    vision = {"model_type": "clip_vision_model", **TINY_VISION, "num_hidden_layers": layers}
    return SoftBioModel(SoftBioConfig(vision_config=vision, projection_dim=16, **config))


def batch(seed: int = 0, size: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 3, 32, 32, generator=g)
    labels = {
        "age": torch.randint(0, 9, (size,), generator=g),
        "gender": torch.randint(0, 2, (size,), generator=g),
        "emotion": torch.randint(0, 7, (size,), generator=g),
    }
    return x, labels


def perturb_low_rank(model: SoftBioModel) -> None:
    """B matrices start at zero; make them non-zero so merging and gradients have something to show."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or ".shared_B" in name or ".task_B." in name:
                param.normal_(0, 0.3)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def expected_trainable(method: str, name: str) -> bool:
    if method == "zs":
        return False
    if name.startswith(("pooling.", "heads.")):
        return True
    if method == "lp":
        return False
    if method == "ft":  # last 4 of 4 blocks here: every block, the final norm and the projection
        return name.startswith(("backbone.encoder.layers.", "backbone.post_layernorm", "visual_projection"))
    return any(marker in name for marker in ("lora_", ".shared_A", ".shared_B", ".task_A.", ".task_B."))


@pytest.mark.parametrize("method", ALL_METHODS)
def test_training_changes_exactly_the_intended_parameters(method):
    model = fresh().apply_method(method, rank=4)  # "ft": the default last 4 blocks, all 4 of them here
    groups = model.optimizer_groups(lr=1e-2, weight_decay=0.0)
    if method == "zs":
        assert groups == []
        return
    before = snapshot(model)
    optimizer = torch.optim.AdamW(groups)
    model.train()
    for step in range(3):
        x, labels = batch(step)
        loss = model(x, **labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    intended = {n for n in before if expected_trainable(method, n)}
    assert changed == intended, (sorted(changed - intended)[:5], sorted(intended - changed)[:5])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == intended


def test_ft_default_is_the_last_four_blocks():
    model = fresh(layers=6).apply_method("ft")
    assert model.config.trainable_blocks == 4 and model.config.adapter == {"method": "ft", "last_k": 4}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("backbone.encoder.layers.2.") for n in trainable)
    assert not any(n.startswith("backbone.encoder.layers.1.") for n in trainable)


def test_mtlora_task_pairs_get_gradient_only_from_their_own_task():
    model = fresh().apply_method("mtlora", rank=4, task_rank=2)
    perturb_low_rank(model)
    x, labels = batch()
    model(x, emotion=labels["emotion"]).loss.backward()
    task_layers = [m for m in model.modules() if isinstance(m, MTLoRALinear)]
    assert len(task_layers) == 3 * len(task_block_indices(4))
    for layer in task_layers:
        for task in ("emotion",):
            assert layer.task_A[task].grad.abs().sum() > 0 and layer.task_B[task].grad.abs().sum() > 0
        for task in ("age", "gender"):
            for grad in (layer.task_A[task].grad, layer.task_B[task].grad):
                assert grad is None or grad.abs().sum() == 0
        assert layer.task_A["emotion"].shape == (2, layer.in_features)


def test_mtlora_runs_the_backbone_once_and_pools_per_task():
    model = fresh(layers=8).apply_method("mtlora", rank=4).eval()
    calls = []
    handle = model.backbone.embeddings.register_forward_hook(lambda *a: calls.append(1))
    tokens, _ = model.encode(batch()[0])
    handle.remove()
    assert calls == [1]
    assert set(tokens) == {"age", "gender", "emotion"}
    assert tokens["age"].shape == (6, 4 * 17, 32)  # 4 stage streams of 16 patches + CLS
    assert task_block_indices(24) == [5, 11, 17, 23]


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_merged_and_unmerged_logits_agree(method):
    model = fresh().apply_method(method, rank=4)
    perturb_low_rank(model)
    model.eval()
    x, _ = batch(3)
    with torch.no_grad():
        before = model(x).logits
        merged = model.merge_adapters()
        after = merged(x).logits
    assert merged.config.adapter["merged"] is True
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert not any(type(m).__module__.startswith("peft") for m in merged.modules())
    for task in before:
        assert (before[task] - after[task]).abs().max() < 1e-4, task
        assert before[task].std() > 0


@pytest.mark.parametrize("method", ALL_METHODS)
def test_save_and_load_round_trip(method, tmp_path):
    model = fresh().apply_method(method, rank=4)
    perturb_low_rank(model)
    model.eval()
    x, _ = batch(4)
    model.save_pretrained(tmp_path / "unmerged")
    loaded = SoftBioModel.from_pretrained(tmp_path / "unmerged", dtype=torch.float32).eval()
    assert loaded.config.adapter == model.config.adapter
    with torch.no_grad():
        reference = model(x).logits
        for task, value in loaded(x).logits.items():
            assert (value - reference[task]).abs().max() < 1e-5
        model.merge_adapters().save_pretrained(tmp_path / "merged")
        merged = SoftBioModel.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        for task, value in merged(x).logits.items():
            assert (value - reference[task]).abs().max() < 1e-4
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as weights:
        assert not [k for k in weights.keys() if "lora_" in k]  # noqa: SIM118 (safe_open is not a dict)


@pytest.mark.parametrize("method", ["dora", "mtlora"])
def test_merged_checkpoint_runs_without_peft_or_softbio(method, tmp_path):
    model = fresh().apply_method(method, rank=4)
    perturb_low_rank(model)
    model.eval().merge_adapters().save_pretrained(tmp_path / "ckpt")
    x, _ = batch(5)
    remote = run_without_softbio(tmp_path, tmp_path / "ckpt", x)
    with torch.no_grad():
        local = model(x).logits
    for task in local:
        assert (remote[task] - local[task]).abs().max() < 1e-5


def test_lora_on_the_last_k_blocks_only():
    model = fresh().apply_method("lora", rank=4, last_k=1, target_modules=["q_proj", "v_proj"])
    adapted = {n.split(".lora_")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"backbone.encoder.layers.3.self_attn.q_proj", "backbone.encoder.layers.3.self_attn.v_proj"}
    assert model.config.adapter["target_modules"] == ["q_proj", "v_proj"]


def test_loraplus_groups_and_no_decay():
    model = fresh(loss_weighting="uncertainty").apply_method("loraplus", rank=4, loraplus_ratio=8)
    groups = {g["name"]: g for g in model.optimizer_groups(lr=1e-4, weight_decay=0.05, head_lr=1e-3)}
    assert groups["adapter_B"]["lr"] == pytest.approx(8e-4) and groups["adapter"]["lr"] == pytest.approx(1e-4)
    assert groups["head"]["lr"] == pytest.approx(1e-3) and groups["head"]["weight_decay"] == 0.05
    assert groups["head_no_decay"]["weight_decay"] == 0.0
    assert groups["loss_weights_no_decay"]["weight_decay"] == 0.0
    probes = {id(p) for p in model.pooling.probes.values()}
    assert all(p.ndim < 2 or id(p) in probes for p in groups["head_no_decay"]["params"])
    assert probes <= {id(p) for p in groups["head_no_decay"]["params"]}
    grouped = sum(len(g["params"]) for g in groups.values())
    assert grouped == sum(1 for p in model.parameters() if p.requires_grad)
    plain = fresh().apply_method("lora", rank=4)
    plain_groups = {g["name"]: g for g in plain.optimizer_groups(lr=1e-4)}
    assert plain_groups["adapter_B"]["lr"] == pytest.approx(1e-4)  # plain LoRA: no ratio


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "lora", "target_modules": ["qkv"]}, r"\['qkv'\] match no linear layer.*'fc1'.*'q_proj'"),
        ({"method": "lora", "rank": 0}, "rank must be > 0"),
        ({"method": "dora", "alpha": -1}, "alpha must be > 0"),
        ({"method": "mtlora", "task_rank": {"race": 2}}, r"task_rank names unknown task\(s\) \['race'\]"),
        ({"method": "mtlora", "task_rank": 0}, "task_rank must be > 0"),
        ({"method": "lora", "last_k": 9}, "last_k=9"),
        ({"method": "prefix"}, "Unknown method 'prefix'"),
    ],
)
def test_bad_adapter_settings_name_the_setting(kwargs, message):
    model = fresh()
    with pytest.raises(ValueError, match=message):
        model.apply_method(**kwargs)
    assert model.config.adapter is None  # nothing half-applied


def test_applying_adapters_twice_is_refused():
    model = fresh().apply_method("lora", rank=4)
    with pytest.raises(ValueError, match="already carries 'lora' adapters"):
        model.apply_method("dora")


def test_readme_parameter_table_matches_the_architecture():
    from bench.parameters import markdown, report

    table = markdown(report())
    assert table in (REPO / "docs" / "pipeline.md").read_text(), "docs/pipeline.md's table is stale: bench.parameters"
    rows = {row["method"].split()[0]: row for row in report()}
    assert rows["ZS"]["trainable"] == 0 and 303_000_000 < rows["ZS"]["total"] < 306_000_000
    assert rows["LoRA"]["parts"]["adapters"] == 24 * 16 * (4 * 2 * 1024 + 2 * (1024 + 4096))


def test_loraplus_ratio_is_refused_for_other_methods():
    model = fresh().apply_method("lora", rank=4)
    with pytest.raises(ValueError, match=r"loraplus_ratio applies to LoRA\+ only.*'lora'"):
        model.optimizer_groups(lr=1e-4, loraplus_ratio=16)


def test_failed_methods_leave_the_model_and_its_config_as_they_were():
    model = fresh(layers=2, pooling="cls")
    before = model.config.to_dict()
    with pytest.raises(ValueError, match="trainable_blocks=4"):
        model.apply_trainable_blocks(4)  # this backbone has 2 blocks
    with pytest.raises(ValueError, match="rank must be > 0"):
        model.apply_method("lora", rank=0)
    with pytest.raises(ValueError, match="trainable_blocks=3"):
        model.apply_method("ft", last_k=3)
    assert model.config.to_dict() == before and model.pooling is None  # pooling not switched half-way
