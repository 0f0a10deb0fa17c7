"""Our σ-space samplers against k-diffusion 0.1.1 (the functions A1111 1.10 samples with), fed the same noise.

The oracle is run the way A1111 runs it: k-diffusion's ``torch.randn_like`` answers with the images' next draws
(A1111's TorchHijack), ancestral samplers get no noise_sampler (so they draw through that hook), and the SDE
samplers get a per-image BrownianTreeNoiseSampler. Our samplers get ``ancestral_noise`` / ``brownian_noise`` over
an identical ImageNoise. Each run logs every model call and noise draw, in order, so the sequences are compared too.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engine.sampling import samplers
from engine.sampling.noise import ImageNoise, ancestral_noise, brownian_noise
from tests._kdiffusion import load

DEMO_MODEL = Path(__file__).resolve().parent.parent / "builtin" / "sfumato-demo"
SEEDS = [1234, 98765]
LATENT_SHAPE = (4, 8, 8)
TOLERANCE = 1e-5

# name, options, noise kind ("ancestral" routes through randn_like, "brownian" is a tree per image)
CASES = [
    ("sample_euler", {}, "ancestral"),
    ("sample_euler", {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 10.0}, "ancestral"),
    ("sample_euler_ancestral", {}, "ancestral"),
    ("sample_euler_ancestral", {"eta": 0.5, "s_noise": 0.9}, "ancestral"),
    ("sample_heun", {}, "ancestral"),
    ("sample_heun", {"s_churn": 1.0}, "ancestral"),
    ("sample_dpm_2", {}, "ancestral"),
    ("sample_dpm_2", {"s_churn": 1.0, "s_noise": 1.003}, "ancestral"),
    ("sample_dpm_2_ancestral", {}, "ancestral"),
    ("sample_lms", {}, "ancestral"),
    ("sample_lms", {"order": 2}, "ancestral"),
    ("sample_dpm_fast", {}, "ancestral"),
    ("sample_dpm_fast", {"eta": 1.0}, "ancestral"),
    ("sample_dpm_adaptive", {}, "ancestral"),
    ("sample_dpm_adaptive", {"eta": 1.0}, "ancestral"),
    ("sample_dpm_adaptive", {"order": 2, "rtol": 0.1}, "ancestral"),
    ("sample_dpmpp_2s_ancestral", {}, "ancestral"),
    ("sample_dpmpp_sde", {}, "brownian"),
    ("sample_dpmpp_sde", {"eta": 0.0}, "brownian"),
    ("sample_dpmpp_2m", {}, "ancestral"),
    ("sample_dpmpp_2m_sde", {}, "brownian"),
    ("sample_dpmpp_2m_sde", {"solver_type": "heun"}, "brownian"),
    ("sample_dpmpp_3m_sde", {}, "brownian"),
    ("sample_dpmpp_3m_sde", {"eta": 0.5}, "brownian"),
]
SAMPLER_NAMES = sorted({name for name, _, _ in CASES})
# On the demo UNet, every sampler once, as A1111 runs it (DPM fast and adaptive with eta 1), plus 2M SDE Heun.
DEMO_CASES = [case for case in CASES if not case[1] or case[1] in ({"solver_type": "heun"},)
              if case[0] not in ("sample_dpm_fast", "sample_dpm_adaptive")]
DEMO_CASES += [("sample_dpm_fast", {"eta": 1.0}, "ancestral"), ("sample_dpm_adaptive", {"eta": 1.0}, "ancestral")]


def _case_id(case) -> str:
    name, options, _ = case
    return name + "".join(f"-{key}={value}" for key, value in options.items())


def _karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5, written here from the paper, ending in 0."""
    ramp = torch.linspace(0, 1, n)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


