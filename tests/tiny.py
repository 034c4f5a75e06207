"""Tiny random CLIP checkpoints and tokenizers built on the fly (no network, no downloads): softbio_hf.tiny's,
which `python -m softbio_hf.tiny OUT` also writes for people to try the demo offline."""

from __future__ import annotations

from softbio_hf.tiny import TINY_VISION, make_tiny_clip, write_char_tokenizer

__all__ = ["TINY_VISION", "make_tiny_clip", "one_prompt_each", "write_char_tokenizer"]


def one_prompt_each(tasks: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]:
    return {task: {label: [f"a photo of a {task} {label}."] for label in labels} for task, labels in tasks.items()}
