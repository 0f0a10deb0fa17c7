"""Flux.1 (dev, schnell, and fine-tunes in their layout): a rectified-flow transformer with double- and
single-stream blocks on a 16-channel latent (Black Forest Labs 2024; diffusers' ``FluxPipeline``).

- **Latent**: 16 channels; the model's latent is (VAE latent − 0.1159) · 0.3611 (the VAE config wins). Preview
  factors and bias are ComfyUI's published ``Flux`` latent format (``comfy/latent_formats.py``, class ``Flux``,
  read at commit 040a3243); TAESD's Flux decoder is "taef1".
- **Packing**: the sampler works on the plain latent [B, 16, H, W]; the transformer sees it cut into 2×2 patches,
  one token of 64 values each, with position ids (0, row, column) per patch and (0, 0, 0) per text token. An odd
  latent side is padded by one pixel for the call and cropped after (as ComfyUI pads to the patch size).
- **Parameterization**: flow, x_σ = (1 − σ)·x₀ + σ·ε, v = ε − x₀, timestep σ·1000. The σs are t = 1/1000 … 1
  shifted by the exponential time shift σ = e^μ / (e^μ + (1/t − 1)), with μ growing linearly with the image's token
  count (diffusers' ``calculate_shift``: 256 tokens → ``base_shift`` 0.5, 4096 → ``max_shift`` 1.15, from the
  scheduler config). So the table depends on the image size (``noise_table_for_latent``). Schnell's config has no
  dynamic shifting: its σs are the plain ``shift`` (1.0) ones.
- **Guidance**: dev is guidance-distilled: its transformer embeds a "distilled CFG scale" (the request's
  ``distilled_cfg_scale``, 3.5 by default) and is meant to run without real CFG (``cfg_scale`` 1: one model call per
  step). Schnell embeds none; it is timestep-distilled to 4 steps.
- **Prompt encoding**: CLIP-L's pooled output (the first 75 tokens, as A1111 reads them) and T5-XXL's tokens of the
  plain text (512 for dev, 256 for schnell; a longer prompt is cut and the cut reported), by ``engine.flow_prompts``.
- **Model call**: ``transformer(hidden_states, timestep=σ, guidance, pooled_projections, encoder_hidden_states,
  txt_ids, img_ids)``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, ClassVar

import torch

from ..fields import BLOCK_CACHE, DISTILLED_GUIDANCE, FLOW
from ..flow_prompts import ClipEncoder, FlowPromptEncoder, FlowPrompts, PlainEncoder, t5_embeds
from ..model_files.bfl_keys import flux_to_diffusers
from ..model_files.layout import CLIP_MARKER, CLIP_WIDTH, T5_MARKER, T5_WIDTH, FileLayout, TextEncoderSlot
from ..prompts import Conditioning, TextLayer
from .base import Family, LatentFormat, ModelInputs
from .patching import crop_to, pad_to_patches

if TYPE_CHECKING:
    from ..sampling.noise_table import NoiseTable

LATENT = LatentFormat(
    channels=16,
    scaling_factor=0.3611,
    shift=0.1159,
    # ComfyUI comfy/latent_formats.py, class Flux (commit 040a3243): its factors and bias.
    rgb_factors=((-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
                 (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
                 (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
                 (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778)),
    rgb_bias=(-0.0329, -0.0718, -0.0851),
    tiny_decoder="taef1",
)
PATCH = 2  # latent pixels per side of one transformer token
# diffusers' calculate_shift defaults, used where a scheduler config leaves them out.
SHIFT_DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
DISTILLED_CFG = "distilled_cfg_scale"  # the request field a guidance-embedded transformer takes (engine/fields.py)
GUIDANCE_MARKER = "guidance_in.in_layer.weight"  # the distilled-guidance embedder, in Black Forest Labs' names


def _config_variant(names: set[str], shape_of) -> str | None:
    """The shipped config for a Flux.1 transformer's weights (Black Forest Labs' published 19 double and 38 single
    blocks): dev embeds the distilled guidance (``guidance_in``), schnell does not."""
    doubles = {int(name.split(".")[1]) for name in names if name.startswith("double_blocks.")}
    singles = {int(name.split(".")[1]) for name in names if name.startswith("single_blocks.")}
    if (len(doubles), len(singles)) != (19, 38):
        return None
    return "" if GUIDANCE_MARKER in names else "schnell"


# Black Forest Labs' flux1-dev/schnell.safetensors (the transformer alone), ComfyUI's all-in-one checkpoints
# (model.diffusion_model.*, text_encoders.clip_l/t5xxl.transformer.*, vae.*), and the split clip_l.safetensors,
# t5xxl_fp16.safetensors and ae.safetensors.
FILE_LAYOUT = FileLayout(
    transformer_prefix="model.diffusion_model.",
    transformer_marker="double_blocks.0.img_attn.qkv.weight",
    vae_prefix="vae.",
    vae_marker="decoder.conv_in.weight",
    text_encoders=(
        TextEncoderSlot("text_encoder", "tokenizer", "text_encoders.clip_l.", CLIP_MARKER, CLIP_WIDTH, "hidden_size",
                        name_hints=("clip_l", "clip-l", "clipl"), title="CLIP-L"),
        TextEncoderSlot("text_encoder_2", "tokenizer_2", "text_encoders.t5xxl.", T5_MARKER, T5_WIDTH, "d_model",
                        name_hints=("t5",), title="T5-XXL"),
    ),
    config_variant=_config_variant,
    to_diffusers=flux_to_diffusers,
)


def shift_mu(image_tokens: int, scheduler_config: dict) -> float:
    """μ of the exponential time shift for an image of ``image_tokens`` tokens: linear from (``base_image_seq_len``,
    ``base_shift``) to (``max_image_seq_len``, ``max_shift``), as diffusers' ``calculate_shift``."""
    config = {key: scheduler_config.get(key, default) for key, default in SHIFT_DEFAULTS.items()}
    slope = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    return image_tokens * slope + config["base_shift"] - slope * config["base_image_seq_len"]


