from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from tiny import TINY_VISION, make_tiny_clip

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture
def tiny_config():
    from softbio_hf import SoftBioConfig

    return SoftBioConfig(vision_config={"model_type": "clip_vision_model", **TINY_VISION}, projection_dim=16)


@pytest.fixture
def tiny_model(tiny_config):
    import torch

    from softbio_hf import SoftBioModel

    torch.manual_seed(0)
    return SoftBioModel(tiny_config).eval()
