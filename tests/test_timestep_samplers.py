"""A1111's timestep samplers (DDIM, DDIM CFG++, PLMS, UniPC) and DDPM on the σ contract, against references
written here in A1111's own coordinates: ᾱ-space latents, integer timesteps (UniPC: its continuous time over
NoiseScheduleVP("discrete")), ε predictions — on an analytic toy model and on the demo model's UNet.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.sampling.timestep_samplers import (
    a1111_timesteps, sample_ddim, sample_ddim_cfgpp, sample_ddpm, sample_plms, sample_unipc, timestep_img2img_start,
    timestep_sigmas, unipc_sigmas,
)
from tests._timestep_fixtures import (
    ListedNoise, SigmaDenoiser, a1111_eps, demo_unet_model, model_for, noise_table, noises, toy_eps_model,
)

TOLERANCE = 1e-5
# Through the demo UNet, fp32 rounding differences between the alpha-space reference and the σ-space sampler are
# amplified by the network: PLMS (four model outputs per step) measured 1.5e-5 on an AMD EPYC machine and under 1e-5
# on others. A wrong coefficient or step moves the result by more than 1e-3.
UNET_TOLERANCE = 5e-5


# ---------------------------------------------------------------------------------------------------------------
# References in ᾱ-space (DDIM paper eq. 12, PLMS paper, DDPM paper eq. 7, UniPC as A1111 runs it)
# ---------------------------------------------------------------------------------------------------------------

def ddim_reference(eps, x, timesteps, alphas_cumprod, eta=0.0, noise_list=(), use_uncond=False):
    ac = alphas_cumprod.to(torch.float64)
    for k, index in enumerate(range(len(timesteps) - 1, 0, -1)):
        t, t_prev = timesteps[index], timesteps[index - 1]
        e_guided, e_uncond = eps(x, torch.tensor([float(t)]))
        a_t, a_prev = ac[t].item(), ac[t_prev].item()
        s = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        pred_x0 = (x - math.sqrt(1 - a_t) * e_guided) / math.sqrt(a_t)
        x = math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev - s * s) * (e_uncond if use_uncond else e_guided)
        if eta:
            x = x + s * noise_list[k]
    return x


def plms_reference(eps, x, timesteps, alphas_cumprod):
    ac = alphas_cumprod.to(torch.float64)
    old = []

    def transfer(x, e, t, t_prev):
        a_t, a_prev = ac[t].item(), ac[t_prev].item()
        return math.sqrt(a_prev) * (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t) + math.sqrt(1 - a_prev) * e

    for index in range(len(timesteps) - 1, 0, -1):
        t, t_prev = timesteps[index], timesteps[index - 1]
        e = eps(x, torch.tensor([float(t)]))[0]
        if not old:
            e_next = eps(transfer(x, e, t, t_prev), torch.tensor([float(t_prev)]))[0]
            e_prime = (e + e_next) / 2
        elif len(old) == 1:
            e_prime = (3 * e - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x = transfer(x, e_prime, t, t_prev)
        old = (old + [e])[-3:]
    return x


def ddpm_reference(eps, x, timesteps, alphas_cumprod, noise_list):
    ac = alphas_cumprod.to(torch.float64)
    for k, index in enumerate(range(len(timesteps) - 1, 0, -1)):
        t, t_prev = timesteps[index], timesteps[index - 1]
        e = eps(x, torch.tensor([float(t)]))[0]
        a_t, a_prev = ac[t].item(), ac[t_prev].item()
        alpha, beta = a_t / a_prev, 1 - a_t / a_prev
        x0 = (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
        mean = math.sqrt(a_prev) * beta / (1 - a_t) * x0 + math.sqrt(alpha) * (1 - a_prev) / (1 - a_t) * x
        x = mean + math.sqrt(beta * (1 - a_prev) / (1 - a_t)) * noise_list[k]
    return x


class VPSchedule:
    """UniPC's NoiseScheduleVP('discrete'): log α_t piecewise linear over t_n = (n+1)/N."""

    def __init__(self, alphas_cumprod):
        self.n = len(alphas_cumprod)
        self.t_array = np.linspace(0.0, 1.0, self.n + 1)[1:]
        self.log_alpha = 0.5 * np.log(alphas_cumprod.to(torch.float64).numpy())

    def log_alpha_at(self, t):
        return float(np.interp(t, self.t_array, self.log_alpha))

    def alpha(self, t):
        return math.exp(self.log_alpha_at(t))

    def std(self, t):
        return math.sqrt(1 - math.exp(2 * self.log_alpha_at(t)))

    def lam(self, t):
        return math.log(self.alpha(t)) - math.log(self.std(t))


