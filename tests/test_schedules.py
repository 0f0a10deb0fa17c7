"""Noise tables and A1111 1.10's noise schedules against independent references.

k-diffusion (the library A1111 samples with) is the oracle for the noise table's σs, its σ↔t maps and the
Uniform, Karras, Exponential and Polyexponential schedules; the A1111-only schedules are re-derived here from
their published formulas, in float64, with k-diffusion's σ↔t maps where a schedule goes through timesteps.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from engine.errors import ValidationError
from engine.sampling.noise_table import AYS_SD15, AYS_SDXL, NoiseTable
from engine.sampling.schedules import SCHEDULES, ScheduleSpec, find_schedule
from engine.sampling import schedules
from tests._kdiffusion import load

torch.set_num_threads(1)

STEP_COUNTS = (1, 2, 10, 11, 20, 50)
SD1_CONFIG = Path(__file__).resolve().parents[1] / "engine" / "configs" / "sd1" / "scheduler" / "scheduler_config.json"
# Published in NVIDIA's "Align Your Steps" how-to, typed in again here rather than imported.
PUBLISHED_AYS_SD15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
PUBLISHED_AYS_SDXL = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]
LAST_ZERO_SNR_ALPHA_BAR = 4.8973451890853435e-08  # what A1111's "Zero Terminal SNR" puts in the last ᾱ


def ldm_alphas_cumprod(beta_start: float, beta_end: float, schedule: str = "scaled_linear", n: int = 1000):
    """ᾱ as latent-diffusion's register_schedule builds it: float64 βs and cumprod, stored as float32."""
    if schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    else:
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    return torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)


class _Model:
    """The one attribute k-diffusion's CompVisDenoiser reads from a CompVis model."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod


def compvis_denoiser(alphas_cumprod: torch.Tensor):
    _, k_external = load()
    return k_external.CompVisDenoiser(_Model(alphas_cumprod))


TABLES = {
    "sd1": lambda: NoiseTable.for_betas(0.00085, 0.012),
    "sdxl": lambda: NoiseTable.for_betas(0.00085, 0.012, align_your_steps=AYS_SDXL),
    "ddpm-linear": lambda: NoiseTable.for_betas(0.0001, 0.02, beta_schedule="linear"),
}
REFERENCE_ALPHAS = {
    "sd1": lambda: ldm_alphas_cumprod(0.00085, 0.012),
    "sdxl": lambda: ldm_alphas_cumprod(0.00085, 0.012),
    "ddpm-linear": lambda: ldm_alphas_cumprod(0.0001, 0.02, "linear"),
}


@pytest.fixture(params=sorted(TABLES))
def table_and_reference(request):
    table = TABLES[request.param]()
    return request.param, table, compvis_denoiser(REFERENCE_ALPHAS[request.param]())


# --- the noise table -------------------------------------------------------------------------------------------


def test_table_sigmas_are_compvis_denoisers(table_and_reference):
    _, table, reference = table_and_reference
    assert table.sigmas.dtype == torch.float32
    assert torch.equal(table.sigmas, reference.sigmas)
    assert torch.equal(table.log_sigmas, reference.log_sigmas)
    assert table.sigma_min == reference.sigma_min.item() and table.sigma_max == reference.sigma_max.item()


def test_sd1_table_from_the_shipped_config_spans_the_a1111_range():
    config = json.loads(SD1_CONFIG.read_text())
    assert config["timestep_spacing"] == "leading"  # a diffusers inference setting the table must not depend on
    table = NoiseTable.for_betas(
        config["beta_start"], config["beta_end"], config["beta_schedule"], config["num_train_timesteps"]
    )
    assert len(table) == 1000
    assert table.sigma_max == pytest.approx(14.6146, abs=1e-4)
    assert table.sigma_min == pytest.approx(0.0292, abs=1e-4)
    karras = schedules.karras(table, 20)
    assert karras.shape == (21,)
    assert karras[0].item() == pytest.approx(14.6146, abs=1e-4)
    assert karras[-2].item() == pytest.approx(0.0292, abs=1e-4)
    assert karras[-1].item() == 0.0


def test_table_from_alphas_cumprod_keeps_them():
    alphas = ldm_alphas_cumprod(0.00085, 0.012)
    table = NoiseTable.from_alphas_cumprod(alphas)
    assert torch.equal(table.alphas_cumprod, alphas)
    assert torch.equal(table.sigmas, compvis_denoiser(alphas).sigmas)
    rebuilt = NoiseTable(table.sigmas)
    assert torch.allclose(rebuilt.alphas_cumprod, alphas, rtol=1e-6, atol=0)


def test_table_rejects_descending_sigmas():
    with pytest.raises(ValueError):
        NoiseTable(torch.tensor([2.0, 1.0]))


def test_sigma_to_t_and_back_match_k_diffusion(table_and_reference):
    _, table, reference = table_and_reference
    generator = torch.Generator().manual_seed(0)
    log_range = torch.rand(200, generator=generator, dtype=torch.float64) * 1.2 - 0.1  # a little past each end
    sigmas = torch.exp(
        math.log(table.sigma_min) + log_range * (math.log(table.sigma_max) - math.log(table.sigma_min))
    ).float()
    sigmas = torch.cat([sigmas, table.sigmas[[0, 1, 500, -2, -1]]])
    assert torch.equal(table.sigma_to_t(sigmas), reference.sigma_to_t(sigmas))
    assert table.sigma_to_t(table.sigma_max).item() == len(table) - 1
    assert table.sigma_to_t(table.sigma_min).item() == 0

    timesteps = torch.rand(200, generator=generator) * (len(table) - 1)
    timesteps = torch.cat([timesteps, torch.tensor([0.0, 1.0, 998.5, 999.0])])
    assert torch.equal(table.t_to_sigma(timesteps), reference.t_to_sigma(timesteps))


# --- zero terminal SNR (Lin et al. 2023) -----------------------------------------------------------------------


def lin_et_al_rescale(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1, on ᾱ: shift √ᾱ so the last is 0, scale so the first is unchanged."""
    root = np.sqrt(alphas_cumprod)
    first, last = root[0], root[-1]
    return ((root - last) * first / (first - last)) ** 2


