"""Token merging (A1111's "Token merging ratio", ``engine.token_merging``): faster, changes pixels, opt-in.

The reference is the peer's library applied the peer's way: ``tomesd.apply_patch`` on the same UNet with the
arguments A1111 passes (``use_rand=False``, self-attention only). The engine's merged call must give that model's
output exactly."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from engine import GenerationRequest
from engine.infotext import parse_infotext, request_fields_from_infotext
from engine.token_merging import MergedTokensCall

from tests._approximations import CIRCLE_LEFT, assert_close_and_still_a_red_circle_on_the_left, draw

torch.set_num_threads(1)


def _unet(demo_engine):
    return demo_engine.registry.load("sfumato-demo").pipeline.unet


@pytest.mark.parametrize("latent", [16, 15], ids=["even-latent", "odd-latent"])
def test_the_merged_call_is_tomesd_applied_as_a1111_applies_it(demo_engine, latent):
    import tomesd

    unet = _unet(demo_engine)
    peer = copy.deepcopy(unet)
    tomesd.apply_patch(peer, ratio=0.5, use_rand=False, merge_attn=True, merge_crossattn=False, merge_mlp=False)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, latent, latent), generator=generator)
    context = torch.randn((2, 77, unet.config.cross_attention_dim), generator=generator)
    timestep = torch.tensor(600.0)
    with torch.no_grad():
        (ours,) = MergedTokensCall(unet, unet, 0.5)(x, timestep, encoder_hidden_states=context, return_dict=False)
        theirs = peer(x, timestep, encoder_hidden_states=context, return_dict=False)[0]
        exact = unet(x, timestep, encoder_hidden_states=context, return_dict=False)[0]
    assert torch.equal(ours, theirs), float((ours - theirs).abs().max())
    assert float((ours - exact).abs().max()) > 1e-3  # it merged something
    # The hooks last one call: the model itself is the exact one again.
    with torch.no_grad():
        assert torch.equal(unet(x, timestep, encoder_hidden_states=context, return_dict=False)[0], exact)


SD1_FIELDS = {"prompt": CIRCLE_LEFT, "model": "sfumato-demo", "steps": 12, "cfg_scale": 5.0, "seed": 7, "width": 128,
              "height": 128}


def test_merging_changes_the_picture_a_little_keeps_what_was_asked_and_leaves_nothing_behind(demo_engine):
    exact, merged = draw(demo_engine, SD1_FIELDS), draw(demo_engine, SD1_FIELDS, token_merging_ratio=0.5)
    assert_close_and_still_a_red_circle_on_the_left(exact.image, merged.image)
    assert "Token merging ratio: 0.5" in merged.infotext and "Token merging" not in exact.infotext
    # A ratio of 0 is the exact path, and a merged job leaves the model exact for the next one.
    assert np.array_equal(np.asarray(draw(demo_engine, SD1_FIELDS, token_merging_ratio=0.0).image), np.asarray(exact.image))


def test_hires_fix_merges_its_second_pass_by_its_own_ratio_and_writes_it(demo_engine):
    hires = dict(width=64, height=64, enable_hr=True, hr_scale=2.0, denoising_strength=0.5, steps=6)
    first_only = draw(demo_engine, SD1_FIELDS, **hires, token_merging_ratio=0.5)
    both = draw(demo_engine, SD1_FIELDS, **hires, token_merging_ratio=0.5, token_merging_ratio_hr=0.3)
    assert "Token merging ratio hr" not in first_only.infotext  # 0: the first pass's ratio, as A1111 resolves it
    assert "Token merging ratio: 0.5" in both.infotext and "Token merging ratio hr: 0.3" in both.infotext
    assert not np.array_equal(np.asarray(first_only.image), np.asarray(both.image))
    parsed = request_fields_from_infotext(parse_infotext(both.infotext))
    assert (parsed["token_merging_ratio"], parsed["token_merging_ratio_hr"]) == (0.5, 0.3)


def test_a_model_without_full_resolution_attention_or_a_flow_model_draws_the_exact_picture(demo_engine, engine):
    # SDXL's UNet has no attention at full resolution: A1111's token merging changes nothing there.
    sdxl = dict(prompt="a red circle", model="tiny-sdxl", steps=3, seed=1, width=64, height=64)
    merged = engine.generate(GenerationRequest(**sdxl, token_merging_ratio=0.5)).images[0]
    assert np.array_equal(np.asarray(merged.image), np.asarray(engine.generate(GenerationRequest(**sdxl)).images[0].image))
    # A flow transformer ignores the field, and its infotext does not carry it.
    flow = dict(prompt=CIRCLE_LEFT, model="sfumato-demo-flow", steps=4, seed=1, sampler="Euler", schedule="Simple", cfg_scale=3.0)
    merged = demo_engine.generate(GenerationRequest(**flow, token_merging_ratio=0.5)).images[0]
    exact = demo_engine.generate(GenerationRequest(**flow)).images[0]
    assert np.array_equal(np.asarray(merged.image), np.asarray(exact.image))
    assert "Token merging" not in merged.infotext
