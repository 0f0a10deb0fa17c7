"""A1111 1.10's timestep samplers (DDIM, DDIM CFG++, PLMS, UniPC), in A1111's own coordinates.

They work on the DDPM latent x_t (unscaled start noise), call the model at discrete timesteps and
read ᾱ from the model's table. With N steps the timesteps are t = 1, 1+k, ..., 1+(N−1)k for
k = 1000 // N (clipped to 999); none of them reads the schedule type.

- DDIM: Song et al. 2021 ("Denoising Diffusion Implicit Models"), eq. 12, η = 0 by default:
  N−1 model calls, from the top t down to the second, the last step landing on ᾱ at t = 1.
- DDIM CFG++: Chung et al. 2024 ("CFG++: Manifold-constrained Classifier Free Guidance"): the DDIM
  step, with the CFG scale divided by 12.5 and the re-noising direction taken from ε_uncond.
- PLMS: Liu et al. 2022 ("Pseudo Numerical Methods for Diffusion Models"): a pseudo improved-Euler
  first step, then Adams–Bashforth of orders 2, 3 and 4 over the kept ε.
- UniPC: Zhao et al. 2023 ("UniPC: A Unified Predictor-Corrector Framework"), variant B(h) = h
  ("bh1"), order 3, multistep, data prediction, time-uniform steps over continuous t from 1 to 1/1000,
  lower orders at the end, no corrector after the last step; the model sees t_in = (t − 1/1000)·1000.
"""
from __future__ import annotations

import torch


def timesteps_for(steps: int) -> torch.Tensor:
    return torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)


def _tables(model, timesteps):
    table = model.alphas_cumprod
    alphas = table[timesteps]
    alphas_prev = table[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    return alphas, alphas_prev, torch.sqrt(1 - alphas)


def _ddim_steps(model, x, timesteps, noise, eta, guided_direction):
    alphas, alphas_prev, sqrt_one_minus = _tables(model, timesteps)
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas.double()) * (1 - alphas.double() / alphas_prev))
    ones = x.new_ones([x.shape[0], 1, 1, 1])
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in)
        direction = e_t if guided_direction else model.last_noise_uncond
        a_t = alphas[index].item() * ones
        a_prev = alphas_prev[index].item() * ones
        sigma_t = sigmas[index].item() * ones
        pred_x0 = (x - sqrt_one_minus[index].item() * ones * e_t) / a_t.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1.0 - a_prev - sigma_t ** 2).sqrt() * direction + sigma_t * noise.next()
    return x


def ddim(model, x, timesteps, noise, eta=0.0):
    return _ddim_steps(model, x, timesteps, noise, eta, guided_direction=True)


def ddim_cfgpp(model, x, timesteps, noise, eta=0.0):
    model.scale_multiplier = 1 / 12.5
    return _ddim_steps(model, x, timesteps, noise, eta, guided_direction=False)


