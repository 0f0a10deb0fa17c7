"""A tiny random-weight FLUX.2 [klein] model saved as a diffusers folder.

Built offline in a few seconds: Flux2Transformer2DModel (one double and one single block, width 32, no guidance
embedder, as Klein's), an AutoencoderKLFlux2 (32 channels, 2× downsampling here, its batch norm given non-trivial
statistics so the normalisation shows), a 27-layer width-16 ``Qwen3ForCausalLM`` (Klein reads hidden states 9, 18
and 27) with the byte-level BPE stand-in of ``tests/_llm_tokenizer.py`` (Qwen's chat template), and Klein's
FlowMatchEulerDiscreteScheduler (dynamic, exponential time shift). ``is_distilled`` is false so CFG runs in the
pipeline too. Its ``sfumato.json`` makes 32×32 its native size.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SIZE = 32
TEXT_WIDTH = 16
TEXT_LAYERS = 27


def build_pipeline(seed: int = 0):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tests._llm_tokenizer import build_qwen_tokenizer

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * TEXT_WIDTH, timestep_guidance_channels=32, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False)
    with torch.no_grad():  # zero-initialised output layers would make a constant model
        for parameter in transformer.parameters():
            if not parameter.abs().sum():
                parameter.normal_(0, 0.2)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=32, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=SIZE, use_quant_conv=False, use_post_quant_conv=False)
    with torch.no_grad():
        vae.bn.running_mean.normal_(0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    tokenizer = build_qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096, shift=3.0,
                                                time_shift_type="exponential")
    return Flux2KleinPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, is_distilled=False)


def build_folder(folder: Path, seed: int = 0) -> Path:
    """The tiny model saved as ``folder`` (a diffusers folder with safetensors weights)."""
    build_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    (folder / "sfumato.json").write_text(json.dumps({"native_width": SIZE, "native_height": SIZE}))
    return folder
