"""The ControlNet Preprocessor dropdown in a real browser: which preprocessors cannot run is visible before choosing
one, Preview on one of them says why and how to fix it, and Refresh picks up weights placed while the app runs."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/_ui_fixtures.py

import _ui_fixtures as fx  # noqa: E402

import pytest  # noqa: E402

from _annotator_weights import write_random_weights  # noqa: E402

from _pages import CHROMIUM  # noqa: E402

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"),
]
UNIT = "txt2img_controlnet_0"


@pytest.fixture(scope="module")
def studio_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("controlnet-studio")


@pytest.fixture(scope="module")
def server_url(studio_root):
    studio = fx.make_studio(studio_root, extensions_dir=fx.REPO / "extensions")
    with fx.running_server(studio) as url:
        yield url


def options(page) -> list[str]:
    page.locator(f"#{UNIT}_module input").first.click()
    listbox = page.locator("ul[role=listbox] li[role=option]")
    listbox.first.wait_for()
    labels = [option.get_attribute("aria-label") or "" for option in listbox.all()]  # the text also holds a ✓ on the chosen one
    page.locator(f"#{UNIT}_module input").first.evaluate("input => input.blur()")  # closes the list; a later click opens it again
    return [label.strip() for label in labels]


def test_unavailable_preprocessors_are_marked_preview_says_why_and_refresh_sees_new_weights(page, studio_root):
    from extensions.controlnet import preprocessors

    page.locator("#txt2img_controlnet").get_by_text("ControlNet", exact=True).first.click()
    listed = options(page)
    assert len(listed) == 38
    assert "canny" in listed and "depth_midas (unavailable)" in listed and "softedge_hed (needs weights)" in listed

    box = page.locator(f"#{UNIT}_module input").first
    box.click()
    box.fill("")
    box.press_sequentially("softedge_hed")  # filter the long list, as an artist types to find one
    page.locator('ul[role=listbox] li[role=option][aria-label="softedge_hed (needs weights)"]').first.click()
    warning = page.locator(f"#{UNIT}_unavailable")
    warning.get_by_text("ControlNetHED.pth", exact=False).wait_for()
    page.locator(f"#{UNIT}_run_preview").click()
    toast = page.locator(".toast-body", has_text="softedge_hed is unavailable")
    toast.first.wait_for()
    message = toast.first.inner_text()
    assert "Fix: download ControlNetHED.pth" in message and "Traceback" not in message

    write_random_weights(preprocessors, studio_root / "models" / "annotators", "ControlNetHED.pth")
    page.locator("#txt2img_controlnet_refresh").click()
    page.wait_for_function(
        """(id) => { const input = document.querySelector('#' + id + ' input'); return input && input.value === 'softedge_hed'; }""",
        arg=f"{UNIT}_module")
    warning.wait_for(state="hidden")  # the note under the unit no longer asks for the file
    assert "softedge_hed" in options(page)
