"""Playwright helpers for driving the Sfumato UI like an artist would (Gradio 6 DOM)."""
from __future__ import annotations

import io
import urllib.request
from pathlib import Path

from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
# The flags CI's Chromium needs: no sandbox as root, no GPU, and no calls home on a closed network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

FINISHED = ("Done", "Interrupted", "Failed", "Not started")

# One ordered log per page of what the artist would see change: previews, progress text, results.
WATCH_JS = """
(mode) => {
  window.__events = window.__events || {};
  const log = window.__events[mode] = [];
  const watch = (id, kind, read) => {
    const el = document.getElementById(id);
    let last = read(el);
    new MutationObserver(() => {
      const now = read(el);
      if (now !== last) { last = now; log.push([kind, now, performance.now()]); }
    }).observe(el, {subtree: true, childList: true, characterData: true, attributes: true, attributeFilter: ['src']});
  };
  watch(mode + '_preview', 'preview', el => { const img = el.querySelector('img'); return img ? img.src : ''; });
  // only the Markdown's own text: Gradio's status tracker (timers, "queue: 1/1") lives beside it in the same block
  watch(mode + '_progress', 'progress', el => (el.querySelector('[data-testid="markdown"]') || el).innerText.trim());
  watch(mode + '_gallery', 'gallery', el => Array.from(el.querySelectorAll('img')).map(i => i.src).join(' '));
}
"""


def new_desktop_page(browser, url: str):
    """A fresh browser context at a desktop size with the studio open; returns (context, page)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    open_app(page, url)
    return context, page


def open_app(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("#txt2img_generate", timeout=60_000)


def open_tab(page, tab_id: str) -> None:
    page.get_by_role("tab", name=tab_id, exact=True).click()


def set_number(page, elem_id: str, value) -> None:
    """Type into a slider's or number box's input, as a user would, and commit it."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def type_text(page, elem_id: str, text: str) -> None:
    page.locator(f"#{elem_id} :is(textarea, input)").first.fill(text)


def text_of(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} :is(textarea, input)").first.input_value()


def choose(page, elem_id: str, value: str) -> None:
    """Pick a dropdown option by its exact text."""
    page.locator(f"#{elem_id} input").first.click()
    page.locator(f'ul[role=listbox] li[role=option][aria-label="{value}"]').first.click()


def watch(page, mode: str) -> None:
    page.evaluate(WATCH_JS, mode)


def events(page, mode: str) -> list:
    return page.evaluate("(mode) => window.__events[mode]", mode)


def finished_count(page, mode: str) -> int:
    return sum(1 for kind, value, _ in events(page, mode) if kind == "progress" and value.split(":")[0] in FINISHED)


def wait_finished(page, mode: str, count: int, timeout: float = 90_000) -> str:
    page.wait_for_function(
        """([mode, count]) => window.__events[mode].filter(e => e[0] === 'progress' && /^(Done|Interrupted|Failed|Not started)/.test(e[1])).length >= count""",
        arg=[mode, count], timeout=timeout)
    return progress_text(page, mode)


def progress_text(page, mode: str) -> str:
    return page.locator(f"#{mode}_progress [data-testid=markdown]").inner_text().strip()


def generate(page, mode: str) -> str:
    before = finished_count(page, mode)
    page.locator(f"#{mode}_generate").click()
    return wait_finished(page, mode, before + 1)


def gallery_images(page, mode: str) -> list[str]:
    return page.locator(f"#{mode}_gallery img").evaluate_all("(imgs) => imgs.map(i => i.src)")


def fetch_image(url: str) -> tuple[Image.Image, bytes]:
    with urllib.request.urlopen(url, timeout=30) as response:
        data = response.read()
    image = Image.open(io.BytesIO(data))
    image.load()
    return image, data
