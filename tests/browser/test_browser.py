"""The studio in a real browser (Playwright + Debian's chromium), against a real server on 127.0.0.1.

Each scenario is something an artist does: generate with live previews, paint
a mask and inpaint, keep settings as a preset, bring an image back from PNG
Info, and interrupt a long run.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/_ui_fixtures.py

import _ui_fixtures as fx  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from _pages import (  # noqa: E402
    CHROMIUM, choose, events, fetch_image, gallery_images, generate, open_app, open_tab, set_number, text_of, type_text, wait_finished,
    watch,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"),
]





def _small(page, mode: str, steps: int) -> None:
    set_number(page, f"{mode}_steps", steps)
    for side in ("width", "height"):
        set_number(page, f"{mode}_{side}", fx.SIZE)


def test_generate_shows_changing_previews_then_the_final_png_with_metadata(page):
    type_text(page, "txt2img_prompt", "a red circle on the left")
    choose(page, "txt2img_sampler", "Euler")
    choose(page, "txt2img_schedule", "Karras")
    _small(page, "txt2img", 30)
    set_number(page, "txt2img_seed", 1234)
    watch(page, "txt2img")
    page.locator("#txt2img_prompt textarea").press("Control+Enter")  # the A1111 shortcut
    assert wait_finished(page, "txt2img", 1).startswith("Done: 1 image")

    log = events(page, "txt2img")
    first_result = next(i for i, (kind, value, _) in enumerate(log) if kind == "gallery" and value)
    previews = {value for kind, value, _ in log[:first_result] if kind == "preview" and value}
    assert len(previews) >= 2, log
    assert any(kind == "progress" and value.startswith("Step ") and "ETA" in value for kind, value, _ in log)

    image, _ = fetch_image(gallery_images(page, "txt2img")[0])
    parameters = image.info["parameters"]
    assert image.size == (fx.SIZE, fx.SIZE)
    assert parameters.startswith("a red circle on the left\n")
    for expected in ("Steps: 30", "Sampler: Euler", "Schedule type: Karras", "Seed: 1234", f"Size: {fx.SIZE}x{fx.SIZE}"):
        assert expected in parameters
    assert "Seed: 1234" in text_of(page, "txt2img_infotext")


def test_painted_stroke_is_repainted_and_far_pixels_are_untouched(page, tmp_path):
    source = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(source).save(tmp_path / "source.png")
    open_tab(page, "Inpaint")
    upload_to_editor(page, tmp_path / "source.png")
    page.get_by_text("Preview the effective mask").first.click()
    paint_until_mask_previewed(page)
    set_number(page, "inpaint_steps", 8)
    set_number(page, "inpaint_seed", 5)
    watch(page, "inpaint")
    assert generate(page, "inpaint").startswith("Done: 1 image")

    result, _ = fetch_image(gallery_images(page, "inpaint")[0])
    result = np.asarray(result.convert("RGB"))
    assert result.shape == source.shape
    assert not np.array_equal(result[60:68, 56:72], source[60:68, 56:72])  # under the stroke, at the canvas centre
    assert np.array_equal(result[:24], source[:24]) and np.array_equal(result[-24:], source[-24:])  # far away: bit-exact
    assert "Mask blur: 4" in result_info(page)


def result_info(page) -> str:
    return text_of(page, "inpaint_infotext")


def upload_to_editor(page, path: Path) -> None:
    """Upload the background image, retrying while the editor is still starting up (its canvas loads lazily)."""
    page.locator("#inpaint_editor canvas").first.wait_for()
    for attempt in range(3):
        page.locator("#inpaint_editor input[type=file]").set_input_files(str(path))
        try:
            page.locator("#inpaint_editor", has_text="Upload an image").wait_for(state="hidden", timeout=10_000)
            return
        except Exception:  # noqa: BLE001
            if attempt == 2:
                raise


def paint_stroke(page) -> None:
    """Drag the brush across the middle of the editor's canvas."""
    canvas = page.locator("#inpaint_editor canvas").first
    canvas.wait_for()
    page.wait_for_timeout(800)  # the editor lays the image out on its canvas
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 40, y)
    page.mouse.down()
    page.mouse.move(x + 40, y, steps=4)  # each pointer event redraws the canvas in software: keep them few
    page.mouse.up()


