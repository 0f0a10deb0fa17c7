"""A1111's own timestep samplers (DDIM, DDIM CFG++, PLMS, UniPC) and DDPM, on the σ-based contract.

A1111 runs these four outside k-diffusion: they ignore the schedule type and walk integer timesteps
``t = 1, 1 + ⌊N/steps⌋, 1 + 2⌊N/steps⌋, …`` (clipped to N − 1) from the top down, in ᾱ-space, starting from
unscaled noise. Here the same walk is expressed in σ-space (``x_σ = x_ᾱ·√(1+σ²)``, σ² = (1−ᾱ)/ᾱ), so every
sampler is a plain function over a σ list; :func:`timestep_sigmas` and :func:`unipc_sigmas` give the lists that
reproduce A1111, and the samplers also accept any other descending σ list.

Every σ they call the denoiser at is ``table.sigmas[t]`` for an integer t (UniPC: the log-σ interpolation at its
fractional timestep), so ``table.sigma_to_t`` gives the timestep back. Each sampler returns the latent A1111
decodes: ``x_ᾱ`` at the last σ of the list (equal to ``x_σ`` when the list ends at 0).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .types import Denoiser, NoiseSource, StepCallback, StepInfo

__all__ = [
    "a1111_timesteps", "timestep_sigmas", "unipc_sigmas", "timestep_img2img_start",
    "sample_ddim", "sample_ddim_cfgpp", "sample_plms", "sample_ddpm", "sample_unipc",
]

A1111_TIME_SCALE = 1000  # A1111 spaces timesteps and maps UniPC's continuous time with this constant, not len(table)


# ---------------------------------------------------------------------------------------------------------------
# Timesteps and σ lists
# ---------------------------------------------------------------------------------------------------------------

def a1111_timesteps(steps: int, num_train_timesteps: int = A1111_TIME_SCALE) -> list[int]:
    """A1111's timestep grid for ``steps``, ascending: ``range(0, 1000, 1000 // steps) + 1``, clipped to N − 1.

    It has ⌈1000 / ⌊1000/steps⌋⌉ entries, which is more than ``steps`` when 1000 is not a multiple of the stride
    (30 steps give 31 entries); DDIM and PLMS step between neighbours, UniPC takes one step per entry.
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    stride = A1111_TIME_SCALE // steps
    if stride < 1:
        raise ValueError(f"A1111's timestep samplers take at most {A1111_TIME_SCALE} steps")
    return [min(max(t + 1, 0), num_train_timesteps - 1) for t in range(0, A1111_TIME_SCALE, stride)]


def _img2img_steps(steps: int, denoising_strength: float, fixed_steps: bool) -> tuple[int, int]:
    """(steps the grid is built for, t_enc) as A1111's ``setup_img2img_steps`` computes them.

    The strength is capped at 0.999. By default the grid is built for ``steps`` and only ``int(strength·steps)``
    of it is kept; with ``fixed_steps`` (A1111's "do exactly the amount of steps the slider specifies", and every
    hires-fix pass) the grid is stretched to ``int(steps / strength)`` and ``steps − 1`` entries are kept.
    """
    strength = min(float(denoising_strength), 0.999)
    if fixed_steps:
        return (int(steps / strength) if strength > 0 else 0), steps - 1
    return steps, int(strength * steps)


def _img2img_timesteps(num_train_timesteps: int, steps: int, denoising_strength: float,
                       fixed_steps: bool) -> tuple[list[int], int]:
    """(the kept timesteps, the timestep the init latent is noised to) for A1111's img2img."""
    grid_steps, t_enc = _img2img_steps(steps, denoising_strength, fixed_steps)
    grid = a1111_timesteps(grid_steps, num_train_timesteps)
    t_enc = min(t_enc, len(grid) - 1)
    return grid[:max(t_enc, 1)], grid[t_enc]


def _model_timesteps(table: Any, steps: int, denoising_strength: float | None, fixed_steps: bool) -> list[int]:
    num_train_timesteps = len(table.alphas_cumprod)
    if denoising_strength is None:
        return a1111_timesteps(steps, num_train_timesteps)
    return _img2img_timesteps(num_train_timesteps, steps, denoising_strength, fixed_steps)[0]


