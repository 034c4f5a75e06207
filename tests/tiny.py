"""Tiny random CLIP checkpoints and tokenizers built on the fly (no network, no downloads)."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}


def write_char_tokenizer(folder: Path) -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer: every distinct prompt gets distinct tokens."""
    symbols = string.ascii_lowercase + string.digits + string.punctuation
    vocab = {}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_tiny_clip(folder: Path, seed: int = 0, num_layers: int = 2) -> Path:
    """Save a random CLIP (hidden 32, image 32, patch 8), its tokenizer and image processor to `folder`."""
    folder = Path(folder)
    tokenizer = write_char_tokenizer(folder)
    torch.manual_seed(seed)
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = CLIPConfig(
        text_config=text, vision_config={**TINY_VISION, "num_hidden_layers": num_layers}, projection_dim=16
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def one_prompt_each(tasks: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]:
    return {task: {label: [f"a photo of a {task} {label}."] for label in labels} for task, labels in tasks.items()}
