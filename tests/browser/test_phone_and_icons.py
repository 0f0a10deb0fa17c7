"""The studio on a phone, and its small icon buttons on a machine without an emoji font.

On a 390×844 screen the preview and results must sit right under Generate (not
3,000 px below it), the model name must read as a name, and every tab must be
reachable. The 🔄 / 🎲 / ♻️ style buttons must draw with ordinary fonts (this CI
Chromium has no emoji font: DejaVu and Liberation only) and say what they do.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/_ui_fixtures.py

import pytest  # noqa: E402

from _pages import CHROMIUM, open_app  # noqa: E402

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"),
]

PHONE = {"width": 390, "height": 844}
TABS = {"txt2img": "tab_txt2img", "img2img": "tab_img2img", "Inpaint": "tab_inpaint", "Extras": "tab_extras",
        "PNG Info": "tab_pnginfo",
        "Gallery": "tab_gallery", "Extensions": "tab_extensions", "Settings": "tab_settings"}
ICON_BUTTONS = ("model_refresh", "txt2img_seed_random", "txt2img_seed_reuse", "txt2img_subseed_random", "txt2img_subseed_reuse",
                "txt2img_swap_size")

# Whether the button's text draws as a real glyph: compared with a code point no font has, which draws as the
# missing-glyph box (or nothing), and checked for emoji, which need an emoji font.
GLYPH_JS = """
(button) => {
  const text = button.innerText.trim();
  const canvas = document.createElement('canvas');
  canvas.width = canvas.height = 48;
  const context = canvas.getContext('2d');
  context.font = `32px ${getComputedStyle(button).fontFamily}`;
  const draw = (s) => { context.clearRect(0, 0, 48, 48); context.fillText(s, 4, 38);
                        return context.getImageData(0, 0, 48, 48).data.join(','); };
  const glyph = draw(text);
  return {text, emoji: /\\p{Emoji_Presentation}|\\uFE0F/u.test(text), missing: glyph === draw('\\u{10FFFD}') || glyph === draw('')};
}
"""


@pytest.fixture
def phone(browser, server_url):
    context = browser.new_context(viewport=PHONE, device_scale_factor=1, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    open_app(page, server_url)
    yield page
    context.close()


def test_on_a_phone_the_preview_and_results_come_right_under_generate(phone):
    generate = phone.locator("#txt2img_generate").bounding_box()
    preview = phone.locator("#txt2img_preview").bounding_box()
    gallery = phone.locator("#txt2img_gallery").bounding_box()
    settings = phone.locator("#txt2img_steps").bounding_box()
    assert 0 < preview["y"] - generate["y"] <= PHONE["height"], f"Generate at {generate}, preview at {preview}"
    assert preview["y"] < gallery["y"] < settings["y"], "preview, then results, then the settings"


def test_on_a_phone_the_model_name_reads_as_a_name(phone):
    name = phone.locator("#model_status strong").first
    box = name.bounding_box()
    line = float(name.evaluate("(el) => parseFloat(getComputedStyle(el).lineHeight) || parseFloat(getComputedStyle(el).fontSize) * 1.5"))
    # a name wrapped letter by letter is as many lines tall as it has letters; the tests' model name fits on one line
    assert box["height"] <= 1.5 * line, f"the model name is squeezed: {box}, line height {line}"
    dropdown = phone.locator("#model_dropdown input").first
    shown = dropdown.evaluate("(el) => ({width: el.clientWidth, needed: el.scrollWidth})")
    assert shown["needed"] <= shown["width"] + 1, f"the model dropdown cuts the name off: {shown}"


def test_on_a_phone_every_tab_is_visible_and_opens(phone):
    for label, panel in TABS.items():
        tab = phone.get_by_role("tab", name=label, exact=True)
        assert tab.is_visible(), f"the {label} tab is hidden (behind a menu?)"
        box = tab.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], f"the {label} tab is off screen: {box}"
        tab.click()
        phone.locator(f"#{panel}").wait_for(state="visible")


def test_there_is_one_settings_the_tab(page):
    page.locator("footer").first.wait_for(state="attached")
    assert page.locator("footer").get_by_text("Settings").count() == 0, "Gradio's footer still offers its own Settings"
    assert page.get_by_role("tab", name="Settings", exact=True).is_visible()


def test_icon_buttons_draw_without_an_emoji_font_and_say_what_they_do(page):
    page.locator("#txt2img_variation").get_by_text("Variation seed").first.click()  # opens the accordion with the subseed row
    for elem_id in ICON_BUTTONS:
        button = page.locator(f"#{elem_id}")
        button.wait_for(state="visible")
        page.wait_for_function("(id) => document.getElementById(id).getAttribute('aria-label')", arg=elem_id, timeout=10_000)
        name, title = button.get_attribute("aria-label"), button.get_attribute("title")
        assert name and len(name) > 3 and title == name, f"#{elem_id}: aria-label {name!r}, title {title!r}"
        assert page.get_by_role("button", name=name, exact=True).count() >= 1  # the browser computes that accessible name
        glyph = button.evaluate(GLYPH_JS)
        assert not glyph["emoji"] and not glyph["missing"], f"#{elem_id} draws {glyph['text']!r} as an empty box or an emoji"
