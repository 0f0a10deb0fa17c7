"""Presets used as styles or loaded as settings, and what a sampler change does to the schedule (no browser)."""
from __future__ import annotations

import pytest

from engine.sampling import table as samplers
from engine.presets import apply_preset, apply_style, load_preset, unmerge_prompt, validate_preset


def _preset(**fields):
    return validate_preset({"name": "P", "fields": fields})


# --- the sampler's schedule -------------------------------------------------------------------

def test_switching_to_a_sampler_that_honours_the_schedule_keeps_it():
    fit = samplers.fit_to_sampler("Euler", "Karras", True)
    assert (fit.schedule, fit.zero_terminal_snr, fit.changes) == ("Karras", True, ())


def test_every_sampler_keeps_every_schedule_as_a1111_offers_them():
    fit = samplers.fit_to_sampler("Euler a", "Karras", True)  # refused before the σ-based samplers; A1111 offers it
    assert (fit.schedule, fit.zero_terminal_snr, fit.changes) == ("Karras", True, ())
    for sampler in samplers.sampler_names():
        assert samplers.schedules_for(sampler) == samplers.schedule_names(), sampler


@pytest.fixture
def karras_missing(monkeypatch):
    """A build where Euler a cannot run Karras: the fall-back path, which no shipped combination takes any more."""
    real = samplers.unsupported_reason

    def reason(sampler, schedule, zero_terminal_snr=False):
        if samplers.find_sampler(sampler).name == "Euler a" and samplers.find_schedule(schedule).name == "Karras":
            return "schedule type 'Karras' is not available in this build"
        return real(sampler, schedule, zero_terminal_snr)

    monkeypatch.setattr(samplers, "unsupported_reason", reason)


def test_switching_to_a_sampler_that_cannot_run_the_schedule_says_from_what_to_what_and_why(karras_missing):
    fit = samplers.fit_to_sampler("Euler a", "Karras")
    assert fit.schedule == "Automatic"
    [change] = fit.changes
    assert "from Karras to Automatic" in change and "not available" in change


def test_the_artists_sampler_pick_keeps_or_explains_the_schedule(karras_missing):
    from ui.generation_tab import _sampler_picked

    schedule, zero_snr, note = _sampler_picked("Euler", "Karras", False)
    assert schedule["value"] == "Karras" and note["visible"] is False
    schedule, zero_snr, note = _sampler_picked("Euler a", "Karras", False)
    assert schedule["value"] == "Automatic" and _choices(schedule) == samplers.schedules_for("Euler a")
    assert note["visible"] is True and "from Karras to Automatic" in note["value"]


def test_applying_a_sampler_alone_to_the_controls_keeps_schedule_and_zero_snr_valid(karras_missing):
    """PNG Info and "send to" may apply a sampler without a schedule: the schedule's choices and value follow it."""
    import gradio as gr

    from ui import fields as F

    with gr.Blocks():
        field_map = F.FieldMap()
        field_map.add(F.simple("sampler", gr.Dropdown(samplers.sampler_names())))
        field_map.add(F.schedule(gr.Dropdown(samplers.schedule_names())))
        field_map.add(F.zero_terminal_snr(gr.Checkbox()))
        field_map.add(F.simple("steps", gr.Number()))
    sampler, schedule, zero_snr, steps = field_map.updates({"sampler": "DPM++ SDE"})
    assert sampler == "DPM++ SDE"
    assert schedule["value"] == "Automatic" and "Karras" in _choices(schedule)
    assert zero_snr == {"__type__": "update", "visible": True}  # zero SNR changes the noise table: every sampler takes it
    assert isinstance(steps, type(gr.skip()))
    _, schedule, zero_snr, _ = field_map.updates({"sampler": "Euler a", "schedule": "Karras"})
    assert schedule["value"] == "Automatic" and "Karras" not in _choices(schedule)
    assert zero_snr == {"__type__": "update", "visible": True}  # supported: the box is shown and its tick left alone


def _choices(update) -> list[str]:
    return [choice[0] if isinstance(choice, (tuple, list)) else choice for choice in update["choices"]]


# --- style or preset --------------------------------------------------------------------------

def test_a_style_adds_its_prompt_text_each_time_and_touches_nothing_else():
    style = _preset(prompt="oil painting", negative_prompt="blurry", steps=33, sampler="Euler")
    current = {"prompt": "a cat", "negative_prompt": "lowres", "steps": 20, "sampler": "DPM++ 2M", "schedule": "Karras"}
    once = apply_style(style, current)
    twice = apply_style(style, once)
    assert once == {**current, "prompt": "a cat, oil painting", "negative_prompt": "lowres, blurry"}
    assert twice["prompt"] == "a cat, oil painting, oil painting"
    assert current["prompt"] == "a cat"


def test_loading_a_preset_restores_its_prompt_and_twice_gives_what_once_gave():
    preset = _preset(prompt="oil painting", negative_prompt="blurry", steps=33)
    current = {"prompt": "a cat", "negative_prompt": "lowres", "steps": 20, "seed": 5}
    once = load_preset(preset, current).fields
    assert once == {"prompt": "oil painting", "negative_prompt": "blurry", "steps": 33, "seed": 5}
    assert load_preset(preset, once).fields == once


def test_loading_a_template_preset_twice_wraps_the_typed_prompt_once():
    preset = _preset(prompt="masterpiece, {prompt}, by a master")
    once = load_preset(preset, {"prompt": "a cat"}).fields
    assert once["prompt"] == "masterpiece, a cat, by a master"
    assert load_preset(preset, once).fields["prompt"] == "masterpiece, a cat, by a master"
    assert unmerge_prompt("{prompt}, x", "a cat") == "a cat"  # nothing to undo


def test_loading_a_preset_over_a_schedule_its_sampler_refuses_leaves_a_valid_schedule(karras_missing):
    euler_a = _preset(sampler="Euler a", steps=25)
    applied = load_preset(euler_a, {"sampler": "DPM++ 2M", "schedule": "Karras", "zero_terminal_snr": True})
    assert applied.fields["schedule"] == "Automatic" and "from Karras to Automatic" in " ".join(applied.notes)
    karras_only = _preset(schedule="Karras")
    applied = load_preset(karras_only, {"sampler": "Euler a", "schedule": "Uniform"})
    assert applied.fields["schedule"] == "Automatic" and applied.notes


@pytest.mark.parametrize("sampler", samplers.sampler_names())
@pytest.mark.parametrize("schedule", samplers.schedule_names())
def test_loading_any_shipped_sampler_preset_from_any_state_gives_a_combination_that_runs(sampler, schedule):
    for preset in (_preset(sampler="Euler a", schedule="Automatic", steps=25), _preset(sampler="DDIM", zero_terminal_snr=True),
                   _preset(sampler="DPM++ SDE", schedule="Karras"), _preset(schedule="Karras")):
        fields = load_preset(preset, {"sampler": sampler, "schedule": schedule, "zero_terminal_snr": True}).fields
        assert samplers.unsupported_reason(fields["sampler"], fields["schedule"], fields["zero_terminal_snr"]) is None


def test_the_api_styles_still_merge_prompts_and_fit_the_schedule(karras_missing):
    preset = _preset(prompt="oil painting", sampler="Euler a")
    result = apply_preset(preset, {"prompt": "a cat", "sampler": "DPM++ 2M", "schedule": "Karras"})
    assert result["prompt"] == "a cat, oil painting" and result["schedule"] == "Automatic"