def timestep_sigmas(table: Any, steps: int, denoising_strength: float | None = None,
                    fixed_steps: bool = False) -> torch.Tensor:
    """σ at each model call of A1111's DDIM / DDIM CFG++ / PLMS (also used for DDPM), then the final σ.

    txt2img (``denoising_strength=None``): the grid ``a1111_timesteps(steps)`` read from the top, i.e. for
    20 steps σ(t) at t = 951, 901, …, 51 (19 model calls) and then σ(1), where the result lives.
    img2img (a strength, 1.0 included, which A1111 caps at 0.999): only the first ``t_enc`` grid entries are kept
    (see :func:`timestep_img2img_start` for how the init latent is noised). Values are ``table.sigmas[t]``.
    """
    kept = _model_timesteps(table, steps, denoising_strength, fixed_steps)
    return table.sigmas[torch.tensor(kept[::-1])].to(torch.float32)


def timestep_img2img_start(table: Any, steps: int, denoising_strength: float, init_latent: torch.Tensor,
                           noise: torch.Tensor, fixed_steps: bool = False) -> torch.Tensor:
    """The σ-space start of A1111's img2img for DDIM, DDIM CFG++, PLMS, UniPC and DDPM.

    A1111 noises the init latent to the grid entry just above the kept ones, ``n = grid[t_enc]``:
    ``x_ᾱ = init·√ᾱ[n] + noise·√(1−ᾱ[n])``, and then starts sampling at ``grid[t_enc−1]`` with that latent as if it
    were at that lower noise level (one grid step of mismatch, kept for parity). In σ-space that is
    ``x_ᾱ·√(1+σ₀²)`` with σ₀ the first value of :func:`timestep_sigmas` / :func:`unipc_sigmas`.
    """
    alphas_cumprod = table.alphas_cumprod.to(torch.float64)
    kept, noised_to = _img2img_timesteps(len(alphas_cumprod), steps, denoising_strength, fixed_steps)
    a_n = alphas_cumprod[noised_to].item()
    x_alpha = init_latent * math.sqrt(a_n) + noise * math.sqrt(1.0 - a_n)
    sigma_0 = table.sigmas[kept[-1]].item()
    return x_alpha * math.sqrt(1.0 + sigma_0 ** 2)


