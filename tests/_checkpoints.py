"""Tiny models in the shapes tests need: A1111-style single files, variant architectures, pickles.

Single files are written by ``engine.checkpoint_convert`` (our own inverse of
diffusers' single-file key mapping) from a tiny diffusers folder; the folder's
own configs go beside the file as ``<name>.config/``, since the tiny
architecture is not SD 1.5's.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from engine.checkpoint_convert import save_single_file
from training.sd3_single_file import copy_configs


def write_single_file(folder: Path, checkpoint: Path, with_config: bool = True) -> Path:
    """``checkpoint`` (a ``.safetensors`` path) in the original layout, plus ``<name>.config/`` from ``folder``."""
    save_single_file(folder, checkpoint)
    if with_config:
        copy_configs(folder, checkpoint.with_suffix(".config"))
    return checkpoint


def build_sdxl_two_widths(folder: Path, seed: int = 0) -> Path:
    """A tiny SDXL whose two text encoders differ in width (32 and 48).

    diffusers tells SDXL's two encoders apart in a single file by width; the
    standard tiny SDXL gives both width 32, so its single file would load the
    first encoder twice.
    """
    from engine.tiny_models import build_sdxl

    return build_sdxl(folder, seed=seed, text_encoder_2_width=48)


def build_sd2_like(folder: Path, seed: int = 0) -> Path:
    """A tiny SD 2.x-shaped model: cross-attention width 1024 (SD 2's OpenCLIP-H text width)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from engine.tiny_models import _scheduler, _vae, build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(Path(folder) / "_tokenizer_build")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=1024))
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=1024, attention_head_dim=4, norm_num_groups=8, use_linear_projection=True,
    )
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(Path(folder) / "_tokenizer_build", ignore_errors=True)
    return Path(folder)


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))


def copy_model(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


class WritesAFile:
    """An object whose unpickling creates ``path``: what a malicious checkpoint does, harmlessly."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_malicious_pickle(path: Path, sentinel: Path) -> Path:
    """A pickle (torch.save format) that writes ``sentinel`` when unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"model.diffusion_model.x": WritesAFile(sentinel)}}, path)
    if sentinel.exists():  # torch.save must not have triggered it
        sentinel.unlink()
    return path
