"""Where one transformer block's time goes: each of its matmuls and its attention, timed alone at the model's
shapes, with their FLOP rates against the square-matmul peak. Explains the gap between bench.speed's rows and
the limit (on a CPU, attention runs far below the matmul rate).

    python -m bench.layers                    # ViT-L/14@336 shapes, bf16 where native; CPU: about 20 s
    python -m bench.layers --dtype float32 --batch-size 4
"""

from __future__ import annotations

import argparse
import sys
import time


def best_seconds(fn, repeats: int = 10, trials: int = 3) -> float:
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def block_parts(config, batch: int) -> list[tuple[str, tuple[int, int, int], int]]:
    """(name, (rows, inner, outer) of a matmul or (batch*heads, tokens, head_dim) of attention, count per block)."""
    vision = config.vision_config
    tokens = (config.image_size // vision.patch_size) ** 2 + 1
    width, mlp, heads = vision.hidden_size, vision.intermediate_size, vision.num_attention_heads
    rows = batch * tokens
    return [
        ("q, k, v, out projections", (rows, width, width), 4),
        ("MLP up", (rows, width, mlp), 1),
        ("MLP down", (rows, mlp, width), 1),
        ("attention (SDPA)", (batch * heads, tokens, width // heads), 1),
    ]


def run(dtype_name: str = "auto", batch: int = 1) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from bench.speed import matmul_peak, resolve_fast_dtype
    from softbio_hf import SoftBioConfig

    device = torch.device("cpu")
    dtype = resolve_fast_dtype(dtype_name, device)
    peak = matmul_peak(dtype, device)
    rows = []
    with torch.inference_mode():
        for name, (a, b, c), count in block_parts(SoftBioConfig(), batch):
            if name.startswith("attention"):
                q = torch.randn(1, a, b, c, dtype=dtype)
                seconds = best_seconds(lambda q=q: F.scaled_dot_product_attention(q, q, q))
                flops = 4 * a * b * b * c
            else:
                x, w = torch.randn(a, b, dtype=dtype), torch.randn(c, b, dtype=dtype)
                seconds = best_seconds(lambda x=x, w=w: F.linear(x, w))
                flops = 2 * a * b * c
            rows.append(
                {
                    "part": name,
                    "ms_per_block": 1e3 * seconds * count,
                    "gflop_per_s": flops / seconds / 1e9,
                    "share_of_peak": flops / seconds / peak,
                }
            )
    total = sum(row["ms_per_block"] for row in rows)
    for row in rows:
        row["share_of_block_time"] = row["ms_per_block"] / total
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.layers", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from softbio_hf.version import add_version_argument  # stdlib only: --version needs no torch

    add_version_argument(parser)
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where native), bfloat16 or float32")
    parser.add_argument("--batch-size", type=int, default=1, help="images per pass (default 1)")
    args = parser.parse_args(argv)
    rows = run(args.dtype, args.batch_size)
    print("| part of one block | ms per block | GFLOP/s | share of matmul peak | share of block time |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['part']} | {row['ms_per_block']:.2f} | {row['gflop_per_s']:,.0f} | {row['share_of_peak']:.0%} | "
            f"{row['share_of_block_time']:.0%} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
