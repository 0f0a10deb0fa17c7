"""The sampler table and the sample pass: every A1111 sampler × schedule runs, "Automatic" resolves as A1111's,
σs span the model's whole range, seeds repeat exactly, and every sampler draws what the prompt says."""
from __future__ import annotations

import numpy as np
import pytest

from engine import GenerationRequest, ValidationError
from engine.infotext import parse_infotext
from engine.sampling import sample_pass
from engine.sampling import table as samplers
from engine.sampling.noise_table import NoiseTable

COMBINATIONS = [(s, k) for s in samplers.sampler_names() for k in samplers.schedule_names()]

# A1111 1.10's sampler list (modules/sd_samplers_*.py) and what "Automatic" resolves to for each; None where the
# sampler ignores the schedule type and A1111 writes no "Schedule type".
A1111_AUTOMATIC = {
    "DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM++ 2M SDE": "Exponential", "DPM++ 2M SDE Heun": "Exponential",
    "DPM++ 2S a": "Karras", "DPM++ 3M SDE": "Exponential", "Euler a": "Uniform", "Euler": "Uniform", "LMS": "Uniform",
    "Heun": "Uniform", "DPM2": "Karras", "DPM2 a": "Karras", "DPM fast": "Uniform", "DPM adaptive": "Uniform",
    "Restart": "Karras", "DDIM": None, "DDIM CFG++": None, "PLMS": None, "UniPC": None, "LCM": "Uniform",
}
A1111_SCHEDULES = ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
                   "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"]


def available(sampler: str, schedule: str = "Automatic") -> bool:
    return samplers.unsupported_reason(sampler, schedule) is None


def request(sampler="Euler", schedule="Automatic", **changes) -> GenerationRequest:
    fields = dict(prompt="a red circle", model="tiny-sd1", sampler=sampler, schedule=schedule, steps=4, cfg_scale=5,
                  width=64, height=64, seed=1, preview_every=0)
    return GenerationRequest(**{**fields, **changes})


def test_the_table_offers_a1111s_samplers_and_schedules():
    assert set(A1111_AUTOMATIC) <= set(samplers.sampler_names())
    assert samplers.schedule_names() == A1111_SCHEDULES
    for sampler, schedule in A1111_AUTOMATIC.items():
        assert samplers.infotext_schedule(sampler, "Automatic") == schedule, sampler


@pytest.mark.parametrize("sampler,schedule", COMBINATIONS)
def test_every_sampler_schedule_generates_or_is_refused_with_a_reason(engine, sampler, schedule):
    reason = samplers.unsupported_reason(sampler, schedule)
    if reason:  # only a function missing from this build may refuse a combination A1111 offers
        assert "not available" in reason
        with pytest.raises(ValidationError) as raised:
            request(sampler, schedule)
        assert raised.value.field == "schedule" and schedule not in samplers.schedules_for(sampler)
        return
    assert schedule in samplers.schedules_for(sampler)
    result = engine.generate(request(sampler, schedule))
    pixels = np.asarray(result.images[0].image)
    assert pixels.shape == (64, 64, 3)
    # A NaN or blown-up latent decodes to one flat or clipped colour. On this random-weight model every combination
    # measured std 39-42 with 1-2% of channel values at 0 or 255. Whether a sampler draws the right picture is
    # tests/test_sampler_pictures.py's job, on the demo model.
    clipped = float(np.isin(pixels, (0, 255)).mean())
    assert pixels.std() > 10 and clipped < 0.25, f"{sampler} + {schedule}: std {pixels.std():.2f}, clipped {clipped:.2f}"
    assert f"Sampler: {sampler}" in result.images[0].infotext


def test_euler_a_with_karras_runs_and_differs_from_uniform(engine):
    karras = engine.generate(request("Euler a", "Karras"))
    uniform = engine.generate(request("Euler a", "Uniform"))
    assert "Schedule type: Karras" in karras.images[0].infotext
    assert not np.array_equal(np.asarray(karras.images[0].image), np.asarray(uniform.images[0].image))


@pytest.mark.parametrize("sampler", [s for s in A1111_AUTOMATIC if A1111_AUTOMATIC[s]])
def test_automatic_is_the_samplers_a1111_default_and_the_infotext_says_which(engine, sampler):
    if not available(sampler):
        pytest.skip(f"{sampler} is not in this build")
    automatic = engine.generate(request(sampler, "Automatic", steps=3)).images[0]
    explicit = engine.generate(request(sampler, A1111_AUTOMATIC[sampler], steps=3)).images[0]
    assert parse_infotext(automatic.infotext)["Schedule type"] == A1111_AUTOMATIC[sampler]
    assert np.array_equal(np.asarray(automatic.image), np.asarray(explicit.image))


