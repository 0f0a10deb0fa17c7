"""Screenshots of every tab of the studio for the README tour: ``python scripts/screenshots.py``.

Starts the real server on 127.0.0.1 (the default built-in demo model, or the untrained
placeholder when no model is there), drives it with Playwright
and Debian's chromium like an artist would (generate, send to img2img and
inpaint, paint a mask, read PNG Info, hires fix, an X/Y/Z plot, the Extras tab,
the extra-networks panel with a LoRA card) and writes ``docs/screenshots/<tab>.png``.
Outputs, settings and the LoRA the panel shows go to a temporary folder, never into the checkout.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
VIEWPORT = {"width": 1400, "height": 1000}
MAX_HEIGHT = 1700  # long tabs are cut here: the tour shows what greets the artist
PROMPT = "a large red circle on the left, blue background"
# The X/Y/Z shot: colours across, shapes down, so every cell of the demo model's world differs at a glance.
XYZ_AXES = (("Prompt S/R", "red, yellow, green"), ("Prompt S/R", "circle, square, triangle"))
# Hires. fix by a pixel upscaler at a moderate strength: the SD 1.x demo keeps its one shape at twice its size.
HIRES_UPSCALER, HIRES_DENOISING, HIRES_MODEL = "Lanczos", 0.45, "sfumato-demo"
FLOW_SHOT_MODEL = "flux1-dev"  # the flow shot's stand-in: a tiny random-weight Flux.1 dev folder
LORA_NAME = "sfumato-outline"  # the extra-networks shot shows the built-in demo LoRA's card (builtin/loras)


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def _markdown(page, elem_id: str):
    return page.locator(f"#{elem_id} [data-testid=markdown]")


def _wait_done(page, mode: str) -> None:
    _markdown(page, f"{mode}_progress").filter(has_text="Done").wait_for(timeout=180_000)


def _shoot(page, out: Path, name: str) -> Path:
    page.wait_for_timeout(600)
    height = min(MAX_HEIGHT, page.evaluate("() => document.documentElement.scrollHeight"))
    path = out / f"{name}.png"
    page.screenshot(path=str(path), full_page=True, clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": height})
    print(path)
    return path


def _choose(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} input").first.click()
    page.locator(f'ul[role=listbox] li[role=option][aria-label="{value}"]').first.click()


def _scroll_to(page, elem_id: str) -> None:
    """Bring a control to the top of the shot: the tour's pictures start where the feature is."""
    page.evaluate("(id) => window.scrollTo(0, document.getElementById(id).getBoundingClientRect().top"
                  " + window.scrollY - 16)", elem_id)


def _shoot_span(page, out: Path, name: str, top_id: str, bottom_id: str) -> Path:
    """The page's full width from one element's top to another's bottom: a feature and its result together."""
    page.wait_for_timeout(600)
    box = page.evaluate("""([top, bottom]) => {
        const y = id => document.getElementById(id).getBoundingClientRect();
        return [y(top).top + window.scrollY, y(bottom).bottom + window.scrollY];
    }""", [top_id, bottom_id])
    path = out / f"{name}.png"
    clip = {"x": 0, "y": max(0, box[0] - 16), "width": VIEWPORT["width"], "height": box[1] - box[0] + 32}
    page.screenshot(path=str(path), full_page=True, clip=clip)
    print(path)
    return path


def _generate_and_wait(page, mode: str) -> None:
    """Generate and wait for this run's result: the progress line still says "Done" from the run before."""
    gallery = f"#{mode}_gallery img"
    before = page.locator(gallery).first.get_attribute("src") if page.locator(gallery).count() else ""
    page.locator(f"#{mode}_generate").click()
    page.wait_for_function("""([selector, before]) => { const img = document.querySelector(selector);
        return img && img.src !== before; }""", arg=[gallery, before], timeout=180_000)
    _wait_done(page, mode)


