"""The A1111 reference (tests/a1111_reference) checked on its own: against k-diffusion where it has the
same function, against A1111's published facts, and against exact solutions where a sampler integrates
an ODE whose answer is known (Gaussian data)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests._kdiffusion import load
from tests.a1111_reference import SAMPLERS, SCHEDULE_NAMES, Params, resolved_schedule, schedule_sigmas, to_uint8
from tests.a1111_reference.ref_model import CFGTimesteps, LatentModel, TimestepsEps
from tests.a1111_reference.ref_noise_table import ldm_alphas_cumprod
from tests.a1111_reference.ref_restart_lcm import LCMDenoiser
from tests.a1111_reference.ref_rng import ImageNoise, TorchWithImageNoise
from tests.a1111_reference import ref_schedules, ref_timesteps

SD_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


class _RecordingUNet(torch.nn.Module):
    """Stands in for a UNet: records its timesteps and returns a fixed fraction of its input."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.timesteps = []

    def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=False):
        self.timesteps.append(t.clone())
        return (x * 0.1,)


def _wrap(config=SD_CONFIG, parameterization="eps"):
    _, external = load()
    model = LatentModel(_RecordingUNet(), {**config, "prediction_type": "v_prediction" if parameterization == "v" else "epsilon"})
    kind = external.CompVisVDenoiser if parameterization == "v" else external.CompVisDenoiser
    return model, kind(model, quantize=False)


def _cond():
    return {"crossattn": torch.zeros(1, 77, 8), "vector": None}


def test_noise_table_is_ldms_float64_product_stored_as_float32():
    table = ldm_alphas_cumprod()
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    assert table.dtype == torch.float32
    assert torch.equal(table, torch.tensor(np.cumprod(1 - betas), dtype=torch.float32))
    _, wrap = _wrap()
    assert wrap.sigmas[-1].item() == pytest.approx(14.6146, abs=1e-4) and wrap.sigmas[0].item() == pytest.approx(0.0292, abs=1e-4)


@pytest.mark.parametrize("steps", [1, 7, 20, 33])
def test_karras_exponential_polyexponential_equal_k_diffusion(steps):
    sampling, _ = load()
    lo, hi = 0.0291675, 14.614642
    assert torch.equal(ref_schedules.karras(steps, lo, hi), sampling.get_sigmas_karras(steps, lo, hi))
    assert torch.equal(ref_schedules.exponential(steps, lo, hi), sampling.get_sigmas_exponential(steps, lo, hi))
    assert torch.equal(ref_schedules.polyexponential(steps, lo, hi), sampling.get_sigmas_polyexponential(steps, lo, hi))


def test_table_schedules_follow_a1111s_formulas():
    _, wrap = _wrap()
    lo, hi = wrap.sigmas[0].item(), wrap.sigmas[-1].item()
    uniform = ref_schedules.uniform(20, lo, hi, wrap)
    assert torch.equal(uniform, wrap.get_sigmas(20)) and uniform[0].item() == pytest.approx(hi) and uniform[-1] == 0
    # SGM Uniform: t evenly from 999 over 21 points, the last dropped: t = 999, 951.45, ...
    sgm = ref_schedules.sgm_uniform(20, lo, hi, wrap)
    assert len(sgm) == 21 and sgm[1].item() == pytest.approx(wrap.t_to_sigma(torch.tensor(999 - 999 / 20)).item(), rel=1e-5)
    # Normal: 20 t inclusive of both ends, so its last non-zero σ is σ_min
    normal = ref_schedules.normal(20, lo, hi, wrap)
    assert normal[-2].item() == pytest.approx(lo, rel=1e-5) and normal[0].item() == pytest.approx(hi, rel=1e-5)
    # Simple: table σ at t = 999, 949, ..., 49; DDIM: at t = 951, 901, ..., 1
    simple = ref_schedules.simple(20, lo, hi, wrap)
    assert torch.equal(simple[:-1], wrap.sigmas[[999 - 50 * i for i in range(20)]])
    ddim = ref_schedules.ddim(20, lo, hi, wrap)
    assert torch.equal(ddim[:-1], wrap.sigmas[[951 - 50 * i for i in range(20)]])
    # KL Optimal ends at σ_min (A1111 appends no zero), AYS resamples the published 11 σs
    kl = ref_schedules.kl_optimal(20, lo, hi)
    assert len(kl) == 21 and kl[-1].item() == pytest.approx(lo, rel=1e-5) and kl[0].item() == pytest.approx(hi, rel=1e-5)
    # AYS: 10 steps resample the published 11 σs log-linearly (ends kept); 11 steps take them as they are
    ays = ref_schedules.align_your_steps(10, lo, hi)
    assert len(ays) == 11 and ays[-1] == 0
    assert ays[0].item() == pytest.approx(14.615, rel=1e-6) and ays[-2].item() == pytest.approx(0.029, rel=1e-5)
    assert ays[5].item() == pytest.approx(math.exp(np.interp(4 / 9, np.linspace(0, 1, 11), np.log(ref_schedules.AYS_SD1[::-1]))), rel=1e-5)
    assert ref_schedules.align_your_steps(11, lo, hi)[:-1].tolist() == pytest.approx(ref_schedules.AYS_SD1, rel=1e-6)
    # Beta(0.6, 0.6): symmetric, so the middle of an odd count sits halfway between σ_min and σ_max
    beta = ref_schedules.beta(21, lo, hi)
    assert beta[10].item() == pytest.approx((lo + hi) / 2, rel=1e-5) and beta[0].item() == pytest.approx(hi)


