"""A1111's Restart and LCM samplers on the σ contract, against references written here the way A1111 runs them:
Restart over k-diffusion's own Karras schedule (the oracle), LCM through a formula-level LCMCompVisDenoiser that
takes the raw model output at an integer LCM timestep as ε — on an analytic toy model and on the demo UNet.
"""
from __future__ import annotations


import pytest
import torch

from engine.sampling.lcm import lcm_sigma_range, lcm_sigmas, sample_lcm
from engine.sampling.restart import restart_step_pairs, sample_restart
from tests._kdiffusion import load
from tests._timestep_fixtures import (
    CFG_SCALE, ListedNoise, SigmaDenoiser, demo_unet_model, model_for, noise_table, noises, toy_eps_model,
)

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def table():
    return noise_table()


@pytest.fixture(scope="module")
def unet():
    return demo_unet_model()


def _karras(k_sampling, steps, table):
    return k_sampling.get_sigmas_karras(steps, float(table.sigmas[0]), float(table.sigmas[-1]))


# ---------------------------------------------------------------------------------------------------------------
# Restart
# ---------------------------------------------------------------------------------------------------------------

def restart_reference(k_sampling, denoiser, x, sigmas, noise_list, s_noise=1.0):
    """Xu et al.'s Restart as A1111 configures it, with k-diffusion's Karras schedule and Heun steps."""
    steps = len(sigmas) - 1
    restart = {}
    if steps >= 20:
        r_steps, r_times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = k_sampling.get_sigmas_karras(steps - r_steps * r_times, sigmas[-2].item(), sigmas[0].item())
        restart = {int(torch.argmin(abs(sigmas - 0.1))): (r_steps + 1, r_times, 2.0)}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restart:
            points, times, top = restart[i + 1]
            max_idx = int(torch.argmin(abs(sigmas - top)))
            if max_idx < i + 1:
                up = k_sampling.get_sigmas_karras(points, sigmas[i + 1].item(), sigmas[max_idx].item())[:-1]
                for _ in range(times):
                    pairs.extend(zip(up[:-1], up[1:]))
    s_in = x.new_ones([x.shape[0]])
    last, drawn = None, 0
    for old, new in pairs:
        if last is not None and last < old:
            x = x + noise_list[drawn] * s_noise * (old ** 2 - last ** 2) ** 0.5
            drawn += 1
        d = k_sampling.to_d(x, old, denoiser(x, old * s_in))
        if new == 0:
            x = x + d * (new - old)
        else:
            x_2 = x + d * (new - old)
            d_2 = k_sampling.to_d(x_2, new, denoiser(x_2, new * s_in))
            x = x + (d + d_2) / 2 * (new - old)
        last = new
    return x, len(pairs), drawn


@pytest.mark.parametrize("steps, expected_calls, expected_restarts", [(10, 19, 0), (20, 39, 1), (40, 79, 2)])
def test_restart_model_calls_follow_a1111s_rule(table, steps, expected_calls, expected_restarts):
    k_sampling, _ = load()
    sigmas = _karras(k_sampling, steps, table)
    denoiser = SigmaDenoiser(toy_eps_model, "eps", table)
    source = ListedNoise(noises(4, seed=1))
    sample_restart(denoiser, noises(1)[0] * sigmas[0], sigmas, source)
    assert len(restart_step_pairs(sigmas)) == steps
    assert len(denoiser.timesteps) == expected_calls  # 2·steps − 1: Heun everywhere but the step to σ = 0
    assert len(source.calls) == expected_restarts
    assert all(low < high for low, high in source.calls)  # each draw climbs from the σ reached back up


