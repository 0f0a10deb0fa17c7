"""Every sampler on a rectified-flow model (x = (1 − σ)·x₀ + σ·ε), and the Shift field.

The flow noise steps are checked against formulas written here from their publications, not from engine code:
- the rectified-flow ancestral step (ComfyUI's ``euler_ancestral_RF``): σ_down = σ_next·(1 + (σ_next/σ − 1)·η),
  an Euler step in σ to σ_down, then x ← (1 − σ_next)/(1 − σ_down)·x + √(σ_next² − σ_down²·(1 − σ_next)²/(1 − σ_down)²)·z;
- DPM-Solver++(2M) SDE (Lu et al. 2022b) in the half-log-SNR λ = log(α/σ) with α = 1 − σ: from σ to σ_next with
  h = λ_next − λ, x ← (σ_next/σ)·e^(−ηh)·x + α_next·(1 − e^(−(1+η)h))·x̂₀ + σ_next·√(1 − e^(−2ηh))·z;
- DDIM with η = 0 on a flow path is Euler in σ: x ← x̂₀ + (σ_next/σ)·(x − x̂₀);
- LCM re-noises its x̂₀ as (1 − σ_next)·x̂₀ + σ_next·z;
- the shift: σ = s·t / (1 + (s − 1)·t) (Esser et al. 2024, §5.3.2).
The engine runs use the tiny SD 3.5 model of tests/_sd3_fixture.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.engine import Engine
from engine.infotext import parse_infotext, request_fields_from_infotext
from engine.models import ModelRegistry
from engine.request import GenerationRequest, GenerationResult
from engine.sampling import flow, samplers, sample_pass, schedules, table as sampler_table, timestep_samplers
from engine.sampling.denoiser import noise_table_for
from engine.sampling.noise import ImageNoise
from engine.sampling.noise_table import NoiseTable
from tests._sd3_fixture import SHIFT, SIZE, build_folder

NAME = "sd3flow"
ALL_SAMPLERS = sampler_table.sampler_names()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    torch.set_num_threads(1)
    folder = build_folder(tmp_path_factory.mktemp("models") / NAME)
    return Engine(ModelRegistry(folder.parent, builtin_dir=None))


def _run(engine: Engine, **changes) -> GenerationResult:
    request = GenerationRequest(**{"prompt": "a red fox", "model": NAME, "steps": 4, "sampler": "Euler",
                                   "schedule": "Simple", "seed": 21, **changes})
    return engine.generate(request)


def _pixels(result: GenerationResult) -> np.ndarray:
    return np.asarray(result.images[0].image, dtype=np.float32) / 255


# --- every sampler on the SD 3.5 fixture ----------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_every_sampler_draws_a_finite_picture_that_repeats_with_its_seed(engine, sampler):
    first = _run(engine, sampler=sampler, schedule="Automatic", steps=3)
    again = _run(engine, sampler=sampler, schedule="Automatic", steps=3)
    assert first.images[0].image.size == (SIZE, SIZE)
    assert np.isfinite(_pixels(first)).all()
    assert np.array_equal(_pixels(first), _pixels(again))


def test_noise_adding_samplers_use_their_noise(engine):
    """ENSD reseeds the draws after the first noise: Euler a, which adds them on the flow model, gives another picture;
    Euler draws none, and the SDE samplers' Brownian tree is seeded with the image seed, so theirs stay."""
    for sampler, changes in (("Euler a", True), ("DPM++ 2M SDE", False), ("Euler", False)):
        base = _pixels(_run(engine, sampler=sampler, eta_noise_seed_delta=0))
        other = _pixels(_run(engine, sampler=sampler, eta_noise_seed_delta=7))
        assert (not np.array_equal(base, other)) == changes, sampler


def test_euler_a_at_eta_0_is_euler(engine):
    euler = _pixels(_run(engine, sampler="Euler", schedule="Simple", steps=5))
    ancestral = _pixels(_run(engine, sampler="Euler a", schedule="Simple", steps=5, eta=0.0))
    assert np.array_equal(euler, ancestral)
    assert not np.array_equal(euler, _pixels(_run(engine, sampler="Euler a", schedule="Simple", steps=5)))


