"""A1111's k-diffusion samplers as plain functions over a σ schedule (contract: engine/sampling/types.py).

Every function is ``(denoiser, x, sigmas, noise=None, callback=None, *, <its options>) -> x``, with options and
defaults as in k-diffusion 0.1.1, which A1111 1.10 samples with. Pictures from A1111 depend on the exact sequence
of noise draws, so each function calls ``denoiser`` and ``noise`` in the same order and as many times as
k-diffusion's function of the same name calls its model and draws noise. In particular:

- Euler, Heun and DPM2 draw churn noise at the start of every step even when churn is off (k-diffusion's
  ``torch.randn_like``, which A1111 routes to the images' generators): the draws keep their places in the sequence.
- Ancestral steps draw (and add noise scaled by zero) even at eta 0; DPM fast and DPM adaptive draw once per
  (accepted) step whatever eta is.
- When ``noise`` is None a step that would add zero noise skips the draw; one that would add real noise refuses.

x lives in σ-space (x = x₀ + σ·ε). The step callback runs after each step with the new x. Nothing here touches
torch's global RNG.

The ancestral samplers take ``flow=True`` for a rectified-flow model (x = (1 − σ)·x₀ + σ·ε): the same deterministic
steps, then the flow re-noise of ``flow.ancestral_step`` instead of adding σ_up·z. The rest run on flow models as
``flow`` explains (unchanged, or on the model's variance-exploding view).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import flow as flow_path
from .types import Denoiser, NoiseSource, StepCallback, StepInfo


# --- shared pieces -------------------------------------------------------------------------------------------------

def _per_image(x: torch.Tensor) -> torch.Tensor:
    return x.new_ones([x.shape[0]])


def _derivative(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dσ of the probability-flow ODE, (x − D(x; σ)) / σ (Karras et al. 2022, eq. 3 with σ(t) = t)."""
    return (x - denoised) / sigma.reshape([1] * x.ndim)


def _ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float):
    """Split a step σ_from → σ_to into a deterministic step down to σ_down and fresh noise of size σ_up.

    σ_up = min(σ_to, η·√(σ_to²(σ_from² − σ_to²)/σ_from²)) and σ_down = √(σ_to² − σ_up²), the DDIM-η split
    (Song et al. 2021, eq. 16) in σ-space; η = 1 is ancestral sampling.
    """
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def _with_noise(x: torch.Tensor, noise: NoiseSource | None, sigma, sigma_next, *scales) -> torch.Tensor:
    """x + noise(σ, σ_next)·scale₁·scale₂…; draws even when a scale is zero, so later draws keep their places."""
    if noise is None:
        if any(bool(scale == 0) for scale in scales):
            return x
        raise ValueError("this sampler adds noise here: pass a noise source")
    fresh = noise(sigma, sigma_next)
    for scale in scales:
        fresh = fresh * scale
    return x + fresh


def _with_flow_noise(x: torch.Tensor, noise: NoiseSource | None, sigma, sigma_next, scale, noise_std,
                     s_noise: float) -> torch.Tensor:
    """scale·x + s_noise·noise_std·noise(σ, σ_next): ``flow.renoise`` applied; draws as ``_with_noise`` does."""
    return _with_noise(x * scale, noise, sigma, sigma_next, s_noise, noise_std)


def _churn(sigmas: torch.Tensor, i: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """γᵢ of Karras et al. 2022, Algorithm 2: min(S_churn/N, √2 − 1) inside [S_tmin, S_tmax], else 0."""
    if not s_churn:  # the usual case: 0 whatever σ is, without comparing σ tensors every step (issue #22)
        return 0.0
    if s_tmin <= sigmas[i] <= s_tmax:
        return min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1)
    return 0.0