class GaussianDenoiser:
    """The exact x̂₀ = E[x₀ | x] for data x₀ ~ N(μ, s²) per element: μ + s²/(s² + σ²)·(x − μ)."""

    def __init__(self):
        generator = torch.Generator().manual_seed(7)
        self.mean = torch.randn((1, *LATENT_SHAPE), generator=generator) * 0.5
        self.std = torch.rand((1, *LATENT_SHAPE), generator=generator) + 0.3

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.reshape(-1, 1, 1, 1)
        return self.mean + self.std ** 2 / (self.std ** 2 + sigma ** 2) * (x - self.mean)


class _DemoModel(torch.nn.Module):
    """The demo UNet behind k-diffusion's CompVis interface (``apply_model(x, t, cond)``, ``alphas_cumprod``)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())

    def apply_model(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond).sample


@pytest.fixture(scope="module")
def kdiffusion():
    return load()


@pytest.fixture(scope="module")
def demo_denoiser(kdiffusion):
    diffusers = pytest.importorskip("diffusers")
    if not (DEMO_MODEL / "unet").is_dir():
        pytest.skip("the demo model is not shipped in this checkout")
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(DEMO_MODEL), subfolder="unet").eval()
    wrapped = kdiffusion[1].CompVisVDenoiser(_DemoModel(unet))
    cond = torch.randn((len(SEEDS), 4, unet.config.cross_attention_dim), generator=torch.Generator().manual_seed(3))

    def denoise(x, sigma):
        with torch.no_grad():
            return wrapped(x, sigma, cond=cond)

    denoise.sigma_range = (float(wrapped.sigma_min), float(wrapped.sigma_max))
    return denoise


class _Log:
    """The ordered model calls and noise draws of one sampler run."""

    def __init__(self):
        self.events: list[tuple] = []

    def denoiser(self, inner):
        def call(x, sigma, **extra_args):
            self.events.append(("model", sigma.clone()))
            return inner(x, sigma)

        return call

    def noise(self, inner):
        def draw(*sigmas):
            self.events.append(("noise", *(torch.as_tensor(s).clone() for s in sigmas)))
            return inner(*sigmas)

        return draw


class _RandnHook:
    """A1111's hook on k-diffusion's ``torch``: ``randn_like`` answers with the images' next draws."""

    def __init__(self, draw):
        self._draw = draw

    def __getattr__(self, name):
        if name == "randn_like":
            return lambda x: self._draw()
        return getattr(torch, name)


def _image_noise() -> ImageNoise:
    return ImageNoise(LATENT_SHAPE, SEEDS, eta_noise_seed_delta=31337)


def _run_both(kdiffusion, monkeypatch, denoiser, sigmas, name, options, noise_kind):
    k_sampling = kdiffusion[0]
    k_log, our_log = _Log(), _Log()

    k_noise, our_noise = _image_noise(), _image_noise()
    x = k_noise.first() * sigmas[0]
    assert torch.equal(our_noise.first() * sigmas[0], x)

    monkeypatch.setattr(k_sampling, "torch", _RandnHook(k_log.noise(lambda: k_noise.next())))
    k_args = dict(options)
    if noise_kind == "brownian":
        sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
        k_args["noise_sampler"] = k_log.noise(k_sampling.BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=SEEDS))
        our_source = brownian_noise(x, sigmas, SEEDS)
    else:
        our_source = ancestral_noise(our_noise)
    k_function = getattr(k_sampling, name)
    k_model = k_log.denoiser(denoiser)
    if name in ("sample_dpm_fast", "sample_dpm_adaptive"):
        positive = sigmas[sigmas > 0]
        bounds = {"sigma_min": positive[-1].item(), "sigma_max": sigmas[0].item()}
        if name == "sample_dpm_fast":
            bounds["n"] = len(sigmas) - 1
        expected = k_function(k_model, x, **bounds, disable=True, **k_args)
    else:
        expected = k_function(k_model, x, sigmas, disable=True, **k_args)
    monkeypatch.undo()

    steps = []
    actual = getattr(samplers, name)(our_log.denoiser(denoiser), x, sigmas, our_log.noise(our_source),
                                     steps.append, **options)
    return expected, actual, k_log.events, our_log.events, steps