@pytest.mark.parametrize("schedule", [name for name in sampler_table.schedule_names() if name != "Automatic"])
def test_every_schedule_fits_the_flow_table(engine, schedule):
    table = NoiseTable.for_flow(SHIFT)
    assert table.sigma_max == 1.0
    assert table.sigma_min == pytest.approx(SHIFT * 1e-3 / (1 + (SHIFT - 1) * 1e-3), rel=1e-6)
    sigmas = schedules.find_schedule(schedule).function(table, 6)
    assert torch.isfinite(sigmas).all()
    assert float(sigmas[0]) <= 1.0 + 1e-6 and float(sigmas.min()) >= 0
    assert bool((sigmas[1:] <= sigmas[:-1]).all()), sigmas
    assert np.isfinite(_pixels(_run(engine, sampler="Euler", schedule=schedule, steps=4))).all()


# --- one flow step against the published formulas -------------------------------------------------------------------

def _linear_denoiser(x0: torch.Tensor):
    """A toy x̂₀ that depends on x and σ, so second-order stages matter: x̂₀ = 0.7·x₀ + 0.2·x·(1 − σ)."""
    def denoise(x, sigma):
        s = sigma.reshape([-1] + [1] * (x.ndim - 1))
        return 0.7 * x0 + 0.2 * x * (1 - s)
    return denoise


def _reference_rf_ancestral(x, denoised, sigma, sigma_next, eta, z):
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    x = (sigma_down / sigma) * x + (1 - sigma_down / sigma) * denoised
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    return alpha_next / alpha_down * x + math.sqrt(sigma_next ** 2 - sigma_down ** 2 * alpha_next ** 2 / alpha_down ** 2) * z


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_one_euler_a_flow_step_is_the_rectified_flow_ancestral_formula(eta):
    generator = torch.Generator().manual_seed(1)
    x0, x, z = (torch.randn(1, 4, 8, 8, generator=generator) for _ in range(3))
    sigma, sigma_next = 0.8, 0.55
    denoise = _linear_denoiser(x0)
    ours = samplers.sample_euler_ancestral(denoise, x, torch.tensor([sigma, sigma_next]), lambda *_: z, eta=eta, flow=True)
    expected = _reference_rf_ancestral(x, denoise(x, torch.tensor([sigma])), sigma, sigma_next, eta, z)
    assert torch.allclose(ours, expected, atol=1e-5)


def test_one_dpm2_a_flow_step_is_the_midpoint_then_the_flow_renoise():
    generator = torch.Generator().manual_seed(2)
    x0, x, z = (torch.randn(1, 4, 8, 8, generator=generator) for _ in range(3))
    sigma, sigma_next, eta = 0.9, 0.6, 1.0
    denoise = _linear_denoiser(x0)
    ours = samplers.sample_dpm_2_ancestral(denoise, x, torch.tensor([sigma, sigma_next]), lambda *_: z, eta=eta, flow=True)
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    sigma_mid = math.sqrt(sigma * sigma_down)  # DPM-Solver-2's midpoint, geometric in σ
    d = (x - denoise(x, torch.tensor([sigma]))) / sigma
    x_mid = x + d * (sigma_mid - sigma)
    d_mid = (x_mid - denoise(x_mid, torch.tensor([sigma_mid]))) / sigma_mid
    x_down = x + d_mid * (sigma_down - sigma)
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    expected = alpha_next / alpha_down * x_down + math.sqrt(sigma_next ** 2 - (sigma_down * alpha_next / alpha_down) ** 2) * z
    assert torch.allclose(ours, expected, atol=1e-5)


