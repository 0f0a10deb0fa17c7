"""Stable Diffusion 1.x: one CLIP ViT-L/14 text encoder, a 4-channel latent, 512×512 native.

Clip skip, as A1111 1.10 defines it for SD 1.x (``FrozenCLIPEmbedderWithCustomWords``): skip N
conditions on the hidden state N layers from the end, passed through CLIP's final layer norm;
skip 1 is the encoder's normal output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

from ..checkpoint_convert import SD1_CLIP_PREFIX, UNET, UNET_PREFIX, VAE, VAE_PREFIX, clip_component
from ..prompts import TextLayer
from .base import NO_SAFETY_CHECKER, Family, LatentFormat, SingleFileLayout

LATENT = LatentFormat(
    channels=4,
    scaling_factor=0.18215,
    rgb_factors=((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177)),
    tiny_decoder="taesd",
)


@dataclass(frozen=True)
class StableDiffusion1(Family):
    id: ClassVar[str] = "sd1"
    title: ClassVar[str] = "SD 1.x"
    pipeline_classes: ClassVar[tuple[str, ...]] = (
        "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
    load_options: ClassVar[dict] = NO_SAFETY_CHECKER
    single_file: ClassVar[SingleFileLayout] = SingleFileLayout(
        marker=SD1_CLIP_PREFIX,
        prefixes={"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": SD1_CLIP_PREFIX},
        components=(UNET, VAE, clip_component("text_encoder", SD1_CLIP_PREFIX)),
    )

    def matches_config(self, unet_config: dict) -> bool:
        """Any cross-attention UNet (or a control model's copy of one) the more specific families do not claim,
        tiny test models included."""
        return "cross_attention_dim" in unet_config

    def matches_unet_keys(self, keys: set[str], shape_of: Callable[[str], list[int]], prefix: str) -> bool:
        return True  # the fallback, as in matches_config

    def text_layers(self, clip_skip: int) -> tuple[TextLayer, ...]:
        return (TextLayer(from_end=clip_skip, final_norm=True),)


SD1 = StableDiffusion1("sd1", native_size=(512, 512), latent=LATENT)
