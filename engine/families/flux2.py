"""FLUX.2 [klein] (4B / 9B; Black Forest Labs 2026): an MMDiT (double- then single-stream blocks) on a 32-channel VAE
latent folded 2×2 into 128 channels, sampled as a rectified flow, conditioned by an LLM (Qwen3).

- **Latent**: ``AutoencoderKLFlux2`` (8× down, 32 channels). The model's latent is the VAE latent patchified 2×2
  (channel c·4 + 2·dy + dx) and normalised by the VAE's own batch-norm running statistics, (z − μ_bn) / √(σ²_bn + ε):
  128 channels at 1/16 of the picture. No scaling factor or shift beyond that. Preview factors: ComfyUI's published
  ``Flux2`` latent format (``comfy/latent_formats.py``) gives 32 rows for the unfolded channels, applied after
  unfolding; on the folded latent each channel's row is that row over 4 (the 2×2 pixels averaged), bias as published.
- **Parameterization**: flow. The transformer predicts the velocity v = ε − x₀ and takes the timestep as σ (diffusers
  divides the scheduler's σ·1000 by 1000; the model multiplies by 1000 inside). The σs are t = 1/1000 … 1 shifted by
  e^μ (the scheduler's exponential time shift), where μ is BFL's empirical fit to the image's token count and the number
  of steps (``compute_empirical_mu`` in diffusers' ``pipeline_flux2_klein.py``): so the noise table depends on the
  picture's size and steps (``noise_table_for_latent``).
- **Prompt encoding**: the prompt in Qwen's chat template (one user turn, generation prompt, thinking off), padded to
  512 tokens, through Qwen3; hidden states 9, 18 and 27 side by side per token. The LLM reads the plain text (A1111's syntax
  taken out); a prompt cut at 512 tokens is reported (``engine.flow_prompts``). Text tokens sit at positions (0, 0, 0, l), image tokens at (0, h, w, 0).
- **Guidance**: A1111's CFG as diffusers applies it (neg + g·(pos − neg)); the distilled Klein models run without it
  (CFG 1); the pipeline always uses an empty negative prompt, Sfumato uses the request's.
"""
from __future__ import annotations

from types import MappingProxyType

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ..flow_prompts import FlowPromptEncoder, FlowPrompts, PlainEncoder
from ..model_files.flux2_keys import flux2_vae_to_diffusers
from ..fields import FLOW
from ..model_files.layout import FileLayout, qwen3_slot
from ..prompts import Conditioning, TextLayer
from .base import Family, LatentFormat, ModelInputs

PATCH = 2  # VAE-latent pixels folded into channels per side
# ComfyUI comfy/latent_formats.py, class Flux2: one row per unfolded VAE channel (32), bias as published.
_UNFOLDED_RGB = ((0.0058, 0.0113, 0.0073), (0.0495, 0.0443, 0.0836), (-0.0099, 0.0096, 0.0644), (0.2144, 0.3009, 0.3652),
                 (0.0166, -0.0039, -0.0054), (0.0157, 0.0103, -0.0160), (-0.0398, 0.0902, -0.0235), (-0.0052, 0.0095, 0.0109),
                 (-0.3527, -0.2712, -0.1666), (-0.0301, -0.0356, -0.0180), (-0.0107, 0.0078, 0.0013), (0.0746, 0.0090, -0.0941),
                 (0.0156, 0.0169, 0.0070), (-0.0034, -0.0040, -0.0114), (0.0032, 0.0181, 0.0080), (-0.0939, -0.0008, 0.0186),
                 (0.0018, 0.0043, 0.0104), (0.0284, 0.0056, -0.0127), (-0.0024, -0.0022, -0.0030), (0.1207, -0.0026, 0.0065),
                 (0.0128, 0.0101, 0.0142), (0.0137, -0.0072, -0.0007), (0.0095, 0.0092, -0.0059), (0.0000, -0.0077, -0.0049),
                 (-0.0465, -0.0204, -0.0312), (0.0095, 0.0012, -0.0066), (0.0290, -0.0034, 0.0025), (0.0220, 0.0169, -0.0048),
                 (-0.0332, -0.0457, -0.0468), (-0.0085, 0.0389, 0.0609), (-0.0076, 0.0003, -0.0043), (-0.0111, -0.0460, -0.0614))
