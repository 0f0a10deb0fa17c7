"""txt2img behaviour on tiny SD 1.x and SDXL models: seeds, batches, previews, interrupt and skip."""
from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from engine import CancelToken, GenerationRequest

MODELS = ["tiny-sd1", "tiny-sdxl"]


def pixels(result, index=0):
    return np.asarray(result.images[index].image, dtype=np.int16)


def request(model="tiny-sd1", **changes):
    base = dict(prompt="a red circle", negative_prompt="blurry", model=model, steps=6, cfg_scale=5.0, width=64, height=64, seed=1234, preview_every=0)
    return GenerationRequest(**{**base, **changes})


@pytest.mark.parametrize("model", MODELS)
def test_same_seed_same_pixels_different_seed_different(engine, model):
    first, again, other = (engine.generate(request(model, seed=s)) for s in (7, 7, 8))
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("sampler", ["DPM++ 2M", "Euler a", "DPM++ 2M SDE"])
def test_batch_image_i_equals_single_run_at_seed_plus_i(engine, model, sampler):
    batch = engine.generate(request(model, seed=100, batch_size=3, sampler=sampler))
    assert batch.seeds == [100, 101, 102]
    for i in range(3):
        single = engine.generate(request(model, seed=100 + i, sampler=sampler))
        assert np.array_equal(pixels(batch, i), pixels(single)), f"image {i} differs from the single run"


def test_batch_count_continues_the_seed_sequence(engine):
    result = engine.generate(request(seed=50, batch_size=2, batch_count=2))
    assert result.seeds == [50, 51, 52, 53]
    assert len({pixels(result, i).tobytes() for i in range(4)}) == 4


def test_random_seed_is_reported_and_reproduces(engine):
    result = engine.generate(request(seed=-1))
    seed = result.images[0].seed
    assert 0 <= seed < 2**32 and f"Seed: {seed}" in result.images[0].infotext
    assert np.array_equal(pixels(result), pixels(engine.generate(request(seed=seed))))


def test_variation_seed_blends_toward_the_subseed(engine):
    base = pixels(engine.generate(request(seed=10)))
    slight = pixels(engine.generate(request(seed=10, subseed=99, subseed_strength=0.1)))
    strong = pixels(engine.generate(request(seed=10, subseed=99, subseed_strength=0.9)))
    assert 0 < np.abs(base - slight).mean() < np.abs(base - strong).mean()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("every", [1, 2, 3])
def test_previews_arrive_before_the_result_with_the_right_count_and_aspect(engine, model, every):
    events = []
    result = engine.generate(request(model, steps=6, width=96, height=64, preview_every=every), on_progress=lambda p: events.append((time.perf_counter(), p)))
    finished = time.perf_counter()
    previews = [p for _, p in events if p.preview is not None]
    expected = len([s for s in range(1, 7) if s % every == 0 or s == 6])
    assert len(previews) == expected
    assert all(t < finished for t, _ in events)
    for progress in previews:
        w, h = progress.preview.size
        assert abs(w / h - 96 / 64) < 1e-6
    assert [p.step for _, p in events] == list(range(1, 7)) and events[-1][1].total_steps == 6
    assert result.images[0].image.size == (96, 64)


def test_cheap_previews_are_drawn_by_whoever_reads_them_from_the_latent_of_that_step(engine):
    """The sampling thread only snapshots the latent; the reader draws it, and what it draws is that step's latent."""
    import threading

    from engine.previews import CheapPreviewer, DeferredPreview

    events, latents = [], []
    original = CheapPreviewer.deferred

    def spy(self, step_latents):
        latents.append(step_latents.clone())
        return original(self, step_latents)

    drawn_on: list[str] = []
    draw = CheapPreviewer.render
    CheapPreviewer.deferred = spy
    CheapPreviewer.render = lambda self, latent: drawn_on.append(threading.current_thread().name) or draw(self, latent)
    try:
        engine.generate(request(steps=3, preview_every=1), on_progress=events.append)
        assert all(isinstance(event.preview_source, DeferredPreview) for event in events)
        assert drawn_on == []  # nothing drawn while sampling
        images = [event.preview for event in events]
    finally:
        CheapPreviewer.deferred, CheapPreviewer.render = original, draw
    assert drawn_on == [threading.current_thread().name] * 3
    previewer = CheapPreviewer(engine.registry.load("tiny-sd1").family)
    for image, step_latent in zip(images, latents):
        assert image.tobytes() == previewer(step_latent).tobytes()
    assert len({image.tobytes() for image in images}) == 3  # each step's own latent, not the last one
    assert events[0].preview is images[0]  # drawn once


def test_preview_off_sends_progress_without_images(engine):
    events = []
    engine.generate(request(preview_every=0), on_progress=events.append)
    assert len(events) == 6 and all(e.preview is None for e in events)


def test_full_vae_preview_is_an_image_of_output_size(engine):
    events = []
    engine.generate(request(preview_method="full", preview_every=3), on_progress=events.append)
    assert [e.preview.size for e in events if e.preview] == [(64, 64), (64, 64)]


def test_interrupt_at_a_random_step_returns_promptly_and_next_request_works(engine):
    token = CancelToken()
    stop_at = random.Random(5).randint(2, 40)
    seen = []

    def on_progress(progress):
        seen.append(progress.step)
        if progress.step == stop_at:
            token.interrupt()

    started = time.perf_counter()
    result = engine.generate(request(steps=60), on_progress=on_progress, cancel=token)
    assert result.interrupted
    assert max(seen) <= stop_at + 1, "interrupt took more than one step"
    assert len(result.images) == 1  # the partial image is still returned, as in A1111
    assert time.perf_counter() - started < 60
    after = engine.generate(request(steps=4))
    assert not after.interrupted and len(after.images) == 1


def test_interrupt_from_another_thread_stops_a_batch(engine):
    token = CancelToken()
    timer = threading.Timer(0.3, token.interrupt)
    timer.start()
    result = engine.generate(request(steps=150, batch_count=20), cancel=token)
    timer.cancel()
    assert result.interrupted and len(result.images) < 20


def test_skip_ends_the_current_image_and_goes_on(engine):
    token = CancelToken()
    steps_per_image: dict[int, int] = {}

    def on_progress(progress):
        steps_per_image[progress.image_index] = progress.step
        if progress.image_index == 0 and progress.step == 2:
            token.skip()

    result = engine.generate(request(steps=8, batch_count=3), on_progress=on_progress, cancel=token)
    assert not result.interrupted and len(result.images) == 3
    assert steps_per_image == {0: 2, 1: 8, 2: 8}


def test_native_size_is_used_when_size_is_omitted(engine):
    result = engine.generate(request(width=None, height=None, steps=2))
    assert result.images[0].image.size == (512, 512)
