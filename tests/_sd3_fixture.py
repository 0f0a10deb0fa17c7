"""A tiny random-weight SD 3.5 model saved as a diffusers folder (no T5: diffusers' zeros stand in).

Built offline in about a second: SD3Transformer2DModel, a 16-channel AutoencoderKL (2× downsampling), two
CLIPTextModelWithProjection with the character tokenizer of ``engine.tiny_models``, and
FlowMatchEulerDiscreteScheduler(shift=3.0). Its ``sfumato.json`` makes 32×32 its native size.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SIZE = 32
SHIFT = 3.0


def build_pipeline(seed: int = 0):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from engine.tiny_models import _text_encoder, build_tokenizer

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=SIZE // 2, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64, out_channels=16, pos_embed_max_size=32)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=SIZE, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    import tempfile

    with tempfile.TemporaryDirectory() as build:
        tokenizer = build_tokenizer(Path(build))
    text_encoder = _text_encoder(len(tokenizer), 32, projection=32)
    text_encoder_2 = _text_encoder(len(tokenizer), 32, projection=32)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)


def build_folder(folder: Path, seed: int = 0) -> Path:
    """The tiny model saved as ``folder`` (a diffusers folder with safetensors weights)."""
    build_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    (folder / "sfumato.json").write_text(json.dumps({"native_width": SIZE, "native_height": SIZE}))
    return folder
