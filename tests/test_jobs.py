"""The shared FIFO job queue: order, ownership, failures that leave the engine ready."""
from __future__ import annotations

import pytest
import torch

from engine import GenerationRequest
from engine.jobs import DONE, FAILED, JobQueue


def request(seed, steps=3, **changes):
    return GenerationRequest(prompt="a red circle", model="tiny-sd1", steps=steps, width=64, height=64, seed=seed, **changes)


@pytest.fixture
def queue(engine):
    return JobQueue(engine)


def test_jobs_run_in_submission_order_and_each_owner_gets_its_own_result(queue):
    jobs = [queue.submit(request(seed), owner=f"client-{seed % 3}") for seed in range(9)]
    for job in jobs:
        result = job.wait(timeout=300)
        assert job.state == DONE and result.seeds == [job.request.seed]
    starts = [job.started_at for job in jobs]
    assert starts == sorted(starts)
    assert all(a.finished_at <= b.started_at for a, b in zip(jobs, jobs[1:])), "jobs overlapped"


def test_queue_position_counts_jobs_ahead(queue):
    first = queue.submit(request(1, steps=60))
    for event in first.events(timeout=120):  # wait until it is running
        if event.kind == "progress":
            break
    second, third = queue.submit(request(2)), queue.submit(request(3))
    assert queue.position(second) == 1 and queue.position(third) == 2
    queue.cancel(first)
    third.wait(timeout=300)
    assert queue.position(third) == 0


def test_previews_go_only_to_the_job_that_owns_them(queue):
    a, b = queue.submit(request(10, steps=4), owner="a"), queue.submit(request(11, steps=4), owner="b")
    events_a, events_b = list(a.events(timeout=300)), list(b.events(timeout=300))
    assert [e.kind for e in events_a][-1] == "result" and events_a[-1].result.seeds == [10]
    assert events_b[-1].result.seeds == [11]
    assert sum(e.kind == "progress" for e in events_a) == 4 and sum(e.kind == "progress" for e in events_b) == 4


def test_out_of_memory_fails_only_that_job_and_the_next_one_works(queue, engine, monkeypatch):
    original = engine._decode
    calls = {"n": 0}

    def exploding_decode(model, latents):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (forced by the test)")
        return original(model, latents)

    monkeypatch.setattr(engine, "_decode", exploding_decode)
    failing, following = queue.submit(request(20), owner="x"), queue.submit(request(21), owner="y")
    events = list(failing.events(timeout=300))
    assert failing.state == FAILED and "out of memory" in failing.error
    assert events[-1].kind == "error" and "out of memory" in events[-1].error
    assert following.wait(timeout=300).seeds == [21] and following.state == DONE
    assert following.error is None


def test_interrupt_and_skip_reach_the_running_job_only(queue):
    long_job = queue.submit(request(30, steps=150, batch_count=3), owner="a")
    waiting = queue.submit(request(31), owner="b")
    for event in long_job.events(timeout=120):
        if event.kind == "progress" and event.progress.step >= 2:
            queue.skip_current()
            break
    for event in long_job.events(timeout=120):
        if event.kind == "progress" and event.progress.image_index == 1 and event.progress.step >= 2:
            queue.interrupt_current()
            break
    result = long_job.wait(timeout=300)
    assert result.interrupted and len(result.images) == 2
    assert not waiting.wait(timeout=300).interrupted


def test_a_job_that_raises_anything_leaves_the_worker_alive(queue, engine, monkeypatch):
    monkeypatch.setattr(engine, "generate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    job = queue.submit(request(40))
    with pytest.raises(Exception, match="boom"):
        job.wait(timeout=60)
    monkeypatch.undo()
    assert queue.submit(request(41)).wait(timeout=300).seeds == [41]


def test_save_failure_is_a_warning_and_the_image_is_still_returned(engine):
    from engine.outputs import OutputError

    def failing_save(result):
        raise OutputError("the outputs folder is read-only: choose another with --outputs-dir")

    queue = JobQueue(engine, save_result=failing_save)
    result = queue.submit(request(50)).wait(timeout=300)
    assert len(result.images) == 1 and any("read-only" in w for w in result.warnings)