def _assert_same_sequence(k_events, our_events, name, noise_kind):
    assert [event[0] for event in our_events] == [event[0] for event in k_events], name
    for ours, theirs in zip(our_events, k_events):
        if ours[0] == "model" or noise_kind == "brownian":
            # The Brownian tree is queried at exactly the oracle's σ pairs; the model sees exactly its σs.
            for our_sigma, k_sigma in zip(ours[1:], theirs[1:]):
                assert torch.equal(our_sigma, k_sigma.to(our_sigma.dtype)), (name, ours, theirs)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_sampler_matches_kdiffusion_on_gaussian_data(kdiffusion, monkeypatch, case):
    name, options, noise_kind = case
    sigmas = _karras(8, 0.03, 14.6)
    expected, actual, k_events, our_events, steps = _run_both(
        kdiffusion, monkeypatch, GaussianDenoiser(), sigmas, name, options, noise_kind)
    _assert_same_sequence(k_events, our_events, name, noise_kind)
    assert (actual - expected).abs().max().item() <= TOLERANCE
    assert steps and torch.equal(steps[-1].x, actual)
    if name not in ("sample_dpm_fast", "sample_dpm_adaptive"):
        assert [step.i for step in steps] == list(range(len(sigmas) - 1))


@pytest.mark.parametrize("case", DEMO_CASES, ids=_case_id)
def test_sampler_matches_kdiffusion_on_demo_unet(kdiffusion, monkeypatch, demo_denoiser, case):
    name, options, noise_kind = case
    sigmas = _karras(8, *demo_denoiser.sigma_range)
    expected, actual, k_events, our_events, _ = _run_both(
        kdiffusion, monkeypatch, demo_denoiser, sigmas, name, options, noise_kind)
    _assert_same_sequence(k_events, our_events, name, noise_kind)
    assert (actual - expected).abs().max().item() <= TOLERANCE


def test_every_a1111_sampler_is_here():
    names = ["sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral",
             "sample_lms", "sample_dpm_fast", "sample_dpm_adaptive", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde",
             "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"]
    assert sorted(names) == SAMPLER_NAMES == sorted({name for name, _, _ in DEMO_CASES})
    for name in names:
        assert callable(getattr(samplers, name)) and getattr(samplers, name).__doc__


def test_samplers_leave_the_global_rng_alone(kdiffusion):
    sigmas = _karras(6, 0.03, 14.6)
    state = torch.get_rng_state()
    for name, options, noise_kind in CASES:
        noise = _image_noise()
        x = noise.first() * sigmas[0]
        source = brownian_noise(x, sigmas, SEEDS) if noise_kind == "brownian" else ancestral_noise(noise)
        getattr(samplers, name)(GaussianDenoiser(), x, sigmas, source, **options)
    assert torch.equal(torch.get_rng_state(), state)


def test_deterministic_samplers_need_no_noise_source():
    sigmas = _karras(6, 0.03, 14.6)
    x = _image_noise().first() * sigmas[0]
    for name in ("sample_euler", "sample_heun", "sample_dpm_2", "sample_lms", "sample_dpmpp_2m",
                 "sample_dpm_fast", "sample_dpm_adaptive"):
        assert torch.isfinite(getattr(samplers, name)(GaussianDenoiser(), x, sigmas)).all()
    with pytest.raises(ValueError):
        samplers.sample_euler_ancestral(GaussianDenoiser(), x, sigmas)


def test_gaussian_data_is_recovered():
    """A sampler that paints noise would fail here: with the exact denoiser the samples take the data's statistics."""
    sigmas = _karras(20, 0.03, 14.6)
    seeds = list(range(64))
    noise = ImageNoise(LATENT_SHAPE, seeds)
    x = noise.first() * sigmas[0]
    data = GaussianDenoiser()
    sample = samplers.sample_dpmpp_2m(data, x, sigmas)
    assert (sample.mean(0) - data.mean[0]).abs().mean() < 0.15
    assert (sample.std(0) / data.std[0] - 1).abs().mean() < 0.15
    assert not math.isnan(sample.sum().item())