def _sd1_sigma_range() -> tuple[float, float]:
    """σ_min and σ_max of SD 1.x's scaled-linear β schedule, from the DDPM formulas in float64."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    return sigmas[0], sigmas[-1]


@pytest.mark.parametrize("schedule", ["Karras", "Exponential"])
@pytest.mark.parametrize("sampler", [s for s in samplers.sampler_names() if samplers.find_sampler(s).uses_schedule])
def test_schedules_span_the_models_whole_sigma_range(sampler, schedule):
    sigma_min, sigma_max = _sd1_sigma_range()
    assert sigma_max == pytest.approx(14.6146, abs=1e-3) and sigma_min == pytest.approx(0.02917, abs=1e-4)
    table = NoiseTable.for_betas(0.00085, 0.012, "scaled_linear", 1000)
    sigmas = sample_pass.pass_sigmas(samplers.find_sampler(sampler), table, schedule, 20, None)
    assert len(sigmas) == 21 and float(sigmas[-1]) == 0.0
    assert float(sigmas[0]) == pytest.approx(sigma_max, rel=1e-4)
    if sampler == "LCM":  # A1111's LCM denoiser knows only its 50 distilled timesteps: its σ_min is at t = 19
        betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
        alphas_cumprod = np.cumprod(1 - betas)
        sigma_min = np.sqrt((1 - alphas_cumprod[19]) / alphas_cumprod[19])
    if not samplers.find_sampler(sampler).discard_next_to_last_sigma:  # those drop σ_min itself (see the DPM2 test)
        assert float(sigmas[-2]) == pytest.approx(sigma_min, rel=1e-3)


def test_dpm2_drops_the_next_to_last_sigma_of_a_longer_schedule():
    table = NoiseTable.for_betas(0.00085, 0.012, "scaled_linear", 1000)
    sigma_min, sigma_max = _sd1_sigma_range()
    sigmas = sample_pass.pass_sigmas(samplers.find_sampler("DPM2"), table, "Karras", 10, None)
    rho, ramp = 7.0, np.linspace(0, 1, 11)  # Karras et al. 2022, eq. 5, for 11 steps
    karras = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    expected = np.concatenate([karras[:-1], [0.0]])  # 12 values with the next-to-last (karras[-1]) dropped
    np.testing.assert_allclose(sigmas.numpy(), expected, rtol=2e-4)


def test_img2img_runs_a1111s_t_enc_plus_one_steps_from_init_plus_noise():
    table = NoiseTable.for_betas(0.00085, 0.012, "scaled_linear", 1000)
    spec = samplers.find_sampler("Euler")
    full = sample_pass.pass_sigmas(spec, table, "Karras", 20, None)
    tail = sample_pass.pass_sigmas(spec, table, "Karras", 20, 0.5)
    t_enc = int(0.5 * 20)
    assert len(tail) - 1 == t_enc + 1 and np.array_equal(tail.numpy(), full[20 - t_enc - 1:].numpy())


@pytest.mark.parametrize("sampler", samplers.sampler_names())
def test_the_same_seed_twice_gives_identical_pixels(engine, sampler):
    if not available(sampler):
        pytest.skip(f"{sampler} is not in this build")
    first = engine.generate(request(sampler, steps=5))
    second = engine.generate(request(sampler, steps=5))
    assert np.array_equal(np.asarray(first.images[0].image), np.asarray(second.images[0].image))


@pytest.mark.parametrize("sampler", [s for s in samplers.sampler_names()
                                     if samplers.find_sampler(s).noise != samplers.NO_NOISE and s != "LCM"])
def test_eta_noise_seed_delta_changes_only_samplers_that_draw_noise_after_the_first(engine, sampler):
    if not available(sampler):
        pytest.skip(f"{sampler} is not in this build")
    spec = samplers.find_sampler(sampler)
    eta = {} if spec.eta_default != 0 else {"eta": 1.0}  # DDIM draws no noise at its default eta 0
    steps = 20 if sampler == "Restart" else 5  # A1111's Restart plans its first restart from 20 steps on
    plain = engine.generate(request(sampler, steps=steps, **eta)).images[0]
    delta = engine.generate(request(sampler, steps=steps, eta_noise_seed_delta=31337, **eta)).images[0]
    if spec.noise == samplers.BROWNIAN_NOISE:  # the Brownian tree is seeded with the image seed alone
        assert np.array_equal(np.asarray(plain.image), np.asarray(delta.image))
    else:
        assert not np.array_equal(np.asarray(plain.image), np.asarray(delta.image))
        assert parse_infotext(delta.infotext)["ENSD"] == "31337"


def test_eta_rng_and_ensd_round_trip_through_the_infotext(engine):
    from engine.infotext import request_fields_from_infotext

    image = engine.generate(request("Euler a", eta=0.5, eta_noise_seed_delta=7, rng="CPU")).images[0]
    parsed = parse_infotext(image.infotext)
    assert (parsed["Eta"], parsed["ENSD"], parsed["RNG"]) == ("0.5", "7", "CPU")
    fields = request_fields_from_infotext(parsed)
    assert (fields["eta"], fields["eta_noise_seed_delta"], fields["rng"]) == (0.5, 7, "CPU")
    default = parse_infotext(engine.generate(request("Euler a")).images[0].infotext)
    assert "Eta" not in default and "ENSD" not in default


def test_hooks_see_the_fraction_of_the_schedule_at_each_model_call(registry):
    """Heun calls the model twice per step: at σ_i and at σ_{i+1}. Each call is keyed by where its σ lies."""
    from engine import Engine

    seen: list[tuple[float, float]] = []

    class Recorder:
        def unet_kwargs(self, point, latent_model_input, encoder_hidden_states, added_cond_kwargs):
            seen.append((float(point.sigma[0]), point.fraction))
            return {}

    class Host:
        def step_hooks(self, context):
            Host.sigmas = context.sigmas
            return [Recorder()]

        def infotext_fields(self, request):
            return {}

    Engine(registry, Host()).generate(request("Heun", "Karras", steps=6))
    sigmas = [float(s) for s in Host.sigmas]
    steps = len(sigmas) - 1
    assert len(seen) == 2 * steps - 1  # the last step, to σ = 0, is a plain Euler step
    for sigma, fraction in seen:
        step = max(i for i in range(steps) if sigmas[i] >= sigma - 1e-6)  # the step whose interval (σ_{i+1}, σ_i] holds σ
        assert fraction == pytest.approx(step / steps)


# Whether each sampler draws what the prompt says is tests/test_sampler_pictures.py's job, on the demo model.


@pytest.mark.parametrize("legacy,sampler,schedule", [
    ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
    ("dpm++ 2m sde karras", "DPM++ 2M SDE", "Karras"),
    ("Euler a", "Euler a", "Automatic"),
    ("k_euler_a", "Euler a", "Automatic"),
    ("DPM++ SDE Karras", "DPM++ SDE", "Karras"),
    ("Euler a Karras", "Euler a", "Karras"),
])
def test_legacy_names_split_into_sampler_and_schedule(legacy, sampler, schedule):
    if not available(sampler, schedule):
        pytest.skip(f"{sampler} is not in this build")
    fixed = GenerationRequest(sampler=legacy)
    assert (fixed.sampler, fixed.schedule) == (sampler, schedule)


def test_unknown_sampler_names_the_field_and_choices():
    with pytest.raises(ValidationError) as raised:
        GenerationRequest(sampler="Nonexistent 9000")
    assert raised.value.field == "sampler" and "DPM++ 2M" in raised.value.message


def test_zero_terminal_snr_runs_on_every_sampler_with_a_finite_first_sigma(engine):
    result = engine.generate(request("Euler", zero_terminal_snr=True))
    assert np.asarray(result.images[0].image).std() > 0
    table = NoiseTable.for_betas(0.00085, 0.012, "scaled_linear", 1000, zero_terminal_snr=True)
    sigmas = sample_pass.pass_sigmas(samplers.find_sampler("Euler"), table, "Karras", 10, None)
    assert np.isfinite(sigmas.numpy()).all() and float(sigmas[0]) > 1000  # A1111 keeps the last ᾱ just above 0


def test_the_shipped_sd1_config_no_longer_narrows_the_karras_range():
    """Its ``timestep_spacing: leading`` once gave Euler + Karras σ 11.03 → 0.041; only the β table counts now."""
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from engine.sampling.denoiser import noise_table_for

    config = json.loads((Path(__file__).resolve().parent.parent / "engine/configs/sd1/scheduler/scheduler_config.json").read_text())
    from engine.families import SD1

    model = SimpleNamespace(family=SD1, pipeline=SimpleNamespace(scheduler=SimpleNamespace(config=config)))
    noise_table, parameterization = noise_table_for(model)
    sigmas = sample_pass.pass_sigmas(samplers.find_sampler("Euler"), noise_table, "Karras", 20, None)
    sigma_min, sigma_max = _sd1_sigma_range()
    assert parameterization == "eps"
    assert float(sigmas[0]) == pytest.approx(sigma_max, rel=1e-4) and float(sigmas[-2]) == pytest.approx(sigma_min, rel=1e-3)