LATENT = LatentFormat(
    channels=128,
    scaling_factor=1.0,
    shift=0.0,
    rgb_factors=tuple(tuple(v / PATCH ** 2 for v in row) for row in _UNFOLDED_RGB for _ in range(PATCH ** 2)),
    rgb_bias=(-0.0329, -0.0718, -0.0851),
    tiny_decoder="taef2",
)
# The shipped configs by transformer width (``img_in.weight`` rows) and block counts: Black Forest Labs' published
# Klein 4B (the base folder; Qwen3-4B) and 9B (``variants/9b``; Qwen3-8B). FLUX.2 [dev] (width 6144, Mistral) is not
# a Klein: no shipped config fits it.
KLEIN_SHAPES = {(3072, 5, 20): "", (4096, 8, 24): "9b"}


def _config_variant(names: set[str], shape_of) -> str | None:
    if "img_in.weight" not in names:
        return None
    doubles = {int(name.split(".")[1]) for name in names if name.startswith("double_blocks.")}
    singles = {int(name.split(".")[1]) for name in names if name.startswith("single_blocks.")}
    return KLEIN_SHAPES.get((shape_of("img_in.weight")[0], len(doubles), len(singles)))


# BFL's flux-2-klein-*.safetensors (the transformer alone, original names: ``img_in``, ``double_blocks.N.img_attn.qkv``,
# ``single_blocks.N.linear1``, the shared ``double_stream_modulation_img/txt`` and ``single_stream_modulation``), read by
# diffusers' own converter; the Qwen3 encoder as a file of its own; the FLUX.2 VAE (flux2-vae.safetensors) by
# ``flux2_vae_to_diffusers``.
FILE_LAYOUT = FileLayout(
    transformer_prefix="model.diffusion_model.",
    transformer_marker="double_stream_modulation_img.lin.weight",  # Flux.2's shared modulation; Flux.1 has none
    vae_prefix="vae.",
    vae_marker="decoder.conv_in.weight",
    text_encoders=(qwen3_slot(),),
    config_variant=_config_variant,
    vae_to_diffusers=flux2_vae_to_diffusers,
)
NATIVE_TOKENS = 64 * 64  # a 1024² picture's tokens: the table ``noise_table`` gives when no size is known


def empirical_mu(image_tokens: int, steps: int) -> float:
    """BFL's fit of the time shift μ to the image's token count and the step count (diffusers'
    ``compute_empirical_mu``): linear in the tokens at 10 and at 200 steps, interpolated linearly in the steps; above
    4300 tokens, the 200-step line alone."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    at_200 = a2 * image_tokens + b2
    if image_tokens > 4300:
        return float(at_200)
    at_10 = a1 * image_tokens + b1
    slope = (at_200 - at_10) / 190.0
    return float(slope * steps + at_200 - 200.0 * slope)


def patchify(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, 4C, H/2, W/2], channel c·4 + 2·dy + dx (diffusers' ``_patchify_latents``)."""
    b, c, h, w = latent.shape
    return latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latent: torch.Tensor) -> torch.Tensor:
    """The inverse of ``patchify``."""
    b, c, h, w = latent.shape
    return latent.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def _batch_norm_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def positions(length: int, height: int, width: int, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4-axis (t, h, w, l) positions of ``length`` text tokens and a height × width grid of image tokens."""
    zero = torch.arange(1)
    text = torch.cartesian_prod(zero, zero, zero, torch.arange(length))
    image = torch.cartesian_prod(zero, torch.arange(height), torch.arange(width), zero)
    return text.expand(batch, -1, -1).to(device), image.expand(batch, -1, -1).to(device)


class Flux2TransformerCall:
    """A Flux.2 transformer called the way the denoiser calls a UNet: the [B, 128, h, w] latent as h·w tokens with
    their positions, the timestep (σ·1000) as σ, and its token answer folded back to [B, 128, h, w]."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, *, encoder_hidden_states: torch.Tensor,
                 added_cond_kwargs: dict | None = None, return_dict: bool = False, **hook_kwargs) -> tuple[torch.Tensor]:
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h * w).permute(0, 2, 1)
        text_ids, image_ids = positions(encoder_hidden_states.shape[1], h, w, b, x.device)
        sigma = timestep.expand(b).to(x.dtype) / 1000
        output = self.transformer(hidden_states=tokens, encoder_hidden_states=encoder_hidden_states, timestep=sigma,
                                  img_ids=image_ids, txt_ids=text_ids, guidance=None, return_dict=False, **hook_kwargs)[0]
        return (output[:, : h * w].permute(0, 2, 1).reshape(b, c, h, w),)


def _qwen3(pipeline, text: str, max_tokens: int) -> torch.Tensor:
    """Qwen3's hidden states 9, 18 and 27 of the text in its chat turn, padded to ``max_tokens`` (diffusers' own
    ``Flux2KleinPipeline`` helper)."""
    return pipeline._get_qwen3_prompt_embeds(text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer, prompt=text,
                                             device=pipeline.text_encoder.device, max_sequence_length=max_tokens)