def test_one_dpmpp_2s_a_flow_step_takes_its_midpoint_in_flow_half_log_snr():
    generator = torch.Generator().manual_seed(3)
    x0, x, z = (torch.randn(1, 4, 8, 8, generator=generator) for _ in range(3))
    sigma, sigma_next, eta = 0.7, 0.4, 1.0
    denoise = _linear_denoiser(x0)
    ours = samplers.sample_dpmpp_2s_ancestral(denoise, x, torch.tensor([sigma, sigma_next]), lambda *_: z, eta=eta, flow=True)
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    lam, lam_down = math.log((1 - sigma) / sigma), math.log((1 - sigma_down) / sigma_down)
    sigma_s = 1 / (1 + math.exp((lam + lam_down) / 2))
    u = (sigma_s / sigma) * x + (1 - sigma_s / sigma) * denoise(x, torch.tensor([sigma]))
    x_down = (sigma_down / sigma) * x + (1 - sigma_down / sigma) * denoise(u, torch.tensor([sigma_s]))
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    expected = alpha_next / alpha_down * x_down + math.sqrt(sigma_next ** 2 - (sigma_down * alpha_next / alpha_down) ** 2) * z
    assert torch.allclose(ours, expected, atol=1e-5)


def _on_the_view(function, denoise, x, flow_sigmas, z, **options):
    """Run ``function`` on the flow model's variance-exploding view, as the sample pass does, and return flow x."""
    view = flow.VarianceExplodingView(denoise)
    s = flow.to_variance_exploding(torch.tensor(flow_sigmas, dtype=torch.float64)).float()
    y = function(view, x / (1 - flow_sigmas[0]), s, view.noise(lambda *_: z), **options)
    return y * (1 - flow_sigmas[-1])


@pytest.mark.parametrize("function", [samplers.sample_dpmpp_2m_sde, samplers.sample_dpmpp_3m_sde])
@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_one_sde_flow_step_is_dpm_solver_pp_in_the_flow_half_log_snr(function, eta):
    generator = torch.Generator().manual_seed(4)
    x0, x, z = (torch.randn(1, 4, 8, 8, generator=generator) for _ in range(3))
    sigma, sigma_next = 0.85, 0.5
    denoise = _linear_denoiser(x0)
    ours = _on_the_view(function, denoise, x, [sigma, sigma_next], z, eta=eta)
    lam, lam_next = math.log((1 - sigma) / sigma), math.log((1 - sigma_next) / sigma_next)
    h = lam_next - lam
    expected = (sigma_next / sigma * math.exp(-eta * h) * x
                + (1 - sigma_next) * (1 - math.exp(-(1 + eta) * h)) * denoise(x, torch.tensor([sigma]))
                + sigma_next * math.sqrt(1 - math.exp(-2 * eta * h)) * z)
    assert torch.allclose(ours, expected, atol=1e-4), float((ours - expected).abs().max())


def test_ddim_at_eta_0_on_the_flow_path_is_euler_in_sigma():
    generator = torch.Generator().manual_seed(5)
    x0, x = (torch.randn(1, 4, 8, 8, generator=generator) for _ in range(2))
    flow_sigmas = [0.95, 0.7, 0.4, 0.15, 0.05]
    denoise = _linear_denoiser(x0)
    y_alpha = _on_the_view(timestep_samplers.sample_ddim, denoise, x, flow_sigmas, None, eta=0.0)
    s_end = flow_sigmas[-1] / (1 - flow_sigmas[-1])
    ddim = y_alpha * math.sqrt(1 + s_end ** 2)  # DDIM returns x in ᾱ-space, y/√(1 + s²)
    euler = x
    for sigma, sigma_next in zip(flow_sigmas, flow_sigmas[1:]):
        denoised = denoise(euler, torch.tensor([sigma]))
        euler = denoised + sigma_next / sigma * (euler - denoised)
    assert torch.allclose(ddim, euler, atol=1e-5), float((ddim - euler).abs().max())


