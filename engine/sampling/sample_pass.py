"""One sample pass, as A1111 1.10 runs it: σs, start latent, noise sources, eta, then the sampler function.

- σs: the schedule's (``steps + 1`` values, or ``steps + 2`` with the next-to-last dropped for DPM2, DPM2 a and
  DPM++ 3M SDE); timestep samplers bring their own σs and ignore the schedule.
- txt2img starts from ``noise · σ₀``. img2img keeps the last ``t_enc + 1`` steps, where
  ``t_enc = int(min(denoising, 0.999) · steps)``, and starts from ``init + noise · σ₀``.
- The first noise and every later draw come from one ``ImageNoise`` per batch (per-image generators seeded with
  seed + i, variation seeds by slerp, ENSD reseeding); SDE samplers get a Brownian tree seeded per image.
- eta is the request's, or the sampler's default.

The callback sees every finished step; it may stop the pass (interrupt, skip), and an interrupt raised inside a
model call stops it too. Either way the pass ends with the last finished step's x̂₀, as A1111 shows an
interrupted image.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import Interrupted
from . import noise as noise_sources
from . import schedules, table
from .types import StepInfo

StepCallback = Callable[[int, int, StepInfo], bool]
"""Called after each step with (steps done, steps planned, the step's record); return True to stop the pass."""


def schedule_sigmas(spec: table.SamplerSpec, noise_table, schedule: str, steps: int) -> torch.Tensor:
    """The whole txt2img σ sequence for ``steps`` steps (before img2img trims it)."""
    if not spec.uses_schedule:
        return spec.own_sigma_function(noise_table, steps).to(torch.float32)
    function = schedules.find_schedule(table.resolve_schedule(spec.name, schedule)).function
    if spec.discard_next_to_last_sigma:
        sigmas = function(noise_table, steps + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]]).to(torch.float32)
    return function(noise_table, steps).to(torch.float32)


def img2img_steps(steps: int, denoising_strength: float) -> int:
    """A1111's t_enc: how many σ intervals below the start an img2img pass skips back from the end."""
    return int(min(denoising_strength, 0.999) * steps)


def pass_sigmas(spec: table.SamplerSpec, noise_table, schedule: str, steps: int, denoising_strength: float | None) -> torch.Tensor:
    """The σs this pass runs: the whole schedule for txt2img (``denoising_strength`` None), its tail for img2img."""
    if not spec.uses_schedule and denoising_strength is not None:
        return spec.own_sigma_function(noise_table, steps, denoising_strength=denoising_strength).to(torch.float32)
    sigmas = schedule_sigmas(spec, noise_table, schedule, steps)
    if denoising_strength is None:
        return sigmas
    t_enc = img2img_steps(steps, denoising_strength)
    return sigmas[steps - t_enc - 1:]


def resolved_eta(spec: table.SamplerSpec, eta: float | None) -> float | None:
    """The eta the sampler runs with: the request's, or the row's default; None for samplers without one."""
    if spec.eta_default is None:
        return None
    return spec.eta_default if eta is None else float(eta)


@dataclass
class PassResult:
    latents: torch.Tensor
    steps_done: int
    steps_planned: int
    stopped: bool  # the callback or an interrupt ended the pass before its last step


class _StopPass(Exception):
    """Raised from the step callback to end the sampler's loop."""


def run(*, sampler: str, denoiser, noise_table, sigmas: torch.Tensor, first_noise: torch.Tensor,
        image_noise: "noise_sources.ImageNoise", seeds: list[int], init_latents: torch.Tensor | None = None,
        eta: float | None = None, on_step: StepCallback | None = None) -> PassResult:
    """Run one pass of ``sampler`` over ``sigmas`` (from ``pass_sigmas``) and return the latent to decode.

    ``first_noise`` is ``image_noise.first()``, drawn by the caller (inpainting's "latent noise" uses it too);
    later draws come from ``image_noise``. ``init_latents`` None is txt2img. ``denoiser.schedule`` is set to the
    pass's σs so hooks can key on the fraction of the schedule done.
    """
    spec = table.find_sampler(sampler)
    sigmas = sigmas.to(first_noise.device, torch.float32)
    planned = len(sigmas) - 1
    first = first_noise.to(torch.float32)
    x = first * sigmas[0] if init_latents is None else init_latents.to(torch.float32) + first * sigmas[0]
    if hasattr(denoiser, "schedule"):
        denoiser.schedule = sigmas.cpu()

    options = dict(spec.options)
    function = spec.function
    accepted = inspect.signature(function).parameters
    eta_value = resolved_eta(spec, eta)
    if eta_value is not None and "eta" in accepted:
        options["eta"] = eta_value
    if spec.model_sigma_range and init_latents is None:
        # A1111 starts DPM fast / adaptive from noise · σ₀ of the schedule but solves over the model's own σ range
        # in txt2img; these functions read that range from the ends of their σs (log-uniform, like their steps).
        sigmas = schedules.exponential(noise_table, planned).to(sigmas.device, torch.float32)
        if hasattr(denoiser, "schedule"):
            denoiser.schedule = sigmas.cpu()
    noise = None
    if spec.noise == table.ANCESTRAL_NOISE:
        noise = noise_sources.ancestral_noise(image_noise)
    elif spec.noise == table.BROWNIAN_NOISE:
        noise = noise_sources.brownian_noise(x, sigmas, seeds)

    last: list[StepInfo] = []

    def callback(info: StepInfo) -> None:
        last[:] = [info]
        if on_step is not None and on_step(info.i + 1, planned, info):
            raise _StopPass

    try:
        latents = function(denoiser, x, sigmas, noise, callback=callback, **options)
    except (_StopPass, Interrupted):
        if not last:
            raise  # nothing denoised yet: no image to show
        done = last[0].i + 1
        # A stop after the last step keeps the finished x; earlier, the step's x̂₀ is the picture so far.
        return PassResult(last[0].x if done >= planned else last[0].denoised, done, planned, stopped=True)
    return PassResult(latents, last[0].i + 1 if last else planned, planned, stopped=False)
