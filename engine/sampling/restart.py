"""A1111's "Restart" sampler: Heun steps down a Karras schedule, with one or two jumps back up in noise.

Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes") alternates a
deterministic ODE solve with a "restart": add fresh noise to return from a low σ to a higher one and solve that
interval again, which contracts accumulated error. A1111 picks the restart interval from the step count alone.
"""
from __future__ import annotations

import math

import torch

from . import flow as flow_path
from .schedules import karras_sigmas
from .types import Denoiser, NoiseSource, StepCallback, StepInfo

__all__ = ["restart_step_pairs", "sample_restart"]

RESTART_MIN_SIGMA = 0.1  # the restart interval runs from the schedule's σ nearest these two values
RESTART_MAX_SIGMA = 2.0


def _nearest_index(sigmas: torch.Tensor, value: float) -> int:
    return int(torch.argmin((sigmas - value).abs()))


def restart_step_pairs(sigmas: torch.Tensor, flow: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (σ, σ_next) pairs A1111's Restart walks for a schedule of ``len(sigmas) − 1`` steps.

    Under 20 steps: the schedule as given, no restart. From 20 steps: a Karras schedule from the given σ_max to
    the given last nonzero σ, shortened by the restart steps (9 once; from 36 steps, steps//4 twice); after the
    main step that lands nearest σ = 0.1, each restart climbs to the σ nearest 2 and walks a Karras schedule of
    its own back down. The total number of pairs is the step count; ``σ_next > σ`` never occurs inside a pair.
    ``flow``: the σs are a rectified-flow model's, and 0.1 and 2 are read as the variance-exploding levels they
    stand for (σ = s/(1 + s), ``flow``), so the restart spans the same signal-to-noise range as on an ε-model.
    """
    steps = len(sigmas) - 1
    low, high = RESTART_MIN_SIGMA, RESTART_MAX_SIGMA
    if flow:
        low, high = (float(flow_path.to_flow(torch.tensor(level))) for level in (low, high))
    restart: tuple[int, int, int] | None = None  # (index after which to restart, steps per restart, times)
    if steps >= 20:
        restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = karras_sigmas(steps - restart_steps * restart_times, float(sigmas[-2]), float(sigmas[0]))
        restart = (_nearest_index(sigmas, low), restart_steps + 1, restart_times)
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if restart is not None and i + 1 == restart[0]:
            min_index, points, times = restart
            max_index = _nearest_index(sigmas, high)
            if max_index < min_index:
                climb = karras_sigmas(points, float(sigmas[min_index]), float(sigmas[max_index]))[:-1]
                pairs.extend(list(zip(climb[:-1], climb[1:])) * times)
    return pairs


def sample_restart(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSource,
                   callback: StepCallback | None = None, s_noise: float = 1.0, flow: bool = False) -> torch.Tensor:
    """Restart sampling (Xu et al. 2023) as A1111 runs it: Heun steps over :func:`restart_step_pairs`.

    Start: noise·σ₀ (a k-sampler; A1111's default schedule for it is Karras).
    Each pair is a Heun step (Euler when it ends at σ = 0: two model calls per step, one for the last, so
    2·steps − 1 calls). Where a pair starts above the σ the previous one ended at, fresh noise from ``noise`` of
    std s_noise·√(σ² − σ_prev²) is added first, one draw per restart, in walking order.
    ``flow``: a rectified-flow model's σs; the Heun steps are the same ODE steps, the restart climbs with the
    flow re-noise of ``flow.renoise`` (the signal keeps its (1 − σ) scale).
    """
    s_in = x.new_ones([x.shape[0]])
    last_sigma = None
    for i, (sigma, sigma_next) in enumerate(restart_step_pairs(sigmas, flow)):
        if last_sigma is not None and last_sigma < sigma:
            if flow:
                scale, noise_std = flow_path.renoise(torch.as_tensor(last_sigma), torch.as_tensor(sigma))
                x = x * scale + noise(last_sigma, sigma) * (s_noise * noise_std)
            else:
                x = x + noise(last_sigma, sigma) * (s_noise * math.sqrt(float(sigma) ** 2 - float(last_sigma) ** 2))
        denoised = denoiser(x, sigma * s_in)
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = (x_euler - denoiser(x_euler, sigma_next * s_in)) / sigma_next
            x = x + (d + d_next) / 2 * dt
        last_sigma = sigma_next
        if callback is not None:
            callback(StepInfo(i=i, x=x, sigma=sigma, sigma_hat=sigma, denoised=denoised))
    return x
