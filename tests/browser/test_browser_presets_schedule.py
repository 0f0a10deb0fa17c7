"""Presets, styles and the sampler's schedule in a real browser, as an artist meets them.

Loading a preset restores what it saved and leaves every control valid, applying
a style adds its prompt text as A1111 does, deleting asks first, and picking a
sampler keeps the schedule it honours or says why it changed.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/_ui_fixtures.py

import _ui_fixtures as fx  # noqa: E402

import pytest  # noqa: E402

from _pages import CHROMIUM, choose, generate, new_desktop_page, set_number, text_of, type_text, watch  # noqa: E402

from engine.sampling import table as samplers  # noqa: E402
from engine.presets import validate_preset  # noqa: E402

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"),
]

# Gradio marks an event's output components with a red "Error" status when the event failed.
ERROR_BADGES_JS = """
(ids) => ids.flatMap(id => Array.from(document.querySelectorAll('#' + id + ' .error'))
                            .filter(el => el.offsetParent !== null).map(el => id + ': ' + el.innerText.trim()))
"""
SAMPLING_CONTROLS = ["txt2img_sampler", "txt2img_schedule", "txt2img_zero_snr", "txt2img_steps"]


@pytest.fixture(scope="module")
def studio_url(tmp_path_factory):
    studio = fx.make_studio(tmp_path_factory.mktemp("presets-studio"))
    with fx.running_server(studio) as url:
        yield studio, url


@pytest.fixture
def studio(studio_url):
    return studio_url[0]


@pytest.fixture
def page(browser, studio_url):
    context, page = new_desktop_page(browser, studio_url[1])
    yield page
    context.close()


def _value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input").first.input_value()


def _schedule_choices(page) -> list[str]:
    page.locator("#txt2img_schedule input").first.click()
    options = page.locator("ul[role=listbox] li[role=option]").evaluate_all("(items) => items.map(i => i.getAttribute('aria-label'))")
    page.keyboard.press("Escape")
    return options


def _status(page) -> str:
    return page.locator("#txt2img_preset_status").inner_text().strip()


def _settle(page) -> None:
    """Let any event the last one set off (a .change listener, say) run and draw its result."""
    page.wait_for_timeout(1500)


def test_loading_the_euler_a_preset_over_karras_leaves_every_control_valid(page):
    choose(page, "txt2img_schedule", "Karras")
    choose(page, "txt2img_preset", "Euler a")
    page.locator("#txt2img_preset_load").click()
    page.locator("#txt2img_preset_status", has_text="Loaded preset").wait_for()
    _settle(page)

    assert page.evaluate(ERROR_BADGES_JS, SAMPLING_CONTROLS) == []
    assert _value(page, "txt2img_sampler") == "Euler a"
    assert _value(page, "txt2img_schedule") == "Automatic"
    assert _schedule_choices(page) == samplers.schedules_for("Euler a")
    assert page.locator("#txt2img_zero_snr input[type=checkbox]").is_visible() == samplers.supports_zero_terminal_snr("Euler a")
    assert page.locator("#txt2img_steps input[type=number]").input_value() == "25"

    # valid values: Generate takes them as they stand
    set_number(page, "txt2img_steps", 3)
    for side in ("width", "height"):
        set_number(page, f"txt2img_{side}", fx.SIZE)
    watch(page, "txt2img")
    assert generate(page, "txt2img").startswith("Done: 1 image")
    assert "Sampler: Euler a, Schedule type: Uniform" in text_of(page, "txt2img_infotext")  # Automatic, resolved as A1111 writes it


def test_loading_presets_in_turn_from_any_sampler_keeps_schedule_choices_consistent(page):
    for preset, sampler in (("DPM++ 2M Karras", "DPM++ 2M"), ("DDIM zero-SNR", "DDIM"), ("Euler a", "Euler a"),
                            ("DPM++ SDE Karras", "DPM++ SDE")):
        choose(page, "txt2img_preset", preset)
        page.locator("#txt2img_preset_load").click()
        page.locator("#txt2img_preset_status", has_text=f"Loaded preset {preset}").wait_for()
        _settle(page)
        assert page.evaluate(ERROR_BADGES_JS, SAMPLING_CONTROLS) == [], preset
        assert _value(page, "txt2img_sampler") == sampler
        choices = _schedule_choices(page)
        assert choices == samplers.schedules_for(sampler), preset
        assert _value(page, "txt2img_schedule") in choices
        ticked = page.locator("#txt2img_zero_snr input[type=checkbox]")
        assert ticked.is_visible() == samplers.supports_zero_terminal_snr(sampler), preset
        if ticked.is_visible():  # a preset's sampler comes with its zero-SNR setting: off unless it says on
            assert ticked.is_checked() == (preset == "DDIM zero-SNR"), preset


def test_a_style_adds_its_prompt_each_time_and_a_loaded_preset_restores_it(page, studio):
    studio.presets.save(validate_preset({"name": "Oil study", "fields": {
        "prompt": "oil painting", "negative_prompt": "blurry", "steps": 33}}))
    page.reload()
    page.wait_for_selector("#txt2img_generate")
    assert "Apply style" in page.locator("#txt2img_style_apply").inner_text()
    assert "Load preset" in page.locator("#txt2img_preset_load").inner_text()
    help_text = page.locator("#txt2img_preset_help").inner_text()
    assert "replaces your" in help_text and "adds" in help_text

    type_text(page, "txt2img_prompt", "a cat")
    type_text(page, "txt2img_negative", "lowres")
    choose(page, "txt2img_preset", "Oil study")
    for clicks in (1, 2):
        page.locator("#txt2img_style_apply").click()
        page.wait_for_function(
            "(n) => document.querySelector('#txt2img_prompt textarea').value.split('oil painting').length - 1 === n", arg=clicks)
    assert text_of(page, "txt2img_prompt") == "a cat, oil painting, oil painting"
    assert text_of(page, "txt2img_negative") == "lowres, blurry, blurry"
    assert page.locator("#txt2img_steps input[type=number]").input_value() == "20"  # a style brings only its prompt text

    for _ in range(2):
        page.locator("#txt2img_preset_load").click()
        page.wait_for_function("() => document.querySelector('#txt2img_prompt textarea').value === 'oil painting'")
    _settle(page)
    assert text_of(page, "txt2img_prompt") == "oil painting"
    assert text_of(page, "txt2img_negative") == "blurry"
    assert page.locator("#txt2img_steps input[type=number]").input_value() == "33"


def test_delete_asks_first_and_cancelling_keeps_the_preset(page, studio):
    studio.presets.save(validate_preset({"name": "Keep me", "fields": {"steps": 12}}))
    page.reload()
    page.wait_for_selector("#txt2img_generate")
    page.get_by_text("Manage presets: save, delete, export, import").first.click()
    choose(page, "txt2img_preset", "Keep me")

    page.locator("#txt2img_preset_delete").click()
    question = page.locator("#txt2img_preset_delete_question")
    question.wait_for()
    assert "Delete preset Keep me?" in question.inner_text()
    _settle(page)
    assert "Keep me" in [preset.name for preset in studio.presets.list()]  # nothing deleted before the second click
    page.locator("#txt2img_preset_delete_cancel").click()
    question.wait_for(state="hidden")
    _settle(page)
    assert "Keep me" in [preset.name for preset in studio.presets.list()]
    assert _value(page, "txt2img_preset") == "Keep me"

    page.locator("#txt2img_preset_delete").click()
    page.locator("#txt2img_preset_delete_confirm").click()
    page.locator("#txt2img_preset_status", has_text="Deleted preset Keep me").wait_for()
    assert "Keep me" not in [preset.name for preset in studio.presets.list()]


def test_a_builtin_preset_is_refused_before_any_confirmation(page):
    page.get_by_text("Manage presets: save, delete, export, import").first.click()
    choose(page, "txt2img_preset", "Euler a")
    page.locator("#txt2img_preset_delete").click()
    page.get_by_text("is a built-in preset and can't be deleted").first.wait_for()
    assert not page.locator("#txt2img_preset_delete_confirm").is_visible()


def test_picking_a_sampler_keeps_the_schedule_every_sampler_honours(page):
    note = page.locator("#txt2img_sampling_note")
    choose(page, "txt2img_sampler", "DPM++ 2M")
    choose(page, "txt2img_schedule", "Karras")
    choose(page, "txt2img_sampler", "Euler")  # Euler honours Karras
    _settle(page)
    assert _value(page, "txt2img_schedule") == "Karras"
    assert not note.is_visible()

    choose(page, "txt2img_sampler", "Euler a")  # A1111 offers Euler a with Karras: kept, nothing to explain
    assert "Karras" in samplers.schedules_for("Euler a")
    _settle(page)
    assert _value(page, "txt2img_schedule") == "Karras"
    assert not note.is_visible()
    assert page.evaluate(ERROR_BADGES_JS, SAMPLING_CONTROLS) == []
