"""The demo's model: a softbio checkpoint, or the zero-shot model of a CLIP one built once and cached."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("softbio.app")
DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"


class ModelUnavailable(RuntimeError):
    """The model could not be loaded or built; the message says what to pass instead."""


def cache_root() -> Path:
    return Path(os.environ.get("SOFTBIO_CACHE", Path.home() / ".cache" / "softbio"))


def zero_shot_cache_dir(clip: str, config_path: Path) -> Path:
    """The cache folder of the zero-shot model of this CLIP checkpoint as it is now: a folder is known by its
    resolved path and its files (name, size, modification time: re-saved in place, it is another model), a Hub
    checkpoint by its id and the commit its config came from (snapshots/<commit>/config.json)."""
    folder = Path(clip)
    if folder.is_dir():
        files = sorted(p for p in folder.resolve().iterdir() if p.is_file())
        parts = [str(folder.resolve()), *(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)]
    else:
        parts = [clip, config_path.parent.name]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return cache_root() / f"zero-shot--{folder.name or clip.replace('/', '--')}--{digest}"


def checkpoint_config(name: str) -> Path | None:
    """config.json of a local folder or Hub repo: the cached copy first, the Hub only if it answers."""
    return checkpoint_file(name, "config.json")


def checkpoint_file(name: str, filename: str) -> Path | None:
    """A file of a local folder or Hub repo (None where it has none): the cached copy first, the Hub only if it
    answers."""
    from huggingface_hub import hf_hub_download

    from softbio_hf.hub_access import hub_reachable

    path = Path(name) / filename
    if path.is_file():
        return path
    if Path(name).exists():
        return None
    try:
        return Path(hf_hub_download(name, filename, local_files_only=not hub_reachable()))
    except Exception:  # not cached and unreachable, or no such repo or file
        return None


def checkpoint_type(config_path: Path | None) -> str | None:
    try:
        return json.loads(config_path.read_text()).get("model_type") if config_path else None
    except (OSError, ValueError):
        return None


def load_model(name: str | None):
    """A SoftBioModel and a description of it: a softbio checkpoint, or the zero-shot model of a CLIP one."""
    from softbio_hf import SoftBioModel
    from softbio_hf.hub_access import hub_repo_id

    name = name or DEFAULT_CLIP
    if not Path(name).exists() and hub_repo_id(name) is None:  # meant as a folder, and not there
        raise ModelUnavailable(
            f"--model {name}: no such folder. Pass a folder written by save_pretrained or python -m train.train "
            "(its best/ folder), a CLIP folder, or a Hub repo id."
        )
    config_path = checkpoint_config(name)
    kind = checkpoint_type(config_path)
    if kind == "clip" or (name == DEFAULT_CLIP and kind is None):
        return zero_shot(name, config_path)
    if kind != "softbio":
        found = f"a {kind!r} checkpoint" if kind else "no readable config.json (not cached, or the Hub is out of reach)"
        raise ModelUnavailable(
            f"--model {name}: {found}. Pass a softbio checkpoint (a folder written by save_pretrained or "
            "python -m train.train, or its Hub id) or a CLIP checkpoint, which becomes the zero-shot model."
        )
    from softbio_hf.modeling_softbio import refuse_untrained_heads

    try:
        model = SoftBioModel.from_pretrained(name)
    except Exception as error:  # a broken checkpoint fails in many ways; each is reported, none as a traceback
        raise ModelUnavailable(
            f"Could not load the softbio checkpoint {name!r}: {type(error).__name__}: {str(error)[:500]}\n"
            "Pass --model with a folder written by save_pretrained or a Hub repo id of a softbio model."
        ) from error
    try:
        refuse_untrained_heads(model)
    except ValueError as error:
        raise ModelUnavailable(str(error)) from None
    return model, name


def zero_shot(clip: str, config_path: Path | None):
    """The zero-shot model of a CLIP checkpoint (folder or Hub id), built once and cached under SOFTBIO_CACHE."""
    from softbio_hf import SoftBioModel

    if config_path is None:  # a Hub id whose config is neither cached nor reachable
        raise ModelUnavailable(
            f"The zero-shot model is built from {clip} on the Hugging Face Hub, which is out of reach, and it is not "
            f"cached yet.\nConnect once to build and cache it, or pass a model you have on disk: "
            "python app.py --model DIR (a softbio checkpoint, or a CLIP folder such as a saved "
            "openai/clip-vit-large-patch14-336), or set SOFTBIO_MODEL."
        )
    cached = zero_shot_cache_dir(clip, config_path)
    if (cached / "config.json").is_file():
        return SoftBioModel.from_pretrained(cached), f"zero-shot {clip} (cached at {cached})"
    try:
        model = SoftBioModel.from_clip(clip)
    except OSError as error:
        raise ModelUnavailable(f"Could not build the zero-shot model from {clip}: {error}") from error
    model.save_pretrained(cached)  # later starts load only the vision tower from here
    return model, f"zero-shot {clip}"


def build_pipeline(model, backend: str = "torch"):
    from transformers import pipeline

    import softbio_hf

    softbio_hf.register()  # the "soft-biometrics" task (app.py defers it at import; idempotent)
    return pipeline("soft-biometrics", model=model, dtype="auto", backend=backend)


# torch.compile makes a forward pass 6-18% faster on a 2-core CPU (bench.speed, ViT-L/14@336: about 175 billion
# multiply-adds a face) for about 20 s at every start (2 min on a loaded machine, whatever the model's size). Below
# this much work a face, the milliseconds it would save a visitor never repay that wait: a tiny model (a million
# multiply-adds) starts in seconds instead. Judged by the model's size, not by a timed trial: a trial on a loaded
# machine measures the load (a 32-pixel model took 0.7 s a face while the tests ran beside it).
COMPILE_PAYS_FROM_GMACS = 1.0


def giga_macs_per_face(model) -> float:
    """The backbone's multiply-adds for one face crop, in billions: every token passes through every weight once
    (attention's token-by-token products, a small share, left out)."""
    vision = model.config.vision_config
    patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
    tokens = (model.config.image_size // patch) ** 2 + 1
    return sum(parameter.numel() for parameter in model.backbone.parameters()) * tokens / 1e9


def compile_for_serving(pipe, wanted: bool | None = None) -> bool:
    """
    Compile once at start-up, so no visitor waits for it, where it pays: `wanted` True or False decides (--compile,
    --no-compile); None compiles only a model large enough to gain from it (COMPILE_PAYS_FROM_GMACS). Said in the
    log either way. If it cannot compile (no C++ compiler, say), it serves uncompiled.
    """
    if wanted is False:
        logger.info("not compiling the model (--no-compile)")
        return False
    if wanted is None:
        work = giga_macs_per_face(pipe.model)
        if work < COMPILE_PAYS_FROM_GMACS:
            logger.info(
                "not compiling the model: a face is %.3g billion multiply-adds, under the %g from which compiling "
                "(about 20 s at each start) pays; --compile compiles anyway",
                work,
                COMPILE_PAYS_FROM_GMACS,
            )
            return False
        logger.info(
            "compiling the model: a face is %.0f billion multiply-adds, so it pays (--no-compile skips it)", work
        )
    else:
        logger.info("compiling the model for this machine (--compile; once per start)")
    try:
        logger.info("compiled in %.1f s", pipe.compile(batch_size=1))
        return True
    except Exception as error:
        logger.warning("could not compile the model (%s: %s); serving it uncompiled", type(error).__name__, error)
        return False


# ------------------------------------------------------------------------------------------ what it is
TRAINED_METHODS = {"lp": "linear probe", "ft": "fine-tuned", "lora": "LoRA", "dora": "DoRA", "loraplus": "LoRA+"}
TRAINED_METHODS["mtlora"] = "MTLoRA"


@dataclass(frozen=True)
class ModelKind:
    """What the page says of the model in use: trained (by which method, with its evaluation), zero-shot, or random."""

    kind: str  # "trained", "zero-shot" or "random"
    headline: str
    detail: str


def describe_model(model, name: str) -> ModelKind:
    """Trained, zero-shot or untrained random weights, from what the checkpoint records (config.adapter, written by
    training; zero_shot_source, by SoftBioModel.from_clip; random_weights, by python -m softbio_hf.tiny)."""
    config = model.config
    method = (config.adapter or {}).get("method")
    if getattr(config, "random_weights", False) or not (method or config.zero_shot_source):
        return ModelKind(
            "random",
            "untrained random weights",
            "Nothing trained these weights: the answers are meaningless (a model for trying the demo out).",
        )
    if method and method != "zs":
        return ModelKind("trained", f"trained ({TRAINED_METHODS.get(method, method)})", evaluation_of(name))
    return ModelKind(
        "zero-shot",
        "zero-shot",
        f"Heads built from CLIP text prompts of {config.zero_shot_source}: no face data trained it.",
    )


def evaluation_of(name: str) -> str:
    """The evaluation its model card states (eval/results.json beside it, else the card's model-index)."""
    results = checkpoint_file(name, "eval/results.json")
    try:
        data = json.loads(results.read_text()) if results else {}
        summary = data.get("summary") or {}
    except (OSError, ValueError, AttributeError):
        summary = {}
    shown = [f"{task} {summary[task]:.1f}%" for task in ("age", "gender", "emotion", "overall") if task in summary]
    if shown:
        return f"Accuracy on its {data.get('split', 'test')} split (from its model card): {', '.join(shown)}."
    card_results = card_evaluation(checkpoint_file(name, "README.md"))
    if card_results:
        return f"From its model card: {card_results}."
    return "Not evaluated: its model card states no evaluation (python -m train.evaluate measures it)."


def card_evaluation(card_path: Path | None, most: int = 4) -> str | None:
    """The first results of a model card's model-index, as "metric on dataset: value"."""
    if card_path is None:
        return None
    from huggingface_hub import ModelCard

    try:
        results = ModelCard.load(card_path).data.eval_results or []
    except Exception:  # a card that does not parse states nothing we can show
        return None
    shown = [f"{r.metric_name or r.metric_type} on {r.dataset_name}: {r.metric_value}" for r in results[:most]]
    return "; ".join(shown) or None
