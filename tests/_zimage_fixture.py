"""A tiny random-weight Z-Image model saved as a diffusers folder.

Built offline in a few seconds: ZImageTransformer2DModel (2 layers, width 32), Flux.1's 16-channel AutoencoderKL
shape (2× downsampling here, scale 0.3611, shift 0.1159), a two-layer ``Qwen3Model`` text encoder with the byte-level
BPE stand-in of ``tests/_llm_tokenizer.py`` (Qwen's chat template) and FlowMatchEulerDiscreteScheduler(shift=3.0)
as Z-Image Turbo's folder has it. Its ``sfumato.json`` makes 32×32 its native size.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SIZE = 32
SHIFT = 3.0
TEXT_WIDTH = 32


def build_pipeline(seed: int = 0):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from tests._llm_tokenizer import build_qwen_tokenizer

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=TEXT_WIDTH, axes_dims=[4, 6, 6], axes_lens=[256, 32, 32])
    # The zero-initialised pad tokens and final layers would make a constant model: random ones show every input.
    with torch.no_grad():
        for parameter in transformer.parameters():
            if not parameter.abs().sum():
                parameter.normal_(0, 0.2)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=SIZE, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    tokenizer = build_qwen_tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id))
    return ZImagePipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), vae=vae,
                          text_encoder=text_encoder, tokenizer=tokenizer)


def build_folder(folder: Path, seed: int = 0) -> Path:
    """The tiny model saved as ``folder`` (a diffusers folder with safetensors weights)."""
    build_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    (folder / "sfumato.json").write_text(json.dumps({"native_width": SIZE, "native_height": SIZE}))
    return folder
