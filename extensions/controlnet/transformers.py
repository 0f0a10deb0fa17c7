"""ControlNets for the flow transformers: SD 3.5's ``SD3ControlNetModel``, Flux.1's ``FluxControlNetModel``.

A transformer ControlNet sees the control image as VAE latents, not pixels, runs a copy of the first
transformer blocks, and returns one residual per block; the family's transformer adds them to its
blocks' hidden states (diffusers: ``block_controlnet_hidden_states`` for SD3; ``FluxControl`` for Flux). The SD3 maths follows
diffusers' ``StableDiffusion3ControlNetPipeline``: the control image in [-1, 1] through the VAE,
(latent − shift)·scale (no shift for the InstantX models, which also read zeros as the pooled text:
``force_zeros_for_pooled_projection``), the same latents, timestep and text as the transformer.
The control image is encoded to the posterior's mean (diffusers draws a sample), so a seed repeats.

Control modes, as for UNets (``hook``): Balanced scales every residual by the weight; the two other
modes weaken shallow blocks — residual i of n by 0.825^(12·(n−1−i)/(n−1)), sd-webui-controlnet's
soft injection spread over the transformer's depth — and "ControlNet is more important" controls
only the conditional half of the CFG batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import torch

from .hook import SOFT_INJECTION_BASE, SOFT_INJECTION_DEPTH, in_window


def depth_scales(count: int) -> list[float]:
    """Soft injection over ``count`` transformer residuals: the deepest at full weight, the first at 0.825^12."""
    if count <= 1:
        return [1.0] * count
    return [SOFT_INJECTION_BASE ** (SOFT_INJECTION_DEPTH * (count - 1 - i) / (count - 1)) for i in range(count)]


def _vae_latents(model, control: torch.Tensor, shift: float) -> torch.Tensor:
    """The control map ([0, 1], 1×3×H×W) as the model's latents: (mean of the VAE posterior − shift)·scaling factor."""
    vae = model.pipeline.vae
    with torch.no_grad():
        mean = vae.encode((control * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mode()
    return ((mean - shift) * vae.config.scaling_factor).to(model.device, model.dtype)


@dataclass(frozen=True)
class SD3Control:
    """SD 3.5: ``SD3ControlNetModel`` → ``block_controlnet_hidden_states``."""

    model_class: str = "SD3ControlNetModel"

    def condition(self, controlnet, model, control: torch.Tensor) -> torch.Tensor:
        if getattr(controlnet.config, "use_pos_embed", True) is False:
            # Stability's SD 3.5 ControlNets share the transformer's patch embedding (as diffusers' pipeline sets it).
            controlnet.pos_embed = controlnet._get_pos_embed_from_transformer(model.pipeline.transformer).to(
                model.device, model.dtype)
        shift = 0.0 if controlnet.config.force_zeros_for_pooled_projection else model.pipeline.vae.config.shift_factor
        return _vae_latents(model, control, shift)

    def residuals(self, controlnet, condition: torch.Tensor, sample: torch.Tensor, timestep: torch.Tensor,
                  text: torch.Tensor, added: dict | None) -> dict[str, list[torch.Tensor]]:
        pooled = added["pooled_projections"]
        if controlnet.config.force_zeros_for_pooled_projection:
            pooled = torch.zeros_like(pooled)
        (samples,) = controlnet(hidden_states=sample, controlnet_cond=condition, conditioning_scale=1.0,
                                encoder_hidden_states=text if controlnet.config.joint_attention_dim is not None else None,
                                pooled_projections=pooled, timestep=timestep.expand(sample.shape[0]), return_dict=False)
        return {"block_controlnet_hidden_states": list(samples)}

    def flags(self, controlnet) -> dict:
        return {}


SCHNELL_CONTROL_GUIDANCE = 3.5  # FluxControlNetPipeline's default guidance_scale


@dataclass(frozen=True)
class FluxControl:
    """Flux.1: ``FluxControlNetModel`` → ``controlnet_block_samples`` and ``controlnet_single_block_samples``.

    As diffusers' ``FluxControlNetPipeline``: InstantX-style models read the control image's latents, packed into
    2×2 tokens as the transformer reads the image; XLabs models (``input_hint_block``) read the pixels in [-1, 1],
    and their residuals repeat over the transformer's blocks (``controlnet_blocks_repeat``). The control model sees
    what the transformer sees: the packed latent, σ (the timestep ÷ 1000), the distilled CFG scale where it embeds
    one, the pooled CLIP and T5 tokens, and the family's position ids."""

    model_class: str = "FluxControlNetModel"

    def condition(self, controlnet, model, control: torch.Tensor) -> torch.Tensor:
        from engine.families.flux import pack

        if getattr(controlnet.config, "num_mode", None):
            from engine.errors import ValidationError

            raise ValidationError("controlnet", "a Flux ControlNet-Union needs a control type, which units have no "
                                                "field for yet; use a single-type Flux ControlNet")
        if controlnet.input_hint_block is not None:
            return (control * 2 - 1).to(model.device, model.dtype)
        return pack(_vae_latents(model, control, model.pipeline.vae.config.shift_factor))

    def residuals(self, controlnet, condition: torch.Tensor, sample: torch.Tensor, timestep: torch.Tensor,
                  text: torch.Tensor, added: dict | None) -> dict[str, list[torch.Tensor]]:
        import torch.nn.functional as F

        from engine.families.flux import DISTILLED_CFG, PATCH, pack, position_ids

        batch, _, height, width = sample.shape
        if (height | width) % PATCH:  # odd latent sides: padded for the call as the family's model call pads them
            sample = F.pad(sample, (0, width % PATCH, 0, height % PATCH), mode="replicate")
        rows, columns = sample.shape[2] // PATCH, sample.shape[3] // PATCH
        img_ids, txt_ids = position_ids(rows, columns, text.shape[1], sample.device, sample.dtype)
        guidance = None
        if controlnet.config.guidance_embeds:
            # A schnell model takes no distilled CFG scale; a guidance-embedded control model then gets diffusers' 3.5.
            scale = float(added.get(DISTILLED_CFG, SCHNELL_CONTROL_GUIDANCE))
            guidance = torch.full((batch,), scale, device=sample.device, dtype=torch.float32)
        double, single = controlnet(
            hidden_states=pack(sample), controlnet_cond=condition, conditioning_scale=1.0,
            timestep=(timestep / 1000).to(sample.dtype).expand(batch), guidance=guidance,
            pooled_projections=added["pooled_projections"], encoder_hidden_states=text, txt_ids=txt_ids, img_ids=img_ids,
            return_dict=False)
        out = {}
        if double is not None:
            out["controlnet_block_samples"] = list(double)
        if single is not None:
            out["controlnet_single_block_samples"] = list(single)
        return out

    def flags(self, controlnet) -> dict:
        return {"controlnet_blocks_repeat": controlnet.input_hint_block is not None}


# The model family's id → how its ControlNets run.
CONTROLS: dict[str, SD3Control | FluxControl] = {"sd3": SD3Control(), "flux": FluxControl()}


def control_for(family_id: str):
    return CONTROLS.get(family_id)


@dataclass
class TransformerUnit:
    index: int
    unit: object  # units.ControlNetUnit
    controlnet: torch.nn.Module
    condition: torch.Tensor  # what the control model reads (VAE latents of the map), batch 1
    do_cfg: bool
    _scales: list[float] | None = field(default=None, repr=False)

    def scales(self, count: int) -> list[float]:
        if self._scales is None or len(self._scales) != count:
            base = depth_scales(count) if self.unit.soft_injection else [1.0] * count
            self._scales = [self.unit.weight * scale for scale in base]
        return self._scales


class TransformerControlHook:
    """Implements ``engine.sampling.StepHook`` for a flow family's transformer ControlNets."""

    def __init__(self, control, units: list[TransformerUnit]):
        self.control = control
        self.units = units

    def unet_kwargs(self, point, latent_model_input: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    added_cond_kwargs: dict | None) -> dict:
        total: dict = {}
        for active in self.units:
            if not in_window(active.unit.guidance_start, active.unit.guidance_end, point.fraction):
                continue
            for key, residuals in self._run(active, point.timestep, latent_model_input, encoder_hidden_states,
                                            added_cond_kwargs).items():
                total[key] = [a + b for a, b in zip(total[key], residuals)] if key in total else residuals
            total.update(self.control.flags(active.controlnet))
        return total

    def _run(self, active: TransformerUnit, timestep, sample, text, added) -> dict[str, list[torch.Tensor]]:
        batch = sample.shape[0]
        cond_only = active.unit.cfg_injection and active.do_cfg and batch % 2 == 0
        if cond_only:  # the CFG batch is [unconditional; conditional]
            half = batch // 2
            sample, text = sample[half:], text[half:]
            timestep = timestep[half:] if timestep.ndim and timestep.shape[0] == batch else timestep
            added = {key: value[half:] if torch.is_tensor(value) and value.ndim and value.shape[0] == batch else value
                     for key, value in added.items()} if added else added
        condition = active.condition.expand(sample.shape[0], *active.condition.shape[1:])
        outputs = self.control.residuals(active.controlnet, condition, sample, timestep, text, added)
        scales = iter(active.scales(sum(len(residuals) for residuals in outputs.values())))  # depth order: lists in order
        scaled = {key: [residual * next(scales) for residual in residuals] for key, residuals in outputs.items()}
        if cond_only:
            scaled = {key: [torch.cat([torch.zeros_like(r), r]) for r in residuals] for key, residuals in scaled.items()}
        return scaled


def transformer_hooks(context, control, active: list) -> list:
    """One hook for the units that act in this pass (``hook.ActiveUnit``s: the control map as a [0, 1] tensor)."""
    units = [TransformerUnit(unit.index, unit.unit, unit.controlnet, control.condition(unit.controlnet, context.model,
                                                                                        unit.control), context.do_cfg)
             for unit in active]
    return [TransformerControlHook(control, units)] if units else []