def test_automatic_resolves_to_each_samplers_default_and_drops_the_penultimate_sigma_where_a1111_does():
    defaults = {name: resolved_schedule(name, "Automatic") for name in SAMPLERS}
    assert defaults["DPM++ 2M"] == defaults["DPM++ SDE"] == defaults["DPM2"] == defaults["Restart"] == "Karras"
    assert defaults["DPM++ 2M SDE"] == defaults["DPM++ 3M SDE"] == defaults["DPM++ 2M SDE Heun"] == "Exponential"
    assert defaults["Euler a"] == defaults["Euler"] == defaults["LMS"] == defaults["LCM"] == "Uniform"
    _, wrap = _wrap()
    lo, hi = wrap.sigmas[0].item(), wrap.sigmas[-1].item()
    for name in ("DPM2", "DPM2 a", "DPM++ 3M SDE"):
        sigmas = schedule_sigmas(SAMPLERS[name], "Automatic", 20, wrap, False)
        longer = ref_schedules.SCHEDULES[defaults[name]](21, lo, hi, wrap)
        assert len(sigmas) == 21 and torch.equal(sigmas, torch.cat([longer[:-2], longer[-1:]]))
    assert len(SAMPLERS) == 20 and len(SCHEDULE_NAMES) == 12


def test_ddim_at_20_steps_evaluates_t_951_down_to_51_and_ends_on_alphabar_1():
    model, _ = _wrap()
    timesteps = ref_timesteps.timesteps_for(20)
    assert timesteps.tolist() == [1 + 50 * i for i in range(20)]
    denoiser = CFGTimesteps(TimestepsEps(model), _cond(), _cond(), 7.0)
    ref_timesteps.ddim(denoiser, torch.randn(1, 4, 2, 2), timesteps, ImageNoise((4, 2, 2), [0]))
    called = [t[0].item() for t in model.unet.timesteps]
    assert called == [951.0 - 50 * i for i in range(19)]


def test_unipc_calls_the_model_20_times_from_t_999_with_the_continuous_time_offset():
    model, _ = _wrap()
    denoiser = CFGTimesteps(TimestepsEps(model), _cond(), _cond(), 7.0)
    ref_timesteps.unipc(denoiser, torch.randn(1, 4, 2, 2), ref_timesteps.timesteps_for(20))
    called = [t[0].item() for t in model.unet.timesteps]
    assert len(called) == 20 and called[0] == pytest.approx(999.0) and called[1] == pytest.approx((1 - 0.999 / 20 - 0.001) * 1000, rel=1e-5)


