"""Stable Diffusion 3 / 3.5 (Medium, Large): an MMDiT transformer on a 16-channel latent, sampled as a
rectified flow (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis").

- **Latent**: 16 channels; the model's latent is (VAE latent − 0.0609) · 1.5305. Preview factors and bias are
  ComfyUI's published ``SD3`` latent format (``comfy/latent_formats.py``).
- **Parameterization**: flow. The model predicts the velocity v = ε − x₀ on x_σ = (1 − σ)·x₀ + σ·ε and sees the
  timestep σ·1000; the training σs are t = 1/1000 … 1 shifted by the scheduler config's ``shift`` (3.0 for SD 3.5):
  σ = shift·t / (1 + (shift − 1)·t).
- **Prompt encoding**: CLIP-L and CLIP-G (penultimate layers, side by side, zero-padded to the joint width) followed
  by T5-XXL's tokens; with no T5 in the folder, zeros stand in for its tokens, as diffusers does. The pooled
  embedding is both CLIPs' projected outputs side by side. The CLIPs read A1111's weights and BREAK in 77-token
  chunks (so a long prompt has more CLIP tokens, not fewer words); T5 reads the plain text up to 256 tokens
  (``engine.flow_prompts``).
- **Model call**: ``transformer(hidden_states, timestep, encoder_hidden_states, pooled_projections)``.
"""
from __future__ import annotations

from types import MappingProxyType

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ..fields import BLOCK_CACHE, FLOW
from ..flow_prompts import ClipEncoder, FlowPromptEncoder, FlowPrompts, PlainEncoder, t5_embeds
from ..model_files.layout import CLIP_MARKER, CLIP_WIDTH, T5_MARKER, T5_WIDTH, FileLayout, TextEncoderSlot
from ..prompts import Conditioning, TextLayer
from . import repeated_tokens
from .base import Family, LatentFormat, ModelInputs
from .patching import crop_to, pad_to_patches