def test_lcm_on_flow_renoises_its_estimate_on_the_flow_path():
    table = NoiseTable.for_flow(SHIFT)
    generator = torch.Generator().manual_seed(6)
    x0 = torch.randn(1, 4, 8, 8, generator=generator)
    steps = []
    image_noise = ImageNoise((4, 8, 8), [9])
    spec = sampler_table.find_sampler("LCM")
    sigmas = sample_pass.pass_sigmas(spec, table, "Automatic", 2, None)
    result = sample_pass.run(sampler="LCM", denoiser=_linear_denoiser(x0), noise_table=table, sigmas=sigmas,
                             first_noise=image_noise.first(), image_noise=image_noise, seeds=[9], steps=2,
                             on_step=lambda done, planned, info: steps.append(info) and False)
    # The step's draw is the images' next one: replay it.
    replay = ImageNoise((4, 8, 8), [9])
    replay.first()
    z = replay.next()
    sigma_next = float(sigmas[1])
    assert 0 < sigma_next < 1
    assert torch.allclose(steps[0].x, ((1 - sigma_next) * steps[0].denoised + sigma_next * z) / (1 - sigma_next), atol=1e-4)
    assert torch.allclose(result.latents, steps[1].denoised, atol=1e-5)


# --- the marginal of a flow noise step ------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE",
                                     "DDPM", "DDIM", "DPM fast", "DPM adaptive"])
def test_a_noise_step_with_an_exact_denoiser_lands_on_the_flow_marginal(sampler):
    """With x̂₀ = x₀ exactly, x after one step from (1 − σ)·x₀ + σ·ε is (1 − σ_next)·x₀ + σ_next·(unit noise): the
    slope of x on x₀ is 1 − σ_next and the rest has std σ_next (a variance-exploding re-noise would leave the slope
    at 1 − σ_down)."""
    generator = torch.Generator().manual_seed(7)
    x0 = torch.randn(4, 16, 32, 32, generator=generator)
    sigma, sigma_next = 0.8, 0.5
    x = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=generator)
    spec = sampler_table.find_sampler(sampler)
    image_noise = ImageNoise(x0.shape[1:], [1, 2, 3, 4])
    image_noise.first()
    exact = lambda latents, s: x0.clone()  # noqa: E731
    function = spec.function
    sigmas = [sigma, sigma_next]
    if spec.on_flow == flow.FLOW_STEP:
        noise = lambda *_: image_noise.next()  # noqa: E731
        after = function(exact, x, torch.tensor(sigmas), noise, flow=True, eta=1.0)
    else:
        from engine.sampling.noise import brownian_noise

        noise = (brownian_noise(x, torch.tensor([sigma, sigma_next, 0.0]), [1, 2, 3, 4]) if spec.noise == sampler_table.BROWNIAN_NOISE
                 else lambda *_: image_noise.next())
        options = {"eta": 1.0} if spec.eta_default is not None else {}
        view = flow.VarianceExplodingView(exact)
        s = flow.to_variance_exploding(torch.tensor(sigmas, dtype=torch.float64)).float()
        y = function(view, x / (1 - sigma), s, view.noise(noise), **options)
        if not spec.uses_schedule:
            y = y * math.sqrt(1 + float(s[-1]) ** 2)  # timestep samplers return y/√(1 + s²)
        after = y * (1 - sigma_next)
    slope = float(((after - after.mean()) * x0).mean() / x0.var())
    rest = after - slope * x0
    print(sampler, "slope", slope, "expected", 1 - sigma_next, "rest std", float(rest.std()), "expected", sigma_next)
    assert slope == pytest.approx(1 - sigma_next, abs=0.01)
    assert float(rest.mean()) == pytest.approx(0, abs=0.01)
    assert float(rest.std()) == pytest.approx(sigma_next, rel=0.02)


