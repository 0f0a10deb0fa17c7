"""In a real browser: picking a model shows the fields its family uses and sets what it draws with, as Forge's
UI presets do: Flux.1 dev brings Distilled CFG, Shift, the first block cache and the VAE / Text Encoder picker and
hides Clip skip and token merging; an SD 1.x model takes them away again (and brings Clip skip and token merging
back) and puts CFG back to 7."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/_ui_fixtures.py, tests/_flux_fixture.py

import _ui_fixtures as fx  # noqa: E402

import pytest  # noqa: E402

from _pages import CHROMIUM, choose, open_tab, text_of  # noqa: E402

FLUX_MODEL = "zz-flux"  # after the tiny SD 1.x model in name order, so that one is shown at start
pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    from tests._flux_fixture import build_folder

    root = tmp_path_factory.mktemp("family-browser")
    folder = build_folder(root / "models" / "Stable-diffusion" / FLUX_MODEL, "dev")
    # Native 64² instead of the fixture's 32²: the size sliders start at 64, and the sizes follow the native size.
    (folder / "sfumato.json").write_text(json.dumps({"native_width": fx.SIZE, "native_height": fx.SIZE}))
    with fx.running_server(fx.make_studio(root)) as url:
        yield url


def _shown(page, elem_id: str, visible: bool) -> None:
    page.locator(f"#{elem_id}").first.wait_for(state="visible" if visible else "hidden", timeout=60_000)


def test_flux_brings_its_fields_and_settings_and_sd1_takes_them_back(page):
    page.get_by_text("Advanced sampling").first.click()  # Clip skip and token merging live in this accordion
    _shown(page, "txt2img_clip_skip", True)
    _shown(page, "txt2img_token_merging_ratio", True)
    for elem_id in ("txt2img_distilled_cfg", "txt2img_shift", "modules_dropdown", "txt2img_first_block_cache"):
        _shown(page, elem_id, False)
    assert "SD 1.x" in page.locator("#model_status").inner_text()

    choose(page, "model_dropdown", FLUX_MODEL)
    for elem_id in ("txt2img_distilled_cfg", "txt2img_shift", "modules_dropdown", "txt2img_first_block_cache"):
        _shown(page, elem_id, True)
    _shown(page, "txt2img_clip_skip", False)
    _shown(page, "txt2img_token_merging_ratio", False)  # a UNet's, like Clip skip
    assert "Flux.1" in page.locator("#model_status").inner_text()
    assert float(text_of(page, "txt2img_cfg")) == 1.0 and float(text_of(page, "txt2img_distilled_cfg")) == 3.5
    assert text_of(page, "txt2img_sampler") == "Euler" and text_of(page, "txt2img_schedule") == "Simple"
    open_tab(page, "img2img")  # every tab follows the picker
    assert float(text_of(page, "img2img_cfg")) == 1.0
    open_tab(page, "txt2img")

    choose(page, "model_dropdown", fx.MODEL_NAME)
    _shown(page, "txt2img_clip_skip", True)
    _shown(page, "txt2img_token_merging_ratio", True)
    for elem_id in ("txt2img_distilled_cfg", "txt2img_shift", "modules_dropdown", "txt2img_first_block_cache"):
        _shown(page, elem_id, False)
    assert float(text_of(page, "txt2img_cfg")) == 7.0
    assert "SD 1.x" in page.locator("#model_status").inner_text()


def test_a_pasted_flux_infotext_shows_its_fields_and_keeps_its_own_settings(page, tmp_path):
    """PNG Info's "send to" sets the model picker in code, so the picker's own handler never runs: the pasted
    model's family must still show its fields, and the pasted values (not the family's defaults) must stay."""
    from PIL import Image

    from engine.image_metadata import save_png

    infotext = ("a red circle\nSteps: 7, Sampler: Heun, Schedule type: Karras, CFG scale: 2.5, Distilled CFG Scale: 4.5, "
                f"Seed: 5, Size: 64x64, Model: {FLUX_MODEL}")
    save_png(Image.new("RGB", (64, 64), "white"), tmp_path / "flux.png", infotext)
    choose(page, "model_dropdown", fx.MODEL_NAME)
    _shown(page, "txt2img_distilled_cfg", False)
    open_tab(page, "PNG Info")
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(tmp_path / "flux.png"))
    page.wait_for_function("() => document.querySelector('#pnginfo_infotext textarea').value.includes('Seed:')")
    page.locator("#pnginfo_send_to_txt2img").click()
    for elem_id in ("txt2img_distilled_cfg", "txt2img_shift", "modules_dropdown"):
        _shown(page, elem_id, True)
    page.get_by_text("Advanced sampling").first.click()
    _shown(page, "txt2img_clip_skip", False)
    assert float(text_of(page, "txt2img_cfg")) == 2.5 and float(text_of(page, "txt2img_distilled_cfg")) == 4.5
    assert text_of(page, "txt2img_sampler") == "Heun" and int(float(text_of(page, "txt2img_steps"))) == 7
