"""The Extras tab's handler: single and batch uploads go through the engine and are saved, as the settings say."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from _upscaler_files import write_upscalers

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from engine.studio import Studio, StudioConfig

    root = tmp_path_factory.mktemp("extras-tab")
    write_upscalers(root / "models")
    return Studio(StudioConfig(models_dir=root / "models", outputs_dir=root / "outputs", user_dir=root / "user",
                               extensions_dir=root / "no-extensions", device="cpu", dtype="float32"))


def _upload(folder: Path, name: str, size=(20, 12), infotext: str | None = None) -> str:
    info = PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    path = folder / name
    Image.new("RGB", size, (10, 200, 90)).save(path, pnginfo=info)
    return str(path)


def test_single_image_is_upscaled_and_saved_with_its_infotext(studio, tmp_path):
    from engine.image_metadata import read_generation_info
    from ui.extras_tab import SINGLE, run_extras_tab

    source = _upload(tmp_path, "one.png", infotext="green\nSteps: 3, Seed: 9, Size: 20x12")
    items, info = run_extras_tab(studio, SINGLE, source, None, 0, 2, 512, 512, True, "2x-tiny-compact", "None", 0)
    [(path, _)] = items
    assert Path(path).is_file() and Path(path).is_relative_to(studio.config.outputs_dir)
    saved = read_generation_info(path)
    assert saved.size == (40, 24) and saved.infotext == "green\nSteps: 3, Seed: 9, Size: 20x12"
    assert "Postprocess upscale by: 2.0, Postprocess upscaler: 2x-tiny-compact" in info


def test_batch_is_scaled_to_the_size_with_the_file_names_as_captions(studio, tmp_path):
    from ui.extras_tab import BATCH, run_extras_tab

    files = [_upload(tmp_path, "a.png"), _upload(tmp_path, "b.png", size=(12, 20))]
    items, info = run_extras_tab(studio, BATCH, None, files, 1, 2, 64, 48, True, "Lanczos", "4x-tiny-esrgan", 0.25)
    assert [Image.open(path).size for path, _ in items] == [(64, 48), (64, 48)]
    assert [caption for _, caption in items] == ["a.png", "b.png"]
    assert "Postprocess upscaler 2: 4x-tiny-esrgan" in info


def test_nothing_to_upscale_is_a_message_not_a_crash(studio):
    import gradio as gr

    from ui.extras_tab import SINGLE, run_extras_tab

    with pytest.raises(gr.Error):
        run_extras_tab(studio, SINGLE, None, None, 0, 2, 512, 512, True, "Lanczos", "None", 0)