def unipc_reference(eps, x, steps, alphas_cumprod, t_start=1.0, order=3):
    """Multistep UniPC-bh1 with data prediction, lower order final and no last corrector, in continuous time."""
    ns = VPSchedule(alphas_cumprod)
    ts = torch.linspace(t_start, 1.0 / ns.n, steps + 1, dtype=torch.float32).tolist()
    model_times = []

    def x0(x, t):
        t_input = (torch.tensor([t], dtype=torch.float32) - 1.0 / ns.n) * 1000.0
        model_times.append(float(t_input))
        return (x - ns.std(t) * eps(x, t_input)[0]) / ns.alpha(t)

    def update(x, models, times, t, p, corrector):
        t0, m0 = times[-1], models[-1]
        h = ns.lam(t) - ns.lam(t0)
        rks = [(ns.lam(times[-(i + 1)]) - ns.lam(t0)) / h for i in range(1, p)]
        d1s = [(models[-(i + 1)] - m0) / rk for i, rk in zip(range(1, p), rks)]
        hh = -h
        h_phi_1 = math.expm1(hh)
        h_phi_k, fact, big_r, b = h_phi_1 / hh - 1, 1, [], []
        nodes = np.array(rks + [1.0])
        for i in range(1, p + 1):
            big_r.append(nodes ** (i - 1))
            b.append(h_phi_k * fact / hh)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        big_r, b = np.array(big_r), np.array(b)
        x_ = ns.std(t) / ns.std(t0) * x - ns.alpha(t) * h_phi_1 * m0
        if d1s:
            rhos_p = [0.5] if p == 2 else np.linalg.solve(big_r[:-1, :-1], b[:-1])
            x_t = x_ - ns.alpha(t) * hh * sum(float(r) * d for r, d in zip(rhos_p, d1s))
        else:
            x_t = x_
        if not corrector:
            return x_t, None
        m_t = x0(x_t, t)
        rhos_c = [0.5] if p == 1 else np.linalg.solve(big_r, b)
        corr = sum((float(r) * d for r, d in zip(rhos_c[:-1], d1s)), torch.zeros_like(x))
        return x_ - ns.alpha(t) * hh * (corr + float(rhos_c[-1]) * (m_t - m0)), m_t

    models, times = [x0(x, ts[0])], [ts[0]]
    for k in range(1, order):
        x, m = update(x, models, times, ts[k], k, True)
        models.append(m)
        times.append(ts[k])
    for step in range(order, steps + 1):
        p = min(order, steps + 1 - step)
        x, m = update(x, models, times, ts[step], p, step < steps)
        models, times = models[1:] + [m], times[1:] + [ts[step]]
    return x, model_times


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def table():
    return noise_table()


@pytest.fixture(scope="module")
def unet():
    return demo_unet_model()


def _start(table, sigmas, noise):
    """Start: noise·√(1+σ₀²), i.e. unscaled noise in ᾱ-space."""
    return noise * math.sqrt(1 + float(sigmas[0]) ** 2)


# ---------------------------------------------------------------------------------------------------------------
# Timesteps
# ---------------------------------------------------------------------------------------------------------------

def test_ddim_calls_the_model_19_times_at_a1111_integer_timesteps(table):
    sigmas = timestep_sigmas(table, 20)
    denoiser = SigmaDenoiser(toy_eps_model, "eps", table)
    noise = noises(1)[0]
    sample_ddim(denoiser, _start(table, sigmas, noise), sigmas, ListedNoise([]))
    assert denoiser.timesteps == [float(t) for t in range(951, 0, -50)][:19]
    assert torch.equal(sigmas[-1], table.sigmas[1])


def test_grid_has_more_entries_than_steps_when_1000_is_not_a_multiple():
    assert len(a1111_timesteps(30)) == 31  # stride 33: 1, 34, …, 991
    assert a1111_timesteps(30)[-1] == 991


