"""A tiny random softbio model, built here with no download: try the pipeline, the batch command and the demo
offline, and run the tests on it.

    python -m softbio_hf.tiny tiny/       # tiny/clip: a random CLIP; tiny/softbio: its zero-shot softbio model
    python app.py --model tiny/softbio    # the demo, offline (its answers are random: the weights are)

Nothing here is trained: the answers are meaningless. It exercises every code path in seconds on any machine.
"""

from __future__ import annotations

import argparse
import string
import sys
from pathlib import Path

from . import safe_files

TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}


def write_char_tokenizer(folder: Path):
    """A character-level CLIP BPE tokenizer: every distinct prompt gets distinct tokens."""
    from transformers import CLIPTokenizer

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
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

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


def make_tiny_models(out: Path, seed: int = 0) -> None:
    """out/clip (a random CLIP) and out/softbio (its zero-shot softbio model), written whole or not at all."""
    from . import SoftBioModel, register

    register()  # so save_pretrained ships the code beside the weights (`python -m` imports the package unregistered)
    with safe_files.folder_written_whole(out) as staging:
        make_tiny_clip(staging / "clip", seed=seed)
        model = SoftBioModel.from_clip(staging / "clip")
        model.config.zero_shot_source = str(out / "clip")  # where it will be, not the staging folder
        model.config.random_weights = True  # record only: the demo's badge says so (its CLIP was never trained)
        model.save_pretrained(staging / "softbio")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m softbio_hf.tiny", description=__doc__.split("\n\n")[0])
    from .version import add_version_argument  # stdlib only: --version needs no torch

    add_version_argument(parser)
    parser.add_argument("out", metavar="OUT", help="a new or empty folder: OUT/clip and OUT/softbio are written")
    parser.add_argument("--seed", type=int, default=0, help="the random weights' seed (0)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    problem = safe_files.unwritable_reason(out / "x")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        problem = f"{out} exists and is not an empty folder (nothing there is replaced)"
    if problem:
        print(f"error: OUT {out} cannot be written: {problem}. Give a new or empty folder.", file=sys.stderr)
        return 2
    make_tiny_models(out, args.seed)
    print(
        f"{out}/softbio: a tiny random softbio model (answers are meaningless). Try it offline:\n"
        f"  python app.py --model {out}/softbio\n"
        f"  python -m softbio_hf.predict examples --model {out}/softbio --out faces.csv --detector haar"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
