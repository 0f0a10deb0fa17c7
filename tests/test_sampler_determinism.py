"""The seed alone decides the picture, for every sampler, ancestral and SDE ones included.

A1111's promise, and ours (../shared/DESIGN.md, "Noise as A1111's"): every noise draw, the first
noise and the ancestral or SDE noise of every step alike, comes from generators seeded by the image's
seed. So:
- the same request twice gives the same pixels, whatever global RNG state the process is in;
- image i of a batch equals a single run at seed + i;
- another seed gives other pixels.
A Brownian tree seeded from the global RNG (diffusers' ``DPMSolverSDEScheduler``) breaks the first
two. Runs at few steps: determinism does not depend on the step count.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import GenerationRequest

from engine.sampling.table import sampler_names

PROMPT = "a large orange circle at the bottom, purple background"
SEED = 41
STEPS = 8
# An ancestral sampler, a multistep SDE sampler, and the Brownian-tree SDE sampler.
NOISY_SAMPLERS = ("Euler a", "DPM++ 2M SDE", "DPM++ SDE")


def pictures(engine, sampler: str, seed: int, batch_size: int = 1) -> list[np.ndarray]:
    request = GenerationRequest(prompt=PROMPT, model="sfumato-demo", sampler=sampler, steps=STEPS, cfg_scale=3.0,
                                seed=seed, batch_size=batch_size, preview_every=0)
    return [np.asarray(image.image.convert("RGB")) for image in engine.generate(request).images]


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.mark.parametrize("sampler", sampler_names())
def test_the_same_seed_twice_gives_the_same_pixels(demo_engine, sampler):
    first = pictures(demo_engine, sampler, SEED)[0]
    torch.rand(7)  # a sampler must not read the global RNG: move it on (never reseed it: that could replay it)
    second = pictures(demo_engine, sampler, SEED)[0]
    assert np.array_equal(first, second), f"{sampler}: two runs at seed {SEED} differ by up to {max_diff(first, second)}/255"
    other = pictures(demo_engine, sampler, SEED + 1)[0]
    assert not np.array_equal(first, other), f"{sampler}: seeds {SEED} and {SEED + 1} give the same pixels"


@pytest.mark.parametrize("sampler", NOISY_SAMPLERS)
def test_batch_image_i_equals_a_single_run_at_seed_plus_i(demo_engine, sampler):
    batch = pictures(demo_engine, sampler, SEED, batch_size=3)
    assert len(batch) == 3
    for i in (0, 2):
        single = pictures(demo_engine, sampler, SEED + i)[0]
        assert np.array_equal(batch[i], single), (
            f"{sampler}: batch image {i} differs from a single run at seed {SEED + i} by up to {max_diff(batch[i], single)}/255")
