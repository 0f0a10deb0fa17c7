"""Tiny random-weight Flux.1 models (dev and schnell) saved as diffusers folders.

Built offline in a few seconds: FluxTransformer2DModel (one double-stream and one single-stream block, 16-wide
attention), a 16-channel AutoencoderKL (2× downsampling, Flux's scaling and shift), CLIP-L as a 32-wide
CLIPTextModel with the real CLIP tokenizer (engine/configs/clip_tokenizer), T5 as a 32-wide T5EncoderModel with
the offline tokenizer of ``tests/_t5_tokenizer``, and FlowMatchEulerDiscreteScheduler with each variant's
published config: dev shifts σ by the image's token count and embeds the distilled guidance; schnell does neither.
Their ``sfumato.json`` makes 32×32 the native size.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

SIZE = 32
TEXT_WIDTH = 32
# black-forest-labs/FLUX.1-dev and FLUX.1-schnell scheduler/scheduler_config.json.
DEV_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, num_train_timesteps=1000,
                     shift=3.0, use_dynamic_shifting=True)
SCHNELL_SCHEDULER = dict(DEV_SCHEDULER, shift=1.0, use_dynamic_shifting=False)


def build_pipeline(variant: str = "dev", seed: int = 0):
    """The tiny FluxPipeline: ``variant`` "dev" (guidance-embedded, dynamic shift) or "schnell"."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    from engine.models import SHARED_TOKENIZER
    from tests._t5_tokenizer import build_t5_tokenizer

    dev = variant == "dev"
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=TEXT_WIDTH, guidance_embeds=dev, axes_dims_rope=(2, 2, 4))
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=SIZE, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    tokenizer = CLIPTokenizer.from_pretrained(SHARED_TOKENIZER, model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=TEXT_WIDTH))
    with tempfile.TemporaryDirectory() as build:
        tokenizer_2 = build_t5_tokenizer(Path(build))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=TEXT_WIDTH, d_kv=8, d_ff=2 * TEXT_WIDTH, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    scheduler = FlowMatchEulerDiscreteScheduler(**(DEV_SCHEDULER if dev else SCHNELL_SCHEDULER))
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)


def build_folder(folder: Path, variant: str = "dev", seed: int = 0) -> Path:
    """The tiny model saved as ``folder`` (a diffusers folder with safetensors weights)."""
    build_pipeline(variant, seed).save_pretrained(folder, safe_serialization=True)
    (folder / "sfumato.json").write_text(json.dumps({"native_width": SIZE, "native_height": SIZE}))
    return folder