def _shoot_view(page, out: Path, name: str) -> Path:
    """The viewport as scrolled (not the page from its top)."""
    page.wait_for_timeout(600)
    path = out / f"{name}.png"
    page.screenshot(path=str(path))
    print(path)
    return path


def _txt2img_page(browser, url: str, size: int | None, batch_size: int):
    """A fresh page on txt2img with the shots' prompt, seed 42, the batch size and (for large models) the size."""
    page = browser.new_context(viewport=VIEWPORT).new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.wait_for_selector("#txt2img_generate")
    page.locator("#txt2img_prompt textarea").fill(PROMPT)
    _set_number(page, "txt2img_seed", 42)
    _set_number(page, "txt2img_batch_size", batch_size)
    if size:
        for side in ("width", "height"):
            _set_number(page, f"txt2img_{side}", size)
    return page


def _pick_model(page, model: str, cfg: str) -> None:
    """Choose ``model`` in the model bar and wait until its pick has set its settings (read back as its CFG)."""
    _choose(page, "model_dropdown", model)
    page.wait_for_function("(cfg) => document.querySelector('#txt2img_cfg input[type=number]').value === cfg",
                           arg=cfg, timeout=120_000)
    page.wait_for_timeout(1500)


def take_features(browser, url: str, out: Path, size: int | None) -> list[Path]:
    """An X/Y/Z grid on the default model; hires fix with a result and the Extras tab with an upscaled picture on
    the SD 1.x demo (the flow demo draws at 64² only: twice that, it streaks at the borders); the extra-networks
    panel with a LoRA card. On a fresh page."""
    shots = []
    page = _txt2img_page(browser, url, size, batch_size=1)
    _choose(page, "txt2img_script", "X/Y/Z plot")
    page.locator("#txt2img_xyz").wait_for(state="visible")
    for letter, (axis, values) in zip("xy", XYZ_AXES):
        _choose(page, f"txt2img_xyz_{letter}_type", axis)
        page.locator(f"#txt2img_xyz_{letter}_values textarea, #txt2img_xyz_{letter}_values input").first.fill(values)
    _generate_and_wait(page, "txt2img")
    shots.append(_shoot_span(page, out, "xyz", "txt2img_preview", "txt2img_xyz"))
    _choose(page, "txt2img_script", "None")

    if size is None and (REPO / "builtin" / HIRES_MODEL / "model_index.json").is_file():
        _pick_model(page, HIRES_MODEL, cfg="7")
    _set_number(page, "txt2img_batch_size", 2)
    page.locator("#txt2img_hires").get_by_text("Hires. fix").first.click()
    page.locator("#txt2img_enable_hr input[type=checkbox]").check()
    _choose(page, "txt2img_hr_upscaler", HIRES_UPSCALER)
    _set_number(page, "txt2img_hr_scale", 2)
    _set_number(page, "txt2img_denoising_strength", HIRES_DENOISING)
    _generate_and_wait(page, "txt2img")
    shots.append(_shoot_span(page, out, "hires", "txt2img_preview", "txt2img_hires"))
    hires_png = page.locator("#txt2img_gallery img").first.get_attribute("src")
    page.locator("#txt2img_enable_hr input[type=checkbox]").uncheck()
    page.locator("#txt2img_hires").get_by_text("Hires. fix").first.click()  # closed again

    with urllib.request.urlopen(hires_png, timeout=30) as response, tempfile.TemporaryDirectory() as folder:
        image = Path(folder) / "hires.png"
        image.write_bytes(response.read())
        page.get_by_role("tab", name="Extras", exact=True).click()
        page.locator("#extras_image input[type=file]").set_input_files(str(image))
        page.locator("#extras_image img").first.wait_for()
    _choose(page, "extras_upscaler_1", "Lanczos")
    _set_number(page, "extras_upscaling_resize", 2)
    page.locator("#extras_generate").click()
    page.locator("#extras_gallery img").first.wait_for(timeout=120_000)
    shots.append(_shoot(page, out, "extras"))

    page.get_by_role("tab", name="txt2img", exact=True).click()
    page.locator("#txt2img_extra_networks").get_by_text("Extra networks", exact=False).first.click()
    page.locator(f'#txt2img_extra_cards_lora .sfumato-card[data-key="lora:{LORA_NAME}"]').wait_for()
    _scroll_to(page, "txt2img_extra_networks")
    shots.append(_shoot_view(page, out, "extra_networks"))
    page.context.close()
    return shots


