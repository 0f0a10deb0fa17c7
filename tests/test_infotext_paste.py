"""An A1111 infotext pasted into PNG Info and sent to txt2img gives A1111's picture (issue #16).

The path is the one the studio takes: PNG Info's "send to" turns the text into request fields
(``ui.send_to``: the declared defaults for what the infotext leaves out, then what it holds), and txt2img
builds one request from them. The oracle is tests/a1111_reference, A1111 1.10's sampling re-implemented
from the formulas, fed the same parameters straight from the text.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import GenerationRequest
from engine.infotext import loading_notes, parse_infotext, request_fields_from_infotext
from tests.a1111_reference.ref_parity import TOLERANCE, engine_conditioning
from tests.a1111_reference.ref_render import Params, decode, sample_latents, to_uint8

pytest.importorskip("torchsde")

PROMPT = "a large red circle on the left, blue background\nNegative prompt: blurry\n"
INFOTEXTS = {
    # A Brownian-tree SDE sampler, ENSD and an explicit schedule type.
    "DPM++ 2M SDE, Karras, ENSD": "Steps: 20, Sampler: DPM++ 2M SDE, Schedule type: Karras, CFG scale: 7, Seed: 1234, "
                                  "Size: 64x64, Model hash: 0123456789, Model: sfumato-demo, ENSD: 31337, RNG: CPU, Version: v1.10.1",
    # An ancestral sampler with a non-default eta, drawing from the per-image generator after ENSD reseeds it.
    "Euler a, Eta, ENSD": "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5, Seed: 77, Size: 64x64, "
                          "Eta: 0.7, ENSD: 31337, RNG: CPU, Version: v1.10.1",
    # A pre-1.9 infotext names the schedule inside the sampler.
    "legacy DPM++ 2M Karras": "Steps: 15, Sampler: DPM++ 2M Karras, CFG scale: 6, Seed: 5, Size: 64x64, RNG: CPU, Version: v1.6.0",
    # A1111's own timestep sampler with "Eta DDIM", the key A1111 writes for it.
    "DDIM, Eta DDIM": "Steps: 20, Sampler: DDIM, CFG scale: 7, Seed: 9, Size: 64x64, Eta DDIM: 0.3, RNG: CPU, Version: v1.10.1",
}


def _sent_to_txt2img(text: str) -> GenerationRequest:
    from ui.send_to import FULL_RESTORE_DEFAULTS, fields_from_infotext

    fields = {**FULL_RESTORE_DEFAULTS, **fields_from_infotext(text)}
    fields["model"] = "sfumato-demo"  # the infotext's model name, or the one picked when it names none
    return GenerationRequest(**fields, preview_every=0)


def _read_back_in_png_info(text: str, folder) -> str:
    """The infotext as PNG Info reads it from an A1111 PNG (its ``parameters`` chunk), with what PNG Info shows."""
    from PIL import Image

    from engine.image_metadata import save_png
    from ui.png_info import read_image_info

    path = save_png(Image.new("RGB", (64, 64)), folder / "a1111.png", text)
    infotext, parsed, _, _, summary = read_image_info(str(path))
    assert "notes" not in parsed and "⚠️" not in summary  # every key applied, nothing set aside
    return infotext


@pytest.mark.slow
@pytest.mark.parametrize("name", list(INFOTEXTS))
def test_pasted_a1111_infotext_reproduces_a1111s_picture(demo_engine, tmp_path, name):
    text = _read_back_in_png_info(PROMPT + INFOTEXTS[name], tmp_path)
    params = parse_infotext(text)
    assert loading_notes(params, request_fields_from_infotext(params)) == []
    request = _sent_to_txt2img(text)
    ours = np.asarray(demo_engine.generate(request).images[0].image.convert("RGB"), dtype=np.int16)

    loaded = demo_engine.registry.load("sfumato-demo")
    p = Params.from_infotext(params)
    conditioning = engine_conditioning(loaded, p.prompt, p.negative_prompt, p.width, p.height)
    with torch.no_grad():
        reference = to_uint8(decode(loaded.pipeline, sample_latents(loaded.pipeline, p, conditioning)))[0].astype(np.int16)
    assert ours.shape == reference.shape
    assert int(np.abs(ours - reference).max()) <= TOLERANCE


def test_an_infotext_without_rng_says_it_was_made_with_gpu_noise():
    text = PROMPT + "Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Version: v1.10.1"
    params = parse_infotext(text)
    notes = loading_notes(params, request_fields_from_infotext(params))
    assert any("GPU noise" in note and '"RNG"' in note for note in notes)
