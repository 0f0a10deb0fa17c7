"""In a real browser: the extra-networks browser finds a LoRA by search, a click puts its tag at the prompt's
cursor, Generate applies it (the picture's infotext names it with its hash), and the card's notes change the tag."""
from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/_ui_fixtures.py, tests/_lora_files.py

import _ui_fixtures as fx  # noqa: E402

import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from _pages import CHROMIUM, generate, set_number, text_of, type_text, watch  # noqa: E402

from engine.tiny_models import build_sd1  # noqa: E402

LORA_NAME = "browser-lora"
SECOND_MODEL = "zz-second"  # after the tiny model in name order, so the tiny model stays the default
pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def lora_path(tmp_path_factory):
    return tmp_path_factory.mktemp("extra-networks-studio")


@pytest.fixture(scope="module")
def studio(lora_path):
    """The tiny model with one kohya LoRA for it (with training notes and a preview) and a decoy LoRA."""
    import _lora_files as lora_files

    studio = fx.make_studio(lora_path)
    folder = lora_path / "models" / "Lora" / "characters"
    folder.mkdir(parents=True)
    path = folder / f"{LORA_NAME}.safetensors"
    tensors = lora_files.kohya_lora(studio.registry.load(fx.MODEL_NAME).pipeline, path, seed=3)
    save_file(tensors, str(path), metadata={"ss_output_name": LORA_NAME, "ss_base_model_version": "sd_v1",
                                            "ss_tag_frequency": json.dumps({"1_x": {"sparkle": 9, "hat": 2}})})
    Image.new("RGB", (48, 48), (20, 160, 60)).save(folder / f"{LORA_NAME}.preview.png")
    lora_files.kohya_lora(studio.registry.load(fx.MODEL_NAME).pipeline, lora_path / "models" / "Lora" / "decoy.safetensors")
    studio.engine.networks.refresh()
    build_sd1(lora_path / "models" / "Stable-diffusion" / SECOND_MODEL, seed=5)  # for the checkpoint cards
    studio.registry.refresh()
    return studio


@pytest.fixture(scope="module")
def server_url(studio):
    with fx.running_server(studio) as url:
        yield url


def a1111_short_hash(path: Path) -> str:
    """A1111's LoRA hash, computed here from the format: SHA-256 of the bytes after the safetensors header, 12 digits."""
    data = path.read_bytes()
    header_length = struct.unpack("<Q", data[:8])[0]
    return hashlib.sha256(data[8 + header_length:]).hexdigest()[:12]


def open_panel(page, mode: str) -> None:
    page.locator(f"#{mode}_extra_networks").get_by_text("Extra networks", exact=False).first.click()


def test_a_lora_card_inserts_its_tag_at_the_cursor_and_generate_applies_it(page, lora_path):
    cards = page.locator("#txt2img_extra_cards_lora .sfumato-card")
    open_panel(page, "txt2img")
    page.wait_for_function("() => document.querySelectorAll('#txt2img_extra_cards_lora .sfumato-card').length === 2")

    type_text(page, "txt2img_extra_search", "sparkle")  # a trigger word from the training notes
    page.wait_for_function("() => document.querySelectorAll('#txt2img_extra_cards_lora .sfumato-card').length === 1")
    card = cards.first
    assert card.get_attribute("data-key") == f"lora:{LORA_NAME}"
    assert "base: sd_v1" in card.inner_text() and "trigger: sparkle, hat" in card.inner_text()
    assert card.locator("img").get_attribute("src").startswith("data:image/jpeg;base64,")  # the preview, not a placeholder

    type_text(page, "txt2img_prompt", "a red circle on a blue background")
    page.evaluate("() => { const box = document.querySelector('#txt2img_prompt textarea'); box.focus();"
                  " box.setSelectionRange(12, 12); }")  # the cursor after "a red circle"
    card.locator(".sfumato-card-name").click()
    expected = f"a red circle <lora:{LORA_NAME}:1> on a blue background"
    page.wait_for_function("(text) => document.querySelector('#txt2img_prompt textarea').value === text", arg=expected)

    set_number(page, "txt2img_steps", 3)
    for side in ("width", "height"):
        set_number(page, f"txt2img_{side}", fx.SIZE)
    watch(page, "txt2img")
    assert generate(page, "txt2img").startswith("Done: 1 image")
    infotext = text_of(page, "txt2img_infotext")
    path = lora_path / "models" / "Lora" / "characters" / f"{LORA_NAME}.safetensors"
    assert f'Lora hashes: "{LORA_NAME}: {a1111_short_hash(path)}"' in infotext
    assert f"<lora:{LORA_NAME}:1>" in infotext  # the prompt as the artist wrote it

    # The card's notes: a preferred weight and activation text, written beside the file in A1111's format.
    card.locator(".sfumato-card-edit").click()
    page.locator("#txt2img_extra_save").wait_for(state="visible")
    set_number(page, "txt2img_extra_weight", 0.5)
    type_text(page, "txt2img_extra_activation", "sparkle")
    page.locator("#txt2img_extra_save").click()
    page.locator("#txt2img_extra_save").wait_for(state="hidden")
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert (sidecar["preferred weight"], sidecar["activation text"]) == (0.5, "sparkle")
    page.wait_for_function("() => document.querySelector('#txt2img_extra_cards_lora .sfumato-card')"
                           "?.dataset.insert === '<lora:browser-lora:0.5> sparkle'")
    type_text(page, "txt2img_prompt", "")
    cards.first.locator(".sfumato-card-name").click()
    page.wait_for_function("(text) => document.querySelector('#txt2img_prompt textarea').value === text",
                           arg=f"<lora:{LORA_NAME}:0.5> sparkle")


def test_a_checkpoint_card_loads_its_model(page):
    page.get_by_role("tab", name="img2img", exact=True).click()
    open_panel(page, "img2img")
    page.locator("#img2img_extra_tabs").get_by_role("tab", name="Checkpoints").click()
    page.locator(f'#img2img_extra_cards_checkpoint .sfumato-card[data-key="checkpoint:{SECOND_MODEL}"]').click()
    page.locator("#model_status", has_text=f"Model {SECOND_MODEL}").wait_for(timeout=120_000)
    assert page.locator("#model_dropdown input").first.input_value() == SECOND_MODEL
