"""Small trees in each benchmark's exact on-disk layout, with the known kinds of broken files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def face_like(seed: int, size: int = 40, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    array[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = rng.integers(0, 255, 3)
    return Image.fromarray(array).convert(mode)


def write_jpeg(path: Path, seed: int, size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    face_like(seed, size).save(path, format="JPEG")


def write_truncated_jpeg(path: Path, seed: int) -> None:
    buffer = io.BytesIO()
    face_like(seed, 64).save(buffer, format="JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[:300])


UTK_GOOD = [  # (age, gender, race)
    (1, 0, 0),
    (5, 1, 1),
    (15, 0, 2),
    (25, 1, 3),
    (25, 0, 4),
    (35, 1, 0),
    (45, 0, 1),
    (55, 1, 2),
    (65, 0, 3),
    (72, 1, 4),
    (90, 0, 0),
    (2, 1, 1),
    (30, 0, 2),
    (29, 1, 3),
    (40, 0, 0),
    (60, 1, 1),
]
UTK_MALFORMED = [
    "39_1_20170116174525125.jpg.chip.jpg",  # missing race field (three such files in the archive)
    "61_1_20170109150557335.jpg.chip.jpg",
    "24_0_1_20170116220224657 .jpg.chip.jpg",  # stray space before .jpg
    "55_0_0_20170116232725357jpg.chip.jpg",  # missing dot before jpg
]


def make_utkface(root: Path) -> dict:
    for i, (age, gender, race) in enumerate(UTK_GOOD):
        write_jpeg(root / f"{age}_{gender}_{race}_2017011617452{i:04d}.jpg.chip.jpg", i)
    for j, name in enumerate(UTK_MALFORMED):
        write_jpeg(root / name, 100 + j)
    write_truncated_jpeg(root / "33_1_0_20170116174525999.jpg.chip.jpg", 200)
    (root / "44_0_1_20170116174525998.jpg.chip.jpg").write_bytes(b"")  # zero-byte file
    face_like(201, mode="L").save(root / "50_1_2_20170116174525997.jpg.chip.jpg", format="JPEG")  # grayscale
    return {"good": len(UTK_GOOD) + 1, "malformed": len(UTK_MALFORMED), "unreadable": 1, "empty": 1}


FAIRFACE_TRAIN = [
    ("train/1.jpg", "50-59", "Male", "East Asian"),
    ("train/2.jpg", "more than 70", "Female", "White"),
    ("train/3.jpg", "0-2", "Female", "Black"),
    ("train/4.jpg", "20-29", "Male", "Indian"),
    ("train/5.jpg", "fifty", "Male", "White"),  # unknown age string
    ("train/6.jpg", "30-39", "Female", "Latino_Hispanic"),
    ("train/11.jpg", "40-49", "Female", "Black"),  # 11 and 13 fall in the validation tenth of the name hash
    ("train/13.jpg", "60-69", "Male", "Indian"),
]
FAIRFACE_VAL = [("val/1.jpg", "3-9", "Male", "Southeast Asian"), ("val/2.jpg", "10-19", "Female", "Middle Eastern")]


def make_fairface(root: Path, margin_folder: str | None = "fairface-img-margin025-trainval") -> dict:
    images = root / margin_folder if margin_folder else root
    for name, rows in (("fairface_label_train.csv", FAIRFACE_TRAIN), ("fairface_label_val.csv", FAIRFACE_VAL)):
        lines = ["file,age,gender,race,service_test"] + [f"{f},{a},{g},{r},True" for f, a, g, r in rows]
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("\n".join(lines) + "\n")
        for i, (file, *_rest) in enumerate(rows):
            write_jpeg(images / file, 300 + i + (10 if "val" in name else 0), size=48)
    Image.new("RGBA", (48, 48), (10, 200, 30, 0)).save(images / "train" / "6.jpg", format="PNG")  # PNG w/ alpha
    # The official val rows are the test split (papers report on them); validation is carved from train.
    return {"train": 5, "validation": 2, "test": 2, "bad label": 1}


RAF_LINES = [
    ("train_00001.jpg", 1),
    ("train_00002.jpg", 4),
    ("train_00003.jpg", 4),
    ("train_00004.jpg", 7),
    ("train_00005.jpg", 6),
    ("train_00006.jpg", 2),
    ("test_0001.jpg", 3),
    ("test_0002.jpg", 5),
]


def make_rafdb(root: Path) -> dict:
    lines = [f"{name} {label}" for name, label in RAF_LINES] + ["train_00099.jpg 4"]  # its file is missing
    (root / "EmoLabel").mkdir(parents=True)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    for i, (name, _) in enumerate(RAF_LINES):
        write_jpeg(root / "Image" / "aligned" / name.replace(".jpg", "_aligned.jpg"), 400 + i, size=100)
    return {"train": 6, "test": 2, "missing image": 1}


def make_vggface2(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "identity_meta.csv").write_text(
        "Class_ID, Name, Sample_Num, Flag, Gender\n"
        'n000001, "Aaron_Tveit", 250, 0, m\n'
        'n000002, "Ada_Lovelace", 300, 1, f\n'
        'n000003, "Alan_Turing", 120, 0, m\n'  # an identity in the validation tenth of the hash
    )
    for split, cls, n in (
        ("train", "n000001", 3),
        ("train", "n000002", 2),
        ("train", "n000003", 1),
        ("test", "n000002", 1),
    ):
        for i in range(n):
            write_jpeg(root / split / cls / f"{i:04d}_01.jpg", 500 + i + n)
    ages = root / "ages.csv"
    ages.write_text("file,age\nn000001/0000_01.jpg,34.2\nn000002/0001_01.jpg,71\nn000001/0001_01.jpg,abc\n")
    return ages


def make_folder(root: Path) -> None:
    root.mkdir(parents=True)
    write_jpeg(root / "a.jpg", 600)
    face_like(601, mode="RGBA").save(root / "b.png")
    face_like(602, mode="L").save(root / "c.png")
    write_jpeg(root / "d.jpg", 603)
    (root / "metadata.csv").write_text(
        "file_name,age,gender,emotion,split\n"
        "a.jpg,27,female,happy,train\n"
        "b.png,0-2,,,train\n"
        "c.png,,male,angry,test\n"
        "d.jpg,,robot,,train\n"
    )