def _churned(x, noise, sigmas, i, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al. 2022, Algorithm 2, lines 4–6: raise σᵢ to σ̂ = σᵢ(1 + γ) by adding noise of √(σ̂² − σᵢ²).

    The draw happens every step (k-diffusion draws before it knows γ), and only a step with γ > 0 uses it.
    """
    gamma = _churn(sigmas, i, s_churn, s_tmin, s_tmax)
    eps = None if noise is None else noise(sigmas[i], sigmas[i + 1]) * s_noise
    sigma_hat = sigmas[i] * (gamma + 1) if gamma else sigmas[i]  # σ·1 is σ, bit for bit: one op fewer a step
    if gamma > 0:
        if eps is None:
            raise ValueError("s_churn > 0 adds noise: pass a noise source")
        x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
    return x, sigma_hat


def _report(callback: StepCallback | None, i: int, x, sigma, sigma_hat, denoised) -> None:
    if callback is not None:
        callback(StepInfo(i=i, x=x, sigma=sigma, sigma_hat=sigma_hat, denoised=denoised))


def _log_time(sigma: torch.Tensor) -> torch.Tensor:
    """t = −log σ, the half-log-SNR λ of DPM-Solver (Lu et al. 2022) for x in σ-space."""
    return sigma.log().neg()


def _sigma_at(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


# --- Karras et al. 2022 ----------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSource | None = None,
                 callback: StepCallback | None = None, *, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = float("inf"), s_noise: float = 1.0) -> torch.Tensor:
    """Euler steps of the probability-flow ODE with optional churn: Karras et al. 2022, Algorithm 2 (Euler only)."""
    s_in = _per_image(x)
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churned(x, noise, sigmas, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, sigma_hat * s_in)
        d = _derivative(x, sigma_hat, denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
        _report(callback, i, x, sigmas[i], sigma_hat, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                           noise: NoiseSource | None = None, callback: StepCallback | None = None, *,
                           eta: float = 1.0, s_noise: float = 1.0, flow: bool = False) -> torch.Tensor:
    """Ancestral sampling with Euler steps: Karras et al. 2022's Euler step down to σ_down, then fresh noise of σ_up
    (the ancestral split of Song et al. 2021's DDIM η, η = 1 by default). ``flow``: the rectified-flow split and
    re-noise of ``flow.ancestral_step``; at η = 0 that is Euler."""
    s_in = _per_image(x)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        if flow:
            sigma_down, scale, noise_std = flow_path.ancestral_step(sigmas[i], sigmas[i + 1], eta)
        else:
            sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = _derivative(x, sigmas[i], denoised)
        x = x + d * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            if flow:
                x = _with_flow_noise(x, noise, sigmas[i], sigmas[i + 1], scale, noise_std, s_noise)
            else:
                x = _with_noise(x, noise, sigmas[i], sigmas[i + 1], s_noise, sigma_up)
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
    return x


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSource | None = None,
                callback: StepCallback | None = None, *, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = float("inf"), s_noise: float = 1.0) -> torch.Tensor:
    """Heun's second-order method with optional churn: Karras et al. 2022, Algorithm 2 (Euler on the last step)."""
    s_in = _per_image(x)
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churned(x, noise, sigmas, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, sigma_hat * s_in)
        d = _derivative(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = _derivative(x_euler, sigmas[i + 1], denoiser(x_euler, sigmas[i + 1] * s_in))
            x = x + (d + d_next) / 2 * dt
        _report(callback, i, x, sigmas[i], sigma_hat, denoised)
    return x


# --- DPM-Solver-2 flavoured (k-diffusion's "DPM2") -----------------------------------------------------------------

@torch.no_grad()
def sample_dpm_2(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSource | None = None,
                 callback: StepCallback | None = None, *, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = float("inf"), s_noise: float = 1.0) -> torch.Tensor:
    """Second-order midpoint steps in log σ (DPM-Solver-2, Lu et al. 2022) inside Karras et al. 2022's Algorithm 2.

    The midpoint is σ_mid = √(σ̂·σᵢ₊₁); the derivative there carries the whole step. The last step is Euler.
    """
    s_in = _per_image(x)
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churned(x, noise, sigmas, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, sigma_hat * s_in)
        d = _derivative(x, sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_mid = x + d * (sigma_mid - sigma_hat)
            d_mid = _derivative(x_mid, sigma_mid, denoiser(x_mid, sigma_mid * s_in))
            x = x + d_mid * (sigmas[i + 1] - sigma_hat)
        _report(callback, i, x, sigmas[i], sigma_hat, denoised)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                           noise: NoiseSource | None = None, callback: StepCallback | None = None, *,
                           eta: float = 1.0, s_noise: float = 1.0, flow: bool = False) -> torch.Tensor:
    """Ancestral sampling with DPM-Solver-2 midpoint steps (Lu et al. 2022) down to σ_down, then noise of σ_up.

    A step that reaches σ_down = 0 is a plain Euler step and adds no noise. ``flow``: σ_down and the re-noise of
    ``flow.ancestral_step``.
    """
    s_in = _per_image(x)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        if flow:
            sigma_down, scale, noise_std = flow_path.ancestral_step(sigmas[i], sigmas[i + 1], eta)
        else:
            sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = _derivative(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_mid = x + d * (sigma_mid - sigmas[i])
            d_mid = _derivative(x_mid, sigma_mid, denoiser(x_mid, sigma_mid * s_in))
            x = x + d_mid * (sigma_down - sigmas[i])
            if flow:
                x = _with_flow_noise(x, noise, sigmas[i], sigmas[i + 1], scale, noise_std, s_noise)
            else:
                x = _with_noise(x, noise, sigmas[i], sigmas[i + 1], s_noise, sigma_up)
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
    return x


# --- Linear multistep ------------------------------------------------------------------------------------------------

def _lms_coefficient(sigmas: np.ndarray, order: int, i: int, j: int) -> float:
    """∫ from σᵢ to σᵢ₊₁ of the Lagrange basis polynomial ℓⱼ through σᵢ, σᵢ₋₁, …, σᵢ₋ₒᵣ𝒹ₑᵣ₊₁ (Adams–Bashforth in σ)."""
    if order - 1 > i:
        raise ValueError(f"LMS order {order} is too high for step {i}")
    basis = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            basis = basis * np.polynomial.Polynomial([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k])
    antiderivative = basis.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


@torch.no_grad()
def sample_lms(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSource | None = None,
               callback: StepCallback | None = None, *, order: int = 4) -> torch.Tensor:
    """Linear multistep (Adams–Bashforth with variable steps) on Karras et al. 2022's probability-flow ODE in σ.

    Each step integrates the Lagrange polynomial through the last ``order`` derivatives over [σᵢ, σᵢ₊₁]; the
    order ramps up from 1 while there are fewer derivatives. The integrals are exact polynomial integrals.
    """
    s_in = _per_image(x)
    sigma_values = sigmas.detach().cpu().numpy().astype(np.float64)
    derivatives: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        derivatives.append(_derivative(x, sigmas[i], denoised))
        if len(derivatives) > order:
            derivatives.pop(0)
        current_order = min(i + 1, order)
        step = 0
        for j, d in enumerate(reversed(derivatives)):
            step = step + _lms_coefficient(sigma_values, current_order, i, j) * d
        x = x + step
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
    return x


# --- DPM-Solver (Lu et al. 2022, arXiv:2206.00927) --------------------------------------------------------------

class _DPMSolver:
    """DPM-Solver-1/2/3 steps in t = −log σ, predicting ε = (x − D(x; σ)) / σ (Lu et al. 2022, Algorithms 1–2)."""

    def __init__(self, denoiser: Denoiser, x: torch.Tensor):
        self.denoiser = denoiser
        self.s_in = _per_image(x)

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = _sigma_at(t)
        return (x - self.denoiser(x, sigma * self.s_in)) / sigma

    def first_order(self, x, t, t_next, eps):
        """DPM-Solver-1 (equivalent to DDIM): x − σ(t_next)(eʰ − 1)ε."""
        return x - _sigma_at(t_next) * (t_next - t).expm1() * eps

    def eps_at_fraction(self, x, t, h, r, eps):
        """ε at s = t + r·h, evaluated on the first-order estimate there (the extra model call of orders 2 and 3)."""
        s = t + r * h
        return self.eps(x - _sigma_at(s) * (r * h).expm1() * eps, s)

    def second_order(self, x, t, t_next, r1, eps, eps_r1):
        """DPM-Solver-2 (Algorithm 1) from ε at t and at t + r₁h."""
        h = t_next - t
        return (x - _sigma_at(t_next) * h.expm1() * eps
                - _sigma_at(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps))

    def third_order(self, x, t, t_next, eps, eps_r1, r1=1 / 3, r2=2 / 3):
        """DPM-Solver-3 (Algorithm 2) with r₁ = 1/3, r₂ = 2/3; returns the final x (needs one more model call)."""
        h = t_next - t
        s2 = t + r2 * h
        u2 = (x - _sigma_at(s2) * (r2 * h).expm1() * eps
              - _sigma_at(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(u2, s2)
        return x - _sigma_at(t_next) * h.expm1() * eps - _sigma_at(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)

    def step(self, x, t, t_next, order, eps):
        """One DPM-Solver step of the given order from ε at t (already evaluated)."""
        if order == 1:
            return self.first_order(x, t, t_next, eps)
        h = t_next - t
        r1 = 1 / 2 if order == 2 else 1 / 3
        eps_r1 = self.eps_at_fraction(x, t, h, r1, eps)
        if order == 2:
            return self.second_order(x, t, t_next, r1, eps, eps_r1)
        return self.third_order(x, t, t_next, eps, eps_r1)


def _sigma_range(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ_max, σ_min): the first σ and the last non-zero σ of the schedule."""
    positive = sigmas[sigmas > 0]
    if len(positive) == 0 or sigmas[0] <= 0:
        raise ValueError("DPM fast/adaptive need a schedule with positive σ")
    return sigmas[0], positive[-1]


def _dpm_noise_step(flow: bool, x, noise, sigma, sigma_next, scale, noise_std, s_noise):
    """DPM fast/adaptive's re-noise after a step to ``_ancestral_target``'s t_down: ``flow.renoise`` on a flow
    model; otherwise x + noise_std·s_noise·z, in the product order the variance-exploding path always had."""
    if flow:
        return _with_flow_noise(x, noise, sigma, sigma_next, scale, noise_std, s_noise)
    return _with_noise(x, noise, sigma, sigma_next, noise_std, s_noise)


def _ancestral_target(t, t_next, t_end, eta, flow: bool = False):
    """(t_down, scale, noise_std): with eta > 0, step deterministically to σ_down (capped at the end), then
    x ← scale·x + noise_std·z reaches σ(t_next). ``flow``: σ_down and the re-noise of ``flow.ancestral_step``."""
    if not eta:
        return t_next, 1.0, 0.0
    if flow:
        sigma_down, _, _ = flow_path.ancestral_step(_sigma_at(t), _sigma_at(t_next), eta)
        t_down = torch.minimum(t_end, _log_time(sigma_down))
        return (t_down, *flow_path.renoise(_sigma_at(t_down), _sigma_at(t_next)))
    sigma_down, _ = _ancestral_step(_sigma_at(t), _sigma_at(t_next), eta)
    t_down = torch.minimum(t_end, _log_time(sigma_down))
    return t_down, 1.0, (_sigma_at(t_next) ** 2 - _sigma_at(t_down) ** 2) ** 0.5


@torch.no_grad()
def sample_dpm_fast(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSource | None = None,
                    callback: StepCallback | None = None, *, eta: float = 0.0, s_noise: float = 1.0,
                    flow: bool = False) -> torch.Tensor:
    """DPM-Solver-fast (Lu et al. 2022, §3.4): n = len(sigmas) − 1 model calls, steps uniform in log σ.

    Runs from σ_max = sigmas[0] to σ_min = the last non-zero σ; the other σs are not used. It takes ⌊n/3⌋ + 1
    steps of order 3, ending with orders (2, 1) when 3 divides n and with order n mod 3 otherwise.
    ``flow``: a rectified-flow model's σs (≤ 1). The solver integrates the same ODE dx/dσ = (x − D)/σ, so only
    the ancestral split and re-noise change (``flow.ancestral_step``).
    """
    sigma_max, sigma_min = _sigma_range(sigmas)
    n = len(sigmas) - 1
    solver = _DPMSolver(denoiser, x)
    t_start, t_end = _log_time(sigma_max), _log_time(sigma_min)
    steps = n // 3 + 1
    ts = torch.linspace(t_start, t_end, steps + 1, device=x.device)
    orders = [3] * (steps - 2) + [2, 1] if n % 3 == 0 else [3] * (steps - 1) + [n % 3]
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        t_target, scale, noise_std = _ancestral_target(t, t_next, t_end, eta, flow)
        eps = solver.eps(x, t)
        denoised = x - _sigma_at(t) * eps
        x = solver.step(x, t, t_target, order, eps)
        x = _dpm_noise_step(flow, x, noise, _sigma_at(t), _sigma_at(t_next), scale, noise_std, s_noise)
        _report(callback, i, x, _sigma_at(t), _sigma_at(t), denoised)
    return x


class _StepSizeController:
    """PID step-size control (Söderlind 2003), limited by 1 + atan(f − 1), as DPM-Solver's adaptive solver uses."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float, accept_safety: float,
                 eps: float = 1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.inverse_errors: list[float] = []

    def propose(self, error: torch.Tensor) -> bool:
        """Scale h by the filtered inverse error; accept the step when the factor is at least the safety margin."""
        inverse_error = 1 / (float(error) + self.eps)
        if not self.inverse_errors:
            self.inverse_errors = [inverse_error] * 3
        self.inverse_errors[0] = inverse_error
        e0, e1, e2 = self.inverse_errors
        factor = 1 + math.atan(e0 ** self.b1 * e1 ** self.b2 * e2 ** self.b3 - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.inverse_errors[2] = self.inverse_errors[1]
            self.inverse_errors[1] = self.inverse_errors[0]
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSource | None = None,
                        callback: StepCallback | None = None, *, order: int = 3, rtol: float = 0.05,
                        atol: float = 0.0078, h_init: float = 0.05, pcoeff: float = 0.0, icoeff: float = 1.0,
                        dcoeff: float = 0.0, accept_safety: float = 0.81, eta: float = 0.0,
                        s_noise: float = 1.0, flow: bool = False) -> torch.Tensor:
    """Adaptive DPM-Solver-12 / DPM-Solver-23 (Lu et al. 2022, adaptive step size section).

    From σ_max = sigmas[0] to σ_min = the last non-zero σ; each attempt compares a lower- and a higher-order
    estimate that share model calls and lets a PID controller pick the next step. The callback runs after every
    attempt, accepted or not (``i`` counts attempts). ``flow``: as for :func:`sample_dpm_fast`.
    """
    if order not in (2, 3):
        raise ValueError("DPM adaptive: order must be 2 or 3")
    sigma_max, sigma_min = _sigma_range(sigmas)
    solver = _DPMSolver(denoiser, x)
    t_start, t_end = _log_time(sigma_max), _log_time(sigma_min)
    atol_t, rtol_t = torch.tensor(atol), torch.tensor(rtol)
    controller = _StepSizeController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    s = t_start
    x_prev = x
    attempt = 0
    while s < t_end - 1e-5:
        t = torch.minimum(t_end, s + controller.h)
        t_target, scale, noise_std = _ancestral_target(s, t, t_end, eta, flow)
        eps = solver.eps(x, s)
        denoised = x - _sigma_at(s) * eps
        h = t_target - s
        if order == 2:
            x_low = solver.first_order(x, s, t_target, eps)
            eps_r1 = solver.eps_at_fraction(x, s, h, 1 / 2, eps)
            x_high = solver.second_order(x, s, t_target, 1 / 2, eps, eps_r1)
        else:
            eps_r1 = solver.eps_at_fraction(x, s, h, 1 / 3, eps)
            x_low = solver.second_order(x, s, t_target, 1 / 3, eps, eps_r1)
            x_high = solver.third_order(x, s, t_target, eps, eps_r1)
        tolerance = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / tolerance) / x.numel() ** 0.5
        if controller.propose(error):
            x_prev = x_low
            x = _dpm_noise_step(flow, x_high, noise, _sigma_at(s), _sigma_at(t), scale, noise_std, s_noise)
            s = t
        _report(callback, attempt, x, _sigma_at(s), _sigma_at(s), denoised)
        attempt += 1
    return x


# --- DPM-Solver++ (Lu et al. 2022b, arXiv:2211.01095) ------------------------------------------------------------

@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                              noise: NoiseSource | None = None, callback: StepCallback | None = None, *,
                              eta: float = 1.0, s_noise: float = 1.0, flow: bool = False) -> torch.Tensor:
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022b, Algorithm 1 with r = 1/2).

    Each step goes to σ_down with the data-prediction second-order singlestep solver, then adds noise of σ_up;
    a step reaching σ_down = 0 is Euler. ``flow``: ``_dpmpp_2s_flow_step`` and the re-noise of ``flow.ancestral_step``.
    """
    s_in = _per_image(x)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        if flow:
            sigma_down, scale, noise_std = flow_path.ancestral_step(sigmas[i], sigmas[i + 1], eta)
            if sigma_down == 0:
                x = x + _derivative(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
            else:
                x = _dpmpp_2s_flow_step(denoiser, x, sigmas[i], sigma_down, denoised, s_in)
            if sigmas[i + 1] > 0:
                x = _with_flow_noise(x, noise, sigmas[i], sigmas[i + 1], scale, noise_std, s_noise)
            _report(callback, i, x, sigmas[i], sigmas[i], denoised)
            continue
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + _derivative(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _log_time(sigmas[i]), _log_time(sigma_down)
            r = 1 / 2
            h = t_next - t
            s = t + r * h
            x_mid = (_sigma_at(s) / _sigma_at(t)) * x - (-h * r).expm1() * denoised
            denoised_mid = denoiser(x_mid, _sigma_at(s) * s_in)
            x = (_sigma_at(t_next) / _sigma_at(t)) * x - (-h).expm1() * denoised_mid
        if sigmas[i + 1] > 0:
            x = _with_noise(x, noise, sigmas[i], sigmas[i + 1], s_noise, sigma_up)
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
    return x


def _dpmpp_2s_flow_step(denoiser: Denoiser, x, sigma, sigma_down, denoised, s_in):
    """DPM-Solver++(2S) from σ to σ_down on a flow path, as ComfyUI's ``dpmpp_2s_ancestral_RF`` takes it.

    The midpoint σ_s is halfway in the half-log-SNR λ = log((1 − σ)/σ), σ_s = 1/(1 + e^λ) (0.9999 when σ = 1, where
    λ is infinite); a first-order step there, u = (σ_s/σ)·x + (1 − σ_s/σ)·x̂₀ (DPM-Solver++'s step with α = 1 − σ is
    this Euler step in σ), gives x̂₀(u, σ_s), which then carries the whole step to σ_down the same way.
    """
    if sigma == 1:
        sigma_s = torch.full_like(sigma, 0.9999)
    else:
        lam, lam_down = ((1 - sigma) / sigma).log(), ((1 - sigma_down) / sigma_down).log()
        sigma_s = 1 / ((lam + (lam_down - lam) / 2).exp() + 1)
    ratio = sigma_s / sigma
    denoised_mid = denoiser(ratio * x + (1 - ratio) * denoised, sigma_s * s_in)
    ratio = sigma_down / sigma
    return ratio * x + (1 - ratio) * denoised_mid


@torch.no_grad()
def sample_dpmpp_sde(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSource | None = None,
                     callback: StepCallback | None = None, *, eta: float = 1.0, s_noise: float = 1.0,
                     r: float = 1 / 2) -> torch.Tensor:
    """Stochastic DPM-Solver++ (Lu et al. 2022b), two stages per step as in k-diffusion's "DPM++ SDE".

    Stage 1 goes to the intermediate s = t + r·h ancestrally (noise drawn for σ(t) → σ(s)); stage 2 steps the
    whole way with the blend (1 − 1/2r)·D₁ + (1/2r)·D₂ and adds noise for σ(t) → σ(t_next). The last step is Euler.
    A1111 feeds it a Brownian tree (``brownian_noise``).
    """
    s_in = _per_image(x)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = x + _derivative(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        else:
            t, t_next = _log_time(sigmas[i]), _log_time(sigmas[i + 1])
            h = t_next - t
            s = t + h * r
            weight = 1 / (2 * r)

            sigma_down, sigma_up = _ancestral_step(_sigma_at(t), _sigma_at(s), eta)
            s_down = _log_time(sigma_down)
            x_mid = (_sigma_at(s_down) / _sigma_at(t)) * x - (t - s_down).expm1() * denoised
            x_mid = _with_noise(x_mid, noise, _sigma_at(t), _sigma_at(s), s_noise, sigma_up)
            denoised_mid = denoiser(x_mid, _sigma_at(s) * s_in)

            sigma_down, sigma_up = _ancestral_step(_sigma_at(t), _sigma_at(t_next), eta)
            t_down = _log_time(sigma_down)
            blended = (1 - weight) * denoised + weight * denoised_mid
            x = (_sigma_at(t_down) / _sigma_at(t)) * x - (t - t_down).expm1() * blended
            x = _with_noise(x, noise, _sigma_at(t), _sigma_at(t_next), s_noise, sigma_up)
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSource | None = None,
                    callback: StepCallback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022b, Algorithm 2: second-order multistep in data prediction.

    The first step, and the step to σ = 0, are first order.
    """
    s_in = _per_image(x)
    previous = None
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        t, t_next = _log_time(sigmas[i]), _log_time(sigmas[i + 1])
        h = t_next - t
        if previous is None or sigmas[i + 1] == 0:
            estimate = denoised
        else:
            ratio = (t - _log_time(sigmas[i - 1])) / h
            estimate = (1 + 1 / (2 * ratio)) * denoised - (1 / (2 * ratio)) * previous
        x = (_sigma_at(t_next) / _sigma_at(t)) * x - (-h).expm1() * estimate
        previous = denoised
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSource | None = None,
                        callback: StepCallback | None = None, *, eta: float = 1.0, s_noise: float = 1.0,
                        solver_type: str = "midpoint") -> torch.Tensor:
    """DPM-Solver++(2M) SDE: the stochastic second-order multistep variant of DPM-Solver++ (Lu et al. 2022b).

    ``solver_type`` picks the second-order correction: "midpoint", or "heun" (A1111's "DPM++ 2M SDE Heun").
    The step to σ = 0 returns the denoised estimate. A1111 feeds it a Brownian tree (``brownian_noise``).
    """
    if solver_type not in ("heun", "midpoint"):
        raise ValueError("DPM++ 2M SDE: solver_type must be 'heun' or 'midpoint'")
    s_in = _per_image(x)
    previous = None
    h_last = None
    h = None
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            decay = (-h - eta_h).expm1().neg()
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + decay * denoised
            if previous is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (decay / (-h - eta_h) + 1) * (1 / r) * (denoised - previous)
                else:
                    x = x + 0.5 * decay * (1 / r) * (denoised - previous)
            if eta:
                x = _with_noise(x, noise, sigmas[i], sigmas[i + 1],
                                sigmas[i + 1], (-2 * eta_h).expm1().neg().sqrt(), s_noise)
        previous = denoised
        h_last = h
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseSource | None = None,
                        callback: StepCallback | None = None, *, eta: float = 1.0,
                        s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(3M) SDE: third-order multistep SDE solver in data prediction (Gonzalez et al. 2023,
    "SEEDS: Exponential SDE Solvers for Fast High-Quality Sampling from Diffusion Models", on DPM-Solver++).

    It uses φ₂ and φ₃ of h(1 + η) with the last two step ratios, dropping to second and first order while history
    is short; the step to σ = 0 returns the denoised estimate. A1111 feeds it a Brownian tree.
    """
    s_in = _per_image(x)
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    h = None
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
            if eta:
                x = _with_noise(x, noise, sigmas[i], sigmas[i + 1],
                                sigmas[i + 1], (-2 * h * eta).expm1().neg().sqrt(), s_noise)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
    return x