def take(url: str, out: Path, size: int | None) -> list[Path]:
    from playwright.sync_api import sync_playwright

    shots = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = _txt2img_page(browser, url, size, batch_size=4)
        page.locator("#txt2img_generate").click()
        _wait_done(page, "txt2img")
        shots.append(_shoot(page, out, "txt2img"))
        source = page.locator("#txt2img_gallery img").first.get_attribute("src")
        with urllib.request.urlopen(source, timeout=30) as response:
            png = response.read()

        page.locator("#txt2img_send_to_img2img").click()
        page.locator("#img2img_image img").first.wait_for()
        shots.append(_shoot(page, out, "img2img"))

        page.get_by_role("tab", name="txt2img", exact=True).click()
        page.locator("#txt2img_send_to_inpaint").click()
        canvas = page.locator("#inpaint_editor canvas").first
        canvas.wait_for()
        page.wait_for_timeout(1500)
        canvas.scroll_into_view_if_needed()
        page.wait_for_timeout(800)  # the model bar and hint settle (a flow model's is taller): measure after
        box = canvas.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(x - 50, y - 20)
        page.mouse.down()
        page.mouse.move(x + 50, y + 20, steps=4)
        page.mouse.up()
        page.evaluate("() => window.scrollTo(0, 0)")
        shots.append(_shoot(page, out, "inpaint"))

        with tempfile.TemporaryDirectory() as folder:
            image = Path(folder) / "generated.png"
            image.write_bytes(png)
            page.get_by_role("tab", name="PNG Info", exact=True).click()
            page.locator("#pnginfo_image input[type=file]").set_input_files(str(image))
            page.wait_for_function("() => document.querySelector('#pnginfo_infotext textarea').value.includes('Seed:')")
            shots.append(_shoot(page, out, "pnginfo"))

        page.get_by_role("tab", name="Gallery", exact=True).click()
        page.locator("#session_gallery img").first.wait_for()
        page.get_by_text("Outputs folder").first.click()
        page.locator("#outputs_show").click()
        page.locator("#outputs_gallery img").first.wait_for()
        shots.append(_shoot(page, out, "gallery"))

        for tab, name in (("Extensions", "extensions"), ("Settings", "settings")):
            page.get_by_role("tab", name=tab, exact=True).click()
            shots.append(_shoot(page, out, name))
        shots += take_features(browser, url, out, size)
        browser.close()
    return shots


def take_flow_model_bar(studio_for, out: Path) -> Path:
    """The model bar and txt2img settings with a Flux.1 dev model picked: the family beside the model, the VAE / Text
    Encoder picker, Distilled CFG and Shift shown, Clip skip gone. A tiny random-weight Flux.1 dev folder stands in
    (the shot shows controls, not a picture), on its own server so the tour's other shots keep the demo model."""
    from playwright.sync_api import sync_playwright

    from tests._flux_fixture import build_folder
    from ui.server import serve

    with tempfile.TemporaryDirectory(prefix="sfumato-flow-shot-") as scratch:
        folder = build_folder(Path(scratch) / "models" / "Stable-diffusion" / FLOW_SHOT_MODEL, "dev")
        (folder / "sfumato.json").write_text('{"native_width": 1024, "native_height": 1024}')  # Flux.1's own size
        handle = serve(studio_for(Path(scratch)), host="127.0.0.1", port=0, block=False)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_context(viewport=VIEWPORT).new_page()
                page.set_default_timeout(60_000)
                page.goto(handle.url)
                page.wait_for_selector("#txt2img_generate")
                _choose(page, "model_dropdown", FLOW_SHOT_MODEL)
                page.locator("#txt2img_distilled_cfg").first.wait_for(state="visible")
                page.wait_for_function(  # loaded: the family's settings are in (CFG 1) and no control is queued
                    "() => document.querySelector('#txt2img_cfg input[type=number]').value.startsWith('1')"
                    "", timeout=120_000)
                page.wait_for_timeout(1500)
                page.locator("#txt2img_prompt textarea").fill(PROMPT)
                shot = _shoot_span(page, out, "flow_models", "model_row", "txt2img_shift")
                browser.close()
        finally:
            handle.stop()
    return shot


