"""One FIFO job queue in front of the engine, shared by the UI and the HTTP API.

Each job carries its owner, its own event stream (progress with previews, then
the result or the error) and its own cancel token, so a job's previews and
result reach only the client that submitted it. ``owner`` names the page or
request that submitted it; ``user`` names the login behind it (an opaque string,
None on a server without logins), so a front end can show and stop each user
only their own jobs. Jobs leave the queue in order; what runs them is the
queue's ``JobRunner``: by default ``EngineRunner``, one job at a time on this
process's engine, and in serve mode a runner over many engine replicas
(``engine.replicas``) that runs as many at once as it has slots. A job that
fails reports to its owner and the worker moves on.

An interrupt frees the queue in every phase: the engine stops a generation
itself (see ``Engine.generate``), and a save the interrupt catches goes on in
the background while the next job starts.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

from .errors import SfumatoError
from .request import CancelToken, GenerationRequest, GenerationResult, Progress

log = logging.getLogger("sfumato.jobs")

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
_SAVE_POLL_S = 0.02


@dataclass
class JobEvent:
    kind: str  # "progress", "result" or "error"
    progress: Progress | None = None
    result: GenerationResult | None = None
    error: str | None = None


@dataclass
class Job:
    id: int
    owner: str
    request: GenerationRequest
    save: bool = True
    user: str | None = None
    # What runs instead of one ``engine.generate(request)``: (engine, on_progress, cancel) -> result. An X/Y/Z
    # plot runs its cells this way, ``request`` then being its base request.
    work: Callable[..., GenerationResult] | None = None
    state: str = QUEUED
    cancel: CancelToken = field(default_factory=CancelToken)
    progress: Progress | None = None
    result: GenerationResult | None = None
    error: str | None = None
    exception: BaseException | None = None
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    ran_on: str | None = None  # which engine ran it (a replica's name in serve mode; None in one process)
    _events: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def events(self, timeout: float | None = None) -> Iterator[JobEvent]:
        """Progress events as they happen, ending with the result or error event."""
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if event.kind != "progress":
                return

    def wait(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.id} did not finish in {timeout} s")
        if self.error is not None:
            raise SfumatoError(self.error)
        return self.result

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait_finished(self, timeout: float | None = None) -> bool:
        """Block until the job has finished or ``timeout`` has passed; True if it has finished."""
        return self._done.wait(timeout)


ProgressCallback = Callable[[Progress], None]


class JobRunner(Protocol):
    """What runs a job the queue hands out: ``slots`` jobs at once, each through ``run``.

    ``run`` reports progress through ``on_progress``, honours ``job.cancel`` and returns the result (or
    raises); it never saves: the queue's one writer does, so a rerun job is still saved once.
    """

    slots: int

    def run(self, job: Job, on_progress: ProgressCallback) -> GenerationResult: ...


class EngineRunner:
    """Runs each job on one in-process engine, one at a time."""

    slots = 1

    def __init__(self, engine) -> None:
        self.engine = engine

    def run(self, job: Job, on_progress: ProgressCallback) -> GenerationResult:
        if job.work is not None:
            return job.work(self.engine, on_progress, job.cancel)
        return self.engine.generate(job.request, on_progress=on_progress, cancel=job.cancel)


class JobQueue:
    def __init__(self, engine, save_result: Callable[[GenerationResult], None] | None = None,
                 runner: JobRunner | None = None):
        self.engine = engine
        self.save_result = save_result
        self.runner: JobRunner = runner or EngineRunner(engine)
        self._ids = itertools.count(1)
        self._pending: list[Job] = []
        self._running: list[Job] = []  # oldest first
        self._lock = threading.Condition()
        self._save_lock = threading.Lock()  # one save at a time; each on its own thread, so an interrupt can leave it behind
        self._workers = [threading.Thread(target=self._run, name=f"sfumato-worker-{slot}", daemon=True)
                         for slot in range(max(1, self.runner.slots))]
        for worker in self._workers:
            worker.start()

    def submit(self, request: GenerationRequest, owner: str = "local", save: bool = True, user: str | None = None,
               work: Callable[..., GenerationResult] | None = None) -> Job:
        """Queue one generation of ``request``, or ``work`` (an X/Y/Z plot's ``run``) with ``request`` as its base."""
        job = Job(id=next(self._ids), owner=owner, request=request, save=save, user=user, work=work)
        with self._lock:
            self._pending.append(job)
            self._lock.notify()
        return job

    def position(self, job: Job) -> int:
        """0 while running or finished; n when n jobs are ahead of it."""
        with self._lock:
            if job in self._pending:
                return self._pending.index(job) + (1 if self._running else 0)
            return 0

    def current(self) -> Job | None:
        """The oldest running job (the only one when one engine runs them)."""
        with self._lock:
            return self._running[0] if self._running else None

    def running(self) -> list[Job]:
        """Every job running now, oldest first: one with one engine, up to the runner's slots with replicas."""
        with self._lock:
            return list(self._running)

    def pending(self) -> list[Job]:
        with self._lock:
            return list(self._pending)

    def cancel(self, job: Job) -> None:
        """Interrupt a running job, or drop a queued one."""
        with self._lock:
            if job in self._pending:
                self._pending.remove(job)
                job.state, job.error = FAILED, "cancelled before it started"
                job._events.put(JobEvent("error", error=job.error))
                job._done.set()
                return
        job.cancel.interrupt()

    def interrupt_current(self) -> None:
        for job in self.running():
            job.cancel.interrupt()

    def skip_current(self) -> None:
        for job in self.running():
            job.cancel.skip()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending:
                    self._lock.wait()
                job = self._pending.pop(0)
                self._running.append(job)
            self._execute(job)
            with self._lock:
                self._running.remove(job)

    def _execute(self, job: Job) -> None:
        job.state, job.started_at = RUNNING, time.time()

        def on_progress(progress: Progress) -> None:
            job.progress = progress
            job._events.put(JobEvent("progress", progress=progress))

        try:
            result = self.runner.run(job, on_progress)
            if job.save and self.save_result is not None:
                self._save(job, result)
            job.result, job.state = result, DONE
            job._events.put(JobEvent("result", result=result))
        except SfumatoError as error:
            job.error, job.exception, job.state = str(error), error, FAILED
            job._events.put(JobEvent("error", error=job.error))
        except Exception as error:  # the worker must survive anything a job does
            log.exception("job %s failed", job.id)
            job.error, job.exception, job.state = f"{type(error).__name__}: {error}", error, FAILED
            job._events.put(JobEvent("error", error=job.error))
        finally:
            job.finished_at = time.time()
            job._done.set()

    def _save(self, job: Job, result: GenerationResult) -> None:
        """Save the result, or, if the job is interrupted meanwhile, leave the save running and return."""
        saving: Future = Future()

        def write() -> None:
            with self._save_lock:
                try:
                    saving.set_result(self.save_result(result))
                except BaseException as error:  # noqa: BLE001 - handed to whoever waits for it
                    saving.set_exception(error)

        # A daemon thread: a save stuck on a stalled disk must not keep the server from exiting either.
        threading.Thread(target=write, name=f"sfumato-save-{job.id}", daemon=True).start()
        while True:
            try:
                saving.result(timeout=_SAVE_POLL_S)
                return
            except FutureTimeout:
                if job.cancel.interrupt_pending:
                    saving.add_done_callback(lambda done, job_id=job.id: _log_late_save(job_id, done))
                    result.warnings.append("interrupted while saving: the images are still being written in the background")
                    return
            except SfumatoError as error:
                result.warnings.append(f"could not save: {error}")
                return


def _log_late_save(job_id: int, saving: Future) -> None:
    error = saving.exception()
    if error is not None:
        log.error("job %s: the save left running after its interrupt failed: %s", job_id, error)
