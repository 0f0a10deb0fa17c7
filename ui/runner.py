"""Following one job of the shared queue, as a stream of ticks a UI can show.

A tick is what changed: the queue position while waiting, the step count and
newest preview while running, then the result or the error. When the worker
runs ahead of the browser, waiting progress events are merged so the artist
always sees the newest preview, never a backlog (ComfyUI and A1111 do the same:
latest preview wins).
"""
from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from typing import Iterator

from PIL import Image

from engine.jobs import QUEUED, Job, JobEvent, JobQueue
from engine.request import GenerationResult, Progress

POLL_SECONDS = 0.2
# At most one progress tick per frame (20 a second). A fast model steps every 15-25 ms on a CPU and
# faster on a GPU; a tick per step would make the web server encode, send and the browser fetch 40-60
# preview images a second, on the cores the sampler needs, for a display that cannot show them. The
# first step's tick and the result still go out the moment they exist.
FRAME_SECONDS = 0.05
# While nothing changes (a model load, a long prompt encode) the last tick is sent again this often.
# Gradio learns that a browser has gone only when the stream yields; a stream that never yields
# would never be closed, and the job of a closed tab would hold the queue.
HEARTBEAT_SECONDS = 1.0


@dataclass
class Tick:
    kind: str  # "queued", "progress", "result" or "error"
    text: str
    preview: Image.Image | None = None
    result: GenerationResult | None = None
    error: str | None = None
    # The preview shown belongs to an earlier image (skipped, or finished) and this tick has none of
    # its own yet: clear it rather than keep showing that image's noise.
    clear_preview: bool = False


def queued_text(ahead: int) -> str:
    return f"Queued: {ahead} ahead" if ahead > 0 else "Starting…"


class EtaClock:
    """Seconds left, from the pace of the steps seen so far.

    The engine's own estimate counts the model load and prompt encoding as if
    they were sampling time, which inflates the first steps' ETA; measuring
    from the first step seen here removes that one-off cost.
    """

    def __init__(self) -> None:
        self._start: tuple[float, float] | None = None  # (time, fraction done) at the first step seen

    def eta(self, progress: Progress, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        if self._start is None:
            self._start = (now, progress.fraction)
            return progress.eta
        started, fraction = self._start
        if progress.fraction <= fraction:
            return progress.eta
        return (now - started) / (progress.fraction - fraction) * (1.0 - progress.fraction)


def progress_text(progress: Progress, eta: float | None = None) -> str:
    """'Step 5/20 · ETA 1.2 s', prefixed with the image number in a batch."""
    eta = progress.eta if eta is None else eta
    text = f"Step {progress.step}/{progress.total_steps} · ETA {eta:.1f} s"
    if progress.images_total > 1:
        text = f"Image {min(progress.image_index + 1, progress.images_total)}/{progress.images_total} · {text}"
    return text


def result_text(result: GenerationResult) -> str:
    """'Done: 2 images in 1.2 s', and for each image stopped early where it stopped:
    'Interrupted: 1 image in 0.3 s · image 1 interrupted at step 2/20'."""
    count = len(result.images)
    noun = "image" if count == 1 else "images"
    seconds = result.timings.get("total", 0.0)
    head = "Interrupted" if result.interrupted else "Done"
    text = f"{head}: {count} {noun} in {seconds:.1f} s"
    stops = [f"image {number} {image.stopped_early.description.lower()}"
             for number, image in enumerate(result.images, 1) if image.stopped_early is not None]
    return " · ".join([text, *stops])


def _next_event(job: Job, timeout: float) -> JobEvent | None:
    try:
        return next(job.events(timeout=timeout))
    except queue.Empty:
        return None


def follow(jobs: JobQueue, job: Job, poll: float = POLL_SECONDS, frame: float = FRAME_SECONDS,
           heartbeat: float = HEARTBEAT_SECONDS) -> Iterator[Tick]:
    """Ticks for one job until its result or error; the caller owns cancelling it if it stops early.

    A job with others ahead says so at once. One that starts right away says "Starting…" only
    if no step has come back within ``poll``: sending that tick makes the web server work while
    the first step computes, and delays the first preview it would otherwise show. After a
    progress tick the next one waits for the ``frame`` to pass (the job finishing ends the wait),
    and then shows the newest step. With nothing new for ``heartbeat`` seconds, the last text
    goes out again, so the web server can notice a browser that has gone and close the stream.
    """
    ahead = jobs.position(job)
    clock = EtaClock()
    shown_image: int | None = None  # image_index of the preview on screen
    announced = ahead > 0
    last = Tick("queued", queued_text(ahead))
    sent_at = time.monotonic()
    if announced:
        yield last
    while True:
        event = _next_event(job, poll)
        if event is None:
            now_ahead = jobs.position(job) if job.state == QUEUED else 0
            if not announced or now_ahead != ahead:
                ahead, announced = now_ahead, True
                last, sent_at = Tick("queued", queued_text(ahead)), time.monotonic()
                yield last
            elif time.monotonic() - sent_at >= heartbeat:
                sent_at = time.monotonic()
                yield Tick(last.kind, last.text)  # no preview: the one shown stays
            continue
        if event.kind == "progress":
            latest, final = event.progress, None
            with_preview = latest if latest.has_preview else None
            while (more := _next_event(job, 0)) is not None:  # merge the backlog: newest wins
                if more.kind != "progress":
                    final = more
                    break
                latest = more.progress
                with_preview = latest if latest.has_preview else with_preview
            # Drawn here, on the web server's thread, and only the one that will be shown.
            preview = with_preview.preview if with_preview is not None else None
            stale = preview is None and shown_image is not None and shown_image != latest.image_index
            if preview is not None:
                shown_image = with_preview.image_index
            elif stale:
                shown_image = None
            frame_ends = (sent_at := time.monotonic()) + frame
            last = Tick("progress", progress_text(latest, clock.eta(latest)), preview=preview, clear_preview=stale)
            yield last
            if final is None:
                job.wait_finished(max(0.0, frame_ends - time.monotonic()))
                continue
            event = final
        if event.kind == "result":
            yield Tick("result", result_text(event.result), result=event.result)
        else:
            yield Tick("error", f"Failed: {event.error}", error=event.error)
        return
