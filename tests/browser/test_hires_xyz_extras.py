"""In a real browser on the shipped demo model: Hires. fix doubles the picture and says so in the infotext, the
X/Y/Z plot draws a labelled grid beside its cells, and the Extras tab upscales an upload by Lanczos.

One server for the module (the demo model, 64×64 native, and an empty temporary models folder); every run is a
few steps so the file stays well under its time budget."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/_ui_fixtures.py

import _ui_fixtures as fx  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from test_phone_and_icons import GLYPH_JS  # noqa: E402
from _pages import (CHROMIUM, choose, fetch_image, gallery_images, generate, open_tab, set_number, text_of,  # noqa: E402
                    type_text, watch)

DEMO_SIZE = 64  # the demo model's native size
pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """Only the built-in demo model: the models folder is empty, so the demo model is the default."""
    import torch

    from engine.studio import Studio, StudioConfig

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hires-xyz-extras-studio")
    return Studio(StudioConfig(models_dir=root / "models", outputs_dir=root / "outputs", user_dir=root / "user",
                               extensions_dir=root / "no-extensions", presets_dir=fx.REPO / "presets",
                               builtin_models_dir=fx.REPO / "builtin"))


@pytest.fixture(scope="module")
def server_url(studio):
    with fx.running_server(studio) as url:
        yield url


def _few_steps(page, steps: int = 3) -> None:
    type_text(page, "txt2img_prompt", "a red circle on the left, blue background")
    set_number(page, "txt2img_steps", steps)
    set_number(page, "txt2img_seed", 7)
    for side in ("width", "height"):
        set_number(page, f"txt2img_{side}", DEMO_SIZE)


def _sizes(page, mode: str) -> list[tuple[int, int]]:
    return [fetch_image(url)[0].size for url in gallery_images(page, mode)]


def test_hires_fix_doubles_the_picture_and_writes_its_keys(page):
    _few_steps(page)
    page.locator("#txt2img_hires").get_by_text("Hires. fix").first.click()  # open the accordion
    page.locator("#txt2img_enable_hr input[type=checkbox]").check()
    set_number(page, "txt2img_hr_scale", 2)
    set_number(page, "txt2img_hr_second_pass_steps", 2)
    watch(page, "txt2img")
    assert generate(page, "txt2img").startswith("Done: 1 image")

    assert _sizes(page, "txt2img") == [(2 * DEMO_SIZE, 2 * DEMO_SIZE)]
    infotext = text_of(page, "txt2img_infotext")
    assert "Hires upscale: 2" in infotext and "Hires upscaler: " in infotext, infotext
    assert f"Size: {DEMO_SIZE}x{DEMO_SIZE}" in infotext  # A1111 writes the first pass's size


def test_an_xyz_plot_over_steps_draws_a_labelled_grid_and_its_cells(page):
    _few_steps(page)
    choose(page, "txt2img_script", "X/Y/Z plot")
    page.locator("#txt2img_xyz").wait_for(state="visible")
    # The fill button (A1111's 📒) draws without an emoji font, says what it does, and lists an axis's choices.
    fill = page.locator("#txt2img_xyz_fill_x")
    page.wait_for_function("() => document.getElementById('txt2img_xyz_fill_x').getAttribute('aria-label')", timeout=10_000)
    glyph = fill.evaluate(GLYPH_JS)
    assert not glyph["emoji"] and not glyph["missing"], glyph
    assert "choice" in fill.get_attribute("title")
    choose(page, "txt2img_xyz_x_type", "Sampler")
    fill.click()
    page.wait_for_function("() => document.querySelector('#txt2img_xyz_x_values :is(textarea, input)').value"
                           ".includes('DPM++ 2M')")
    choose(page, "txt2img_xyz_x_type", "Steps")
    type_text(page, "txt2img_xyz_x_values", "2,3")
    watch(page, "txt2img")
    generate(page, "txt2img")

    grid, *cells = _sizes(page, "txt2img")
    assert cells == [(DEMO_SIZE, DEMO_SIZE)] * 2
    # X across with a legend row above the cells: two cells wide, taller than one cell
    assert grid[0] == 2 * DEMO_SIZE and grid[1] > DEMO_SIZE, grid
    legend = np.asarray(fetch_image(gallery_images(page, "txt2img")[0])[0].convert("L"))[: grid[1] - DEMO_SIZE]
    assert legend.min() < 128 < legend.max()  # dark label text drawn on the light legend band
    infotext = text_of(page, "txt2img_infotext")
    for entry in ("Script: X/Y/Z plot", "X Type: Steps", "X Values: "):
        assert entry in infotext, infotext


def test_extras_upscales_an_upload_by_lanczos(page, tmp_path):
    source = tmp_path / "source.png"
    pixels = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(source)
    open_tab(page, "Extras")
    page.locator("#extras_image input[type=file]").set_input_files(str(source))
    page.locator("#extras_image img").first.wait_for()
    choose(page, "extras_upscaler_1", "Lanczos")
    set_number(page, "extras_upscaling_resize", 2)
    page.locator("#extras_generate").click()
    page.locator("#extras_gallery img").first.wait_for(timeout=60_000)

    (result, _), = [fetch_image(url) for url in gallery_images(page, "extras")]
    assert result.size == (2 * 56, 2 * 40)
    # Lanczos of the upload, computed here with PIL, as A1111's Lanczos upscaler does
    expected = np.asarray(Image.fromarray(pixels).resize((112, 80), Image.LANCZOS), dtype=np.int16)
    assert np.abs(np.asarray(result.convert("RGB"), dtype=np.int16) - expected).max() <= 1
