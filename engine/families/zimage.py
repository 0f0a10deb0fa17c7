"""Z-Image (Turbo and base; Tongyi-MAI 2025): a single-stream DiT ("S3-DiT") on Flux.1's 16-channel latent, sampled as
a rectified flow, conditioned by an LLM (Qwen3) instead of CLIP/T5.

- **Latent**: Flux.1's VAE: 16 channels; the model's latent is (VAE latent − 0.1159) · 0.3611. Preview factors and
  bias are ComfyUI's published ``Flux`` latent format (``comfy/latent_formats.py``), the same VAE's.
- **Parameterization**: flow, with two twists the pipeline (diffusers ``ZImagePipeline``) applies around the
  transformer and that live here, in the model call, not in the shared denoiser: the transformer sees the *flow time*
  t = 1 − σ (its timestep is ``(1000 − σ·1000) / 1000``, scaled by its own ``t_scale`` inside), and it predicts the
  *negated* velocity: v = ε − x₀ = −output. The training σs are the scheduler config's ``shift`` (3.0 for Turbo) applied
  to t = 1/1000 … 1 as for SD3 (Esser et al. 2024).
- **Prompt encoding**: the prompt in Qwen's chat template (one user turn, generation prompt, thinking on), through the
  Qwen3 encoder; the second-to-last hidden state of the real (unpadded) tokens conditions the model, each prompt at its
  own length. The LLM reads the plain text (A1111's syntax taken out); a prompt cut at 512 tokens is reported
  (``engine.flow_prompts``).
  The engine batches embeddings as one tensor, so the positive and negative are zero-padded to a common length and a
  token mask travels with them (``text_mask``); the model call cuts each row back to its real tokens, which is what the
  transformer is given in the pipeline.
- **Guidance**: the pipeline's ``guidance_scale`` g means pos + g·(pos − neg), A1111's CFG scale is 1 + g: Turbo's
  g = 0 is CFG 1 (no negative pass).
"""
from __future__ import annotations

from types import MappingProxyType

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ..fields import FLOW
from ..flow_prompts import FlowPromptEncoder, FlowPrompts, MaskedConditioning, PlainEncoder
from ..model_files.layout import FileLayout, qwen3_slot
from ..prompts import TextLayer
from .base import Family, ModelInputs
from .flux import LATENT as FLUX_LATENT
from .patching import crop_to, pad_to_patches

LATENT = FLUX_LATENT  # Z-Image draws in Flux.1's VAE latent: its constants, preview factors and TAESD (taef1)
DEFAULT_SHIFT = 3.0  # Z-Image Turbo's scheduler config; a folder's own ``shift`` wins
TEXT_MASK = "text_mask"  # the model-call input that says which embedding tokens are real


# The transformer alone as Tongyi-MAI/ComfyUI publish it (z_image_turbo_bf16.safetensors: ``x_embedder``, fused
# ``attention.qkv``, ``attention.out``, ``q_norm``/``k_norm``, ``final_layer``), read by diffusers' own converter
# (``convert_z_image_transformer_checkpoint_to_diffusers``: renames and a qkv split, at any width); the VAE is Flux.1's
# ae.safetensors (original names); the Qwen3 encoder a file of its own.
def _config_variant(names: set[str], shape_of) -> str | None:
    """The shipped config (Z-Image Turbo's: 30 layers of width 3840 on Qwen3-4B's 2560) when the weights have its shape."""
    layers = {int(name.split(".")[1]) for name in names if name.startswith("layers.")}
    if len(layers) != 30 or "cap_embedder.1.weight" not in names or shape_of("cap_embedder.1.weight") != [3840, 2560]:
        return None
    return ""


FILE_LAYOUT = FileLayout(
    transformer_prefix="model.diffusion_model.",
    transformer_marker="layers.0.adaLN_modulation.0.weight",  # diffusers' marker; Lumina 2 keeps adaLN_modulation.1
    vae_prefix="vae.",
    vae_marker="decoder.conv_in.weight",
    text_encoders=(qwen3_slot(),),
    config_variant=_config_variant,
)


