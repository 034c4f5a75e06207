"""A learnable multi-task face-like dataset in the bring-your-own folder format (metadata.csv), for training tests.

Background colour encodes gender, the colour of a centre square the age group (3 of the 9 bins) and the colour
of a square above it the emotion (3 of the 7). Emotion is labelled on a small share of rows and age is missing
on some, as in the study's mix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

GENDER_COLOURS = {"male": (210, 60, 50), "female": (50, 70, 210)}
AGE_COLOURS = {5: (40, 200, 40), 35: (230, 220, 30), 65: (200, 40, 200)}  # bins 3-9, 30-39, 60-69
EMOTION_COLOURS = {"surprise": (250, 250, 250), "happy": (15, 15, 15), "sad": (30, 220, 230)}


def synthetic_image(rng: np.random.Generator, gender: str, age: int, emotion: str, size: int = 48) -> Image.Image:
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = GENDER_COLOURS[gender]
    image[size // 3 : 3 * size // 4, size // 3 : 2 * size // 3] = AGE_COLOURS[age]
    image[size // 12 : size // 4, size // 3 : 2 * size // 3] = EMOTION_COLOURS[emotion]
    image += rng.normal(0, 12, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def make_synthetic_folder(
    root: Path, rows: int = 300, emotion_share: float = 0.2, age_missing: float = 0.3, seed: int = 0
) -> dict[str, list[int]]:
    """Write images and metadata.csv; return the true label ids per task (-100 where unlabelled) by row."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = ["file_name,age,gender,emotion,split"]
    for i in range(rows):
        gender = str(rng.choice(list(GENDER_COLOURS)))
        age = int(rng.choice(list(AGE_COLOURS)))
        emotion = str(rng.choice(list(EMOTION_COLOURS)))
        synthetic_image(rng, gender, age, emotion).save(root / f"{i:04d}.png")
        split = "train" if i < 0.7 * rows else "validation" if i < 0.85 * rows else "test"
        in_train = split == "train"  # evaluation rows carry every label
        age_cell = "" if in_train and rng.random() < age_missing else str(age)
        emotion_cell = emotion if not in_train or rng.random() < emotion_share else ""
        lines.append(f"{i:04d}.png,{age_cell},{gender},{emotion_cell},{split}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def run_settings(data, backbone, out, **extra) -> list[str]:
    """`--set` values for a short CPU training run of a tiny backbone on `data`; `extra` overrides any of them."""
    values = {
        "model.backbone": str(backbone),
        "data.train": f"[{data}]",
        "data.eval": f"[{data}]",
        "train.max_steps": 150,
        "train.batch_size": 32,
        "train.warmup_steps": 5,
        "train.mixed_precision": "no",
        "train.device": "cpu",
        "eval.every": 50,
        "checkpoint.every": 50,
        "data.num_workers": 0,
        "output_dir": str(out),
        **extra,
    }
    return [f"{key}={value}" for key, value in values.items()]


def prepared_synthetic(root: Path, rows: int = 120) -> Path:
    """The synthetic folder at `root/raw`, prepared at 32 px into `root/prepared` (what the training tests read)."""
    from train.data import prepare

    make_synthetic_folder(root / "raw", rows=rows)
    prepare("folder", root / "raw", root / "prepared", image_size=32)
    return root / "prepared"