def test_restart_on_flow_climbs_along_the_flow_path_between_the_levels_it_stands_for():
    """Restart's climb on a flow model: after the main steps land at σ_a (the σ nearest 0.1/1.1, the flow σ of
    A1111's variance-exploding 0.1), fresh noise takes x to σ_b (nearest 2/3, that of 2) along the flow path,
    (1 − σ_b)·x₀ + σ_b·(unit noise). An exact denoiser keeps x on the path during the Heun steps, so the first
    model call after the climb sees exactly that marginal (a variance-exploding climb would keep the slope 1 − σ_a)."""
    from engine.sampling.restart import sample_restart

    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 16, 32, 32, generator=generator)
    calls = []

    def exact(x, sigma):
        calls.append((float(sigma.reshape(-1)[0]), x.clone()))
        return x0.clone()

    sigmas = torch.cat([torch.linspace(1.0, 0.01, 20), torch.zeros(1)])
    noise = lambda *_: torch.randn(x0.shape, generator=generator)  # noqa: E731
    sample_restart(exact, torch.randn(x0.shape, generator=generator), sigmas, noise, flow=True)
    climb = next(i for i in range(1, len(calls)) if calls[i][0] > calls[i - 1][0])
    sigma_a, (sigma_b, after) = calls[climb - 1][0], calls[climb]
    print("restart climbs from", sigma_a, "to", sigma_b)
    assert sigma_a == pytest.approx(0.1 / 1.1, abs=0.03) and sigma_b == pytest.approx(2 / 3, abs=0.08)
    slope = float(((after - after.mean()) * x0).mean() / x0.var())
    rest = after - slope * x0
    assert slope == pytest.approx(1 - sigma_b, abs=0.01)
    assert float(rest.std()) == pytest.approx(sigma_b, rel=0.02)


@pytest.mark.parametrize("sampler,tolerance", [("Euler", 0.2), ("DDIM", 0.2), ("Heun", 0.02), ("LMS", 0.02), ("DPM2", 0.02),
                                               ("DPM++ 2M", 0.02), ("PLMS", 0.02), ("UniPC", 0.02), ("DPM fast", 0.02),
                                               ("DPM adaptive", 0.02)])
def test_every_ode_sampler_solves_the_flow_ode_of_gaussian_data(sampler, tolerance):
    """For data x₀ ~ N(0, c²) the exact denoiser on the flow path is x̂₀ = (1 − σ)·c²/((1 − σ)²·c² + σ²)·x, and the
    probability-flow ODE carries noise ε at σ = 1 to c·ε at σ = 0. Each sampler (η = 0) at its Automatic schedule,
    20 steps, through the sample pass, lands near it (relative L2 error: 0.14 for the first-order Euler and DDIM,
    at most 0.009 for the rest). DPM fast and adaptive on the variance-exploding view, which spent their
    log-uniform steps up to s ≈ 3·10⁴, missed by 0.05 and 0.26."""
    c = 0.5
    table = NoiseTable.for_flow(SHIFT)
    spec = sampler_table.find_sampler(sampler)

    def exact(x, sigma):
        s = sigma.reshape([-1] + [1] * (x.ndim - 1)).double()
        return ((1 - s) * c ** 2 / ((1 - s) ** 2 * c ** 2 + s ** 2) * x.double()).float()

    image_noise = ImageNoise((4, 16, 16), [5])
    first = image_noise.first()
    sigmas = sample_pass.pass_sigmas(spec, table, "Automatic", 20, None)
    result = sample_pass.run(sampler=sampler, denoiser=exact, noise_table=table, sigmas=sigmas, first_noise=first,
                             image_noise=image_noise, seeds=[5], steps=20, eta=0.0 if spec.eta_default is not None else None)
    error = float((result.latents - c * first).norm() / (c * first).norm())
    print(sampler, "relative error", error)
    assert error < tolerance


# --- Shift ----------------------------------------------------------------------------------------------------------

