"""All torch work on one thread (engine.compute): whoever asks, the engine's loads and generations
run on the same long-lived thread, errors come back to the caller, and the thread survives them."""
from __future__ import annotations

import threading

import pytest
import torch

from engine import GenerationRequest
from engine.compute import is_compute_thread, run_on_compute_thread


def test_work_from_any_thread_runs_on_one_compute_thread():
    seen: list[threading.Thread] = []
    callers = [threading.Thread(target=lambda: seen.append(run_on_compute_thread(threading.current_thread))) for _ in range(3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(10)
    seen.append(run_on_compute_thread(threading.current_thread))
    assert len(seen) == 4 and len(set(seen)) == 1
    assert seen[0] is not threading.current_thread() and seen[0].name == "sfumato-compute"


def test_errors_reach_the_caller_and_the_thread_lives_on():
    def fail():
        raise ValueError("bad size")

    with pytest.raises(ValueError, match="bad size"):
        run_on_compute_thread(fail)
    assert run_on_compute_thread(lambda: 6 * 7) == 42


def test_a_task_may_call_back_in_without_deadlocking():
    assert run_on_compute_thread(lambda: run_on_compute_thread(is_compute_thread)) is True
    assert not is_compute_thread()


def test_the_compute_thread_uses_the_callers_torch_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert run_on_compute_thread(torch.get_num_threads) == 2
        torch.set_num_threads(1)
        assert run_on_compute_thread(torch.get_num_threads) == 1
    finally:
        torch.set_num_threads(before)


def test_engine_loads_and_generates_on_the_compute_thread_whoever_calls(engine, monkeypatch):
    """The server loads models from web threads and generates from the job worker: both must land on one thread."""
    threads: set[str] = set()
    registry = engine.registry
    original_load = type(registry)._load_uncached

    def spy_load(self, entry):
        threads.add(threading.current_thread().name)
        return original_load(self, entry)

    monkeypatch.setattr(type(registry), "_load_uncached", spy_load)
    for name in list(registry.loaded_names()):
        registry._loaded.pop(name)
    request = GenerationRequest(prompt="a red circle", model="tiny-sd1", steps=2, width=64, height=64, seed=3, preview_every=1)
    results = []

    def generate():
        results.append(engine.generate(request, on_progress=lambda progress: threads.add(threading.current_thread().name)))

    loader = threading.Thread(target=registry.load, args=("tiny-sd1",))
    loader.start()
    loader.join(120)
    worker = threading.Thread(target=generate)
    worker.start()
    worker.join(120)
    generate()
    assert threads == {"sfumato-compute"}
    assert len(results) == 2 and results[0].images[0].image.tobytes() == results[1].images[0].image.tobytes()


class _PacedEngine:
    """Reports one step after ``delay`` seconds, then a result: enough for the UI's job follower."""

    def __init__(self, delay: float):
        self.delay = delay

    def generate(self, request, on_progress=None, cancel=None):
        import time

        from engine.request import GenerationResult, Progress

        time.sleep(self.delay)
        on_progress(Progress(1, 1, 0, 1, self.delay, 0.0, None))
        return GenerationResult(request=request, images=[], interrupted=False, timings={"total": self.delay})


@pytest.mark.parametrize("delay, first_kinds", [(0.0, ["progress", "result"]), (0.4, ["queued", "progress", "result"])])
def test_the_ui_says_starting_only_when_the_first_step_is_slow_to_come(delay, first_kinds):
    """A "Starting…" tick sent while the first step computes makes the web server work at that moment
    and delays the first preview; it is only worth sending when the wait is noticeable."""
    from engine.jobs import JobQueue
    from ui.runner import follow

    jobs = JobQueue(_PacedEngine(delay))
    ticks = list(follow(jobs, jobs.submit(GenerationRequest(prompt="x"), save=False), poll=0.1))
    assert [tick.kind for tick in ticks] == first_kinds
    if delay:
        assert ticks[0].text == "Starting…"