class _GaussianEps:
    """Exact ε for data x₀ ~ N(μ, s²) elementwise, as a timestep denoiser (CFG scale irrelevant)."""

    def __init__(self, table, mu, s):
        self.alphas_cumprod, self.mu, self.s = table, mu, s
        self.last_noise_uncond = None
        self.scale_multiplier = 1.0

    def __call__(self, x, t):
        # continuous-time samplers (UniPC) ask between table entries: interpolate log √ᾱ as they do
        vp = ref_timesteps.DiscreteVP(self.alphas_cumprod)
        tc = t.double() / 1000 + 1 / 1000
        alpha = torch.exp(vp.log_mean(tc.float())).double()[:, None, None, None]
        sigma = torch.sqrt(1 - alpha ** 2)
        x0 = self.mu + alpha * self.s ** 2 / (alpha ** 2 * self.s ** 2 + sigma ** 2) * (x.double() - alpha * self.mu)
        eps = ((x.double() - alpha * x0) / sigma).float()
        self.last_noise_uncond = eps
        return eps


def _gaussian_endpoint_error(name: str, steps: int) -> float:
    """Max |x − exact| after sampling Gaussian data x₀ ~ N(0.3, 0.5²) with the exact ε.

    For Gaussian data the probability-flow ODE is solved exactly: x_t = α_t μ + √(α_t² s² + σ_t²)·z.
    """
    table = ldm_alphas_cumprod()
    mu, s = torch.full((1, 4, 4, 4), 0.3, dtype=torch.float64), 0.5
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    timesteps = ref_timesteps.timesteps_for(steps)
    vp = ref_timesteps.DiscreteVP(table)
    if name == "unipc":  # continuous t from 1 to 1/1000
        a_start, a_end = (torch.exp(vp.log_mean(torch.tensor([t]))).double() for t in (1.0, 0.001))
    else:  # from the top timestep down to ᾱ at t = 1 (DDIM and PLMS end on the table's second entry)
        a_start, a_end = table[timesteps[-1]].double().sqrt(), table[1].double().sqrt()
    start = a_start * mu + torch.sqrt(a_start ** 2 * s ** 2 + 1 - a_start ** 2) * z
    exact = a_end * mu + torch.sqrt(a_end ** 2 * s ** 2 + 1 - a_end ** 2) * z
    got = getattr(ref_timesteps, name)(_GaussianEps(table, mu, s), start.float(), timesteps, ImageNoise((4, 4, 4), [0]))
    return (got.double() - exact).abs().max().item()


@pytest.mark.parametrize("name, at_20_steps", [("ddim", 0.13), ("plms", 0.03), ("unipc", 0.075)])
def test_timestep_samplers_converge_to_the_exact_ode_endpoint_for_gaussian_data(name, at_20_steps):
    """A wrong coefficient shows as an error that stops shrinking with more steps. The bounds are what the
    formulas give at 20 steps; UniPC's time-uniform steps end with one large first-order step (A1111's
    lower_order_final), so all three shrink at about first order here."""
    errors = [_gaussian_endpoint_error(name, steps) for steps in (20, 50, 100)]
    assert errors[0] < at_20_steps
    assert errors[1] < errors[0] / 2 and errors[2] < errors[1] / 1.8


def test_image_noise_is_a_cpu_generator_per_image_seed_and_ensd_reseeds_after_the_first_draw():
    noise = ImageNoise((4, 8, 8), [10, 11], ensd=31337)
    first, second = noise.next(), noise.next()
    assert torch.equal(first[0], torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(10)))
    assert torch.equal(first[1], torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(11)))
    assert torch.equal(second[1], torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(11 + 31337)))
    plain = ImageNoise((4, 8, 8), [10])
    plain.next()
    generator = torch.Generator().manual_seed(10)
    torch.randn((4, 8, 8), generator=generator)
    assert torch.equal(plain.next()[0], torch.randn((4, 8, 8), generator=generator))


def test_ancestral_draws_reach_k_diffusion_through_the_hijack():
    sampling, _ = load()
    noise = ImageNoise((4, 2, 2), [5])
    noise.next()
    expected_generator = torch.Generator().manual_seed(5)
    torch.randn((4, 2, 2), generator=expected_generator)
    hijack = TorchWithImageNoise(noise)
    original = sampling.torch
    sampling.torch = hijack
    try:
        drawn = sampling.default_noise_sampler(torch.zeros(1, 4, 2, 2))(None, None)
    finally:
        sampling.torch = original
    assert torch.equal(drawn[0], torch.randn((4, 2, 2), generator=expected_generator))