def paint_until_mask_previewed(page):
    """Paint a stroke and press "Preview mask" until the preview shows (the editor may still be setting up its
    tools, or laying the picture out, when the first stroke lands); returns the preview image's locator."""
    shown = page.locator("#inpaint_mask_preview img")
    for attempt in range(3):
        paint_stroke(page)
        page.locator("#inpaint_preview_mask").click()
        try:
            shown.wait_for(timeout=15_000)
            return shown
        except Exception:  # noqa: BLE001 - "paint over the area first": paint again
            if attempt == 2:
                raise
    return shown


def test_a_saved_preset_survives_a_reload_and_restores_the_controls(page, server_url):
    page.get_by_text("Manage presets: save, delete, export, import").first.click()
    set_number(page, "txt2img_steps", 13)
    set_number(page, "txt2img_cfg", 4.5)
    choose(page, "txt2img_sampler", "Heun")
    type_text(page, "txt2img_preset_name", "Browser preset")
    type_text(page, "txt2img_preset_text", "made by the browser test")
    page.locator("#txt2img_preset_save").click()
    page.locator("#txt2img_preset_status", has_text="Saved preset").wait_for()

    open_app(page, server_url)  # a fresh page: nothing carried over but the saved file
    assert page.locator("#txt2img_steps input[type=number]").input_value() == "20"
    choose(page, "txt2img_preset", "Browser preset")
    page.locator("#txt2img_preset_load").click()
    page.locator("#txt2img_preset_status", has_text="Loaded preset").wait_for()
    assert page.locator("#txt2img_steps input[type=number]").input_value() == "13"
    assert page.locator("#txt2img_cfg input[type=number]").input_value() == "4.5"
    assert page.locator("#txt2img_sampler input").input_value() == "Heun"


def test_png_info_sends_an_image_back_to_txt2img_and_regenerates_it_exactly(page, tmp_path):
    type_text(page, "txt2img_prompt", "a blue square")
    _small(page, "txt2img", 6)
    watch(page, "txt2img")
    assert generate(page, "txt2img").startswith("Done")
    original, data = fetch_image(gallery_images(page, "txt2img")[0])
    (tmp_path / "made.png").write_bytes(data)
    seed = next(part.split(": ")[1] for part in original.info["parameters"].split(", ") if part.startswith("Seed: "))

    type_text(page, "txt2img_prompt", "something else entirely")  # what PNG Info must overwrite
    set_number(page, "txt2img_steps", 20)
    open_tab(page, "PNG Info")
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(tmp_path / "made.png"))
    page.wait_for_function("() => document.querySelector('#pnginfo_infotext textarea').value.includes('Seed:')")
    page.locator("#pnginfo_send_to_txt2img").click()
    page.wait_for_function("(seed) => document.querySelector('#txt2img_seed input').value === seed", arg=seed)
    assert text_of(page, "txt2img_prompt") == "a blue square"
    assert page.locator("#txt2img_steps input[type=number]").input_value() == "6"

    assert generate(page, "txt2img").startswith("Done")
    again, _ = fetch_image(gallery_images(page, "txt2img")[0])
    assert np.array_equal(np.asarray(again.convert("RGB")), np.asarray(original.convert("RGB")))
    assert f"Seed: {seed}" in again.info["parameters"]


def test_interrupt_returns_to_idle_and_the_next_generation_works(page):
    _small(page, "txt2img", 150)
    set_number(page, "txt2img_batch_count", 20)
    watch(page, "txt2img")
    page.locator("#txt2img_generate").click()
    page.locator("#txt2img_progress [data-testid=markdown]", has_text="Step ").wait_for()
    page.locator("#txt2img_interrupt").click()
    assert wait_finished(page, "txt2img", 1, timeout=60_000).startswith("Interrupted")

    set_number(page, "txt2img_steps", 4)
    set_number(page, "txt2img_batch_count", 1)
    assert generate(page, "txt2img").startswith("Done: 1 image")
