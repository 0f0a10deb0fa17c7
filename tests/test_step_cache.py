"""First block cache on the flow transformers (``engine.step_cache``): faster, changes pixels, opt-in.

The reference is the peer library's own way of applying it: diffusers' ``enable_cache(FirstBlockCacheConfig(...))``
on a Flux transformer, called inside its ``cache_context`` as diffusers' Flux pipeline calls it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine import GenerationRequest, traced_calls
from engine.step_cache import CachedBlocksCall

from tests._approximations import CIRCLE_LEFT, assert_close_and_still_a_red_circle_on_the_left, draw

torch.set_num_threads(1)
FLOW = "sfumato-demo-flow"


def _flux_transformer():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  guidance_embeds=False, axes_dims_rope=(2, 2, 4)).eval()


def _steps(count: int = 8):
    """A denoising-like sequence of inputs: the image tokens move a little less each step."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn((1, 16, 16), generator=generator)
    fixed = dict(encoder_hidden_states=torch.randn((1, 6, 32), generator=generator),
                 pooled_projections=torch.randn((1, 32), generator=generator), txt_ids=torch.zeros((6, 3)),
                 img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"),
                                     dim=-1).reshape(16, 3))
    for step in range(count):
        x = x + torch.randn(x.shape, generator=generator) * 0.3 / (step + 1) ** 2
        yield x, torch.tensor([1.0 - step / count]), fixed


def _call(transformer):
    def call(x, timestep, **fixed):
        return transformer(hidden_states=x, timestep=timestep, return_dict=False, **fixed)[0]
    return call


def test_the_engines_cache_is_diffusers_enable_cache_on_flux():
    from diffusers.hooks import FirstBlockCacheConfig

    ours, theirs = _flux_transformer(), _flux_transformer()
    theirs.enable_cache(FirstBlockCacheConfig(threshold=0.3))
    cached = CachedBlocksCall(_call(ours), ours, 0.3)
    exact, skipped = _flux_transformer(), 0
    with torch.no_grad():
        for x, timestep, fixed in _steps():
            with theirs.cache_context("cond"):
                reference = _call(theirs)(x, timestep, **fixed)
            output = cached(x, timestep, **fixed)
            assert torch.equal(output, reference)
            skipped += not torch.equal(output, _call(exact)(x, timestep, **fixed))
    assert 0 < skipped < 8, skipped  # some steps reused the cache, and not the first
    cached.close()
    with torch.no_grad():  # the hooks are off: the model is the exact one again
        for x, timestep, fixed in _steps(2):
            assert torch.equal(_call(ours)(x, timestep, **fixed), _call(exact)(x, timestep, **fixed))


@pytest.fixture(scope="module")
def flow_engine(demo_engine):
    from tests.conftest import DEMO_MODEL

    if not (DEMO_MODEL.parent / FLOW / "model_index.json").is_file():
        pytest.skip(f"builtin/{FLOW} is not present")
    return demo_engine


def _fields(engine) -> dict:
    cfg = json.loads((engine.registry.load(FLOW).entry.path / "sfumato.json").read_text())["recommended_cfg"]
    return {"prompt": CIRCLE_LEFT, "model": FLOW, "sampler": "Euler", "schedule": "Simple", "steps": 20, "cfg_scale": cfg,
            "seed": 5}


def test_the_cache_changes_the_picture_a_little_keeps_what_was_asked_and_leaves_the_model_exact(flow_engine):
    fields = _fields(flow_engine)
    exact, cached = draw(flow_engine, fields), draw(flow_engine, fields, first_block_cache=0.3)
    assert_close_and_still_a_red_circle_on_the_left(exact.image, cached.image)
    assert "First block cache: 0.3" in cached.infotext and "First block cache" not in exact.infotext
    # The pass took its hooks off: the next exact job draws the exact picture, from its traced call again.
    transformer = flow_engine.registry.load(FLOW).pipeline.transformer
    assert traced_calls._inspect(transformer) is not None
    assert np.array_equal(np.asarray(draw(flow_engine, fields).image), np.asarray(exact.image))


def test_a_unet_model_ignores_the_cache(demo_engine):
    request = dict(prompt="a red circle", model="sfumato-demo", steps=6, seed=1)
    cached = demo_engine.generate(GenerationRequest(**request, first_block_cache=0.3)).images[0]
    exact = demo_engine.generate(GenerationRequest(**request)).images[0]
    assert np.array_equal(np.asarray(cached.image), np.asarray(exact.image))
    assert "First block cache" not in cached.infotext
