"""Every sampler, each at its own default schedule ("Automatic"), on every flow family other than SD 3.5
(tests/test_flow_samplers.py runs them on SD 3.5): Flux.1 dev, Z-Image and Flux.2 Klein, on their tiny random-weight
fixtures through the real Engine.

Each picture must have the requested size, be finite and not flat; a handful of samplers that draw noise as they
go (ancestral draws and Brownian trees) must repeat to the pixel with the same seed. The families' own defaults
(CFG 1, Flux.1 dev's distilled CFG 3.5) are used, so each step is one model call.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.engine import Engine
from engine.families.flux import FLUX_DEV
from engine.families.flux2 import FLUX2
from engine.families.zimage import ZIMAGE
from engine.models import ModelRegistry
from engine.request import GenerationRequest, GenerationResult
from engine.sampling import table as sampler_table
from tests import _flux2_fixture, _flux_fixture, _zimage_fixture

FAMILIES = {  # model folder name → (its family's defaults, the fixture's native size, which a request draws at)
    "flux-dev": (FLUX_DEV.defaults, _flux_fixture.SIZE),
    "zimage": (ZIMAGE.defaults, _zimage_fixture.SIZE),
    "flux2-klein": (FLUX2.defaults, _flux2_fixture.SIZE),
}
ALL_SAMPLERS = sampler_table.sampler_names()
STEPS = 3  # enough for the third-order stages (DPM++ 3M SDE) to run
# Samplers whose noise is drawn during sampling: the same seed must give the same draws.
NOISY_SAMPLERS = ("Euler a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DDPM")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    torch.set_num_threads(1)
    models = tmp_path_factory.mktemp("models")
    _flux_fixture.build_folder(models / "flux-dev", "dev")
    _zimage_fixture.build_folder(models / "zimage")
    _flux2_fixture.build_folder(models / "flux2-klein")
    return Engine(ModelRegistry(models, builtin_dir=None))


def _draw(engine: Engine, model: str, sampler: str) -> np.ndarray:
    defaults, size = FAMILIES[model]
    request = GenerationRequest(**{**defaults, "prompt": "a red fox", "model": model, "sampler": sampler,
                                   "schedule": "Automatic", "steps": STEPS, "seed": 33})
    result: GenerationResult = engine.generate(request)
    image = result.images[0].image
    assert image.size == (size, size), (model, sampler)
    return np.asarray(image, dtype=np.float32) / 255


def test_the_noisy_samplers_exist():
    assert set(NOISY_SAMPLERS) <= set(ALL_SAMPLERS)
    assert {sampler_table.find_sampler(name).noise for name in NOISY_SAMPLERS} >= {
        sampler_table.ANCESTRAL_NOISE, sampler_table.BROWNIAN_NOISE}


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
@pytest.mark.parametrize("model", list(FAMILIES))  # one family after another: each is loaded once
def test_every_sampler_draws_a_finite_picture_on_every_flow_family(engine, model, sampler):
    pixels = _draw(engine, model, sampler)
    assert np.isfinite(pixels).all()
    assert pixels.std() > 0, "a flat picture"
    if sampler in NOISY_SAMPLERS:
        assert np.array_equal(pixels, _draw(engine, model, sampler)), "the same seed drew another picture"