def _log_sigma_at(log_sigmas: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log σ at fractional timesteps, linear between integer timesteps (k-diffusion's ``t_to_sigma``)."""
    low = t.floor().long().clamp(0, len(log_sigmas) - 1)
    high = (low + 1).clamp(max=len(log_sigmas) - 1)
    w = t - low.to(t.dtype)
    return (1 - w) * log_sigmas[low] + w * log_sigmas[high]


def _timestep_of(log_sigmas: torch.Tensor, sigma: float) -> float:
    """The fractional timestep whose log-σ interpolation is ``sigma`` (k-diffusion's ``sigma_to_t``)."""
    log_sigma = math.log(sigma)
    high = int(torch.searchsorted(log_sigmas, torch.tensor(log_sigma, dtype=log_sigmas.dtype)).item())
    high = min(max(high, 1), len(log_sigmas) - 1)
    low = high - 1
    w = (log_sigma - log_sigmas[low].item()) / (log_sigmas[high].item() - log_sigmas[low].item())
    return low + min(max(w, 0.0), 1.0)


def _unipc_model_times(table: Any, steps: int, denoising_strength: float | None,
                       fixed_steps: bool) -> torch.Tensor:
    """UniPC's model-input timesteps as A1111 feeds them: ``(t − 1/N)·1000`` over ``linspace(t_T, 1/N, n + 1)``.

    A1111's UniPC takes one step per grid entry, ``n = len(grid)``, from continuous time t_T = 1 (txt2img) or
    ``(grid[t_enc−1] + 1)/1000`` (img2img) down to 1/N, in float32 as A1111 computes it.
    """
    kept = _model_timesteps(table, steps, denoising_strength, fixed_steps)
    total_n = len(table.alphas_cumprod)
    t_end = 1.0 / total_n
    t_start = 1.0 if denoising_strength is None else kept[-1] / A1111_TIME_SCALE + 1.0 / A1111_TIME_SCALE
    continuous = torch.linspace(t_start, t_end, len(kept) + 1, dtype=torch.float32)
    return (continuous - t_end) * A1111_TIME_SCALE


def unipc_sigmas(table: Any, steps: int, denoising_strength: float | None = None,
                 fixed_steps: bool = False) -> torch.Tensor:
    """σ at each of A1111's UniPC model calls, then the final σ (t = 1/N, i.e. σ = table.sigmas[0]).

    Time-uniform over continuous time (A1111's default skip type): for 20 steps the model sees
    t = 999, 949.05, …, 49.95 and the result lives at t = 0. The σs are log-σ interpolations at those fractional
    timesteps, so ``table.sigma_to_t`` (k-diffusion's rule) gives each timestep back. img2img as in
    :func:`timestep_sigmas` (same kept entries, one step per entry; the start from :func:`timestep_img2img_start`).
    """
    times = _unipc_model_times(table, steps, denoising_strength, fixed_steps).to(torch.float64)
    log_sigmas = table.sigmas.to(torch.float64).log()
    return _log_sigma_at(log_sigmas, times).exp().to(torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Shared arithmetic: ᾱ from σ, and the result in ᾱ-space
# ---------------------------------------------------------------------------------------------------------------

def _alpha_bar(sigma: float) -> float:
    return 1.0 / (1.0 + sigma * sigma)


def _to_alpha_space(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x_ᾱ = x_σ / √(1+σ²)``: what A1111 decodes after a timestep sampler."""
    return x / math.sqrt(1.0 + sigma * sigma)


def _per_image(sigma: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)


def _ddim_sigma(a_t: float, a_prev: float, eta: float) -> float:
    """DDIM's σ_t(η) (Song et al. 2021, eq. 16) in ᾱ-space; η = 1 is DDPM's posterior std."""
    if eta == 0.0:
        return 0.0
    return eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))


def _ddim_walk(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSource,
               callback: StepCallback | None, eta: float, renoise_with_uncond: bool) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) written in σ-space; with ``renoise_with_uncond`` it is CFG++.

    In ᾱ-space a step is ``x' = √ᾱ'·x̂₀ + √(1−ᾱ'−s²)·ε + s·z``; dividing by √ᾱ' gives the σ-space step
    ``x' = x̂₀ + √((1−ᾱ'−s²)/ᾱ')·ε + (s/√ᾱ')·z`` with ε = (x − x̂₀)/σ. At η = 0 this is an Euler step in σ.
    CFG++ (Chung et al. 2024) keeps the guided x̂₀ but points back to the noise with the unconditional ε.
    """
    sigma_list = [float(s) for s in sigmas]
    for i in range(len(sigma_list) - 1):
        sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
        denoised = denoiser(x, _per_image(sigma, x))
        if renoise_with_uncond:
            uncond = denoiser.uncond_denoised
            eps = (x - (denoised if uncond is None else uncond)) / sigma
        else:
            eps = (x - denoised) / sigma
        a_t, a_prev = _alpha_bar(sigma), _alpha_bar(sigma_next)
        s = _ddim_sigma(a_t, a_prev, eta)
        x = denoised + math.sqrt(max(1.0 - a_prev - s * s, 0.0) / a_prev) * eps
        if s > 0.0:
            x = x + (s / math.sqrt(a_prev)) * noise(sigmas[i], sigmas[i + 1])
        if callback is not None:
            callback(StepInfo(i=i, x=x, sigma=sigmas[i], sigma_hat=sigmas[i], denoised=denoised))
    return _to_alpha_space(x, sigma_list[-1])


def sample_ddim(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSource,
                callback: StepCallback | None = None, eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"), A1111's "DDIM" with ``timestep_sigmas``.

    Start: noise·√(1+σ₀²) (unscaled noise in ᾱ-space); img2img: :func:`timestep_img2img_start`.
    One model call per σ but the last; η ("Eta DDIM", A1111 default 0) adds noise from ``noise`` each step.
    Returns x in ᾱ-space at the last σ (A1111: ᾱ[1]).
    """
    return _ddim_walk(denoiser, x, sigmas, noise, callback, eta, renoise_with_uncond=False)


def sample_ddim_cfgpp(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSource,
                      callback: StepCallback | None = None, eta: float = 0.0) -> torch.Tensor:
    """DDIM with CFG++ (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance").

    Start: noise·√(1+σ₀²) (unscaled noise in ᾱ-space); img2img: :func:`timestep_img2img_start`.
    Renoises with ``denoiser.uncond_denoised`` read after each call. A1111 divides the CFG scale by 12.5 for this
    sampler: that belongs to the denoiser's guidance, not here. Returns x in ᾱ-space at the last σ.
    """
    return _ddim_walk(denoiser, x, sigmas, noise, callback, eta, renoise_with_uncond=True)


def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSource,
                callback: StepCallback | None = None) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Algorithm 2).

    Start: noise·√(1+σ₀²) (unscaled noise in ᾱ-space); img2img: :func:`timestep_img2img_start`.
    Each step samples the posterior q(x_{t'} | x_t, x̂₀) over the (possibly strided) step t → t', whose mean is
    eq. 7 and whose variance is β̃ = (1−ᾱ')/(1−ᾱ)·(1−ᾱ/ᾱ'); noise from ``noise`` whenever the target σ > 0.
    Returns x in ᾱ-space at the last σ.
    """
    sigma_list = [float(s) for s in sigmas]
    for i in range(len(sigma_list) - 1):
        sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
        denoised = denoiser(x, _per_image(sigma, x))
        a_t, a_prev = _alpha_bar(sigma), _alpha_bar(sigma_next)
        alpha_step = a_t / a_prev  # α of the strided step
        beta_step = 1.0 - alpha_step
        # Posterior mean in ᾱ-space, then divided by √ᾱ' to land in σ-space; x_ᾱ = x·√ᾱ.
        coef_x0 = beta_step / (1.0 - a_t)
        coef_xt = math.sqrt(alpha_step) * (1.0 - a_prev) / (1.0 - a_t) * math.sqrt(a_t) / math.sqrt(a_prev)
        x_next = coef_x0 * denoised + coef_xt * x
        if sigma_next > 0.0:
            posterior_std = math.sqrt(beta_step * (1.0 - a_prev) / (1.0 - a_t))
            x_next = x_next + (posterior_std / math.sqrt(a_prev)) * noise(sigmas[i], sigmas[i + 1])
        x = x_next
        if callback is not None:
            callback(StepInfo(i=i, x=x, sigma=sigmas[i], sigma_hat=sigmas[i], denoised=denoised))
    return _to_alpha_space(x, sigma_list[-1])


def sample_plms(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSource,
                callback: StepCallback | None = None) -> torch.Tensor:
    """PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"), A1111's "PLMS".

    Start: noise·√(1+σ₀²) (unscaled noise in ᾱ-space); img2img: :func:`timestep_img2img_start`.
    The DDIM transfer with ε replaced by an Adams–Bashforth combination of the last ε's (orders 2, 3, 4); the first
    step has no history and averages ε at both ends (pseudo improved Euler, one extra model call). In σ-space the
    transfer is ``x' = x + (σ' − σ)·ε``. Deterministic: ``noise`` is unused. Returns x in ᾱ-space at the last σ.
    """
    sigma_list = [float(s) for s in sigmas]
    history: list[torch.Tensor] = []
    for i in range(len(sigma_list) - 1):
        sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
        eps = (x - denoiser(x, _per_image(sigma, x))) / sigma
        if not history and sigma_next > 0.0:
            x_euler = x + (sigma_next - sigma) * eps
            eps_next = (x_euler - denoiser(x_euler, _per_image(sigma_next, x))) / sigma_next
            eps_combined = (eps + eps_next) / 2
        elif not history:
            eps_combined = eps  # a one-step list ending at σ = 0 has no ε there to average with
        elif len(history) == 1:
            eps_combined = (3 * eps - history[-1]) / 2
        elif len(history) == 2:
            eps_combined = (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            eps_combined = (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        history = (history + [eps])[-3:]
        denoised = x - sigma * eps_combined
        x = x + (sigma_next - sigma) * eps_combined
        if callback is not None:
            callback(StepInfo(i=i, x=x, sigma=sigmas[i], sigma_hat=sigmas[i], denoised=denoised))
    return _to_alpha_space(x, sigma_list[-1])


# ---------------------------------------------------------------------------------------------------------------
# UniPC
# ---------------------------------------------------------------------------------------------------------------

class _VPTimes:
    """α, σ_VP and λ at each point of a σ list, as UniPC's solver sees them.

    Without a table they follow from σ itself (α = 1/√(1+σ²), λ = −log σ). With A1111's noise table they come
    from its ``NoiseScheduleVP("discrete")``: log α piecewise linear in the fractional timestep at which the
    model is called, which is not quite the log-σ interpolation the σ list is built with.
    """

    def __init__(self, sigmas: list[float], table: Any | None):
        self.times: list[float] | None = None
        if table is None:
            self.alpha = [1.0 / math.sqrt(1.0 + s * s) for s in sigmas]
        else:
            log_sigmas = table.sigmas.to(torch.float64).log()
            half_log_alpha_bar = 0.5 * table.alphas_cumprod.to(torch.float64).log()
            self.times = [_timestep_of(log_sigmas, s) for s in sigmas]
            times = torch.tensor(self.times, dtype=torch.float64)
            self.alpha = _log_sigma_at(half_log_alpha_bar, times).exp().tolist()
        self.sigma_vp = [math.sqrt(1.0 - a * a) for a in self.alpha]
        self.lam = [math.log(a) - math.log(s) for a, s in zip(self.alpha, self.sigma_vp)]


def _unipc_bh_coefficients(h: float, rks: list[float], order: int, variant: str) -> tuple[float, float, list[float], list[float]]:
    """(B(h), h·φ₁, predictor ρ's, corrector ρ's) of UniPC's B(h) family (Zhao et al. 2023, Algorithms 2–3).

    Works on the data prediction, so the exponential integrator runs in ``hh = −h``. ρ's solve
    ``R ρ = b`` with R_{ik} = r_k^{i−1} and b_i = i!·h·φ_{i+1}(hh)/B(h); order 2's predictor and order 1's
    corrector use the closed-form ρ = ½.
    """
    hh = -h
    h_phi_1 = math.expm1(hh)
    if variant == "bh1":
        b_h = hh
    elif variant == "bh2":
        b_h = math.expm1(hh)
    else:
        raise ValueError(f"unknown UniPC variant {variant!r} (bh1 or bh2)")
    nodes = rks + [1.0]
    rows, rhs = [], []
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1
    for i in range(1, order + 1):
        rows.append([r ** (i - 1) for r in nodes])
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    matrix = torch.tensor(rows, dtype=torch.float64)
    vector = torch.tensor(rhs, dtype=torch.float64)
    if not rks:
        rhos_p: list[float] = []
    elif order == 2:
        rhos_p = [0.5]
    else:
        rhos_p = torch.linalg.solve(matrix[:-1, :-1], vector[:-1]).tolist()
    rhos_c = [0.5] if order == 1 else torch.linalg.solve(matrix, vector).tolist()
    return b_h, h_phi_1, rhos_p, rhos_c


def sample_unipc(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSource,
                 callback: StepCallback | None = None, order: int = 3, variant: str = "bh1",
                 lower_order_final: bool = True, table: Any | None = None,
                 prediction_type: str = "epsilon") -> torch.Tensor:
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), multistep, data prediction.

    Start: noise·√(1+σ₀²) (unscaled noise in ᾱ-space); img2img: :func:`timestep_img2img_start`.
    A1111's defaults: order 3, variant bh1, lower-order final steps, no corrector after the last step, one model
    call per σ but the last (the corrector's evaluation is reused by the next step). Pass ``table`` (the model's
    noise table) with :func:`unipc_sigmas` to use A1111's exact λ's; without it λ = −log σ. With a table and
    ``prediction_type="v_prediction"`` a v-model's ε is formed as A1111 does, with ᾱ at the model's fractional
    timestep truncated to an integer (the denoiser's σ-consistent ε differs by ~1e-3). Orders above the step
    count are lowered (A1111 refuses them). The final σ must be > 0. Deterministic: ``noise`` is unused.
    Returns x in ᾱ-space at the last σ (A1111: t = 1/N).
    """
    sigma_list = [float(s) for s in sigmas]
    steps = len(sigma_list) - 1
    if sigma_list[-1] <= 0.0:
        raise ValueError("UniPC ends at a σ above 0 (use unipc_sigmas)")
    order = max(1, min(order, steps))
    vp = _VPTimes(sigma_list, table)
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unknown prediction type {prediction_type!r}")
    truncated_v = prediction_type == "v_prediction" and vp.times is not None
    x = _to_alpha_space(x, sigma_list[0])  # the solver's state is A1111's x, in ᾱ-space

    def data_prediction(x_vp: torch.Tensor, index: int) -> torch.Tensor:
        # The model sees x_vp exactly; its ε is turned into x̂₀ with the solver's own α and σ_VP.
        sigma = sigma_list[index]
        x_sigma = x_vp * math.sqrt(1.0 + sigma * sigma)
        denoised = denoiser(x_sigma, _per_image(sigma, x_vp))
        if truncated_v:
            # Recover v from x̂₀ = x/(σ²+1) − v·σ/√(σ²+1), then ε = √ᾱ·v + √(1−ᾱ)·x at ⌊t⌋ (A1111's int cast;
            # the small margin absorbs float32 noise in t at whole timesteps).
            v = (x_sigma / (1.0 + sigma * sigma) - denoised) * (math.sqrt(1.0 + sigma * sigma) / sigma)
            a = float(table.alphas_cumprod[int(math.floor(vp.times[index] + 1e-4))])
            eps = math.sqrt(a) * v + math.sqrt(1.0 - a) * x_vp
        else:
            eps = (x_sigma - denoised) / sigma
        return (x_vp - vp.sigma_vp[index] * eps) / vp.alpha[index]

    def update(x_vp: torch.Tensor, history: list[tuple[int, torch.Tensor]], target: int, step_order: int,
               use_corrector: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        prev_index, model_prev = history[-1]
        h = vp.lam[target] - vp.lam[prev_index]
        rks, d1s = [], []
        for back in range(1, step_order):
            index_i, model_i = history[-(back + 1)]
            rk = (vp.lam[index_i] - vp.lam[prev_index]) / h
            rks.append(rk)
            d1s.append((model_i - model_prev) / rk)
        b_h, h_phi_1, rhos_p, rhos_c = _unipc_bh_coefficients(h, rks, step_order, variant)
        alpha_t = vp.alpha[target]
        x_base = (vp.sigma_vp[target] / vp.sigma_vp[prev_index]) * x_vp - (alpha_t * h_phi_1) * model_prev
        predicted = sum((rho * d for rho, d in zip(rhos_p, d1s)), torch.zeros_like(x_vp))
        x_next = x_base - (alpha_t * b_h) * predicted
        if not use_corrector:
            return x_next, None
        model_next = data_prediction(x_next, target)
        corrected = sum((rho * d for rho, d in zip(rhos_c[:-1], d1s)), torch.zeros_like(x_vp))
        corrected = corrected + rhos_c[-1] * (model_next - model_prev)
        return x_base - (alpha_t * b_h) * corrected, model_next

    history = [(0, data_prediction(x, 0))]
    for step in range(1, steps + 1):
        if step < order:
            step_order = step
        elif lower_order_final:
            step_order = min(order, steps + 1 - step)
        else:
            step_order = order
        x, model_x = update(x, history, step, step_order, use_corrector=step < steps)
        denoised = model_x if model_x is not None else history[-1][1]
        if model_x is not None:
            history = (history + [(step, model_x)])[-order:]
        if callback is not None:
            x_sigma = x * math.sqrt(1.0 + sigma_list[step] ** 2)
            callback(StepInfo(i=step - 1, x=x_sigma, sigma=sigmas[step - 1], sigma_hat=sigmas[step - 1], denoised=denoised))
    return x