LATENT = LatentFormat(
    channels=16,
    scaling_factor=1.5305,
    shift=0.0609,
    # ComfyUI comfy/latent_formats.py, class SD3 (the factors published with a bias).
    rgb_factors=((-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
                 (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
                 (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
                 (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189)),
    rgb_bias=(0.2394, 0.2135, 0.1925),
    tiny_decoder="taesd3",
)
DEFAULT_SHIFT = 3.0  # SD 3.5's scheduler config; a folder's own ``shift`` wins



def _config_variant(names: set[str], shape_of) -> str | None:
    """The shipped config for an MMDiT's weights (Stability's published SD 3.5 configs): Large has 38 joint blocks;
    Medium has 24, of which the first 13 also attend within the image (MMDiT-X, ``attn2``)."""
    blocks = {int(name.split(".")[1]) for name in names if name.startswith("joint_blocks.")}
    dual = any(".x_block.attn2." in name for name in names)
    if len(blocks) == 38 and not dual:
        return ""  # the base folder: SD 3.5 Large (and Large Turbo)
    if len(blocks) == 24 and dual:
        return "medium"
    return None


# Stability's single files (sd3.5_large.safetensors, sd3.5_medium.safetensors) and ComfyUI/Forge's split files
# (clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors in models/text_encoder).
FILE_LAYOUT = FileLayout(
    transformer_prefix="model.diffusion_model.",
    transformer_marker="joint_blocks.0.context_block.adaLN_modulation.1.weight",
    vae_prefix="first_stage_model.",
    vae_marker="decoder.conv_in.weight",
    text_encoders=(
        TextEncoderSlot("text_encoder", "tokenizer", "text_encoders.clip_l.", CLIP_MARKER, CLIP_WIDTH, "hidden_size",
                        name_hints=("clip_l", "clip-l", "clipl"), title="CLIP-L", identity_projection=True),
        TextEncoderSlot("text_encoder_2", "tokenizer_2", "text_encoders.clip_g.", CLIP_MARKER, CLIP_WIDTH, "hidden_size",
                        name_hints=("clip_g", "clip-g", "clipg"), title="CLIP-G"),
        TextEncoderSlot("text_encoder_3", "tokenizer_3", "text_encoders.t5xxl.", T5_MARKER, T5_WIDTH, "d_model",
                        name_hints=("t5",), title="T5-XXL", optional=True),
    ),
    config_variant=_config_variant,
)


class TransformerCall:
    """An SD3 transformer called the way the denoiser calls a UNet (``GuidedDenoiser``): the pooled text comes in
    ``added_cond_kwargs["pooled_projections"]``. ``zero_tokens``: how many identical zero tokens end the context (T5's
    place in a model without T5), computed as one (``repeated_tokens``: the same function, a fraction of the tokens)."""

    def __init__(self, transformer: torch.nn.Module, zero_tokens: int = 0):
        self.transformer = transformer
        self.patch = int(transformer.config.patch_size)  # odd latent sides are padded to whole patches (patching.py)
        self.zero_tokens, self.attention_kwargs = 0, None
        if zero_tokens > 1:
            try:
                repeated_tokens.install(transformer)
            except TypeError:  # attention processors of someone else's: the whole context, as it comes
                return
            self.zero_tokens, self.attention_kwargs = zero_tokens, {repeated_tokens.REPEATS_KEY: zero_tokens}

    @property
    def trace_key(self) -> int:
        """What a traced replay of this call depends on besides its class and inputs (``engine.traced_calls``)."""
        return self.zero_tokens

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, *, encoder_hidden_states: torch.Tensor,
                 added_cond_kwargs: dict | None = None, return_dict: bool = False, **hook_kwargs) -> tuple[torch.Tensor]:
        pooled = (added_cond_kwargs or {})["pooled_projections"]
        height, width = x.shape[-2:]
        if self.zero_tokens:
            encoder_hidden_states = repeated_tokens.collapse(encoder_hidden_states, self.zero_tokens)
        output = self.transformer(hidden_states=pad_to_patches(x, self.patch), timestep=timestep.to(x.dtype).expand(x.shape[0]),
                                  encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled,
                                  joint_attention_kwargs=self.attention_kwargs, return_dict=False, **hook_kwargs)[0]
        return (crop_to(output, height, width),)


# CLIP-L and CLIP-G read A1111's syntax, their penultimate hidden states (no final norm) side by side in 77-token chunks;
# T5 gets the plain text up to diffusers' default ``max_sequence_length`` (256).
PROMPTS = FlowPrompts(
    clip=(ClipEncoder("tokenizer", "text_encoder", "CLIP-L"), ClipEncoder("tokenizer_2", "text_encoder_2", "CLIP-G")),
    clip_layer=TextLayer(from_end=2, final_norm=False),
    plain=PlainEncoder("tokenizer_3", "text_encoder_3", "T5-XXL", 256, t5_embeds),
)


@dataclass(frozen=True)
class StableDiffusion3(Family):
    id: ClassVar[str] = "sd3"
    title: ClassVar[str] = "SD 3.5"
    traits: ClassVar[frozenset[str]] = frozenset({FLOW, BLOCK_CACHE})
    denoiser: ClassVar[str] = "transformer"
    pipeline_classes: ClassVar[tuple[str, ...]] = (
        "StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")
    components: ClassVar[tuple[str, ...]] = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                             "scheduler")
    text_encoders: ClassVar[tuple[tuple[str, str], ...]] = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    pooled_encoder: ClassVar[int | None] = 1
    embedding_keys: ClassVar[tuple[str, ...]] = ("clip_l", "clip_g")
    lora_layout: ClassVar[str | None] = "sd3"  # kohya's sd-scripts names the original MMDiT's layers (fused qkv)
    file_layout: ClassVar[FileLayout] = FILE_LAYOUT

    def matches_config(self, config: dict) -> bool:
        """The MMDiT's config: a joint text width and a caption projection (Flux has the first, not the second)."""
        return "joint_attention_dim" in config and "caption_projection_dim" in config

    def matches_unet_keys(self, keys: set[str], shape_of: Callable[[str], list[int]], prefix: str) -> bool:
        return False  # no UNet

    def prompt_encoder(self, components) -> FlowPromptEncoder:
        return FlowPromptEncoder(components, PROMPTS)

    def parameterization(self, scheduler_config: dict) -> str:
        return "flow"

    def noise_table(self, scheduler_config: dict, zero_terminal_snr: bool | None = None, shift: float | None = None):
        """The shifted flow σs (``NoiseTable.for_flow``) with the request's ``shift``, else the config's; zero terminal
        SNR does not apply (σ = 1 is pure noise already)."""
        from ..sampling.noise_table import NoiseTable

        return NoiseTable.for_flow(float(shift or scheduler_config.get("shift", DEFAULT_SHIFT)),
                                   int(scheduler_config.get("num_train_timesteps", 1000)))

    def max_size_of(self, denoiser_config, vae_scale_factor: int) -> int:
        """No larger than the transformer's table of patch positions reaches (``pos_embed_max_size`` patches a side:
        SD 3.5's 192 reach past the family's 2048 pixels, the flow demo's 32 end at 256)."""
        table = denoiser_config.get("pos_embed_max_size")
        if not table:
            return self.max_size
        return min(self.max_size, int(table) * int(denoiser_config.get("patch_size", 2)) * vae_scale_factor)

    def text_layers(self, clip_skip: int) -> tuple[TextLayer, ...]:
        penultimate = TextLayer(from_end=2, final_norm=False)
        return (penultimate, penultimate)

    def model_call(self, pipeline) -> Callable:
        without_t5 = getattr(pipeline, PROMPTS.plain.text_encoder, None) is None  # its tokens are zeros (t5_embeds)
        return TransformerCall(pipeline.transformer, zero_tokens=PROMPTS.plain.max_tokens if without_t5 else 0)

    def unet_kwargs(self, conditioning: Conditioning, width: int, height: int) -> ModelInputs:
        return ModelInputs(positive={"pooled_projections": conditioning.pooled},
                           negative={"pooled_projections": conditioning.negative_pooled})


# What SD 3.5 is released and sampled with (Euler, the flow σs as they come), at the CFG its authors show.
SD3 = StableDiffusion3("sd3", native_size=(1024, 1024), latent=LATENT,
                       defaults=MappingProxyType({"sampler": "Euler", "schedule": "Simple", "cfg_scale": 4.5, "steps": 28}))