def test_unipc_model_times_are_a1111_continuous_time_grid(table):
    sigmas = unipc_sigmas(table, 20)
    expected = ((torch.linspace(1.0, 0.001, 21) - 0.001) * 1000).tolist()
    got = table.sigma_to_t(sigmas).tolist()
    assert len(sigmas) == 21
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-3
    assert got[1] == pytest.approx(949.05, abs=1e-3) and got[-1] == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Parity with the references
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_name", ["toy", "unet"])
@pytest.mark.parametrize("variant", ["ddim", "ddim_eta", "ddim_cfgpp", "plms", "ddpm"])
def test_timestep_samplers_match_a1111_in_alpha_space(table, unet, model_name, variant):
    model, prediction = model_for(model_name, unet)
    eps = a1111_eps(model, prediction, table.alphas_cumprod)
    timesteps = a1111_timesteps(20)
    sigmas = timestep_sigmas(table, 20)
    noise = noises(1, seed=11)[0]
    step_noise = noises(19, seed=12)
    if variant == "ddim":
        expected = ddim_reference(eps, noise, timesteps, table.alphas_cumprod)
        got = sample_ddim(SigmaDenoiser(model, prediction, table), _start(table, sigmas, noise), sigmas, ListedNoise([]))
    elif variant == "ddim_eta":
        expected = ddim_reference(eps, noise, timesteps, table.alphas_cumprod, eta=0.6, noise_list=step_noise)
        got = sample_ddim(SigmaDenoiser(model, prediction, table), _start(table, sigmas, noise), sigmas,
                          ListedNoise(step_noise), eta=0.6)
    elif variant == "ddim_cfgpp":
        expected = ddim_reference(eps, noise, timesteps, table.alphas_cumprod, use_uncond=True)
        got = sample_ddim_cfgpp(SigmaDenoiser(model, prediction, table), _start(table, sigmas, noise), sigmas, ListedNoise([]))
    elif variant == "plms":
        expected = plms_reference(eps, noise, timesteps, table.alphas_cumprod)
        got = sample_plms(SigmaDenoiser(model, prediction, table), _start(table, sigmas, noise), sigmas, ListedNoise([]))
    else:
        expected = ddpm_reference(eps, noise, timesteps, table.alphas_cumprod, step_noise)
        got = sample_ddpm(SigmaDenoiser(model, prediction, table), _start(table, sigmas, noise), sigmas, ListedNoise(step_noise))
    diff = (got - expected).abs().max().item()
    print(f"{variant} {model_name}: max diff {diff:.2e}")
    assert expected.abs().max() > 0.1
    assert diff <= (UNET_TOLERANCE if model_name == "unet" else TOLERANCE)


def test_ddpm_is_ddim_at_eta_one(table):
    sigmas = timestep_sigmas(table, 10)
    noise, step_noise = noises(1, seed=5)[0], noises(9, seed=6)
    start = _start(table, sigmas, noise)
    ddpm = sample_ddpm(SigmaDenoiser(toy_eps_model, "eps", table), start, sigmas, ListedNoise(step_noise))
    ddim = sample_ddim(SigmaDenoiser(toy_eps_model, "eps", table), start, sigmas, ListedNoise(step_noise), eta=1.0)
    assert (ddpm - ddim).abs().max() <= TOLERANCE


@pytest.mark.parametrize("model_name", ["toy", "unet"])
def test_unipc_matches_a1111(table, unet, model_name):
    model, prediction = model_for(model_name, unet)
    # A1111 turns a v-model's output into ε with ᾱ at the truncated timestep; UniPC calls fractional timesteps,
    # where that differs from the σ-consistent conversion every denoiser here does, so the reference uses eps.
    eps = a1111_eps(model, "eps", table.alphas_cumprod) if prediction == "eps" else _v_as_eps(model, table)
    noise = noises(1, seed=21)[0]
    expected, model_times = unipc_reference(eps, noise, 20, table.alphas_cumprod)
    sigmas = unipc_sigmas(table, 20)
    denoiser = SigmaDenoiser(model, prediction, table)
    got = sample_unipc(denoiser, _start(table, sigmas, noise), sigmas, ListedNoise([]), table=table)
    diff = (got - expected).abs().max().item()
    print(f"unipc {model_name}: max diff {diff:.2e}; timesteps max diff "
          f"{max(abs(a - b) for a, b in zip(denoiser.timesteps, model_times)):.1e}")
    assert len(denoiser.timesteps) == 20
    assert max(abs(a - b) for a, b in zip(denoiser.timesteps, model_times)) < 1e-3
    assert diff <= TOLERANCE


