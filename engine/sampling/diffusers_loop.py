"""The denoising loop: one function, shared by txt2img, img2img, inpaint and ControlNet.

It follows the diffusers Stable Diffusion pipelines step for step (same noise,
same scheduler calls, same guidance arithmetic), so at equal seeds it gives the
same pixels as ``StableDiffusionPipeline.__call__``, while adding what a studio
needs between steps: previews, interrupt/skip, inpaint blending and extension
hooks.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from ..errors import Interrupted


class StepHook(Protocol):
    """What an extension may add to each UNet call (e.g. ControlNet residuals)."""

    def unet_kwargs(self, step_index: int, timestep: torch.Tensor, latent_model_input: torch.Tensor,
                    encoder_hidden_states: torch.Tensor, added_cond_kwargs: dict | None) -> dict: ...


@dataclass
class InpaintInputs:
    """Latent-space inpainting inputs. ``mask`` is 1 where the image is regenerated."""

    mask: torch.Tensor
    image_latents: torch.Tensor
    noise: torch.Tensor
    masked_image_latents: torch.Tensor | None = None  # only for 9-channel inpainting UNets


@dataclass
class DenoiseJob:
    unet: torch.nn.Module
    scheduler: object
    latents: torch.Tensor
    timesteps: torch.Tensor
    prompt_embeds: torch.Tensor  # [uncond; cond] when guidance is on, else cond only
    guidance_scale: float
    do_cfg: bool
    generators: list[torch.Generator]
    added_cond_kwargs: dict | None = None
    inpaint: InpaintInputs | None = None
    hooks: list[StepHook] = field(default_factory=list)


StepCallback = Callable[[int, int, torch.Tensor], bool]
"""Called after each step with (step done, total, latents); return True to stop early."""


def _step_kwargs(scheduler, generators: list[torch.Generator]) -> dict:
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generators if len(generators) > 1 else generators[0]
    return kwargs


@torch.inference_mode()
def denoise(job: DenoiseJob, on_step: StepCallback | None = None) -> torch.Tensor:
    scheduler, unet, latents = job.scheduler, job.unet, job.latents
    step_kwargs = _step_kwargs(scheduler, job.generators)
    total = len(job.timesteps)
    for index, timestep in enumerate(job.timesteps):
        try:
            latents = _step(job, scheduler, unet, latents, index, timestep, step_kwargs)
        except Interrupted:
            if index == 0:
                raise  # nothing denoised yet: no image to show
            break  # interrupted inside the step: the image so far is the last finished step's
        if on_step is not None and on_step(index + 1, total, latents):
            break
    return latents


def _step(job: DenoiseJob, scheduler, unet, latents: torch.Tensor, index: int, timestep, step_kwargs: dict) -> torch.Tensor:
    """One sampler step: the latents after ``timestep``."""
    total = len(job.timesteps)
    inpaint = job.inpaint
    model_input = torch.cat([latents] * 2) if job.do_cfg else latents
    # Only the model runs in its own dtype: the sampler's arithmetic, and the noise an ancestral or SDE step draws
    # from the seeded CPU generators (diffusers draws it in the model output's dtype), stay float32 on every device,
    # so a half-precision GPU gives the CPU's picture for the same seed.
    model_input = scheduler.scale_model_input(model_input, timestep).to(job.prompt_embeds.dtype)
    if inpaint is not None and inpaint.masked_image_latents is not None:
        extra = torch.cat([inpaint.mask, inpaint.masked_image_latents], dim=1)
        model_input = torch.cat([model_input, torch.cat([extra] * 2) if job.do_cfg else extra], dim=1)
    unet_kwargs: dict = {}
    for hook in job.hooks:
        unet_kwargs.update(_merge_residuals(unet_kwargs, hook.unet_kwargs(index, timestep, model_input, job.prompt_embeds, job.added_cond_kwargs)))
    noise_pred = unet(
        model_input, timestep, encoder_hidden_states=job.prompt_embeds,
        added_cond_kwargs=job.added_cond_kwargs, return_dict=False, **unet_kwargs,
    )[0].float()
    if job.do_cfg:
        noise_uncond, noise_cond = noise_pred.chunk(2)
        noise_pred = noise_uncond + job.guidance_scale * (noise_cond - noise_uncond)
    latents = scheduler.step(noise_pred, timestep, latents, **step_kwargs, return_dict=False)[0]
    if inpaint is not None and inpaint.masked_image_latents is None:
        # 4-channel models: keep the known region on the noisy trajectory of the original
        # (the blending diffusers' inpaint pipeline and A1111 use).
        known = inpaint.image_latents
        if index < total - 1:
            known = scheduler.add_noise(known, inpaint.noise, job.timesteps[index + 1:index + 2])
        latents = (1 - inpaint.mask) * known + inpaint.mask * latents
    return latents


def _merge_residuals(current: dict, new: dict) -> dict:
    """Several hooks may add residuals to the same UNet inputs: sum them."""
    merged = dict(new)
    for key, value in new.items():
        if key in current and current[key] is not None and value is not None:
            if isinstance(value, (list, tuple)):
                merged[key] = [a + b for a, b in zip(current[key], value)]
            else:
                merged[key] = current[key] + value
    return merged
