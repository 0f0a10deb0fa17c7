"""Placeholder k-samplers (the `ksamplers` branch replaces this file)."""
from __future__ import annotations

import torch

from .types import StepInfo


def _ancestral_step(sigma_from, sigma_to, eta=1.0):
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, noise=None, callback=None):
    """Euler's method, Karras et al. 2022 algorithm 2 without churn."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        if callback is not None:
            callback(StepInfo(i, x, sigmas[i], sigmas[i], denoised))
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, noise=None, callback=None, eta=1.0, s_noise=1.0):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        sigma_down, sigma_up = _ancestral_step(float(sigmas[i]), float(sigmas[i + 1]), eta)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        if callback is not None:
            callback(StepInfo(i, x, sigmas[i], sigmas[i], denoised))
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, noise=None, callback=None):
    """DPM-Solver++(2M), Lu et al. 2022."""
    s_in = x.new_ones([x.shape[0]])
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
        if callback is not None:
            callback(StepInfo(i, x, sigmas[i], sigmas[i], denoised))
    return x