def test_zero_terminal_snr_follows_lin_et_al_with_a1111s_finite_end():
    start, end, schedule = 0.00085, 0.012, "scaled_linear"
    plain = ldm_alphas_cumprod(start, end, schedule)
    table = NoiseTable.for_betas(start, end, schedule, zero_terminal_snr=True)
    expected = lin_et_al_rescale(plain.double().numpy())

    alphas = table.alphas_cumprod.double().numpy()
    np.testing.assert_allclose(alphas[:-1], expected[:-1], rtol=2e-5, atol=1e-9)
    assert alphas[0] == pytest.approx(plain[0].item(), rel=1e-6)  # the first step is untouched
    assert alphas[-1] == np.float32(LAST_ZERO_SNR_ALPHA_BAR)
    assert expected[-1] == 0.0  # the algorithm itself would give σ = ∞ ...
    last_sigma = table.sigma_max  # ... A1111's stand-in keeps it large but finite
    assert math.isfinite(last_sigma)
    assert last_sigma == pytest.approx(math.sqrt((1 - LAST_ZERO_SNR_ALPHA_BAR) / LAST_ZERO_SNR_ALPHA_BAR), rel=1e-4)
    assert 4000 < last_sigma < 5000
    assert torch.equal(table.sigmas, compvis_denoiser(table.alphas_cumprod).sigmas)
    assert bool((table.sigmas[1:] > table.sigmas[:-1]).all())


def test_zero_terminal_snr_that_would_unsort_the_table_is_refused():
    # DDPM's linear βs end far noisier than SD's: after the rescale σ_998 ≈ 15406 already exceeds the σ ≈ 4519
    # A1111 writes at the end, so no ascending table exists.
    with pytest.raises(ValueError, match="ascending"):
        NoiseTable.for_betas(0.0001, 0.02, "linear", zero_terminal_snr=True)


# --- schedules against k-diffusion ------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_k_diffusion_schedules_match_exactly(table_and_reference, steps):
    k_sampling, _ = load()
    _, table, reference = table_and_reference
    sigma_min, sigma_max = reference.sigmas[0].item(), reference.sigmas[-1].item()  # as A1111 passes them
    expected = {
        "Uniform": reference.get_sigmas(steps),
        "Karras": k_sampling.get_sigmas_karras(steps, sigma_min, sigma_max, rho=7.0),
        "Exponential": k_sampling.get_sigmas_exponential(steps, sigma_min, sigma_max),
        "Polyexponential": k_sampling.get_sigmas_polyexponential(steps, sigma_min, sigma_max, rho=1.0),
    }
    for name, reference_sigmas in expected.items():
        ours = find_schedule(name).function(table, steps)
        assert ours.dtype == torch.float32 and ours.device.type == "cpu"
        assert torch.equal(ours, reference_sigmas), name