def test_lcm_keeps_fifty_table_entries_at_t_19_to_999():
    model, _ = _wrap()
    lcm = LCMDenoiser(model)
    assert len(lcm.sigmas) == 50
    assert lcm.sigmas[0].item() == pytest.approx(math.sqrt((1 - model.alphas_cumprod[19]) / model.alphas_cumprod[19]), rel=1e-6)
    assert lcm.sigma_to_t(lcm.sigmas[-1:]).item() == 999 and lcm.sigma_to_t(lcm.sigmas[:1]).item() == 19
    sigmas = lcm.get_sigmas(4)
    assert len(sigmas) == 5 and sigmas[0].item() == pytest.approx(lcm.sigmas[-1].item(), rel=1e-6) and sigmas[-1] == 0


def test_truncation_never_rounds_up_and_differs_from_rounding_by_at_most_one():
    decoded = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    truncated, rounded = to_uint8(decoded)[0].astype(int), to_uint8(decoded, rounding=True)[0].astype(int)
    assert (rounded - truncated).min() == 0 and (rounded - truncated).max() == 1
    assert np.array_equal(truncated, np.floor(255.0 * decoded[0].permute(1, 2, 0).numpy()).astype(int))


def test_infotext_params_read_a1111s_keys_and_old_sampler_names():
    p = Params.from_infotext({"Steps": "20", "Sampler": "DPM++ 2M Karras", "CFG scale": "7", "Seed": "5", "Size": "96x64", "ENSD": "31337"})
    assert (p.sampler, p.schedule, p.width, p.height, p.ensd) == ("DPM++ 2M", "Karras", 96, 64, 31337)
    with pytest.raises(ValueError):
        Params.from_infotext({"Sampler": "Euler z"})


def _fake_pipeline(unet):
    from types import SimpleNamespace

    unet.config = SimpleNamespace(in_channels=4)
    return SimpleNamespace(unet=unet, scheduler=SimpleNamespace(config={**SD_CONFIG, "prediction_type": "epsilon"}),
                           vae=SimpleNamespace(config=SimpleNamespace(block_out_channels=(8, 8, 8, 8), scaling_factor=0.18215)),
                           text_encoder_2=None)


@pytest.mark.parametrize("sampler, strength, calls, first_t", [
    ("Euler", None, 20, 999.0),  # txt2img: one call per step, from the top of the table
    ("DPM2", None, 39, 999.0),  # two calls a step but the last (to σ = 0)
    ("Euler", 0.6, 13, None),  # img2img keeps t_enc + 1 = 13 steps
    ("DDIM", 0.6, 11, 551.0),  # timesteps[:12] walked from t = 551 (noised to t = 601)
    ("UniPC", None, 20, 999.0),
])
def test_model_calls_per_sampler_and_img2img_steps(sampler, strength, calls, first_t):
    from tests.a1111_reference import sample_latents

    unet = _RecordingUNet()
    p = Params.from_infotext({"Sampler": sampler, "Steps": 20, "Size": "16x16", "Seed": 1, **(
        {} if strength is None else {"Denoising strength": strength})})
    init = None if strength is None else torch.zeros(1, 4, 2, 2)
    sample_latents(_fake_pipeline(unet), p, (_cond(), _cond()), init)
    assert len(unet.timesteps) == calls
    if first_t is not None:
        assert unet.timesteps[0][0].item() == pytest.approx(first_t, abs=1e-3)


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M SDE"])
def test_batch_image_i_is_the_single_picture_at_seed_plus_i(sampler):
    """A1111's batches: per-image generators and one Brownian tree per image seed, so batching changes nothing."""
    from pathlib import Path

    from tests.a1111_reference import render

    DEMO_MODEL = Path(__file__).resolve().parent.parent / "builtin" / "sfumato-demo"
    if not (DEMO_MODEL / "model_index.json").is_file():
        pytest.skip("builtin/sfumato-demo is not present")
    params = {"Prompt": "a red circle", "Negative prompt": "blurry", "Steps": 6, "Sampler": sampler, "Seed": 40, "Size": "64x64"}
    batch = render(DEMO_MODEL, {**params, "Batch size": 2})
    single = render(DEMO_MODEL, {**params, "Seed": 41})
    other = render(DEMO_MODEL, {**params, "Seed": 42})
    as_array = lambda image: np.asarray(image, dtype=np.int16)  # noqa: E731
    assert np.abs(as_array(batch[1]) - as_array(single[0])).max() <= 1
    assert np.abs(as_array(batch[1]) - as_array(other[0])).max() > 20