def plms(model, x, timesteps, noise=None):
    alphas, alphas_prev, sqrt_one_minus = _tables(model, timesteps)
    ones = x.new_ones([x.shape[0], 1, 1, 1])
    s_in = x.new_ones([x.shape[0]])

    def ddim_step(x, e_t, index):
        a_t = alphas[index].item() * ones
        a_prev = alphas_prev[index].item() * ones
        pred_x0 = (x - sqrt_one_minus[index].item() * ones * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * e_t

    kept: list[torch.Tensor] = []
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in)
        if not kept:
            e_next = model(ddim_step(x, e_t, index), timesteps[max(index - 1, 0)].item() * s_in)
            e_prime = (e_t + e_next) / 2
        elif len(kept) == 1:
            e_prime = (3 * e_t - kept[-1]) / 2
        elif len(kept) == 2:
            e_prime = (23 * e_t - 16 * kept[-1] + 5 * kept[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * kept[-1] + 37 * kept[-2] - 9 * kept[-3]) / 24
        x = ddim_step(x, e_prime, index)
        kept.append(e_t)
        if len(kept) >= 4:
            kept.pop(0)
    return x


class DiscreteVP:
    """Continuous-time view of the discrete table (DPM-Solver's ``NoiseScheduleVP('discrete')``):
    log α(t) interpolated linearly between t_k = (k+1)/1000, with α = √ᾱ."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.log_alpha = 0.5 * torch.log(alphas_cumprod)
        self.total = len(alphas_cumprod)
        self.knots = torch.linspace(0.0, 1.0, self.total + 1)[1:]

    def log_mean(self, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1)
        k = torch.clamp(torch.searchsorted(self.knots, t, right=False) - 1, 0, self.total - 2)
        x0, x1 = self.knots[k], self.knots[k + 1]
        y0, y1 = self.log_alpha[k], self.log_alpha[k + 1]
        return y0 + (t - x0) * (y1 - y0) / (x1 - x0)

    def std(self, t):
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_mean(t)))

    def lam(self, t):
        log_mean = self.log_mean(t)
        return log_mean - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_mean))


def unipc(model, x, timesteps, noise=None, order: int = 3, t_start: float | None = None):
    vp = DiscreteVP(model.alphas_cumprod)
    steps = len(timesteps)
    t_top = 1.0 if t_start is None else t_start
    t_end = 1.0 / vp.total
    ts = torch.linspace(t_top, t_end, steps + 1)
    batch = x.shape[0]

    def data_prediction(x, t):
        eps = model(x, (t - 1.0 / vp.total) * 1000.0)
        alpha = torch.exp(vp.log_mean(t))[:, None, None, None]
        return (x - vp.std(t)[:, None, None, None] * eps) / alpha

    def update(x, history, times, t, step_order, correct):
        """One UniPC-bh1 predictor step from times[-1] to t, with the corrector when ``correct``."""
        t_prev = times[-1]
        lam_prev, lam_t = vp.lam(t_prev), vp.lam(t)
        h = lam_t - lam_prev
        m_prev = history[-1]
        alpha_t = torch.exp(vp.log_mean(t))
        ratios, diffs = [], []
        for i in range(1, step_order):
            r = (vp.lam(times[-(i + 1)]) - lam_prev) / h
            ratios.append(r)
            diffs.append((history[-(i + 1)] - m_prev) / r)
        ratios.append(torch.ones_like(h))
        ratios = torch.tensor([float(r) for r in ratios])
        hh = -h  # data prediction integrates in −λ
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial = 1
        rows, rhs = [], []
        for i in range(1, step_order + 1):
            rows.append(torch.pow(ratios, i - 1))
            rhs.append(h_phi_k * factorial / hh)  # B(h) = h for bh1
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        system = torch.stack(rows)
        rhs = torch.tensor([float(v) for v in rhs])
        base = (vp.std(t) / vp.std(t_prev))[:, None, None, None] * x - (alpha_t * h_phi_1)[:, None, None, None] * m_prev
        scale = (alpha_t * hh)[:, None, None, None]
        if diffs:
            stacked = torch.stack(diffs, dim=1)
            rhos_p = torch.tensor([0.5]) if step_order == 2 else torch.linalg.solve(system[:-1, :-1], rhs[:-1])
            x_t = base - scale * torch.einsum("k,bkchw->bchw", rhos_p, stacked)
        else:
            stacked = None
            x_t = base
        if not correct:
            return x_t, None
        rhos_c = torch.tensor([0.5]) if step_order == 1 else torch.linalg.solve(system, rhs)
        m_t = data_prediction(x_t, t)
        correction = torch.einsum("k,bkchw->bchw", rhos_c[:-1], stacked) if stacked is not None else 0
        return base - scale * (correction + rhos_c[-1] * (m_t - m_prev)), m_t

    t0 = ts[0].expand(batch)
    history, times = [data_prediction(x, t0)], [t0]
    for step in range(1, order):
        t = ts[step].expand(batch)
        x, m = update(x, history, times, t, step, correct=True)
        history.append(m)
        times.append(t)
    for step in range(order, steps + 1):
        t = ts[step].expand(batch)
        step_order = min(order, steps + 1 - step)
        x, m = update(x, history, times, t, step_order, correct=step != steps)
        history, times = history[1:] + [m], times[1:] + [t]
    return x
