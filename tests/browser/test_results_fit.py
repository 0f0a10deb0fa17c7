"""The results gallery shows every picture whole, at any count and aspect.

Gradio draws each gallery tile as a square as wide as its column; a single result
became a 635-px tile inside a 300-px box, showing only its top half. Here each
picture's drawn rectangle (after object-fit) must lie inside its tile, the tile
inside the gallery's visible box.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/_ui_fixtures.py

import pytest  # noqa: E402

from _pages import generate, set_number, watch  # noqa: E402
from _pages import CHROMIUM  # noqa: E402

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(420),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"),
]

# count -> (batch count, batch size); a batch holds at most 8 images
BATCHES = {1: (1, 1), 2: (1, 2), 4: (1, 4), 9: (3, 3)}
ASPECTS = {"square": (64, 64), "landscape 2:1": (128, 64), "portrait 1:2": (64, 128)}
TOLERANCE_PX = 1.0

# Where each result is drawn: its <img> box, and inside it the picture as object-fit places it.
DRAWN_JS = """
(id) => {
  const gallery = document.getElementById(id);
  const rect = (r) => ({left: r.left, top: r.top, right: r.right, bottom: r.bottom});
  const wrap = gallery.querySelector('.grid-wrap');
  return {
    gallery: rect(gallery.getBoundingClientRect()),
    visible: rect(wrap.getBoundingClientRect()),
    pictures: Array.from(gallery.querySelectorAll('.grid-container img')).map((img) => {
      const box = img.getBoundingClientRect();
      const fit = getComputedStyle(img).objectFit;
      const [w, h] = [img.naturalWidth, img.naturalHeight];
      const scale = fit === 'cover' ? Math.max(box.width / w, box.height / h)
                  : fit === 'none' ? 1 : Math.min(box.width / w, box.height / h);
      const [dw, dh] = fit === 'fill' ? [box.width, box.height] : [w * scale, h * scale];
      const left = box.left + (box.width - dw) / 2, top = box.top + (box.height - dh) / 2;
      return {fit, natural: [w, h], box: rect(box), drawn: {left, top, right: left + dw, bottom: top + dh}};
    }),
  };
}
"""


def _inside(inner: dict, outer: dict) -> bool:
    return (inner["left"] >= outer["left"] - TOLERANCE_PX and inner["top"] >= outer["top"] - TOLERANCE_PX
            and inner["right"] <= outer["right"] + TOLERANCE_PX and inner["bottom"] <= outer["bottom"] + TOLERANCE_PX)


def _generate(page, count: int, size: tuple[int, int]) -> None:
    batch_count, batch_size = BATCHES[count]
    for name, value in (("steps", 1), ("width", size[0]), ("height", size[1]), ("batch_count", batch_count),
                        ("batch_size", batch_size)):
        set_number(page, f"txt2img_{name}", value)
    assert generate(page, "txt2img").startswith(f"Done: {count} image")
    page.wait_for_function(
        """(count) => { const imgs = document.querySelectorAll('#txt2img_gallery .grid-container img');
                        return imgs.length === count && Array.from(imgs).every(i => i.complete && i.naturalWidth > 0); }""",
        arg=count)
    page.wait_for_timeout(200)  # let the grid settle after the last picture decoded


@pytest.mark.parametrize("aspect", list(ASPECTS))
def test_every_result_is_shown_whole_inside_the_gallery(page, aspect):
    width, height = ASPECTS[aspect]
    watch(page, "txt2img")
    page.locator("#txt2img_gallery").scroll_into_view_if_needed()
    for count in BATCHES:
        _generate(page, count, (width, height))
        layout = page.evaluate(DRAWN_JS, "txt2img_gallery")
        assert len(layout["pictures"]) == count
        for index, picture in enumerate(layout["pictures"]):
            where = f"{aspect}, {count} result(s), picture {index + 1}: {picture}, gallery {layout['gallery']}"
            assert picture["natural"] == [width, height], where
            assert picture["fit"] in ("contain", "scale-down"), f"the picture is cropped or stretched: {where}"
            assert _inside(picture["drawn"], picture["box"]), f"the picture overflows its tile: {where}"
            assert _inside(picture["box"], layout["visible"]) and _inside(picture["box"], layout["gallery"]), (
                f"the tile is not fully visible in the gallery: {where}")
        if count == 1:
            drawn = layout["pictures"][0]["drawn"]
            short_side = min(drawn["right"] - drawn["left"], drawn["bottom"] - drawn["top"])
            assert short_side >= 150, f"a single result should be shown large, not as a thumbnail: {drawn}"
