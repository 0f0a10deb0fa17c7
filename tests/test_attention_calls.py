"""Attention layers that skip diffusers' per-call signature inspection give the same numbers,
and still hand extra arguments to diffusers' own filtering."""
from __future__ import annotations

import copy
import logging

import torch
from diffusers.models.attention_processor import Attention

from engine.attention_calls import call_processors_directly
from engine.tiny_models import build_sd1


def _tiny_unet(tmp_path):
    from diffusers import UNet2DConditionModel

    build_sd1(tmp_path / "m", seed=0)
    return UNet2DConditionModel.from_pretrained(tmp_path / "m" / "unet").eval()


def _inputs(unet):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    return sample, torch.tensor(500), context


def test_patched_layers_give_bit_identical_output(tmp_path):
    plain = _tiny_unet(tmp_path)
    patched = copy.deepcopy(plain)
    layers = sum(isinstance(module, Attention) for module in patched.modules())
    assert layers > 0 and call_processors_directly(patched) == layers
    assert call_processors_directly(patched) == 0  # patching twice changes nothing
    sample, timestep, context = _inputs(plain)
    with torch.inference_mode():
        expected = plain(sample, timestep, encoder_hidden_states=context).sample
        got = patched(sample, timestep, encoder_hidden_states=context).sample
    assert torch.equal(expected, got)


def test_the_patched_layer_calls_the_processor_without_inspecting_it(tmp_path, monkeypatch):
    unet = _tiny_unet(tmp_path)
    call_processors_directly(unet)
    import inspect

    calls = []
    monkeypatch.setattr(inspect, "signature", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError("inspected")))
    sample, timestep, context = _inputs(unet)
    with torch.inference_mode():
        unet(sample, timestep, encoder_hidden_states=context)
    assert calls == []


def test_extra_arguments_still_go_through_diffusers_filtering(tmp_path, caplog):
    unet = _tiny_unet(tmp_path)
    call_processors_directly(unet)
    layer = next(module for module in unet.modules() if isinstance(module, Attention))
    hidden = torch.randn(1, 4, layer.query_dim)
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()  # another test in this worker (the benches) may have silenced it
    diffusers_logging.set_verbosity_warning()
    try:
        with torch.inference_mode(), caplog.at_level(logging.WARNING):
            plain = Attention.forward(layer, hidden)
            filtered = layer(hidden, not_a_processor_argument=1.0)  # dropped, with diffusers' warning
    finally:
        diffusers_logging.set_verbosity(verbosity)
    assert torch.equal(plain, filtered)
    assert "not_a_processor_argument" in caplog.text


def test_models_the_registry_loads_have_patched_layers(registry):
    model = registry.load("tiny-sdxl")
    for component in (model.pipeline.unet, model.pipeline.vae):
        layers = [module for module in component.modules() if isinstance(module, Attention)]
        assert layers and all("forward" in vars(module) for module in layers)
