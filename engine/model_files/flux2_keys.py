"""Black Forest Labs' FLUX.2 VAE names (``flux2-vae.safetensors``, the FLUX.2 repositories' ``ae.safetensors``) to
diffusers' ``AutoencoderKLFlux2``, which diffusers' single-file loader does not take.

The file is Flux.1's CompVis layout (``encoder.down.N.block.M``, ``mid.attn_1``, ``norm_out``...) with two 1×1 convs
kept inside the encoder and decoder (``encoder.quant_conv``, ``decoder.post_quant_conv``; diffusers keeps them at the
top) and the latent batch norm's statistics (``bn.running_mean``, ``bn.running_var``, which diffusers names alike).
The CompVis part goes through diffusers' own ``convert_ldm_vae_checkpoint`` (it reads the block counts from the config).
The transformer needs nothing here: diffusers' ``convert_flux2_transformer_checkpoint_to_diffusers`` only renames and
splits by thirds, so it fits any width.
"""
from __future__ import annotations

import torch

MOVED = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}
BATCH_NORM = "bn."


def flux2_vae_to_diffusers(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A FLUX.2 VAE's weights (without a ``vae.`` prefix) in diffusers' names; keys already in them pass through."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if "encoder.conv_norm_out.weight" in state:
        return state
    state = {key.removeprefix("vae."): value for key, value in state.items()}
    compvis, kept = {}, {}
    for key, value in state.items():
        moved = next((new + key[len(old):] for old, new in MOVED.items() if key.startswith(old)), None)
        if moved is not None:
            kept[moved] = value
        elif key.startswith(BATCH_NORM):
            kept[key] = value
        else:
            compvis[key] = value
    return {**convert_ldm_vae_checkpoint(compvis, config), **kept}
