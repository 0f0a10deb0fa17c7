"""A picture sent between tabs arrives bit for bit, and inpainting keeps every unmasked pixel of it.

Our headline promise is that pixels outside an inpaint mask stay exactly as they
were. That holds only if every hop the picture takes through the browser is
lossless: the result gallery, "Send to img2img / inpaint", the inpaint editor and
the mask preview. Gradio's image components default to lossy WebP.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/_ui_fixtures.py

import _ui_fixtures as fx  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from _pages import fetch_image, gallery_images, generate, open_tab, set_number, type_text, watch  # noqa: E402
from _pages import CHROMIUM  # noqa: E402
from test_browser import paint_until_mask_previewed  # noqa: E402

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"),
]


def _pixels(url: str) -> np.ndarray:
    image, _ = fetch_image(url)
    return np.asarray(image.convert("RGB"))


def _first_result(page, mode: str) -> np.ndarray:
    return _pixels(gallery_images(page, mode)[0])


def _changed(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """(how many pixels differ, the largest channel difference), the figures the issue reports."""
    difference = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(difference.any(axis=-1).sum()), int(difference.max(initial=0))


def _txt2img(page) -> np.ndarray:
    type_text(page, "txt2img_prompt", "a red circle on a blue background")
    set_number(page, "txt2img_steps", 6)
    for side in ("width", "height"):
        set_number(page, f"txt2img_{side}", fx.SIZE)
    set_number(page, "txt2img_seed", 77)
    watch(page, "txt2img")
    assert generate(page, "txt2img").startswith("Done: 1 image")
    return _first_result(page, "txt2img")


def _inpaint_sent_picture(page, source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paint a stroke over the picture just sent to Inpaint and inpaint it; returns (result, unmasked pixels).

    With mask blur 0 the effective mask is exactly the painted pixels. The mask preview draws them red over the
    picture the server received and leaves every other pixel as it is, so "unmasked" is where the preview still
    equals the picture we sent: which also proves the editor received it intact.
    """
    open_tab(page, "Inpaint")
    page.locator("#inpaint_editor canvas").first.wait_for()
    set_number(page, "inpaint_mask_blur", 0)
    set_number(page, "inpaint_steps", 6)
    set_number(page, "inpaint_seed", 9)
    page.get_by_text("Preview the effective mask").first.click()
    shown = paint_until_mask_previewed(page)
    preview = _pixels(shown.get_attribute("src"))
    assert preview.shape == source.shape
    unmasked = (preview == source).all(axis=-1)
    count, largest = _changed(preview, source)
    assert 0 < count < source.shape[0] * source.shape[1] // 2, (
        f"the editor did not receive the sent picture intact: the mask preview differs from it in {count} pixels "
        f"(max {largest}/255), more than the painted stroke covers")
    watch(page, "inpaint")
    assert generate(page, "inpaint").startswith("Done: 1 image")
    return _first_result(page, "inpaint"), unmasked


def test_send_to_img2img_then_inpaint_keeps_every_pixel_the_mask_does_not_cover(page):
    made = _txt2img(page)

    page.locator("#txt2img_send_to_img2img").click()
    page.locator("#img2img_image img").wait_for()
    received = _pixels(page.locator("#img2img_image img").get_attribute("src"))
    count, largest = _changed(received, made)
    assert count == 0, f"Send to img2img changed {count} of {made.shape[0] * made.shape[1]} pixels, by up to {largest}/255"

    set_number(page, "img2img_steps", 6)
    watch(page, "img2img")
    assert generate(page, "img2img").startswith("Done: 1 image")
    repainted = _first_result(page, "img2img")

    page.locator("#img2img_send_to_inpaint").click()
    result, unmasked = _inpaint_sent_picture(page, repainted)
    count, largest = _changed(result[unmasked], repainted[unmasked])
    assert count == 0, f"{count} of {int(unmasked.sum())} unmasked pixels changed, by up to {largest}/255"
    assert not np.array_equal(result[~unmasked], repainted[~unmasked])  # the stroke itself was repainted


def test_txt2img_result_sent_to_inpaint_keeps_its_unmasked_pixels_bit_for_bit(page):
    made = _txt2img(page)

    page.locator("#txt2img_send_to_inpaint").click()
    result, unmasked = _inpaint_sent_picture(page, made)
    count, largest = _changed(result[unmasked], made[unmasked])
    assert count == 0, f"{count} of {int(unmasked.sum())} unmasked pixels changed, by up to {largest}/255"
    assert not np.array_equal(result[~unmasked], made[~unmasked])