class ZImageTransformerCall:
    """A Z-Image transformer called the way the denoiser calls a UNet: ``timestep`` is σ·1000 and the result is the
    velocity ε − x₀; the transformer itself takes lists (one latent [C, 1, H, W] and one caption [L, D] per image),
    the flow time 1 − σ, and answers the negated velocity."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.patch = int(transformer.config.all_patch_size[0])  # odd latent sides are padded to whole patches (patching.py)

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, *, encoder_hidden_states: torch.Tensor,
                 added_cond_kwargs: dict | None = None, return_dict: bool = False, **hook_kwargs) -> tuple[torch.Tensor]:
        mask = (added_cond_kwargs or {})[TEXT_MASK]
        captions = [row[keep > 0.5] for row, keep in zip(encoder_hidden_states, mask)]
        flow_time = (1000 - timestep.float().expand(x.shape[0])) / 1000  # as ZImagePipeline writes it
        height, width = x.shape[-2:]
        latents = list(pad_to_patches(x, self.patch).unsqueeze(2).unbind(0))
        outputs = self.transformer(latents, flow_time, captions, return_dict=False, **hook_kwargs)[0]
        return (-crop_to(torch.stack(outputs).squeeze(2), height, width),)


def _qwen3(pipeline, text: str, max_tokens: int) -> torch.Tensor:
    """Qwen3's second-to-last hidden state of the text's real tokens in its chat turn ([1, L, D]; diffusers' own
    ``ZImagePipeline`` helper)."""
    return pipeline._encode_prompt(prompt=[text], device=pipeline.text_encoder.device, max_sequence_length=max_tokens)[0][None]


# No CLIP: the LLM gets the plain text, in a chat turn with thinking on, up to diffusers' 512 tokens, each prompt at its
# own length.
PROMPTS = FlowPrompts(plain=PlainEncoder("tokenizer", "text_encoder", "Qwen3", 512, _qwen3,
                                         chat=MappingProxyType({"enable_thinking": True})),
                      variable_length=True)


@dataclass(frozen=True)
class ZImage(Family):
    id: ClassVar[str] = "zimage"
    title: ClassVar[str] = "Z-Image"
    traits: ClassVar[frozenset[str]] = frozenset({FLOW})
    denoiser: ClassVar[str] = "transformer"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline")
    components: ClassVar[tuple[str, ...]] = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    embedding_keys: ClassVar[tuple[str, ...]] = ()  # no CLIP: textual-inversion files do not apply
    file_layout: ClassVar[FileLayout] = FILE_LAYOUT
    # The S3-DiT splits its token sequence by each caption's own length (Python ints read from the inputs), which a
    # trace would freeze at the first call's lengths: a replay failed on inpaint's second prompt length.
    traceable_call: ClassVar[bool] = False

    def matches_config(self, config: dict) -> bool:
        """The S3-DiT's config: caption features fed straight from the LLM (``cap_feat_dim``) and per-patch-size
        embedders (``all_patch_size``)."""
        return "cap_feat_dim" in config and "all_patch_size" in config

    def matches_unet_keys(self, keys: set[str], shape_of: Callable[[str], list[int]], prefix: str) -> bool:
        return False  # no UNet

    def prompt_encoder(self, components) -> FlowPromptEncoder:
        return FlowPromptEncoder(components, PROMPTS)

    def parameterization(self, scheduler_config: dict) -> str:
        return "flow"

    def noise_table(self, scheduler_config: dict, zero_terminal_snr: bool | None = None, shift: float | None = None):
        """The shifted flow σs (``NoiseTable.for_flow``) with the request's ``shift``, else the folder's fixed one."""
        from ..sampling.noise_table import NoiseTable

        return NoiseTable.for_flow(float(shift or scheduler_config.get("shift", DEFAULT_SHIFT)),
                                   int(scheduler_config.get("num_train_timesteps", 1000)))

    def text_layers(self, clip_skip: int) -> tuple[TextLayer, ...]:
        return (TextLayer(from_end=2, final_norm=False),)  # the LLM's second-to-last hidden state; Clip skip does not apply

    def network_components(self) -> dict[str, str]:
        return {"lora_unet_": "transformer", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}

    def model_call(self, pipeline) -> Callable:
        return ZImageTransformerCall(pipeline.transformer)

    def unet_kwargs(self, conditioning: MaskedConditioning, width: int, height: int) -> ModelInputs:
        return ModelInputs(positive={TEXT_MASK: conditioning.prompt_mask}, negative={TEXT_MASK: conditioning.negative_mask})


# Z-Image Turbo's recommended settings (8 steps of Euler, no CFG); the base model wants CFG (~5) and more steps.
ZIMAGE = ZImage("zimage", native_size=(1024, 1024), latent=LATENT,
                defaults=MappingProxyType({"cfg_scale": 1.0, "steps": 8, "sampler": "Euler", "schedule": "Simple"}))