def flux_sigmas(mu: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The training σs at time shift μ: t = 1/T … 1 mapped to e^μ / (e^μ + (1/t − 1)) (Flux's exponential time
    shift; diffusers' ``FlowMatchEulerDiscreteScheduler.time_shift``), in float64."""
    t = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/2)·(W/2), C·4]: each 2×2 patch one token, channel-major within it (diffusers' layout)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack`` for a latent of ``height``×``width`` (both even)."""
    b, _, values = tokens.shape
    channels = values // (PATCH * PATCH)
    patches = tokens.view(b, height // PATCH, width // PATCH, channels, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels, height, width)


@functools.lru_cache(maxsize=16)  # a few sizes in use at once (a hires pass has its own); never written to
def position_ids(rows: int, columns: int, text_tokens: int, device: torch.device,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(img_ids, txt_ids): (0, row, column) per image token, zeros per text token (diffusers' FluxPipeline)."""
    image = torch.zeros(rows, columns, 3)
    image[..., 1] = torch.arange(rows)[:, None]
    image[..., 2] = torch.arange(columns)[None, :]
    return image.reshape(rows * columns, 3).to(device, dtype), torch.zeros(text_tokens, 3, device=device, dtype=dtype)


class TransformerCall:
    """A Flux transformer called the way the denoiser calls a UNet (``GuidedDenoiser``): the latent is packed
    into tokens and back, the position ids are built once per size, σ·1000 becomes the σ the transformer takes,
    and ``added_cond_kwargs`` brings the pooled CLIP output and, for a guidance-embedded model, the distilled
    CFG scale."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.guidance_embedded = bool(transformer.config.get("guidance_embeds", False))

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, *, encoder_hidden_states: torch.Tensor,
                 added_cond_kwargs: dict | None = None, return_dict: bool = False, **hook_kwargs) -> tuple[torch.Tensor]:
        added = added_cond_kwargs or {}
        batch, _, height, width = x.shape
        padded = pad_to_patches(x, PATCH)
        rows, columns = padded.shape[2] // PATCH, padded.shape[3] // PATCH
        img_ids, txt_ids = position_ids(rows, columns, encoder_hidden_states.shape[1], x.device, x.dtype)
        guidance = None
        if self.guidance_embedded:
            guidance = torch.full((batch,), float(added[DISTILLED_CFG]), device=x.device, dtype=torch.float32)
        tokens = self.transformer(
            hidden_states=pack(padded), timestep=(timestep / 1000).to(x.dtype).expand(batch), guidance=guidance,
            pooled_projections=added["pooled_projections"], encoder_hidden_states=encoder_hidden_states, txt_ids=txt_ids,
            img_ids=img_ids, return_dict=False, **hook_kwargs)[0]
        return (crop_to(unpack(tokens, padded.shape[2], padded.shape[3]), height, width),)


# Only CLIP-L's pooled output conditions Flux.1; T5 gets the plain text up to Black Forest Labs' limits (their reference
# ``flux/util.py``: ``load_t5(max_length=256 if name == "flux-schnell" else 512)``; diffusers' docs run schnell with
# ``max_sequence_length=256`` too).
CLIP_L = ClipEncoder("tokenizer", "text_encoder", "CLIP-L")
DEV_PROMPTS = FlowPrompts(clip=(CLIP_L,), plain=PlainEncoder("tokenizer_2", "text_encoder_2", "T5-XXL", 512, t5_embeds))
SCHNELL_PROMPTS = FlowPrompts(clip=(CLIP_L,), plain=PlainEncoder("tokenizer_2", "text_encoder_2", "T5-XXL", 256, t5_embeds))


@dataclass(frozen=True)
class Flux1(Family):
    """Flux.1; ``guidance_embedded`` tells dev (and its fine-tunes) from schnell."""

    guidance_embedded: bool = True

    id: ClassVar[str] = "flux"
    title: ClassVar[str] = "Flux.1"
    denoiser: ClassVar[str] = "transformer"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
    components: ClassVar[tuple[str, ...]] = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                             "scheduler")
    text_encoders: ClassVar[tuple[tuple[str, str], ...]] = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    pooled_encoder: ClassVar[int | None] = 0
    embedding_keys: ClassVar[tuple[str, ...]] = ("clip_l", "t5")
    lora_layout: ClassVar[str | None] = "flux"  # kohya's sd-scripts names BFL's layers (fused qkv, single-block linear1)
    file_layout: ClassVar[FileLayout] = FILE_LAYOUT

    def matches_config(self, config: dict) -> bool:
        """A Flux.1 transformer config: a joint text width and pooled projections without SD3's caption projection,
        and ``guidance_embeds`` as this variant has it."""
        if not ("joint_attention_dim" in config and "pooled_projection_dim" in config and "guidance_embeds" in config):
            return False
        return "caption_projection_dim" not in config and bool(config["guidance_embeds"]) == self.guidance_embedded

    def matches_checkpoint(self, keys: set[str]) -> bool:
        """A Flux.1 transformer, alone or in an all-in-one file, with the guidance embedder exactly when this is dev."""
        if not self.file_layout.holds_transformer(keys):
            return False
        names, _ = self.file_layout.transformer_names(keys)
        return (GUIDANCE_MARKER in names) == self.guidance_embedded

    def matches_unet_keys(self, keys: set[str], shape_of: Callable[[str], list[int]], prefix: str) -> bool:
        return False  # no UNet

    def prompt_encoder(self, components) -> FlowPromptEncoder:
        return FlowPromptEncoder(components, DEV_PROMPTS if self.guidance_embedded else SCHNELL_PROMPTS)

    def parameterization(self, scheduler_config: dict) -> str:
        return "flow"

    def latent_channels(self, denoiser_config: dict) -> int:
        """The transformer takes 2×2 patches of the latent: its ``in_channels`` (64) are four latent pixels."""
        return int(denoiser_config.get("out_channels") or denoiser_config["in_channels"]) // (PATCH * PATCH)

    def noise_table(self, scheduler_config: dict, zero_terminal_snr: bool | None = None,
                    shift: float | None = None) -> "NoiseTable":
        """The table for the largest image the shift is defined for (``max_image_seq_len`` tokens: 1024² for Flux.1);
        sampling uses ``noise_table_for_latent`` with the image's own size."""
        tokens = int(scheduler_config.get("max_image_seq_len", SHIFT_DEFAULTS["max_image_seq_len"]))
        return self._table(scheduler_config, tokens, shift)

    def noise_table_for_latent(self, scheduler_config: dict, latent_size: tuple[int, int],
                               zero_terminal_snr: bool | None = None, shift: float | None = None,
                               steps: int | None = None) -> "NoiseTable":
        """The σs for a latent of ``latent_size`` (width, height): μ from its token count when the config shifts
        dynamically; zero terminal SNR does not apply (σ = 1 is pure noise already)."""
        width, height = latent_size
        return self._table(scheduler_config, math.ceil(width / PATCH) * math.ceil(height / PATCH), shift)

    @staticmethod
    def _table(scheduler_config: dict, image_tokens: int, shift: float | None = None) -> "NoiseTable":
        """A request's Shift s replaces the size's μ: the exponential shift at μ is the linear one at s = e^μ
        (e^μ / (e^μ + 1/t − 1) = s·t / (1 + (s − 1)·t)), so Shift means the same on Flux as on SD 3.5."""
        from ..sampling.noise_table import NoiseTable

        steps = int(scheduler_config.get("num_train_timesteps", 1000))
        if shift:
            return NoiseTable.for_flow(float(shift), steps)
        if not scheduler_config.get("use_dynamic_shifting", False):
            return NoiseTable.for_flow(float(scheduler_config.get("shift", 1.0)), steps)
        return NoiseTable(flux_sigmas(shift_mu(image_tokens, scheduler_config), steps).to(torch.float32), flow=True)

    @property
    def traits(self) -> frozenset[str]:  # type: ignore[override]  # dev and schnell differ, so per instance
        """A guidance-embedded transformer (dev, detected from its config or its ``guidance_in`` weights) takes the
        distilled CFG scale; schnell does not."""
        return frozenset({FLOW, BLOCK_CACHE, DISTILLED_GUIDANCE}) if self.guidance_embedded else frozenset({FLOW, BLOCK_CACHE})

    def text_layers(self, clip_skip: int) -> tuple[TextLayer, ...]:
        return (TextLayer(), TextLayer())  # CLIP's pooled output and T5's last hidden state, whatever the clip skip

    def model_call(self, pipeline) -> Callable:
        return TransformerCall(pipeline.transformer)

    def unet_kwargs(self, conditioning: Conditioning, width: int, height: int) -> ModelInputs:
        return ModelInputs(positive={"pooled_projections": conditioning.pooled},
                           negative={"pooled_projections": conditioning.negative_pooled})


# What a model of each variant draws best with, as Black Forest Labs and Forge run them; the UI applies them when
# the model is chosen, the engine never overrides a request.
DEV_DEFAULTS = MappingProxyType({"cfg_scale": 1.0, DISTILLED_CFG: 3.5, "sampler": "Euler", "schedule": "Simple", "steps": 20})
SCHNELL_DEFAULTS = MappingProxyType({"cfg_scale": 1.0, "sampler": "Euler", "schedule": "Simple", "steps": 4})

FLUX_DEV = Flux1("flux-dev", native_size=(1024, 1024), latent=LATENT, defaults=DEV_DEFAULTS, guidance_embedded=True)
FLUX_SCHNELL = Flux1("flux-schnell", native_size=(1024, 1024), latent=LATENT, defaults=SCHNELL_DEFAULTS,
                     guidance_embedded=False)
