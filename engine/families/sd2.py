"""Stable Diffusion 2.x: one OpenCLIP ViT-H/14 text encoder (1024 wide), SD 1.x's latent, 768×768 native.

SD 2 conditions on the text encoder's penultimate layer, through its final layer norm. diffusers
ships the encoder with its last layer dropped, so that layer is the encoder's normal output.

Clip skip, as A1111 1.10 defines it for SD 2.x: not at all. Its OpenCLIP embedder
(``FrozenOpenCLIPEmbedderWithCustomWords``) always reads the model's fixed layer, whatever the
setting; so does this family.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

from ..checkpoint_convert import SD2_OPENCLIP_PREFIX, UNET, UNET_PREFIX, VAE, VAE_PREFIX, openclip_component
from ..prompts import TextLayer
from .base import SingleFileLayout
from .sd1 import LATENT, StableDiffusion1

TEXT_WIDTH = 1024  # OpenCLIP ViT-H/14: the UNet's cross-attention width tells SD 2 from SD 1 (768)
# The first input block with cross-attention: its attn2 key projection reads text of the cross-attention width.
CROSS_ATTENTION_PROBE = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


@dataclass(frozen=True)
class StableDiffusion2(StableDiffusion1):
    id: ClassVar[str] = "sd2"
    title: ClassVar[str] = "SD 2.x"
    # SD 2's text encoder is not compared name by name: diffusers drops its last layer on purpose.
    single_file: ClassVar[SingleFileLayout] = SingleFileLayout(
        marker=SD2_OPENCLIP_PREFIX,
        prefixes={"unet": UNET_PREFIX, "vae": VAE_PREFIX},
        components=(UNET, VAE, openclip_component("text_encoder", SD2_OPENCLIP_PREFIX)),
    )

    def matches_config(self, unet_config: dict) -> bool:
        return unet_config.get("cross_attention_dim") == TEXT_WIDTH and not unet_config.get("addition_embed_type")

    def matches_unet_keys(self, keys: set[str], shape_of: Callable[[str], list[int]], prefix: str) -> bool:
        probe = prefix + CROSS_ATTENTION_PROBE
        return probe in keys and shape_of(probe)[1] == TEXT_WIDTH

    def text_layers(self, clip_skip: int) -> tuple[TextLayer, ...]:
        return (TextLayer(from_end=1, final_norm=True),)


SD2 = StableDiffusion2("sd2", native_size=(768, 768), latent=LATENT)
