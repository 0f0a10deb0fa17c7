"""Tiny random-weight Stable Diffusion models in the real diffusers layouts.

Built offline in about a second. Tests and benches use them to drive the same
loading and sampling code that serves full-size checkpoints; the UI falls back
to one (clearly labelled untrained) only when no trained model is present.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch

TOKENIZER_MAX_LENGTH = 77


def _char_vocab() -> tuple[dict[str, int], list[str]]:
    """A byte-level-free CLIP BPE vocabulary: every printable character, alone and word-final."""
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    return {token: index for index, token in enumerate(tokens)}, []


def build_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    vocab, _ = _char_vocab()
    tokenizer = CLIPTokenizer(
        vocab=vocab, merges=[], model_max_length=TOKENIZER_MAX_LENGTH, bos_token="<|startoftext|>",
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def _text_encoder(vocab_size: int, hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TOKENIZER_MAX_LENGTH, bos_token_id=0, eos_token_id=1,
        pad_token_id=1, projection_dim=projection or hidden,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
        sample_size=64,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_sd1(folder: Path, seed: int = 0, in_channels: int = 4) -> Path:
    """A tiny SD 1.x pipeline folder. ``in_channels=9`` makes an inpainting model."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(Path(folder) / "_tokenizer_build")
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=in_channels, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=_text_encoder(len(tokenizer), 32), tokenizer=tokenizer, unet=unet,
        scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    _remove_tree(Path(folder) / "_tokenizer_build")
    return Path(folder)


def build_sdxl(folder: Path, seed: int = 0, text_encoder_2_width: int = 32, demo_sized: bool = False) -> Path:
    """A tiny SDXL pipeline folder (two text encoders, text_time added conditioning).

    ``text_encoder_2_width`` other than 32 makes the two encoders differ in width, which
    diffusers needs to tell them apart when the model is saved as one single file.
    ``demo_sized`` gives the UNet the built-in demo model's layout (three levels of 32/64/64
    channels, cross-attention in each), so a UNet call costs about what the demo's does.
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(Path(folder) / "_tokenizer_build")
    if demo_sized:
        layout = dict(block_out_channels=(32, 64, 64), down_block_types=("CrossAttnDownBlock2D",) * 3,
                      up_block_types=("CrossAttnUpBlock2D",) * 3, transformer_layers_per_block=(1, 1, 1))
    else:
        layout = dict(block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1))
    unet = UNet2DConditionModel(
        **layout, layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        cross_attention_dim=32 + text_encoder_2_width, attention_head_dim=4, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=text_encoder_2_width + 6 * 8, use_linear_projection=True,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=_text_encoder(len(tokenizer), 32),
        text_encoder_2=_text_encoder(len(tokenizer), text_encoder_2_width, projection=text_encoder_2_width),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=_scheduler(),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    _remove_tree(Path(folder) / "_tokenizer_build")
    return Path(folder)


def build_sd15_shaped(folder: Path) -> Path:
    """For ``bench --gpu``: SD 1.5's UNet layout (320/640/1280/1280, 8 heads, 768-wide text) with random weights; tiny text encoder and VAE
    of the right widths."""
    return _build_full_shaped(folder, xl=False)


def build_sdxl_shaped(folder: Path) -> Path:
    """SDXL's UNet layout (320/640/1280, transformer depths 0/2/10, 2048-wide text) with random weights."""
    return _build_full_shaped(folder, xl=True)


def _build_full_shaped(folder: Path, xl: bool) -> Path:
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = build_tokenizer(folder / "_tokenizer")
    vae = AutoencoderKL(block_out_channels=(32, 64, 64, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
                        sample_size=1024 if xl else 512)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)

    def text(hidden: int, projection: bool = False):
        config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=1,
                                num_attention_heads=8, max_position_embeddings=77, projection_dim=hidden)
        return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)

    if xl:
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text(768), text_encoder_2=text(1280, projection=True), tokenizer=tokenizer,
                                         tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    else:
        unet = UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                    attention_head_dim=8, cross_attention_dim=768)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text(768), tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