def test_rho_overrides_match_k_diffusion():
    k_sampling, _ = load()
    table = TABLES["sd1"]()
    assert torch.equal(
        schedules.karras(table, 15, rho=5.0), k_sampling.get_sigmas_karras(15, table.sigma_min, table.sigma_max, 5.0)
    )
    assert torch.equal(
        schedules.polyexponential(table, 15, rho=2.0),
        k_sampling.get_sigmas_polyexponential(15, table.sigma_min, table.sigma_max, 2.0),
    )


# --- A1111-only schedules against their formulas -----------------------------------------------------------------


def reference_sgm_uniform(reference, steps):
    start = reference.sigma_to_t(reference.sigma_max).item()
    end = reference.sigma_to_t(reference.sigma_min).item()
    timesteps = [start + (end - start) * i / steps for i in range(steps)]  # steps + 1 points, the last dropped
    return [reference.t_to_sigma(torch.tensor(t)).item() for t in timesteps] + [0.0]


def reference_normal(reference, steps):
    start = reference.sigma_to_t(reference.sigma_max).item()
    end = reference.sigma_to_t(reference.sigma_min).item()
    timesteps = [start + (end - start) * i / (steps - 1) for i in range(steps)] if steps > 1 else [start]
    return [reference.t_to_sigma(torch.tensor(t)).item() for t in timesteps] + [0.0]


def reference_kl_optimal(reference, steps):
    low, high = math.atan(reference.sigma_min.item()), math.atan(reference.sigma_max.item())
    return [math.tan(i / steps * low + (1 - i / steps) * high) for i in range(steps + 1)]


def reference_align_your_steps(published, steps):
    if steps == len(published):
        return published + [0.0]
    # Log-linear interpolation over an even grid on [0, 1], written out point by point.
    logs = [math.log(s) for s in published]
    out = []
    for i in range(steps):
        # Position along the descending list; a lone point sits at the grid's start, which A1111 lays over
        # the ascending list, so it is σ_min's end.
        position = (i / (steps - 1) if steps > 1 else 1.0) * (len(published) - 1)
        lower = min(int(math.floor(position)), len(published) - 2)
        frac = position - lower
        out.append(math.exp(logs[lower] * (1 - frac) + logs[lower + 1] * frac))
    return out + [0.0]


def reference_simple(reference, steps):
    table_sigmas = reference.sigmas.tolist()
    return [table_sigmas[len(table_sigmas) - 1 - int(i * len(table_sigmas) / steps)] for i in range(steps)] + [0.0]


