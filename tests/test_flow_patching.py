"""Sizes whose latent the transformer's 2×2 patches do not divide (a multiple of 8 pixels but not 16 on a real
model) draw on SD 3.5 and Z-Image, as they do in ComfyUI: the model call pads the latent with its own edge and
crops the answer (engine/families/patching.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.engine import Engine
from engine.families.patching import crop_to, pad_to_patches
from engine.models import ModelRegistry
from engine.request import GenerationRequest
from tests import _sd3_fixture, _zimage_fixture

FIXTURES = {"sd3tiny": _sd3_fixture, "zimagetiny": _zimage_fixture}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    torch.set_num_threads(1)
    models = tmp_path_factory.mktemp("models")
    for name, fixture in FIXTURES.items():
        fixture.build_folder(models / name)
    return Engine(ModelRegistry(models, builtin_dir=None))


def test_padding_repeats_the_edge_and_cropping_undoes_it():
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)
    padded = pad_to_patches(x, 2)
    assert padded.shape == (2, 3, 6, 8)
    assert torch.equal(padded[..., 5, :7], x[..., 4, :]) and torch.equal(padded[..., :5, 7], x[..., :, 6])
    assert torch.equal(crop_to(padded, 5, 7), x)
    assert pad_to_patches(padded, 2) is padded  # whole patches are left alone


@pytest.mark.parametrize("name", FIXTURES)
def test_the_model_call_answers_an_odd_latent_at_its_own_size(engine, name):
    """The request's sizes are multiples of 8 and the fixtures' VAEs shrink 2×, so an odd latent side cannot be asked
    for through a request here; the model call is given one directly (on a real 8× VAE: 72 px → 9 latent pixels)."""
    model = engine.registry.load(name)
    conditioning = model.prompt_encoder.encode("a red circle", "", 1)
    inputs = model.family.unet_kwargs(conditioning, 34, 36).batched(1, False, model.device, model.dtype)
    call = model.family.model_call(model.pipeline)
    latent = torch.randn(1, model.latent_channels, 17, 18, generator=torch.Generator().manual_seed(0))
    timestep = torch.tensor([700.0])
    with torch.inference_mode():
        answer = call(latent, timestep, encoder_hidden_states=conditioning.prompt_embeds, added_cond_kwargs=inputs)[0]
        # The reference: the edge row repeated by hand, the whole-patch answer cut back.
        by_hand = torch.cat([latent, latent[:, :, -1:, :]], dim=2)
        whole = call(by_hand, timestep, encoder_hidden_states=conditioning.prompt_embeds, added_cond_kwargs=inputs)[0]
    assert answer.shape == latent.shape and torch.isfinite(answer).all()
    assert torch.equal(answer, whole[:, :, :17, :])
