"""An interrupt frees the shared queue in every phase of a job, and the next job runs.

Each test makes one phase slow, either in a way the engine's checkpoints can see (work done in
model blocks) or in a way nothing can see (a call that blocks, standing in for one long C call or a
stalled disk), interrupts the job in that phase, and measures the time from the interrupt to the
next job starting. The figures print with ``-s``.
"""
from __future__ import annotations

import threading
import time

import pytest

from engine import Engine, GenerationRequest, ModelRegistry
from engine.compute import INTERRUPT_GRACE_S
from engine.jobs import DONE, JobQueue

# From the interrupt to the next job starting. Checkpoints answer within one model block and
# blocked work is left behind after INTERRUPT_GRACE_S; the rest is slack for a busy 2-core machine.
FREED_WITHIN_S = INTERRUPT_GRACE_S + 3.0
MODEL, OTHER_MODEL = "tiny-sd1", "tiny-sd1-inpainting"


def request(seed: int, model: str = MODEL, steps: int = 3, prompt: str = "a red circle") -> GenerationRequest:
    return GenerationRequest(prompt=f"{prompt} {seed}", model=model, steps=steps, width=64, height=64, seed=seed)


class Phase:
    """A slow stretch inside one phase: ``entered`` is set when it starts; a blocking one holds until ``release``."""

    def __init__(self, blocking: bool, delay: float = 0.25):
        self.blocking, self.delay = blocking, delay
        self.entered, self.release = threading.Event(), threading.Event()

    def pause(self) -> None:
        self.entered.set()
        if self.blocking:
            self.release.wait(120)
        else:
            time.sleep(self.delay)

    def wrap(self, fn):
        def slow(*args, **kwargs):
            self.pause()
            return fn(*args, **kwargs)
        return slow


@pytest.fixture
def parts(tiny_models_dir):
    """A registry with nothing loaded, its engine and a queue: every phase, model load included, runs fresh."""
    registry = ModelRegistry(tiny_models_dir, builtin_dir=None, cache_size=4)
    engine = Engine(registry)
    return registry, engine, JobQueue(engine)


@pytest.fixture
def phases():
    made: list[Phase] = []

    def make(blocking: bool, delay: float = 0.25) -> Phase:
        made.append(Phase(blocking, delay))
        return made[-1]

    yield make
    for phase in made:  # let work left on a retired compute thread finish and end
        phase.release.set()


def interrupt_in(queue: JobQueue, phase: Phase, first: GenerationRequest, following: GenerationRequest, label: str):
    """Interrupt ``first`` once it is inside ``phase``; (its result, the following job, seconds until it started)."""
    first_job, next_job = queue.submit(first, owner="a"), queue.submit(following, owner="b")
    assert phase.entered.wait(120), f"the job never reached {label}"
    while first_job.started_at is None:  # the phase may be other work the job waits behind
        time.sleep(0.005)
    interrupted_at = time.time()
    queue.interrupt_current()
    deadline = time.monotonic() + 30
    while next_job.started_at is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert next_job.started_at is not None, f"the queue stayed held after an interrupt while {label}"
    freed = next_job.started_at - interrupted_at
    print(f"\ninterrupt → queue free, {label}: {freed * 1000:.0f} ms")
    assert first_job.wait_finished(5) and first_job.state == DONE
    return first_job.result, next_job, freed


def assert_next_job_succeeds(next_job, phase: Phase | None = None) -> None:
    if phase is not None:
        phase.release.set()  # a blocked save, say, still has to finish before the next one's save
    result = next_job.wait(timeout=300)
    assert next_job.state == DONE and len(result.images) == 1 and not result.interrupted


def test_interrupt_while_a_model_load_is_stuck_frees_the_queue(parts, phases, monkeypatch):
    registry, _, queue = parts
    phase = phases(blocking=True)
    original = registry._load_uncached
    monkeypatch.setattr(registry, "_load_uncached", lambda entry: phase.wrap(original)(entry) if entry.name.split("/")[-1] == MODEL else original(entry))
    result, next_job, freed = interrupt_in(queue, phase, request(1), request(2, model=OTHER_MODEL), "loading the model (stuck)")
    assert result.interrupted and result.images == [] and "background" in result.warnings[0]
    assert freed < FREED_WITHIN_S
    assert_next_job_succeeds(next_job)
    asked = time.monotonic()
    assert MODEL in registry.names() and time.monotonic() - asked < 0.5, "the model list waited on the stuck load"


def test_a_job_waiting_for_another_jobs_model_load_can_be_interrupted(parts, phases, monkeypatch):
    registry, _, queue = parts
    phase = phases(blocking=True)
    original = registry._load_uncached
    monkeypatch.setattr(registry, "_load_uncached", lambda entry: phase.wrap(original)(entry) if entry.name.split("/")[-1] == MODEL else original(entry))
    _, waiting, _ = interrupt_in(queue, phase, request(1), request(2), "loading the model (stuck)")
    following = queue.submit(request(3, model=OTHER_MODEL))
    time.sleep(0.3)  # the second job now waits for the first one's load of the same model
    interrupted_at = time.time()
    queue.cancel(waiting)
    assert waiting.wait(10).interrupted
    assert following.wait(300).images and following.started_at - interrupted_at < FREED_WITHIN_S
    phase.release.set()
    assert queue.submit(request(4)).wait(300).images  # the load finished in the background and is used


