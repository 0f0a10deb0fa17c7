"""Tiny ControlNets for the ControlNet tests, built once per session next to the shared tiny models.

``ControlNetModel.from_unet`` copies a tiny UNet's encoder. Its conditioning
embedding must downscale by the VAE's factor: the tiny VAE has 4 blocks (÷8),
so 4 channel entries (3 stride-2 steps) are used. A fresh ControlNet's output
convolutions are zero (that is the ControlNet recipe), which would make every
unit a no-op, so the tests give them random weights.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
CONDITIONING_CHANNELS = (8, 16, 16, 16)


def build_tiny_controlnet(unet_folder: Path, out: Path, seed: int = 0, scale: float = 0.5) -> Path:
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(unet_folder, local_files_only=True)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
    with torch.no_grad():
        for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                       controlnet.controlnet_cond_embedding.conv_out]:
            module.weight.normal_(0.0, scale)
            module.bias.normal_(0.0, scale)
    controlnet.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def controlnet_models_dir(tiny_models_dir, tmp_path_factory) -> Path:
    """A models folder holding only ControlNets: one per tiny family, and a single-file copy."""
    root = tmp_path_factory.mktemp("cn-models")
    controlnets = root / "ControlNet"
    checkpoints = tiny_models_dir / "Stable-diffusion"
    build_tiny_controlnet(checkpoints / "tiny-sd1" / "unet", controlnets / "tiny-cn-sd1", seed=0)
    build_tiny_controlnet(checkpoints / "tiny-sd1" / "unet", controlnets / "tiny-cn-sd1-b", seed=1)
    build_tiny_controlnet(checkpoints / "tiny-sdxl" / "unet", controlnets / "tiny-cn-sdxl", seed=2)
    single = controlnets / "tiny-cn-single.safetensors"
    shutil.copy(controlnets / "tiny-cn-sd1" / "diffusion_pytorch_model.safetensors", single)
    (controlnets / "tiny-cn-single.config").mkdir()
    shutil.copy(controlnets / "tiny-cn-sd1" / "config.json", controlnets / "tiny-cn-single.config" / "config.json")
    return root


@pytest.fixture(scope="session")
def cn_manager(controlnet_models_dir, tmp_path_factory):
    """The real extensions folder, with ControlNets from the test models folder."""
    from engine.extensions import ExtensionManager

    state = tmp_path_factory.mktemp("ext-state") / "extensions.json"
    manager = ExtensionManager(REPO / "extensions", state, models_dir=controlnet_models_dir, builtin_dir=None)
    assert "controlnet" in manager.loaded, manager.failed
    return manager


@pytest.fixture(scope="session")
def cn_engine(registry, cn_manager):
    from engine import Engine

    return Engine(registry, cn_manager)


@pytest.fixture(scope="session")
def cn(cn_manager):
    """The ControlNet extension's package, as the manager loaded it."""
    return cn_manager.module("controlnet")


def square_image(size: int = 64, box: tuple[int, int, int, int] = (16, 16, 48, 48)) -> Image.Image:
    """A white square on black."""
    image = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(image).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill="white")
    return image


def outline_image(size: int = 64, box: tuple[int, int, int, int] = (16, 16, 48, 48), width: int = 2) -> Image.Image:
    image = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(image).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline="white", width=width)
    return image


def pixels(result, index: int = 0) -> np.ndarray:
    return np.asarray(result.images[index].image, dtype=np.int16)
