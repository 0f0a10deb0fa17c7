"""The prompt-embedding cache: a repeated prompt skips the text encoder, a changed one does not,
each loaded model has its own cache, and the cache never changes the picture."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from engine import Engine, GenerationRequest, ModelRegistry
from engine.tiny_models import build_sd1, build_sdxl

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(300)

SD1, SD1_OTHER, SDXL = "tiny-sd1", "tiny-sd1-other", "tiny-sdxl"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_sd1(root / SD1, seed=0)
    build_sd1(root / SD1_OTHER, seed=1)
    build_sdxl(root / SDXL, seed=0)
    return root


@pytest.fixture()
def registry(models_dir):
    return ModelRegistry(models_dir, builtin_dir=None, device="cpu", cache_size=3)


def request(model: str, prompt: str = "a red circle", negative: str = "blurry", **changes) -> GenerationRequest:
    fields = dict(prompt=prompt, negative_prompt=negative, model=model, steps=3, cfg_scale=7.0, width=64, height=64,
                  seed=42, preview_every=0)
    fields.update(changes)
    return GenerationRequest(**fields)


class ForwardCounter:
    """Counts calls into every text encoder of a loaded model (wraps each ``forward``)."""

    def __init__(self, monkeypatch, pipeline):
        self.calls = 0
        for name in ("text_encoder", "text_encoder_2"):
            module = getattr(pipeline, name, None)
            if module is not None:
                monkeypatch.setattr(module, "forward", self._wrap(module.forward))

    def _wrap(self, forward):
        def counted(*args, **kwargs):
            self.calls += 1
            return forward(*args, **kwargs)
        return counted


def clear_cache(encoder) -> None:
    clear = getattr(encoder, "clear", None)
    if callable(clear):
        clear()
    else:
        encoder._cache.clear()


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image, dtype=np.int16)


@pytest.mark.parametrize("model", [SD1, SDXL])
def test_repeated_prompt_is_a_cache_hit_and_skips_the_text_encoder(registry, monkeypatch, model):
    engine = Engine(registry)
    loaded = registry.load(model)
    counter = ForwardCounter(monkeypatch, loaded.pipeline)
    encoder = loaded.prompt_encoder

    engine.generate(request(model))
    assert encoder.misses == 1 and encoder.hits == 0
    calls_after_first = counter.calls
    assert calls_after_first > 0, "the first generation must run the text encoder"

    engine.generate(request(model, seed=7))
    assert encoder.hits == 1 and encoder.misses == 1
    assert counter.calls == calls_after_first, "a repeated (prompt, negative) must not call the text encoder again"


@pytest.mark.parametrize("changed", [{"prompt": "a blue square"}, {"negative": "sharp"}])
def test_changed_prompt_or_negative_is_a_miss(registry, monkeypatch, changed):
    engine = Engine(registry)
    loaded = registry.load(SD1)
    counter = ForwardCounter(monkeypatch, loaded.pipeline)
    encoder = loaded.prompt_encoder

    engine.generate(request(SD1))
    calls = counter.calls
    engine.generate(request(SD1, **changed))
    assert encoder.misses == 2 and encoder.hits == 0
    assert counter.calls > calls, "a new prompt pair must be encoded"


def test_each_model_has_its_own_cache_after_a_switch(registry, monkeypatch):
    engine = Engine(registry)
    first = registry.load(SD1)
    engine.generate(request(SD1))
    assert first.prompt_encoder.misses == 1

    other = registry.load(SD1_OTHER)
    counter = ForwardCounter(monkeypatch, other.pipeline)
    engine.generate(request(SD1_OTHER))
    assert other.prompt_encoder is not first.prompt_encoder
    assert other.prompt_encoder.misses == 1 and other.prompt_encoder.hits == 0
    assert counter.calls > 0, "another model's text encoder must encode the prompt itself"

    engine.generate(request(SD1))  # back to the first model, still loaded: its cache still holds the prompt
    assert first.prompt_encoder.hits == 1


def test_a_model_loaded_again_after_eviction_starts_with_an_empty_cache(models_dir):
    registry = ModelRegistry(models_dir, builtin_dir=None, device="cpu", cache_size=1)
    engine = Engine(registry)
    engine.generate(request(SD1))
    engine.generate(request(SD1_OTHER))  # evicts SD1
    reloaded = registry.load(SD1)
    assert reloaded.prompt_encoder.hits == 0 and reloaded.prompt_encoder.misses == 0
    engine.generate(request(SD1))
    assert reloaded.prompt_encoder.misses == 1


@pytest.mark.parametrize("model", [SD1, SDXL])
def test_cached_embeddings_give_the_same_image_as_fresh_ones(registry, model):
    engine = Engine(registry)
    encoder = registry.load(model).prompt_encoder
    fresh = engine.generate(request(model))
    cached = engine.generate(request(model))
    assert encoder.hits == 1
    clear_cache(encoder)
    fresh_again = engine.generate(request(model))
    assert encoder.misses == 2
    assert np.array_equal(pixels(fresh), pixels(cached))
    assert np.array_equal(pixels(fresh), pixels(fresh_again))


def test_weighted_prompt_is_cached_too(registry, monkeypatch):
    """A1111 attention syntax goes through the weighting parser; its result is cached like plain text."""
    engine = Engine(registry)
    loaded = registry.load(SD1)
    counter = ForwardCounter(monkeypatch, loaded.pipeline)
    weighted = "a (red:1.3) circle, [blue] background"
    first = engine.generate(request(SD1, prompt=weighted))
    calls = counter.calls
    second = engine.generate(request(SD1, prompt=weighted))
    assert counter.calls == calls and loaded.prompt_encoder.hits == 1
    assert np.array_equal(pixels(first), pixels(second))
