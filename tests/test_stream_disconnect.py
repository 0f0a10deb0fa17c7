"""A browser tab that closes during a phase with no progress (a model load, a long encode) cancels its job.

Gradio notices a closed stream only when the generator yields, and closes it then; the stream
therefore repeats its last tick while nothing changes, and closing it cancels the job.
"""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from engine import GenerationRequest, GenerationResult
from engine.jobs import JobQueue


class SilentEngine:
    """Works without a single progress event until interrupted, like a long model load."""

    def __init__(self):
        self.started = threading.Event()

    def generate(self, request, on_progress=None, cancel=None):
        self.started.set()
        while not cancel.interrupted:
            time.sleep(0.01)
        return GenerationResult(request=request, images=[], interrupted=True)


def next_tick(stream, seconds: float):
    """The stream's next tick, or None if it gives none within ``seconds``."""
    box: list = []
    reader = threading.Thread(target=lambda: box.append(next(stream)), daemon=True)
    reader.start()
    reader.join(seconds)
    return box[0] if box else None


def test_a_closed_stream_cancels_a_job_that_makes_no_progress():
    from ui.generation_tab import _stream

    engine = SilentEngine()
    queue = JobQueue(engine)
    studio = SimpleNamespace(jobs=queue, settings=SimpleNamespace(save_outputs=False))
    stream = _stream(studio, GenerationRequest(prompt="a long load"), "browser", [], [], 0)
    assert next_tick(stream, 10) is not None  # "Starting…"
    assert engine.started.wait(10)
    assert next_tick(stream, 3) is not None, "nothing was sent while the job made no progress: Gradio can never close the stream"
    job = queue.current()
    stream.close()  # what Gradio does once the browser has gone
    assert job.wait_finished(5) and job.result.interrupted
    after = queue.submit(GenerationRequest(prompt="next"))
    deadline = time.monotonic() + 5
    while after.started_at is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert after.started_at is not None, "the closed tab's job still holds the queue"
    queue.cancel(after)