def test_unipc_reproduces_a1111s_truncated_timestep_for_v_models(table, unet):
    eps = a1111_eps(unet, "v", table.alphas_cumprod)  # ᾱ at int(t), as A1111's CompVisTimestepsVDenoiser
    noise = noises(1, seed=21)[0]
    expected, _ = unipc_reference(eps, noise, 20, table.alphas_cumprod)
    sigmas = unipc_sigmas(table, 20)
    start = _start(table, sigmas, noise)
    got = sample_unipc(SigmaDenoiser(unet, "v", table), start, sigmas, ListedNoise([]), table=table,
                       prediction_type="v_prediction")
    plain = sample_unipc(SigmaDenoiser(unet, "v", table), start, sigmas, ListedNoise([]), table=table)
    diff, quirk = (got - expected).abs().max().item(), (plain - expected).abs().max().item()
    print(f"unipc unet, A1111's int-timestep v→ε: max diff {diff:.2e} (σ-consistent ε is off by {quirk:.2e})")
    assert quirk > 1e-3
    assert diff <= TOLERANCE


def _v_as_eps(model, table):
    """ε from a v-model with ᾱ interpolated at the fractional timestep (as the σ-space denoiser sees it)."""
    def eps(x, t):
        uncond, cond = model(x, t)
        sigma = table.t_to_sigma(t.reshape(-1)).reshape(-1, 1, 1, 1).to(torch.float64)
        a = (1 / (1 + sigma ** 2)).to(torch.float32)
        uncond, cond = a.sqrt() * uncond + (1 - a).sqrt() * x, a.sqrt() * cond + (1 - a).sqrt() * x
        return uncond + 3.0 * (cond - uncond), uncond
    return eps


# ---------------------------------------------------------------------------------------------------------------
# img2img
# ---------------------------------------------------------------------------------------------------------------

def test_ddim_img2img_keeps_a1111_timesteps_and_noising(table):
    init, noise = noises(2, seed=31)
    eps = a1111_eps(toy_eps_model, "eps", table.alphas_cumprod)
    grid = a1111_timesteps(20)
    t_enc = 10  # int(0.5 · 20)
    ac = table.alphas_cumprod.to(torch.float64)
    xi = init * math.sqrt(ac[grid[t_enc]].item()) + noise * math.sqrt(1 - ac[grid[t_enc]].item())
    expected = ddim_reference(eps, xi, grid[:t_enc], table.alphas_cumprod)
    sigmas = timestep_sigmas(table, 20, denoising_strength=0.5)
    denoiser = SigmaDenoiser(toy_eps_model, "eps", table)
    got = sample_ddim(denoiser, timestep_img2img_start(table, 20, 0.5, init, noise), sigmas, ListedNoise([]))
    assert denoiser.timesteps == [float(t) for t in grid[1:t_enc][::-1]]
    assert (got - expected).abs().max() <= TOLERANCE


def test_img2img_at_full_strength_caps_at_0_999_and_fixed_steps_stretch_the_grid(table):
    assert len(timestep_sigmas(table, 20, denoising_strength=1.0)) == 19  # int(0.999·20) = 19 kept
    sigmas = timestep_sigmas(table, 10, denoising_strength=0.5, fixed_steps=True)  # grid for 20, keep 9
    assert table.sigma_to_t(sigmas).round().tolist() == [float(t) for t in a1111_timesteps(20)[:9][::-1]]


def test_unipc_img2img_matches_a1111(table):
    init, noise = noises(2, seed=41)
    eps = a1111_eps(toy_eps_model, "eps", table.alphas_cumprod)
    grid = a1111_timesteps(20)
    t_enc = 12  # int(0.6 · 20)
    ac = table.alphas_cumprod.to(torch.float64)
    xi = init * math.sqrt(ac[grid[t_enc]].item()) + noise * math.sqrt(1 - ac[grid[t_enc]].item())
    t_start = float(torch.tensor(grid[t_enc - 1]) / 1000 + 1 / 1000)
    expected, _ = unipc_reference(eps, xi, t_enc, table.alphas_cumprod, t_start=t_start)
    sigmas = unipc_sigmas(table, 20, denoising_strength=0.6)
    got = sample_unipc(SigmaDenoiser(toy_eps_model, "eps", table), timestep_img2img_start(table, 20, 0.6, init, noise),
                       sigmas, ListedNoise([]), table=table)
    assert len(sigmas) == t_enc + 1
    assert (got - expected).abs().max() <= TOLERANCE