@pytest.mark.parametrize("model_name", ["toy", "unet"])
@pytest.mark.parametrize("steps", [12, 20, 36])
def test_restart_matches_reference(table, unet, model_name, steps):
    k_sampling, _ = load()
    model, prediction = model_for(model_name, unet)
    sigmas = _karras(k_sampling, steps, table)
    x0, step_noise = noises(1, seed=2)[0] * sigmas[0], noises(3, seed=4)
    expected, _, drawn = restart_reference(k_sampling, SigmaDenoiser(model, prediction, table), x0, sigmas, step_noise)
    got = sample_restart(SigmaDenoiser(model, prediction, table), x0, sigmas, ListedNoise(step_noise))
    diff = (got - expected).abs().max().item()
    print(f"restart {model_name} {steps}: max diff {diff:.2e}, restarts {drawn}")
    assert expected.abs().max() > 0.1
    assert diff <= TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# LCM
# ---------------------------------------------------------------------------------------------------------------

class A1111LCMDenoiser:
    """LCMCompVisDenoiser at formula level: 50 timesteps 999 − 20k, snapping in log σ, raw output taken as ε."""

    def __init__(self, model, alphas_cumprod):
        self.model = model
        valid = torch.stack([alphas_cumprod[999 - 20 * k] for k in range(50)]).flip(0)
        self.sigmas = ((1 - valid) / valid) ** 0.5
        self.log_sigmas = self.sigmas.log()

    def sigma_to_t(self, sigma):
        return (sigma.log() - self.log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape) * 20 + 19

    def get_sigmas(self, n):
        t = torch.linspace(999.0, 19.0, n)
        k = ((t - 19) / 20).clamp(0, 49)
        low, high, w = k.floor().long(), k.ceil().long(), k.frac()
        return torch.cat([((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp(), torch.zeros(1)])

    def __call__(self, x, sigma):
        s = sigma.reshape(-1, 1, 1, 1)
        t = self.sigma_to_t(sigma)
        outputs = self.model(x / (s ** 2 + 1) ** 0.5, t.to(torch.float32))
        ts = t.reshape(-1, 1, 1, 1).to(torch.float32) * 10.0
        c_skip, c_out = 0.25 / (ts ** 2 + 0.25), ts / (ts ** 2 + 0.25) ** 0.5
        uncond, cond = (c_out * (x - s * eps) + c_skip * x for eps in outputs)
        return uncond + CFG_SCALE * (cond - uncond)


def lcm_reference(denoiser, x, sigmas, noise_list):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x = denoiser(x, sigmas[i] * s_in)
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise_list[i]
    return x


def test_lcm_schedule_is_a1111s_automatic(table):
    reference = A1111LCMDenoiser(None, table.alphas_cumprod)
    for steps in (1, 4, 8):
        assert torch.allclose(lcm_sigmas(table, steps), reference.get_sigmas(steps), rtol=1e-6, atol=0)
    assert lcm_sigma_range(table) == (float(reference.sigmas[0]), float(reference.sigmas[-1]))


@pytest.mark.parametrize("model_name, prediction", [("toy", "eps"), ("unet", "v")])
@pytest.mark.parametrize("steps", [4, 8])
def test_lcm_matches_a1111(table, unet, model_name, prediction, steps):
    """A1111 takes the demo UNet's v as ε, which paints latents of size ~50: there the bound is relative to that
    size (float32 rounding of the v recovered from the denoiser's x̂₀), on the toy ε-model it is absolute."""
    model = toy_eps_model if model_name == "toy" else unet
    reference = A1111LCMDenoiser(model, table.alphas_cumprod)
    sigmas = reference.get_sigmas(steps)
    x0, step_noise = noises(1, seed=8)[0] * sigmas[0], noises(steps, seed=9)
    expected = lcm_reference(reference, x0, sigmas, step_noise)
    denoiser = SigmaDenoiser(model, prediction, table)
    got = sample_lcm(denoiser, x0, sigmas, ListedNoise(step_noise), table=table,
                     output_as_eps=prediction == "v")  # A1111's way: a v-model's output taken as ε
    diff = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    print(f"lcm {model_name} as {prediction} {steps}: max diff {diff:.2e} (max |x| {scale:.1f})")
    assert all(t == round(t) and round(t) % 20 == 19 for t in denoiser.timesteps)  # exact LCM timesteps
    assert scale > 0.1
    assert diff <= (TOLERANCE if prediction == "eps" else 1e-6 * scale)
