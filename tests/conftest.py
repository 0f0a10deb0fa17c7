"""Shared fixtures: tiny random-weight models built once per test session, offline."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

DEMO_MODEL = Path(__file__).resolve().parent.parent / "builtin" / "sfumato-demo"


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    """An A1111-style models folder with tiny SD1, SD1-inpainting and SDXL diffusers folders."""
    from engine.tiny_models import build_sd1, build_sdxl

    root = tmp_path_factory.mktemp("models")
    checkpoints = root / "Stable-diffusion"
    build_sd1(checkpoints / "tiny-sd1", seed=0)
    build_sd1(checkpoints / "tiny-sd1-inpainting", seed=1, in_channels=9)
    build_sdxl(checkpoints / "tiny-sdxl", seed=2)
    return root


@pytest.fixture(scope="session")
def registry(tiny_models_dir):
    from engine import ModelRegistry

    return ModelRegistry(tiny_models_dir, builtin_dir=None, cache_size=4)


@pytest.fixture(scope="session")
def engine(registry):
    from engine import Engine

    return Engine(registry)


@pytest.fixture(scope="session")
def demo_engine():
    """The engine on the shipped demo model; skips where the model has not been trained yet."""
    from engine import Engine, ModelRegistry

    if not (DEMO_MODEL / "model_index.json").is_file():
        pytest.skip("builtin/sfumato-demo is not present")
    return Engine(ModelRegistry(None, builtin_dir=DEMO_MODEL.parent))