# No CLIP: the LLM gets the plain text, in a chat turn without thinking, up to diffusers' 512 tokens.
PROMPTS = FlowPrompts(plain=PlainEncoder("tokenizer", "text_encoder", "Qwen3", 512, _qwen3,
                                         chat=MappingProxyType({"enable_thinking": False})))


@dataclass(frozen=True)
class Flux2Klein(Family):
    id: ClassVar[str] = "flux2"
    title: ClassVar[str] = "Flux.2 Klein"
    traits: ClassVar[frozenset[str]] = frozenset({FLOW})
    denoiser: ClassVar[str] = "transformer"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("Flux2KleinPipeline",)
    components: ClassVar[tuple[str, ...]] = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    embedding_keys: ClassVar[tuple[str, ...]] = ()  # no CLIP: textual-inversion files do not apply
    latent_patch: ClassVar[int] = PATCH
    file_layout: ClassVar[FileLayout] = FILE_LAYOUT

    def matches_config(self, config: dict) -> bool:
        """Flux.2's transformer config: a joint timestep-and-guidance embedder (``timestep_guidance_channels``),
        which Flux.1's lacks."""
        return "timestep_guidance_channels" in config and "joint_attention_dim" in config

    def matches_unet_keys(self, keys: set[str], shape_of: Callable[[str], list[int]], prefix: str) -> bool:
        return False  # no UNet

    def prompt_encoder(self, components) -> FlowPromptEncoder:
        return FlowPromptEncoder(components, PROMPTS)

    def parameterization(self, scheduler_config: dict) -> str:
        return "flow"

    def model_latent(self, vae_latent: torch.Tensor, vae, scaling: float, shift: float) -> torch.Tensor:
        mean, std = _batch_norm_stats(vae, vae_latent)
        return (patchify(vae_latent) - mean) / std

    def vae_latent(self, latent: torch.Tensor, vae, scaling: float, shift: float) -> torch.Tensor:
        mean, std = _batch_norm_stats(vae, latent)
        return unpatchify(latent * std + mean)

    def noise_table(self, scheduler_config: dict, zero_terminal_snr: bool | None = None, shift: float | None = None):
        """The table of a 1024² picture at the family's default step count (see ``noise_table_for_latent``)."""
        side = int(math.isqrt(NATIVE_TOKENS))
        return self.noise_table_for_latent(scheduler_config, (side, side), zero_terminal_snr, shift)

    def noise_table_for_latent(self, scheduler_config: dict, latent_size: tuple[int, int],
                               zero_terminal_snr: bool | None = None, shift: float | None = None, steps: int | None = None):
        """The flow σs shifted by e^μ (μ from ``empirical_mu``; the scheduler's "linear" time shift uses μ itself),
        or by the config's fixed ``shift`` when it turns dynamic shifting off; a request's Shift s replaces either
        (the exponential shift at μ is the linear one at s = e^μ)."""
        from ..sampling.noise_table import NoiseTable

        timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
        if shift:
            return NoiseTable.for_flow(float(shift), timesteps)
        latent_width, latent_height = latent_size
        steps = steps or int(self.defaults["steps"])
        if not scheduler_config.get("use_dynamic_shifting", True):
            return NoiseTable.for_flow(float(scheduler_config.get("shift", 1.0)), timesteps)
        mu = empirical_mu(latent_width * latent_height, steps)
        linear = scheduler_config.get("time_shift_type", "exponential") == "linear"
        return NoiseTable.for_flow(mu if linear else math.exp(mu), timesteps)

    def text_layers(self, clip_skip: int) -> tuple[TextLayer, ...]:
        return ()  # hidden states 9, 18 and 27 of the LLM (diffusers' encode_prompt); Clip skip does not apply

    def network_components(self) -> dict[str, str]:
        return {"lora_unet_": "transformer", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}

    def model_call(self, pipeline) -> Callable:
        return Flux2TransformerCall(pipeline.transformer)

    def unet_kwargs(self, conditioning: Conditioning, width: int, height: int) -> ModelInputs:
        return ModelInputs()


# The step-distilled Klein models' settings (4 steps, no CFG); the undistilled "base" ones want CFG ~4, ~50 steps.
FLUX2 = Flux2Klein("flux2", native_size=(1024, 1024), latent=LATENT,
                   defaults=MappingProxyType({"cfg_scale": 1.0, "steps": 4, "sampler": "Euler", "schedule": "Simple"}))
