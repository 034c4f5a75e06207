"""Trainable and total parameters per method on the study's architecture (ViT-L/14@336), as a Markdown table.

    python -m bench.parameters            # random weights on the meta device: no download, no memory

The numbers are the ones quoted in docs/pipeline.md.
"""

from __future__ import annotations

import argparse

# The study's rows, each as its config in train/configs says (the config is the single source of truth).
ROWS = [("ZS", "zs"), ("LP", "lp"), ("FT4", "ft4"), ("LoRA", "lora"), ("DoRA", "dora"), ("MTLoRA", "mtlora")]


def report(config_kwargs: dict | None = None) -> list[dict]:
    import torch

    from softbio_hf import SoftBioConfig, SoftBioModel
    from train.build import apply_configured_method
    from train.config import load_config

    rows = []
    for title, name in ROWS:
        config = load_config(name)
        model_options = {k: config["model"][k] for k in ("pooling_heads", "pooling_mlp_ratio", "normalize_features")}
        with torch.device("meta"):
            model = SoftBioModel(SoftBioConfig(pooling="cls", **model_options, **(config_kwargs or {})))
            apply_configured_method(model, config)
        parts = {row["part"]: row for row in model.parameter_report()}
        trainable_parts = {p: r["trainable"] for p, r in parts.items() if r["trainable"] and p != "total"}
        method = config["method"]
        settings = f"r{method['rank']}" if method["name"] in ("lora", "dora") else ""
        if method["name"] == "mtlora":
            settings = f"{method['rank']}/{method['task_rank']}"
        heads = config["model"]["head_hidden_size"]
        settings += (", " if settings else "") + (f"MLP heads {heads}" if heads else "linear heads")
        rows.append({"method": f"{title} ({settings})", **parts["total"], "parts": trainable_parts})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| method | trainable | total | trainable % | trainable parts |", "|---|---:|---:|---:|---|"]
    for row in rows:
        parts = ", ".join(f"{part} {count:,}" for part, count in row["parts"].items()) or "none"
        share = 100 * row["trainable"] / row["total"]
        lines.append(f"| {row['method']} | {row['trainable']:,} | {row['total']:,} | {share:.2f} | {parts} |")
    return "\n".join(lines)


def main() -> None:
    from softbio_hf.version import add_version_argument  # stdlib only: --version needs no torch

    add_version_argument(
        argparse.ArgumentParser(
            prog="python -m bench.parameters", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    ).parse_args()
    print(markdown(report()))


if __name__ == "__main__":
    main()
