"""Trainable and total parameters per method on the study's architecture (ViT-L/14@336), as a Markdown table.

    python -m bench.parameters            # random weights on the meta device: no download, no memory

The numbers are the ones quoted in README.md.
"""

from __future__ import annotations

import argparse

ROWS = [
    ("ZS", "zs", {}, "cls"),
    ("LP", "lp", {}, "attention"),
    ("FT4", "ft", {"last_k": 4}, "attention"),
    ("LoRA r16", "lora", {"rank": 16}, "attention"),
    ("DoRA r16", "dora", {"rank": 16}, "attention"),
    ("MTLoRA 16/4", "mtlora", {"rank": 16, "task_rank": 4}, "attention"),
]


def report(config_kwargs: dict | None = None) -> list[dict]:
    import torch

    from softbio_hf import SoftBioConfig, SoftBioModel

    rows = []
    for title, method, options, pooling in ROWS:
        with torch.device("meta"):
            model = SoftBioModel(SoftBioConfig(pooling=pooling, **(config_kwargs or {})))
            model.apply_method(method, **options)
        parts = {row["part"]: row for row in model.parameter_report()}
        trainable_parts = {p: r["trainable"] for p, r in parts.items() if r["trainable"] and p != "total"}
        rows.append({"method": title, **parts["total"], "parts": trainable_parts})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| method | trainable | total | trainable % | trainable parts |", "|---|---:|---:|---:|---|"]
    for row in rows:
        parts = ", ".join(f"{part} {count:,}" for part, count in row["parts"].items()) or "none"
        share = 100 * row["trainable"] / row["total"]
        lines.append(f"| {row['method']} | {row['trainable']:,} | {row['total']:,} | {share:.2f} | {parts} |")
    return "\n".join(lines)


def main() -> None:
    argparse.ArgumentParser(
        prog="python -m bench.parameters", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    print(markdown(report()))


if __name__ == "__main__":
    main()
