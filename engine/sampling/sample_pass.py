"""One sample pass, as A1111 1.10 runs it: σs, start latent, noise sources, eta, then the sampler function.

- σs: the schedule's (``steps + 1`` values, or ``steps + 2`` with the next-to-last dropped for DPM2, DPM2 a and
  DPM++ 3M SDE); timestep samplers bring their own σs and ignore the schedule.
- txt2img starts from ``noise · σ₀``. img2img keeps the last ``t_enc + 1`` steps, where
  ``t_enc = int(min(denoising, 0.999) · steps)``, and starts from ``init + noise · σ₀``. Timestep samplers
  follow their own start rule (``start_latent``).
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
from . import flow
from . import noise as noise_sources
from . import schedules, table
from .types import StepInfo

StepCallback = Callable[[int, int, StepInfo], bool]
"""Called after each step with (steps done, steps planned, the step's record); return True to stop the pass."""


def schedule_table(spec: table.SamplerSpec, noise_table):
    """The noise table schedules read for this sampler: the model's, or the part a distilled sampler knows
    (LCM's 50 timesteps, which A1111's LCM denoiser carries as its own σ table)."""
    if spec.schedule_timesteps is None:
        return noise_table
    from .noise_table import NoiseTable

    timesteps = spec.schedule_timestep_function(len(noise_table.sigmas))
    return NoiseTable(noise_table.sigmas[timesteps], noise_table.align_your_steps)


def _own_sigmas(spec: table.SamplerSpec, noise_table, steps: int, **options) -> torch.Tensor:
    """A timestep sampler's own σs; on a flow model it walks the variance-exploding view's table (``flow``), and
    its σs are handed back as flow σs."""
    if noise_table.flow:
        sigmas = spec.own_sigma_function(flow.variance_exploding_table(noise_table), steps, **options)
        return flow.to_flow(sigmas.double()).to(torch.float32)
    return spec.own_sigma_function(noise_table, steps, **options).to(torch.float32)


def schedule_sigmas(spec: table.SamplerSpec, noise_table, schedule: str, steps: int) -> torch.Tensor:
    """The whole txt2img σ sequence for ``steps`` steps (before img2img trims it)."""
    if not spec.uses_schedule:
        return _own_sigmas(spec, noise_table, steps)
    noise_table = schedule_table(spec, noise_table)
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
        return _own_sigmas(spec, noise_table, steps, denoising_strength=denoising_strength)
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


def _timestep_sampler_on_flow_sigmas(spec: table.SamplerSpec, noise_table) -> bool:
    """A timestep sampler run as is on a flow model's σs (PLMS: its Adams–Bashforth combination of dx/dσ is well
    defined at σ = 1, where the ε of the variance-exploding view is not): it starts and ends in σ-space there."""
    return noise_table.flow and not spec.uses_schedule and spec.on_flow == flow.FLOW_AS_IS


def start_latent(spec: table.SamplerSpec, noise_table, sigmas: torch.Tensor, noise: torch.Tensor,
                 init_latents: torch.Tensor | None, steps: int, denoising_strength: float | None) -> torch.Tensor:
    """The σ-space latent the sampler starts from.

    k-samplers: ``noise · σ₀`` (txt2img) or ``init + noise · σ₀`` (img2img; ``(1 − σ₀)·init + σ₀·noise`` on a flow
    model's table, ``NoiseTable.noised``). A1111's timestep samplers start from unscaled noise in ᾱ-space, which is
    ``noise · √(1 + σ₀²)`` here, and noise their img2img init to the grid entry above the first kept one (``timestep_samplers.timestep_img2img_start``).
    """
    if spec.uses_schedule or _timestep_sampler_on_flow_sigmas(spec, noise_table):
        return noise * sigmas[0] if init_latents is None else noise_table.noised(init_latents.to(torch.float32), noise, sigmas[0])
    if init_latents is None:
        return noise * (1 + sigmas[0] ** 2) ** 0.5
    from .timestep_samplers import timestep_img2img_start

    return timestep_img2img_start(noise_table, steps, denoising_strength, init_latents.to(torch.float32), noise).to(torch.float32)


def _flow_latent(spec: table.SamplerSpec, latents: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """A variance-exploding view's result as the flow latent to decode: k-samplers return y at the last σ (DPM
    fast/adaptive at the last non-zero one), timestep samplers y_ᾱ = y/√(1 + s²) there (``timestep_samplers``)."""
    end = sigmas[sigmas > 0][-1] if spec.model_sigma_range else sigmas[-1]
    if not spec.uses_schedule:
        latents = latents * float((1 + end.double() ** 2) ** 0.5)
    return flow.from_variance_exploding(latents, end)


def run(*, sampler: str, denoiser, noise_table, sigmas: torch.Tensor, first_noise: torch.Tensor,
        image_noise: "noise_sources.ImageNoise", seeds: list[int], steps: int, init_latents: torch.Tensor | None = None,
        denoising_strength: float | None = None, eta: float | None = None, prediction_type: str | None = None,
        full_sigmas: torch.Tensor | None = None, on_step: StepCallback | None = None) -> PassResult:
    """Run one pass of ``sampler`` over ``sigmas`` (from ``pass_sigmas``) and return the latent to decode.

    ``first_noise`` is ``image_noise.first()``, drawn by the caller (inpainting's "latent noise" uses it too);
    later draws come from ``image_noise``. ``init_latents`` None is txt2img; with them, ``denoising_strength`` is
    the img2img strength ``sigmas`` were cut for. ``prediction_type`` is the model's, in diffusers' words
    ("epsilon", "v_prediction"). ``denoiser.schedule`` is set to the pass's σs so hooks can key
    on the fraction of the schedule done. ``full_sigmas`` is the whole schedule an img2img pass was cut from: A1111
    spans the SDE samplers' Brownian tree over it, not over the cut σs (default: ``sigmas``).
    """
    spec = table.find_sampler(sampler)
    sigmas = sigmas.to(first_noise.device, torch.float32)
    planned = len(sigmas) - 1
    first = first_noise.to(torch.float32)
    if hasattr(denoiser, "schedule"):
        denoiser.schedule = sigmas.cpu()
    view = None
    if noise_table.flow and spec.on_flow == flow.FLOW_VARIANCE_EXPLODING:
        # The sampler runs on the flow model's variance-exploding view: its σs, table, denoiser and noise translated.
        view = flow.VarianceExplodingView(denoiser)
        flow_table, noise_table = noise_table, flow.variance_exploding_table(noise_table)
        sigmas = flow.to_variance_exploding(flow.capped(sigmas.double(), flow_table)).to(torch.float32)
        if full_sigmas is not None:
            full_sigmas = flow.capped(full_sigmas.to(torch.float32), flow_table)
        denoiser = view
    x = start_latent(spec, noise_table, sigmas, first, init_latents, steps, denoising_strength)

    options = dict(spec.options)
    function = spec.function
    accepted = inspect.signature(function).parameters
    eta_value = resolved_eta(spec, eta)
    if eta_value is not None and "eta" in accepted:
        options["eta"] = eta_value
    # Samplers that work on training timesteps (UniPC's λs, LCM's snapping) get the model's table, and those that
    # form ε from the model's output as A1111 does get its prediction type.
    if "table" in accepted:
        options["table"] = noise_table
    if "prediction_type" in accepted and prediction_type is not None:
        options["prediction_type"] = prediction_type
    if noise_table.flow and spec.on_flow == flow.FLOW_STEP:
        options["flow"] = True
    if spec.model_sigma_range and init_latents is None:
        # A1111 starts DPM fast / adaptive from noise · σ₀ of the schedule but solves over the model's own σ range
        # in txt2img; these functions read that range from the ends of their σs (log-uniform, like their steps).
        sigmas = schedules.exponential(noise_table, planned).to(sigmas.device, torch.float32)
        sigmas[0], sigmas[-2] = noise_table.sigma_max, noise_table.sigma_min  # exactly, not through exp(log(σ))
        if view is not None:
            view.denoiser.schedule = flow.to_flow(sigmas).cpu()
        elif hasattr(denoiser, "schedule"):
            denoiser.schedule = sigmas.cpu()
    noise = None
    if spec.noise == table.ANCESTRAL_NOISE:
        noise = noise_sources.ancestral_noise(image_noise)
    elif spec.noise == table.BROWNIAN_NOISE:
        tree_sigmas = sigmas if full_sigmas is None else full_sigmas.to(sigmas.device, torch.float32)
        if view is not None:
            # The tree spans the flow σs, as ComfyUI's does on a flow model; the view asks it in flow σs.
            tree_sigmas = flow.to_flow(tree_sigmas.double()).float() if full_sigmas is None else tree_sigmas
        noise = noise_sources.brownian_noise(x, tree_sigmas, seeds)
    if view is not None:
        noise = view.noise(noise)

    last: list[StepInfo] = []

    def callback(info: StepInfo) -> None:
        last[:] = [info]
        # DPM adaptive reports every attempt, which may outnumber the planned steps: progress never passes the plan.
        done = min(info.i + 1, planned)
        if on_step is not None and on_step(done, planned, info) and info.i + 1 != planned:
            raise _StopPass  # a stop after the last step lets the sampler return its finished latent

    try:
        with torch.inference_mode():  # no autograd bookkeeping anywhere in the pass (cheaper than no_grad per op)
            if view is None:
                latents = function(denoiser, x, sigmas, noise, callback=callback, **options)
                if _timestep_sampler_on_flow_sigmas(spec, noise_table):
                    latents = latents * float((1 + sigmas[-1].double() ** 2) ** 0.5)  # back from its ᾱ-space result
            else:
                latents = function(denoiser, x, sigmas, noise, callback=view.callback(callback), **options)
                latents = _flow_latent(spec, latents, sigmas)
    except (_StopPass, Interrupted):
        if not last:
            raise  # nothing denoised yet: no image to show
        # The last finished step's x̂₀ is the picture so far (what A1111 decodes for an interrupted image).
        return PassResult(last[0].denoised, min(last[0].i + 1, planned), planned, stopped=True)
    return PassResult(latents, min(last[0].i + 1, planned) if last else planned, planned, stopped=False)
