"""Restart and LCM as A1111 1.10 runs them (modules/sd_samplers_extra.py, modules/sd_samplers_lcm.py).

Restart: Xu et al. 2023 ("Restart Sampling for Improving Generative Processes"). With N ≥ 20 steps
A1111 replaces the schedule by Karras σs over N − 9 steps between the given schedule's smallest
non-zero σ and its largest, and after reaching the σ nearest 0.1 it jumps back up to the σ nearest 2
once (re-noising with √(σ_hi² − σ_lo²) fresh noise) and descends again over a 10-point Karras
ladder. Every step is Heun's (Euler into σ = 0). With N ≥ 36 the restart block is N // 4 steps, twice.

LCM: Luo et al. 2023 ("Latent Consistency Models"). A1111's denoiser keeps 50 of the 1000 table
entries (t = 19, 39, ..., 999), treats the UNet output as ε whatever the model's parameterization,
calls it at integer t, and applies the consistency boundary scalings c_skip = σ_d²/((10t)² + σ_d²),
c_out = 10t/√((10t)² + σ_d²) with σ_d = 0.5. The sampler jumps to x̂₀ and re-noises to σ_next.
"""
from __future__ import annotations

import torch

from .ref_schedules import karras


def _to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def restart(model, x, sigmas, noise, s_noise: float = 1.0):
    s_in = x.new_ones([x.shape[0]])

    def heun(x, old, new):
        denoised = model(x, old * s_in)
        d = _to_d(x, old, denoised)
        dt = new - old
        if new == 0:
            return x + d * dt
        x_2 = x + d * dt
        d_2 = _to_d(x_2, new, model(x_2, new * s_in))
        return x + (d + d_2) / 2 * dt

    steps = sigmas.shape[0] - 1
    plan = {}
    if steps >= 20:
        block, times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = karras(steps - block * times, sigmas[-2].item(), sigmas[0].item())
        plan = {0.1: (block + 1, times, 2.0)}
    plan = {int(torch.argmin(abs(sigmas - low))): value for low, value in plan.items()}

    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in plan:
            points, times, high = plan[i + 1]
            top = int(torch.argmin(abs(sigmas - high)))
            if top < i + 1:
                ladder = karras(points, sigmas[i + 1].item(), sigmas[top].item())[:-1]
                for _ in range(times):
                    pairs.extend(zip(ladder[:-1], ladder[1:]))

    last = None
    for old, new in pairs:
        if last is not None and last < old:
            x = x + noise.next() * s_noise * (old ** 2 - last ** 2) ** 0.5
        x = heun(x, old, new)
        last = new
    return x


class LCMDenoiser:
    """A1111's ``LCMCompVisDenoiser``: 50 table σs, integer t, ε output, consistency scalings."""

    ORIGINAL_STEPS = 50
    SIGMA_DATA = 0.5

    def __init__(self, model):
        self.inner_model = model
        table = model.alphas_cumprod
        self.skip = len(table) // self.ORIGINAL_STEPS
        kept = table[torch.arange(self.ORIGINAL_STEPS) * self.skip + (self.skip - 1)]
        self.sigmas = ((1 - kept) / kept) ** 0.5
        self.log_sigmas = self.sigmas.log()

    def sigma_to_t(self, sigma):
        nearest = (sigma.log() - self.log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape)
        return nearest * self.skip + (self.skip - 1)

    def t_to_sigma(self, t):
        u = torch.clamp(((t - (self.skip - 1)) / self.skip).float(), min=0, max=len(self.sigmas) - 1)
        low, high, w = u.floor().long(), u.ceil().long(), u.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def get_sigmas(self, n):
        t = torch.linspace(self.sigma_to_t(self.sigmas[-1]), self.sigma_to_t(self.sigmas[0]), n)
        sigmas = self.t_to_sigma(t)
        return torch.cat([sigmas, sigmas.new_zeros([1])])

    def __call__(self, x, sigma, cond):
        c_in = (1 / (sigma ** 2 + 1) ** 0.5)[:, None, None, None]
        t = self.sigma_to_t(sigma)
        eps = self.inner_model.apply_model(x * c_in, t, cond)
        denoised = x + eps * (-sigma)[:, None, None, None]
        scaled = (t * 10.0)[:, None, None, None]
        c_skip = self.SIGMA_DATA ** 2 / (scaled ** 2 + self.SIGMA_DATA ** 2)
        c_out = scaled / (scaled ** 2 + self.SIGMA_DATA ** 2) ** 0.5
        return c_out * denoised + c_skip * x


def lcm(model, x, sigmas, noise):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise.next()
    return x