def test_shift_sets_the_flow_sigmas_and_round_trips_through_the_infotext(engine):
    model = engine.registry.load(NAME)
    own, _ = noise_table_for(model)
    shifted, _ = noise_table_for(model, shift=6.0)
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    assert torch.allclose(own.sigmas.double(), SHIFT * t / (1 + (SHIFT - 1) * t), atol=1e-7)
    assert torch.allclose(shifted.sigmas.double(), 6.0 * t / (1 + 5.0 * t), atol=1e-7)
    assert noise_table_for(model, shift=0.0)[0].sigmas.equal(own.sigmas)  # 0: the model's own

    result = _run(engine, shift=6.0)
    assert not np.array_equal(_pixels(result), _pixels(_run(engine)))
    params = parse_infotext(result.images[0].infotext)
    assert float(params["Shift"]) == 6.0
    assert request_fields_from_infotext(params)["shift"] == 6.0
    assert "Shift" not in parse_infotext(_run(engine).images[0].infotext)
    assert np.array_equal(_pixels(result), _pixels(_run(engine, **{"shift": request_fields_from_infotext(params)["shift"]})))


def test_shift_is_ignored_and_not_written_on_a_unet_model(demo_engine):
    from engine.families import SD1

    table = SD1.noise_table({}, None, shift=6.0)
    assert not table.flow and table.sigmas.equal(SD1.noise_table({}).sigmas)
    request = GenerationRequest(prompt="a red circle", model="sfumato-demo", steps=2, seed=3, sampler="Euler")
    shifted = demo_engine.generate(request.with_changes(shift=6.0))
    assert "Shift" not in parse_infotext(shifted.images[0].infotext)
    assert shifted.request.shift is None
    assert np.array_equal(_pixels(shifted), _pixels(demo_engine.generate(request)))


def test_an_xyz_plot_over_shift_runs_each_value_on_the_flow_model(engine):
    from engine.xyz import XyzPlot, find_axis

    plot = XyzPlot.plan(GenerationRequest(prompt="a red fox", model=NAME, steps=3, sampler="Euler a", seed=5),
                        [(find_axis("Shift"), "1, 3, 8")])
    result = plot.run(engine)
    cells = [np.asarray(cell.image, dtype=np.float32) for cell in result.cells]
    assert len(cells) == 3 and all(cell.shape == (SIZE, SIZE, 3) for cell in cells)
    assert [float(parse_infotext(cell.infotext)["Shift"]) for cell in result.cells] == [1.0, 3.0, 8.0]
    assert not np.array_equal(cells[0], cells[2])


def test_hires_fix_with_an_sde_sampler_and_a_shift_runs_both_passes(engine):
    result = _run(engine, sampler="DPM++ 2M SDE", schedule="Karras", enable_hr=True, hr_scale=2.0,
                  hr_sampler_name="Euler a", denoising_strength=0.5, shift=4.0)
    picture = result.images[0].image
    assert picture.size == (2 * SIZE, 2 * SIZE)
    assert np.isfinite(np.asarray(picture, dtype=np.float32)).all()
    assert float(parse_infotext(result.images[0].infotext)["Shift"]) == 4.0


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M SDE", "DDIM"])
def test_inpaint_with_a_noise_adding_sampler_keeps_the_unmasked_pixels_exactly(engine, sampler):
    """The known region's x̂₀ is the init latent at every step, so the noise steps keep it on the flow path; the
    pixels outside the mask are the init image's."""
    from PIL import Image

    y, x = np.mgrid[0:SIZE, 0:SIZE]
    init = Image.fromarray(np.stack([x * 8 % 256, y * 8 % 256, (x + y) * 4 % 256], axis=-1).astype(np.uint8), "RGB")
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, SIZE // 2:] = 255
    result = _run(engine, sampler=sampler, init_image=init, mask=Image.fromarray(mask, "L"), denoising_strength=0.75,
                  mask_blur=0)
    out, original = np.asarray(result.images[0].image), np.asarray(init)
    assert np.array_equal(out[:, : SIZE // 2 - 1], original[:, : SIZE // 2 - 1])
    assert not np.array_equal(out[:, SIZE // 2 + 1:], original[:, SIZE // 2 + 1:])


def test_the_family_names_euler_simple_as_its_default_and_both_exist():
    from engine.families import SD3

    sampler, schedule = SD3.defaults["sampler"], SD3.defaults["schedule"]
    assert sampler_table.find_sampler(sampler).name == "Euler"
    assert sampler_table.find_schedule(schedule).name == "Simple"
