"""The denoiser: D(x, σ) → x̂₀ with classifier-free guidance, whatever the model predicts.

Samplers see only this function (see ``types``). It turns σ into what the model takes, runs the negative and the
positive prompt in one batch, applies CFG on x̂₀ and, when inpainting, keeps the known region. The formulas are
k-diffusion's ``CompVisDenoiser`` / ``CompVisVDenoiser`` (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", table 1, with σ_data = 1), which A1111 samples with:

- the model sees ``x · c_in`` with ``c_in = 1/√(σ² + 1)`` and a fractional timestep ``t`` interpolated in log σ
  from the model's noise table;
- eps: ``x̂₀ = x − σ · ε(x · c_in, t)``;
- v:   ``x̂₀ = x · 1/(σ² + 1) − σ/√(σ² + 1) · v(x · c_in, t)``;
- flow (SD 3.5; rectified flow): the model takes x as it is at t = σ · 1000 and ``x̂₀ = x − σ · v``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .noise_table import NoiseTable

EPS, V_PREDICTION, FLOW = "eps", "v", "flow"


def noise_table_for(model, zero_terminal_snr: bool = False, width: int | None = None, height: int | None = None,
                    shift: float | None = None, steps: int | None = None) -> tuple[NoiseTable, str]:
    """The model's noise table and parameterization ("eps", "v" or "flow"), as its family reads them from the model's
    scheduler config: only the training facts (β range and shape, prediction type), never how diffusers would
    space timesteps. Zero terminal SNR off follows the config's own ``rescale_betas_zero_snr``.

    ``width``×``height`` (pixels) and ``steps``: the picture the pass draws, for the families whose σs depend on it
    (Flux.1 shifts them by the image's token count, Flux.2 by its token count and step count); without them, the family's table for no particular size. ``shift`` (the request's
    "Shift"; None or 0: the model's own) overrides a flow family's timestep shift, in place of any size-dependent one;
    it reaches the family only when set."""
    family, config = model.family, model.pipeline.scheduler.config
    overrides = {"shift": float(shift)} if shift else {}
    if width is None or height is None:
        return family.noise_table(config, zero_terminal_snr or None, **overrides), family.parameterization(config)
    latent_size = (width // model.vae_scale_factor, height // model.vae_scale_factor)
    return (family.noise_table_for_latent(config, latent_size, zero_terminal_snr or None, steps=steps, **overrides),
            family.parameterization(config))


@dataclass(frozen=True)
class ModelCallPoint:
    """Where in the pass a model call happens: what extension hooks are keyed by."""

    sigma: torch.Tensor  # σ of the call, one per image
    timestep: torch.Tensor  # the fractional timestep the model is given, one per batch row
    fraction: float  # the fraction of the schedule done: i/N while σ lies in (σ_{i+1}, σ_i] of the pass's N steps


class StepHook(Protocol):
    """What an extension may add to each UNet call (e.g. a control model's residuals).

    Keyed by the call's σ and schedule fraction, never by a step index: a second-order sampler calls the model
    twice per step, and an adaptive one an unknown number of times.
    """

    def unet_kwargs(self, point: ModelCallPoint, latent_model_input: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    added_cond_kwargs: dict | None) -> dict: ...


@dataclass
class InpaintInputs:
    """Latent-space inpainting inputs. ``mask`` is 1 where the image is regenerated."""

    mask: torch.Tensor
    image_latents: torch.Tensor
    masked_image_latents: torch.Tensor | None = None  # only for 9-channel inpainting UNets
    blend: bool = True  # keep the known region: x̂₀ ← init outside the mask (A1111's CFGDenoiser blend)


@dataclass
class GuidedDenoiser:
    """Implements ``types.Denoiser`` for a UNet with classifier-free guidance."""

    unet: torch.nn.Module
    table: NoiseTable
    parameterization: str
    prompt_embeds: torch.Tensor  # [uncond; cond] when guidance is on, else cond only; in the model's dtype
    cfg_scale: float
    do_cfg: bool
    added_cond_kwargs: dict | None = None
    inpaint: InpaintInputs | None = None
    hooks: list[StepHook] = field(default_factory=list)
    schedule: torch.Tensor | None = None  # the pass's σs, for hooks' schedule fraction
    flow_timestep_scale: float = 1000.0  # flow models: the timestep the model sees is σ times this (the family's)
    uncond_denoised: torch.Tensor | None = field(default=None, init=False)
    calls: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._log_sigmas = self.table.sigmas.log()
        # σ → (σ per batch row, c_in column, timestep): a sampler asks the same few σs every step, and the
        # fractional timestep alone is a dozen ops over the whole noise table. Kept for CPU σs only, whose value
        # is read without waiting on a device.
        self._scalings: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._schedule_scaled: torch.Tensor | None = None  # the schedule whose σs are in the memo

    def fraction_done(self, sigma: float) -> float:
        """i/N for σ in (σ_{i+1}, σ_i] of the pass's schedule; 0 above σ₀."""
        if self.schedule is None or len(self.schedule) < 2:
            return 0.0
        steps = len(self.schedule) - 1
        index = int((self.schedule[:-1] >= sigma).sum()) - 1
        return min(max(index, 0), steps - 1) / steps

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        sigma = sigma.to(torch.float32)
        copies = 2 if self.do_cfg else 1
        x_in = torch.cat([x] * copies)
        sigma_in, c_in, timestep = self._scalings_for(sigma, copies)
        # Only the model runs in its own dtype: the sampler's arithmetic and every noise draw stay float32 on every
        # device, so a half-precision GPU gives the CPU's picture for the same seed.
        scaled = x_in if self.parameterization == FLOW else x_in * c_in  # a flow model's c_in is 1: x·1 is x, bit for bit
        model_input = scaled.to(self.prompt_embeds.dtype)
        inpaint = self.inpaint
        if inpaint is not None and inpaint.masked_image_latents is not None:
            extra = torch.cat([inpaint.mask, inpaint.masked_image_latents], dim=1).to(model_input.dtype)
            model_input = torch.cat([model_input, torch.cat([extra] * copies)], dim=1)
        unet_kwargs: dict = {}
        if self.hooks:
            point = ModelCallPoint(sigma, timestep, self.fraction_done(float(sigma[0])))
            for hook in self.hooks:
                unet_kwargs = _merge_residuals(unet_kwargs, hook.unet_kwargs(point, model_input, self.prompt_embeds, self.added_cond_kwargs))
        output = self.unet(model_input, timestep, encoder_hidden_states=self.prompt_embeds,
                           added_cond_kwargs=self.added_cond_kwargs, return_dict=False, **unet_kwargs)[0].float()
        denoised = self._to_denoised(x_in, sigma_in, output)
        if self.do_cfg:
            uncond, cond = denoised.chunk(2)
            self.uncond_denoised = uncond
            denoised = uncond + (cond - uncond) * self.cfg_scale  # A1111's combine_denoised, on x̂₀
        else:
            self.uncond_denoised = denoised
        if inpaint is not None and inpaint.blend:
            keep = 1 - inpaint.mask
            denoised = denoised * inpaint.mask + inpaint.image_latents * keep
        return denoised

    def _scalings_for(self, sigma: torch.Tensor, copies: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """σ for each batch row, c_in as a column to multiply x by, and the model's timestep: the same tensors,
        computed by the same ops, whether they come from the memo or not."""
        key = (copies, tuple(sigma.tolist())) if sigma.device.type == "cpu" else None
        found = self._scalings.get(key) if key is not None else None
        if found is None and key is not None and self._schedule_scaled is not self.schedule:
            self._scale_schedule(sigma.numel(), copies)
            found = self._scalings.get(key)
        if found is None:
            sigma_in = torch.cat([sigma] * copies)
            c_in, timestep = self._model_scalings(sigma_in)
            found = (sigma_in, c_in[:, None, None, None], timestep)
            if key is not None and len(self._scalings) < 4096:
                self._scalings[key] = found
        return found

    def _scale_schedule(self, batch: int, copies: int) -> None:
        """The memo for every σ of the pass's schedule at once, in one vectorised call: a single-step sampler asks
        each of them once, so the memo alone never hit, and ``_model_scalings`` per step was a fifth of the per-step
        overhead (issue #22). Every op is elementwise, so each row is the value a call for that σ alone computes."""
        self._schedule_scaled = self.schedule
        if self.schedule is None or self.schedule.device.type != "cpu" or len(self._scalings) >= 4096:
            return
        rows = self.schedule.to(torch.float32)[:, None].expand(-1, batch * copies).contiguous()
        c_in, timestep = self._model_scalings(rows.flatten())
        c_in, timestep = c_in.view(rows.shape), timestep.view(rows.shape)
        for row, value in enumerate(rows[:, 0].tolist()):
            self._scalings.setdefault((copies, (value,) * batch),
                                      (rows[row], c_in[row][:, None, None, None], timestep[row]))

    def _model_scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's input scale and timestep for each σ.

        eps and v (k-diffusion's CompVis denoisers): x/√(σ²+1) at the fractional training timestep whose σ
        this is. Flow (rectified flow, Liu et al. 2022; Esser et al. 2024): x as it is, where x = (1−σ)·x₀ + σ·ε,
        at t = σ times the family's timestep scale (1000 for SD3 and Flux).
        """
        if self.parameterization == FLOW:
            return torch.ones_like(sigma), sigma * self.flow_timestep_scale
        c_in = 1 / (sigma ** 2 + 1) ** 0.5  # written as k-diffusion writes it, so results agree to the last bit
        return c_in, self.table.sigma_to_t(sigma)

    def _to_denoised(self, x: torch.Tensor, sigma: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        sigma = sigma[:, None, None, None]
        if self.parameterization == FLOW:
            return x - output * sigma  # the model predicts the velocity v = ε − x₀
        if self.parameterization == EPS:
            return x + output * -sigma  # CompVisDenoiser: c_out = −σ
        if self.parameterization == V_PREDICTION:
            c_skip = 1 / (sigma ** 2 + 1)
            c_out = -sigma / (sigma ** 2 + 1) ** 0.5
            return output * c_out + x * c_skip  # CompVisVDenoiser, σ_data = 1
        raise ValueError(f"unknown parameterization {self.parameterization!r}; one of {EPS}, {V_PREDICTION}, {FLOW}")


def _merge_residuals(current: dict, new: dict) -> dict:
    """Several hooks may add residuals to the same UNet inputs: sum them."""
    merged = dict(current)
    for key, value in new.items():
        if key in current and current[key] is not None and value is not None:
            if isinstance(value, (list, tuple)):
                merged[key] = [a + b for a, b in zip(current[key], value)]
            else:
                merged[key] = current[key] + value
        else:
            merged[key] = value
    return merged
