"""The demo's model: a softbio checkpoint, or the zero-shot model of a CLIP one built once and cached."""

from __future__ import annotations

import hashlib
import json
import logging
import os
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
    from huggingface_hub import hf_hub_download

    from softbio_hf.hub_access import hub_reachable

    path = Path(name) / "config.json"
    if path.is_file():
        return path
    if Path(name).exists():
        return None
    try:
        return Path(hf_hub_download(name, "config.json", local_files_only=not hub_reachable()))
    except Exception:  # not cached and unreachable, or no such repo
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

    return pipeline("soft-biometrics", model=model, dtype="auto", backend=backend)


def compile_for_serving(pipe) -> None:
    """Compile once at start-up, so no visitor waits for it; if it cannot (no C++ compiler, say), serve plain."""
    logger.info("compiling the model for this machine (once per start; --no-compile skips it)")
    try:
        logger.info("compiled in %.1f s", pipe.compile(batch_size=1))
    except Exception as error:
        logger.warning("could not compile the model (%s: %s); serving it uncompiled", type(error).__name__, error)
