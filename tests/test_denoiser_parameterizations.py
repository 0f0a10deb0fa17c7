"""The denoiser turns each parameterization's model output into x̂₀ from the published formulas.

A stand-in model that answers with the exact prediction for a known clean latent x₀ and noise ε must make the
denoiser return x₀, for eps (Ho et al. 2020), v (Salimans & Ho 2022) and flow (rectified flow: x = (1−σ)·x₀ + σ·ε,
v = ε − x₀; Liu et al. 2022, Esser et al. 2024). The stand-in checks the input scale and timestep the model sees.
"""
from __future__ import annotations

import pytest
import torch

from engine.sampling.denoiser import EPS, FLOW, V_PREDICTION, GuidedDenoiser
from engine.sampling.noise_table import NoiseTable

TABLE = NoiseTable.for_betas(0.00085, 0.012)
X0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
NOISE = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))


class KnownAnswer(torch.nn.Module):
    """Answers with the exact prediction for X0/NOISE, after checking what the model was handed."""

    def __init__(self, parameterization: str, sigma: float):
        super().__init__()
        self.parameterization, self.sigma = parameterization, sigma

    def forward(self, model_input, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=False):
        sigma = self.sigma
        if self.parameterization == FLOW:
            assert torch.allclose(model_input, (1 - sigma) * X0 + sigma * NOISE, atol=1e-5)  # no input scaling
            assert torch.allclose(timestep, torch.tensor([sigma * 1000.0]))
            return (NOISE - X0,)
        alpha = 1 / (1 + sigma ** 2) ** 0.5  # √ᾱ for this σ
        assert torch.allclose(model_input, alpha * X0 + alpha * sigma * NOISE, atol=1e-5)  # x_ᾱ = √ᾱ·x₀ + √(1−ᾱ)·ε
        assert torch.allclose(TABLE.t_to_sigma(timestep), torch.tensor([sigma]), rtol=1e-4)
        if self.parameterization == EPS:
            return (NOISE,)
        return (alpha * NOISE - alpha * sigma * X0,)  # v = √ᾱ·ε − √(1−ᾱ)·x₀


@pytest.mark.parametrize("parameterization", [EPS, V_PREDICTION, FLOW])
@pytest.mark.parametrize("sigma", [0.3, 2.0])
def test_each_parameterization_recovers_the_clean_latent(parameterization, sigma):
    if parameterization == FLOW:
        sigma = min(sigma, 0.9)  # flow σ lives in [0, 1]
        x = (1 - sigma) * X0 + sigma * NOISE
    else:
        x = X0 + sigma * NOISE  # σ-space: x_σ = x₀ + σ·ε
    denoiser = GuidedDenoiser(KnownAnswer(parameterization, sigma), TABLE, parameterization,
                              prompt_embeds=torch.zeros(1, 2, 8), cfg_scale=1.0, do_cfg=False)
    denoised = denoiser(x, torch.tensor([sigma]))
    assert torch.allclose(denoised, X0, atol=1e-4)


def test_an_unknown_parameterization_is_named():
    class Zeros(torch.nn.Module):
        def forward(self, model_input, *args, **kwargs):
            return (torch.zeros_like(model_input),)

    denoiser = GuidedDenoiser(Zeros(), TABLE, "x0", prompt_embeds=torch.zeros(1, 2, 8), cfg_scale=1.0, do_cfg=False)
    with pytest.raises(ValueError, match="x0"):
        denoiser(X0, torch.tensor([1.0]))