def take_demo(studio_for, out: Path, model: str, name: str, cfg: str) -> Path | None:
    """txt2img on one built-in demo model: a batch of four pictures with the settings its pick applies (the flow demo:
    its card's Euler, Simple, 20 steps and CFG 3, and the Shift field; the SD 1.x demo: A1111's DPM++ 2M and CFG 7, and
    Clip skip), the demo hint and the model bar. ``cfg``: the CFG the model's pick sets, read back before generating."""
    from playwright.sync_api import sync_playwright

    from ui.server import serve

    if not (REPO / "builtin" / model / "sfumato.json").is_file():
        return None
    with tempfile.TemporaryDirectory(prefix="sfumato-demo-shot-") as scratch:
        handle = serve(studio_for(Path(scratch)), host="127.0.0.1", port=0, block=False)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = _txt2img_page(browser, handle.url, None, batch_size=4)
                if page.locator("#model_dropdown input").first.input_value() != model:  # the default needs no pick
                    _pick_model(page, model, cfg)
                _generate_and_wait(page, "txt2img")
                shot = _shoot_span(page, out, name, "model_row", "txt2img_gallery")
                browser.close()
        finally:
            handle.stop()
    return shot


def take_demos(studio_for, out: Path) -> None:
    """The demo section's two shots: the flow demo (the default) and the SD 1.x demo."""
    take_demo(studio_for, out, "sfumato-demo-flow", "flow_demo", cfg="3")
    take_demo(studio_for, out, "sfumato-demo", "sd1_demo", cfg="7")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots", help="folder for the PNGs")
    parser.add_argument("--models-dir", type=Path, default=None, help="an A1111-style models folder (default: built-in models only)")
    parser.add_argument("--only-flow", action="store_true",
                        help="only the model shots (flow_models.png, flow_demo.png, sd1_demo.png)")
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"needs chromium at {CHROMIUM} (apt-get install chromium)", file=sys.stderr)
        return 2

    from engine.studio import Studio, StudioConfig
    from ui.model_info import native_size
    from ui.server import serve

    def studio_for(scratch: Path, models_dir: Path | None = None) -> Studio:
        return Studio(StudioConfig(
            models_dir=models_dir or scratch / "models", outputs_dir=scratch / "outputs", user_dir=scratch / "user",
            extensions_dir=REPO / "extensions", presets_dir=REPO / "presets", builtin_models_dir=REPO / "builtin",
        ))

    args.out.mkdir(parents=True, exist_ok=True)
    if args.only_flow:
        take_flow_model_bar(studio_for, args.out)
        take_demos(studio_for, args.out)
        return 0
    with tempfile.TemporaryDirectory(prefix="sfumato-shots-") as scratch:
        scratch = Path(scratch)
        studio = studio_for(scratch, args.models_dir)
        width, _ = native_size(studio, studio.default_model())
        size = 64 if width > 256 else None  # the untrained placeholder is SD1-sized; keep its run short
        handle = serve(studio, host="127.0.0.1", port=0, block=False)
        try:
            take(handle.url, args.out, size)
        finally:
            handle.stop()
    take_flow_model_bar(studio_for, args.out)
    take_demos(studio_for, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
