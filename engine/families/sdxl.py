"""Stable Diffusion XL: CLIP ViT-L and OpenCLIP ViT-bigG text encoders side by side, a 4-channel latent
of its own scale, 1024×1024 native, and size conditioning.

Both encoders condition on their penultimate layer without the final layer norm (SGM's
``FrozenCLIPEmbedder`` with ``layer: hidden`` and ``FrozenOpenCLIPEmbedder2`` with ``layer:
penultimate``); the pooled embedding is bigG's projected output.

Clip skip, as A1111 1.10 defines it for SDXL: by default not at all. Its CLIP-L embedder
(``FrozenCLIPEmbedderForSDXLWithCustomWords``) reads the fixed layer unless the separate setting
"Clip skip SDXL" (``sdxl_clip_l_skip``, off by default) is on, and bigG always reads its fixed
layer. Sfumato follows the default.

Each step the UNet also takes the pooled embedding and six size numbers (Podell et al. 2023,
"SDXL", §2.2): original height and width, crop top and left, target height and width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ..checkpoint_convert import (SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX, UNET, UNET_PREFIX, VAE, VAE_PREFIX,
                                  clip_component, openclip_component)
from ..prompts import Conditioning, TextLayer
from .base import Family, LatentFormat, ModelInputs, SingleFileLayout

PENULTIMATE = TextLayer(from_end=2, final_norm=False)

LATENT = LatentFormat(
    channels=4,
    scaling_factor=0.13025,
    rgb_factors=((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
    rgb_bias=(0.1084, -0.0175, -0.0011),
    tiny_decoder="taesdxl",
)


@dataclass(frozen=True)
class StableDiffusionXL(Family):
    id: ClassVar[str] = "sdxl"
    title: ClassVar[str] = "SDXL"
    pipeline_classes: ClassVar[tuple[str, ...]] = (
        "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
    components: ClassVar[tuple[str, ...]] = Family.components + ("text_encoder_2", "tokenizer_2")
    missing_component_hints: ClassVar[dict[str, str]] = {"text_encoder": "an SDXL refiner cannot be the main model"}
    single_file: ClassVar[SingleFileLayout] = SingleFileLayout(
        marker=SDXL_OPENCLIP_PREFIX,
        prefixes={"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": SDXL_CLIP_PREFIX,
                  "text_encoder_2": SDXL_OPENCLIP_PREFIX},
        components=(UNET, VAE, clip_component("text_encoder", SDXL_CLIP_PREFIX),
                    openclip_component("text_encoder_2", SDXL_OPENCLIP_PREFIX)),
    )
    text_encoders: ClassVar[tuple[tuple[str, str], ...]] = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    pooled_encoder: ClassVar[int | None] = 1
    embedding_keys: ClassVar[tuple[str, ...]] = ("clip_l", "clip_g")  # the two tensors of an SDXL embedding file
    align_your_steps: ClassVar[str] = "AYS_SDXL"

    def matches_config(self, unet_config: dict) -> bool:
        return unet_config.get("addition_embed_type") == "text_time"

    def matches_unet_keys(self, keys: set[str], shape_of: Callable[[str], list[int]], prefix: str) -> bool:
        return f"{prefix}label_emb.0.0.weight" in keys  # the embedding of pooled text and size numbers

    def text_layers(self, clip_skip: int) -> tuple[TextLayer, ...]:
        return (PENULTIMATE, PENULTIMATE)

    def unet_kwargs(self, conditioning: Conditioning, width: int, height: int) -> ModelInputs:
        """Pooled text and size conditioning: the whole image, uncropped, at the size being drawn."""
        sizes = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=conditioning.pooled.device)
        return ModelInputs(positive={"text_embeds": conditioning.pooled, "time_ids": sizes},
                           negative={"text_embeds": conditioning.negative_pooled, "time_ids": sizes})


SDXL = StableDiffusionXL("sdxl", native_size=(1024, 1024), latent=LATENT, max_size=4096)
