"""A bad upload is refused the moment it is dropped, with a sentence for a person, not at Generate.

The browser uploads a corrupt file and an EPS to the image inputs; a warning naming
the problem appears at once, the bad image is cleared, and nothing on the page shows
a temp path or an exception class.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/_ui_fixtures.py

import _ui_fixtures as fx  # noqa: E402

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from _pages import CHROMIUM, open_tab  # noqa: E402

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"),
]

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"
TOAST = ".toast-body"


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    studio = fx.make_studio(tmp_path_factory.mktemp("uploads-studio"), extensions_dir=fx.REPO / "extensions")  # with ControlNet
    with fx.running_server(studio) as url:
        yield url




@pytest.fixture
def bad_files(tmp_path) -> dict[str, Path]:
    corrupt = tmp_path / "holiday.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this was never a picture" * 20)
    eps = tmp_path / "logo.eps"
    eps.write_bytes(EPS)
    return {"corrupt": corrupt, "eps": eps}


def good_png(tmp_path: Path) -> Path:
    path = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (30, 120, 200)).save(path)
    return path


def expect_refusal(page, says: str) -> str:
    """The warning appears without any other click; returns its text."""
    toast = page.locator(TOAST, has_text=says).first
    toast.wait_for(timeout=15_000)
    text = toast.inner_text()
    assert "/tmp" not in text and not re.search(r"[A-Z]\w+(Error|Exception)", text), text
    return text


def image_shown(page, elem_id: str) -> bool:
    return page.locator(f"#{elem_id} img").count() > 0


@pytest.mark.parametrize("kind, says", [("corrupt", "not a readable image"), ("eps", "EPS files are not accepted")])
def test_img2img_upload_is_refused_at_once_and_cleared(page, bad_files, kind, says):
    open_tab(page, "img2img")
    page.locator("#img2img_image input[type=file]").set_input_files(str(bad_files[kind]))
    text = expect_refusal(page, says)
    assert "Image for img2img" in text
    page.wait_for_function("() => !document.querySelector('#img2img_image img')", timeout=10_000)
    assert not page.locator("text=UnidentifiedImageError").count()


def test_a_good_img2img_upload_stays(page, tmp_path):
    open_tab(page, "img2img")
    page.locator("#img2img_image input[type=file]").set_input_files(str(good_png(tmp_path)))
    page.locator("#img2img_image img").first.wait_for(timeout=15_000)
    page.wait_for_timeout(1500)  # time for a (wrong) refusal to arrive
    assert image_shown(page, "img2img_image") and page.locator(TOAST).count() == 0


@pytest.mark.parametrize("kind, says", [("corrupt", "not a readable image"), ("eps", "EPS files are not accepted")])
def test_png_info_and_mask_uploads_are_refused_at_once(page, bad_files, kind, says):
    open_tab(page, "PNG Info")
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(bad_files[kind]))
    expect_refusal(page, says)
    assert "/tmp" not in page.locator("#pnginfo_summary").inner_text()

    open_tab(page, "Inpaint")
    page.get_by_text("Upload a mask instead (white = repaint)").first.click()
    page.locator("#inpaint_mask_upload input[type=file]").set_input_files(str(bad_files[kind]))
    expect_refusal(page, "Mask: ")


def test_a_controlnet_unit_refuses_an_eps_at_once(page, bad_files):
    page.locator("#txt2img_controlnet").get_by_text("ControlNet").first.click()
    page.locator("#txt2img_controlnet_0_image input[type=file]").set_input_files(str(bad_files["eps"]))
    assert "Control image" in expect_refusal(page, "EPS files are not accepted")
    assert not page.locator("#txt2img_controlnet_0_enabled input[type=checkbox]").is_checked()  # a refused upload does not turn the unit on


def test_a_good_controlnet_upload_still_turns_its_unit_on(page, tmp_path):
    page.locator("#txt2img_controlnet").get_by_text("ControlNet").first.click()
    page.locator("#txt2img_controlnet_0_image input[type=file]").set_input_files(str(good_png(tmp_path)))
    page.wait_for_function("() => document.querySelector('#txt2img_controlnet_0_enabled input[type=checkbox]').checked", timeout=15_000)
    assert page.locator(TOAST).count() == 0
