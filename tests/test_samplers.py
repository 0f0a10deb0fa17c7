"""Every sampler × schedule either generates a finite image or is refused with the documented message."""
from __future__ import annotations

import numpy as np
import pytest

from engine import GenerationRequest, ValidationError
from engine.sampling import table as samplers

COMBINATIONS = [(s, k) for s in samplers.sampler_names() for k in samplers.schedule_names()]


@pytest.mark.parametrize("sampler,schedule", COMBINATIONS)
def test_every_sampler_schedule_generates_or_is_refused(engine, sampler, schedule):
    reason = samplers.unsupported_reason(sampler, schedule)
    make = lambda: GenerationRequest(prompt="a red circle", model="tiny-sd1", sampler=sampler, schedule=schedule,
                                     steps=4, cfg_scale=5, width=64, height=64, seed=1, preview_every=0)
    if reason:
        with pytest.raises(ValidationError) as raised:
            make()
        assert raised.value.field == "schedule"
        assert "does not support" in str(raised.value) and sampler in str(raised.value)
        assert schedule not in samplers.schedules_for(sampler)
        return
    assert schedule in samplers.schedules_for(sampler)
    result = engine.generate(make())
    pixels = np.asarray(result.images[0].image)
    assert pixels.shape == (64, 64, 3) and np.isfinite(pixels).all()
    assert f"Sampler: {sampler}" in result.images[0].infotext


def test_refusals_are_real_not_silently_ignored():
    # DDIM has no Karras sigmas: diffusers would drop the option silently; we refuse.
    assert samplers.unsupported_reason("DDIM", "Karras")
    assert samplers.unsupported_reason("Euler a", "Exponential")
    assert samplers.unsupported_reason("DPM++ 2M", "Karras") is None


@pytest.mark.parametrize("sampler", [s for s in samplers.sampler_names() if samplers.supports_zero_terminal_snr(s)])
def test_zero_terminal_snr_runs_or_is_refused_for_epsilon_models(engine, sampler):
    request = GenerationRequest(prompt="x", model="tiny-sd1", sampler=sampler, steps=4, width=64, height=64, seed=2,
                                zero_terminal_snr=True, preview_every=0)
    scheduler = samplers.build_scheduler(engine.registry.load("tiny-sd1").pipeline.scheduler.config, sampler, "Automatic", True)
    assert scheduler.config.rescale_betas_zero_snr is True
    if samplers.find_sampler(sampler).scheduler_class in samplers.ZERO_SNR_NEEDS_V_PREDICTION:
        with pytest.raises(ValidationError, match="v-prediction"):
            engine.generate(request)
        return
    previews = []
    result = engine.generate(request.with_changes(preview_every=1), on_progress=previews.append)
    assert previews, "no progress reported"
    assert np.asarray(result.images[0].image).std() > 0


def test_zero_terminal_snr_refused_where_unsupported():
    unsupported = [s for s in samplers.sampler_names() if not samplers.supports_zero_terminal_snr(s)]
    assert unsupported
    with pytest.raises(ValidationError, match="zero terminal SNR"):
        GenerationRequest(sampler=unsupported[0], zero_terminal_snr=True)


@pytest.mark.parametrize("legacy,sampler,schedule", [
    ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
    ("dpm++ 2m sde karras", "DPM++ 2M SDE", "Karras"),
    ("Euler a", "Euler a", "Automatic"),
    ("k_euler_a", "Euler a", "Automatic"),
    ("DPM++ SDE Karras", "DPM++ SDE", "Karras"),
])
def test_legacy_names_split_into_sampler_and_schedule(legacy, sampler, schedule):
    request = GenerationRequest(sampler=legacy)
    assert (request.sampler, request.schedule) == (sampler, schedule)


def test_unknown_sampler_names_the_field_and_choices():
    with pytest.raises(ValidationError) as raised:
        GenerationRequest(sampler="Nonexistent 9000")
    assert raised.value.field == "sampler" and "DPM++ 2M" in raised.value.message