def reference_ddim(reference, steps):
    table_sigmas = reference.sigmas.tolist()
    stride = max(len(table_sigmas) // steps, 1)
    return [table_sigmas[t] for t in range(1, len(table_sigmas), stride)][::-1] + [0.0]


def reference_beta(reference, steps, alpha=0.6, beta=0.6):
    low, high = reference.sigma_min.item(), reference.sigma_max.item()
    fractions = [1 - (i / (steps - 1) if steps > 1 else 0.0) for i in range(steps)]
    return [low + stats.beta.ppf(u, alpha, beta) * (high - low) for u in fractions] + [0.0]


def assert_close(ours: torch.Tensor, expected, name: str, rtol: float):
    expected = torch.tensor(expected, dtype=torch.float64)
    assert ours.dtype == torch.float32 and ours.device.type == "cpu", name
    assert ours.shape == expected.shape, f"{name}: {ours.shape} vs {expected.shape}"
    torch.testing.assert_close(ours.double(), expected, rtol=rtol, atol=0, msg=name)


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_a1111_only_schedules_match_their_formulas(table_and_reference, steps):
    table_name, table, reference = table_and_reference
    published = PUBLISHED_AYS_SDXL if table_name == "sdxl" else PUBLISHED_AYS_SD15
    # Through k-diffusion's own float32 σ↔t maps, so these agree to float32 rounding.
    assert_close(schedules.sgm_uniform(table, steps), reference_sgm_uniform(reference, steps), "SGM Uniform", 1e-6)
    assert_close(schedules.normal(table, steps), reference_normal(reference, steps), "Normal", 1e-6)
    # Straight table entries: exact.
    assert_close(schedules.simple(table, steps), reference_simple(reference, steps), "Simple", 0)
    assert_close(schedules.ddim(table, steps), reference_ddim(reference, steps), "DDIM", 0)
    # float32 arithmetic against a float64 formula.
    assert_close(schedules.kl_optimal(table, steps), reference_kl_optimal(reference, steps), "KL Optimal", 2e-6)
    assert_close(
        schedules.align_your_steps(table, steps), reference_align_your_steps(published, steps), "AYS", 1e-6
    )
    assert_close(schedules.beta(table, steps), reference_beta(reference, steps), "Beta", 1e-6)
    assert_close(
        schedules.beta(table, steps, alpha=0.3, beta=0.9),
        reference_beta(reference, steps, 0.3, 0.9),
        "Beta(0.3, 0.9)",
        1e-6,
    )


def test_a1111_quirks_are_kept():
    table = TABLES["sd1"]()
    kl = schedules.kl_optimal(table, 10)
    assert kl.shape == (11,) and kl[-1].item() == pytest.approx(table.sigma_min, rel=1e-6)  # no final 0
    assert torch.equal(schedules.align_your_steps(table, 11)[:-1], torch.tensor(PUBLISHED_AYS_SD15))
    assert torch.equal(
        schedules.align_your_steps(TABLES["sdxl"](), 11)[:-1], torch.tensor(PUBLISHED_AYS_SDXL)
    )
    assert schedules.align_your_steps(table, 20)[0].item() == pytest.approx(14.615)  # not the model's σ_max
    assert schedules.ddim(table, 7).shape == (9,)  # 1000 // 7 = 142 lands 8 timesteps below 1000
    assert schedules.ddim(table, 1).tolist() == [table.sigmas[1].item(), 0.0]
    assert list(AYS_SD15) == PUBLISHED_AYS_SD15 and list(AYS_SDXL) == PUBLISHED_AYS_SDXL


def test_every_schedule_descends_from_the_top(table_and_reference):
    _, table, _ = table_and_reference
    for spec in SCHEDULES:
        sigmas = spec.function(table, 20)
        assert sigmas.dtype == torch.float32 and sigmas.ndim == 1, spec.name
        assert bool((sigmas[1:] < sigmas[:-1]).all()), spec.name


# --- the name table -----------------------------------------------------------------------------------------------

A1111_DROPDOWN = [
    ("Uniform", "uniform"),
    ("Karras", "karras"),
    ("Exponential", "exponential"),
    ("Polyexponential", "polyexponential"),
    ("SGM Uniform", "sgm_uniform"),
    ("KL Optimal", "kl_optimal"),
    ("Align Your Steps", "align_your_steps"),
    ("Simple", "simple"),
    ("Normal", "normal"),
    ("DDIM", "ddim"),
    ("Beta", "beta"),
]


def test_schedules_are_listed_in_a1111s_order_without_automatic():
    assert [(spec.name, spec.a1111_name) for spec in SCHEDULES] == A1111_DROPDOWN
    assert all(isinstance(spec, ScheduleSpec) for spec in SCHEDULES)


@pytest.mark.parametrize("label, internal", A1111_DROPDOWN)
def test_find_schedule_by_label_and_internal_name(label, internal):
    spec = find_schedule(label)
    assert spec.name == label
    assert find_schedule(internal) is spec
    assert find_schedule(label.upper()) is spec
    assert find_schedule(label.lower().replace(" ", "_")) is spec


@pytest.mark.parametrize(
    "alias, label",
    [("SGMUniform", "SGM Uniform"), ("sgmuniform", "SGM Uniform"), ("sgm uniform", "SGM Uniform"),
     ("KL_OPTIMAL", "KL Optimal"), ("align your steps", "Align Your Steps"), (" karras ", "Karras")],
)
def test_find_schedule_by_alias(alias, label):
    assert find_schedule(alias).name == label


@pytest.mark.parametrize("unknown", ["Automatic", "karras2", "", "linear_quadratic"])
def test_unknown_schedule_is_a_validation_error_listing_the_choices(unknown):
    with pytest.raises(ValidationError) as raised:
        find_schedule(unknown)
    assert raised.value.field == "schedule"
    for label, _ in A1111_DROPDOWN:
        assert label in raised.value.message


def test_beta_writes_its_parameters_to_the_infotext():
    assert find_schedule("Beta").infotext_extras(alpha=0.5, beta=0.7) == {
        "Beta schedule alpha": 0.5,
        "Beta schedule beta": 0.7,
    }
    assert find_schedule("Beta").infotext_extras() == {"Beta schedule alpha": 0.6, "Beta schedule beta": 0.6}
    assert find_schedule("Karras").infotext_extras() == {}
    assert find_schedule("Karras").default_rho == 7.0 and find_schedule("Polyexponential").default_rho == 1.0
