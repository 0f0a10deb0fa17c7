"""Every image component of the studio carries its pixels losslessly; only the live preview may be cheap.

Gradio's image components default to lossy WebP, and a picture that goes to the browser
and comes back through one of them (a result sent to img2img or inpaint) loses most of its
pixels' exact values. The browser test ``tests/browser/test_send_to_lossless.py`` follows a
picture through the tabs; this one checks every component, ControlNet's included, at once.
"""
from __future__ import annotations

import _ui_fixtures as fx  # noqa: E402  (sets the offline / thread environment first)

import gradio as gr
import pytest

from ui.image_formats import LOSSLESS, PREVIEW

pytestmark = pytest.mark.timeout(300)

PIXEL_COMPONENTS = (gr.Image, gr.ImageEditor, gr.Gallery)
LIVE_PREVIEWS = {f"{mode}_preview" for mode in ("txt2img", "img2img", "inpaint")}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from ui.app import build_app

    if not (fx.REPO / "extensions" / "controlnet" / "__init__.py").is_file():
        pytest.skip("extensions/controlnet is not present")
    return build_app(fx.make_studio(tmp_path_factory.mktemp("formats"), extensions_dir=fx.REPO / "extensions"))


def _pixel_components(app) -> list:
    return [block for block in app.blocks.values() if isinstance(block, PIXEL_COMPONENTS)]


def test_every_image_component_but_the_live_preview_is_lossless(app):
    components = _pixel_components(app)
    lossy = [(type(block).__name__, block.elem_id, block.format) for block in components
             if block.elem_id not in LIVE_PREVIEWS and block.format != LOSSLESS]
    assert not lossy, f"these image components would re-encode pictures lossily: {lossy}"
    ids = {block.elem_id for block in components}
    assert {"img2img_image", "inpaint_editor", "inpaint_mask_preview", "txt2img_gallery", "pnginfo_image",
            "txt2img_controlnet_0_image", "txt2img_controlnet_0_preview", "extras_image", "extras_gallery"} <= ids  # the walk saw what it must check


def test_the_live_preview_stays_cheap(app):
    previews = [block for block in _pixel_components(app) if block.elem_id in LIVE_PREVIEWS]
    assert len(previews) == len(LIVE_PREVIEWS) and all(block.format == PREVIEW for block in previews)
