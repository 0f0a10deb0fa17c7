"""In a real browser: an interrupted or skipped image is shown as such and not saved, the demo model explains
itself, and outpainting previews its mask and keeps the picture when the mask is cleared."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/_ui_fixtures.py

import _ui_fixtures as fx  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from _pages import CHROMIUM, choose, events, fetch_image, gallery_images, open_tab, set_number, text_of, wait_finished, watch  # noqa: E402
from test_browser import paint_until_mask_previewed, upload_to_editor  # noqa: E402

DEMO_MODEL = "sfumato-demo"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """The tiny model (the default: a user model) beside the shipped demo model."""
    from engine.studio import Studio

    base = fx.make_studio(tmp_path_factory.mktemp("interrupts-studio"))
    config = base.config
    config.builtin_models_dir = fx.REPO / "builtin"
    return Studio(config)


@pytest.fixture(scope="module")
def server_url(studio):
    with fx.running_server(studio) as url:
        yield url




def _long_run(page, steps: int, count: int) -> None:
    set_number(page, "txt2img_steps", steps)
    set_number(page, "txt2img_batch_count", count)
    for side in ("width", "height"):
        set_number(page, f"txt2img_{side}", fx.SIZE)


def _preview_src(page, mode: str) -> str:
    images = page.locator(f"#{mode}_preview img")
    return images.first.get_attribute("src") if images.count() else ""


def _saved_pngs(studio) -> list[Path]:
    return sorted(Path(studio.config.outputs_dir).rglob("*.png"))


def test_an_interrupted_image_is_shown_as_interrupted_and_not_saved(page, studio):
    saved_before = _saved_pngs(studio)
    _long_run(page, 150, 1)
    watch(page, "txt2img")
    page.locator("#txt2img_generate").click()
    page.locator("#txt2img_progress [data-testid=markdown]", has_text="Step ").wait_for()
    page.locator("#txt2img_interrupt").click()
    text = wait_finished(page, "txt2img", 1, timeout=60_000)

    assert text.startswith("Interrupted: 1 image") and "image 1 interrupted at step " in text, text
    assert "Interrupted at step " in page.locator("#txt2img_gallery").inner_text()  # the caption under the picture
    assert "Not saved: interrupted at step" in page.locator("#txt2img_saved").inner_text()
    infotext = text_of(page, "txt2img_infotext")
    assert "Steps: 150," in infotext and "Interrupted at step: " in infotext
    assert _saved_pngs(studio) == saved_before  # the setting is off by default
    assert _preview_src(page, "txt2img") == ""  # the noise it stopped at is not left in the live preview


def test_after_skip_the_preview_shows_the_next_image_not_the_skipped_noise(page):
    _long_run(page, 100, 2)
    watch(page, "txt2img")
    page.locator("#txt2img_generate").click()
    page.locator("#txt2img_progress [data-testid=markdown]", has_text="Image 1/2 · Step ").wait_for()
    page.locator("#txt2img_skip").click()
    text = wait_finished(page, "txt2img", 1, timeout=90_000)
    assert text.startswith("Done: 2 images") and "image 1 skipped at step " in text, text

    log = events(page, "txt2img")
    final_preview = next(value for kind, value, _ in reversed(log) if kind == "preview" and value)
    at_next_image = next(index for index, (kind, value, _) in enumerate(log) if kind == "progress" and value.startswith("Image 2/2"))
    last_before = [value for kind, value, _ in log[:at_next_image] if kind == "preview"]
    first_after = next(value for kind, value, _ in log[at_next_image:] if kind == "preview")
    assert first_after != (last_before[-1] if last_before else None)  # cleared or the next image's own preview

    shown, _ = fetch_image(final_preview)  # what the preview ends on
    skipped, finished = (np.asarray(fetch_image(url)[0].convert("RGB"), dtype=np.float32) for url in gallery_images(page, "txt2img"))
    shown = np.asarray(shown.convert("RGB").resize((finished.shape[1], finished.shape[0])), dtype=np.float32)
    assert np.abs(shown - finished).mean() < np.abs(shown - skipped).mean() / 2


def test_the_demo_model_explains_itself_and_its_examples_fill_the_prompt(page):
    hint = page.locator("#demo_hint")
    assert not hint.is_visible()  # the tiny user model is selected
    choose(page, "model_dropdown", DEMO_MODEL)
    page.locator("#demo_hint_text", has_text="Demo model").wait_for()
    line = page.locator("#demo_hint_text").inner_text()
    for fact in ("circle", "square", "triangle", "purple", "on the left", "64×64", "Stable-diffusion"):
        assert fact in line
    examples = [page.locator(f"#demo_example_{index}") for index in range(3)]
    prompts = [button.inner_text().strip() for button in examples]
    assert len(set(prompts)) == 3 and all(prompt.startswith("a ") for prompt in prompts)

    open_tab(page, "img2img")
    examples[1].click()
    page.wait_for_function("(text) => document.querySelector('#txt2img_prompt textarea').value === text", arg=prompts[1])
    assert page.locator("#txt2img_prompt textarea").is_visible()  # it took the artist to txt2img

    choose(page, "model_dropdown", fx.MODEL_NAME)
    hint.wait_for(state="hidden")


def test_outpainting_alone_previews_its_mask_and_the_trash_button_keeps_the_picture(page, tmp_path):
    source = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(source).save(tmp_path / "source.png")
    open_tab(page, "Inpaint")
    upload_to_editor(page, tmp_path / "source.png")
    page.get_by_text("Preview the effective mask").first.click()
    preview = paint_until_mask_previewed(page)
    with_stroke = preview.first.get_attribute("src")
    # the editor's trash button; the cleared editor comes back from the server as its own event, so wait for it
    with page.expect_response(lambda response: response.request.method == "POST"):
        page.locator('#inpaint_editor button[aria-label="Clear canvas"]').click()
    page.wait_for_timeout(300)  # the page applies the cleared value

    page.get_by_text("Outpainting: extend the canvas").first.click()
    set_number(page, "inpaint_outpaint_right", 16)
    # Under load the typed width, or the cleared editor, can reach the page's state just after the click: press again
    # (each press must bring a new preview). A trash button that does not clear fails every press.
    old = with_stroke
    for attempt in range(4):
        page.locator("#inpaint_preview_mask").click()
        try:
            page.wait_for_function("(old) => { const img = document.querySelector('#inpaint_mask_preview img'); return img && img.src !== old; }",
                                   arg=old, timeout=15_000)
        except Exception:  # noqa: BLE001 - no new preview yet: press again
            if attempt == 3:
                raise
            continue
        old = preview.first.get_attribute("src")
        shown, _ = fetch_image(old)
        shown = np.asarray(shown.convert("RGB"))
        if shown.shape == (64, 80, 3) and np.array_equal(shown[:, :64], source):
            break
        page.wait_for_timeout(500)
    assert shown.shape == (64, 80, 3)
    assert np.array_equal(shown[:, :64], source)  # the picture is still there, and the cleared stroke repaints nothing
    assert (shown[:, 72:, 0] > shown[:, 72:, 1]).all()  # the new strip is marked red

    page.locator("#inpaint_remove_image").click()  # the one action that removes the picture
    page.locator("#inpaint_editor", has_text="Upload an image").wait_for()