@pytest.mark.parametrize("blocking", [False, True], ids=["checkpointed", "stuck"])
def test_interrupt_while_encoding_the_prompt_frees_the_queue(parts, phases, monkeypatch, blocking):
    registry, _, queue = parts
    model = registry.load(MODEL)
    layer = model.pipeline.text_encoder.encoder.layers[0]
    phase = phases(blocking=blocking)
    monkeypatch.setattr(layer, "forward", phase.wrap(layer.forward))
    result, next_job, freed = interrupt_in(queue, phase, request(1, prompt="a (blue:1.2) square"), request(2, model=OTHER_MODEL),
                                           f"encoding the prompt ({'stuck' if blocking else 'checkpointed'})")
    assert result.interrupted and result.images == []
    assert ("background" if blocking else "while encoding the prompt") in result.warnings[0]
    assert freed < (FREED_WITHIN_S if blocking else 1.5)
    assert_next_job_succeeds(next_job)
    monkeypatch.undo()
    phase.release.set()
    assert_next_job_succeeds(queue.submit(request(3)))  # the interrupted encoding left nothing half-made in the cache


@pytest.mark.parametrize("blocking", [False, True], ids=["checkpointed", "stuck"])
def test_interrupt_inside_a_sampler_step_frees_the_queue(parts, phases, monkeypatch, blocking):
    registry, _, queue = parts
    unet = registry.load(MODEL).pipeline.unet
    block = unet.down_blocks[0]
    phase = phases(blocking=blocking)
    calls = {"n": 0}
    original = block.forward

    def slow_from_the_third_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 3:
            phase.pause()
        return original(*args, **kwargs)

    monkeypatch.setattr(block, "forward", slow_from_the_third_step)
    result, next_job, freed = interrupt_in(queue, phase, request(1, steps=20), request(2, model=OTHER_MODEL),
                                           f"sampling, inside a step ({'stuck' if blocking else 'checkpointed'})")
    assert result.interrupted
    if not blocking:
        assert len(result.images) == 1, "an interrupt inside a step still shows the image of the steps before"
    assert freed < (FREED_WITHIN_S if blocking else 1.5)
    assert_next_job_succeeds(next_job)


@pytest.mark.parametrize("blocking", [False, True], ids=["checkpointed", "stuck"])
def test_interrupt_while_decoding_frees_the_queue(parts, phases, monkeypatch, blocking):
    registry, engine, queue = parts
    decoder_block = registry.load(MODEL).pipeline.vae.decoder.up_blocks[0]
    phase = phases(blocking=blocking)
    monkeypatch.setattr(decoder_block, "forward", phase.wrap(decoder_block.forward))
    result, next_job, freed = interrupt_in(queue, phase, request(1, steps=3), request(2, model=OTHER_MODEL),
                                           f"decoding ({'stuck' if blocking else 'checkpointed'})")
    assert result.interrupted and result.images == []
    assert ("background" if blocking else "while decoding") in result.warnings[0]
    assert freed < (FREED_WITHIN_S if blocking else 1.5)
    assert_next_job_succeeds(next_job)


def test_interrupt_while_saving_frees_the_queue_and_the_save_finishes_in_the_background(parts, phases):
    _, engine, _ = parts
    phase = phases(blocking=True)
    saved = []
    queue = JobQueue(engine, save_result=phase.wrap(saved.append))
    result, next_job, freed = interrupt_in(queue, phase, request(1), request(2, model=OTHER_MODEL), "saving (stuck)")
    assert len(result.images) == 1 and "background" in " ".join(result.warnings)
    assert freed < 1.5
    assert_next_job_succeeds(next_job, phase)
    assert [r.images[0].seed for r in saved] == [1, 2], "both saves completed, in job order"


def test_a_job_interrupted_while_it_waits_for_the_compute_thread_never_runs(parts, phases, monkeypatch):
    """The compute thread serves more than jobs (ControlNet previews): a job queued behind such work stops too."""
    from engine.compute import run_on_compute_thread

    _, engine, queue = parts
    phase = phases(blocking=True)
    other_work = threading.Thread(target=run_on_compute_thread, args=(phase.pause,), daemon=True)
    other_work.start()
    result, next_job, freed = interrupt_in(queue, phase, request(1), request(2, model=OTHER_MODEL), "waiting for the compute thread")
    assert result.interrupted and result.images == [] and freed < FREED_WITHIN_S
    phase.release.set()
    assert_next_job_succeeds(next_job)


def test_interrupt_between_steps_keeps_the_image_so_far_and_frees_the_queue(parts):
    _, _, queue = parts
    first, next_job = queue.submit(request(1, steps=150), owner="a"), queue.submit(request(2), owner="b")
    for event in first.events(timeout=120):
        if event.kind == "progress" and event.progress.step >= 3:
            break
    interrupted_at = time.time()
    queue.interrupt_current()
    result = first.wait(30)
    while next_job.started_at is None:
        time.sleep(0.005)
    freed = next_job.started_at - interrupted_at
    print(f"\ninterrupt → queue free, sampling, between steps: {freed * 1000:.0f} ms")
    assert result.interrupted and len(result.images) == 1 and freed < 1.5
    assert_next_job_succeeds(next_job)
