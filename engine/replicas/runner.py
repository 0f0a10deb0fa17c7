"""The job queue's runner in serve mode: each job goes through a Ray Serve handle to a free engine replica.

A job's seeds are drawn here, before it leaves, so a job whose replica dies (process killed, node gone)
runs again on another replica from the start and draws the same picture; the queue saves its result once,
in this process. Routing, load balancing and replacing dead replicas are Ray Serve's.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Callable

from ..errors import GenerationError, ModelError, SfumatoError, ValidationError
from ..jobs import Job, ProgressCallback
from ..request import CancelToken, GenerationRequest, GenerationResult
from ..seeds import resolve_seed

log = logging.getLogger("sfumato.replicas")

# A job whose replica died is sent again this many times in all (each to whichever replica Serve picks),
# waiting a little longer each time for Serve to notice the death and route around it.
ATTEMPTS = 5
RETRY_WAITS_S = (0.2, 0.5, 1.0, 2.0)
_ERRORS = {cls.__name__: cls for cls in (ModelError, GenerationError, SfumatoError)}


def fixed_seeds(request: GenerationRequest) -> GenerationRequest:
    """The request with its random seeds (-1) drawn, as the engine would draw them, so every run of it agrees."""
    seed = resolve_seed(request.seed)
    subseed = resolve_seed(request.subseed) if request.subseed_strength > 0 else request.subseed
    return request.with_changes(seed=seed, subseed=subseed)


class ReplicaRunner:
    """A ``JobRunner`` over a Ray Serve deployment of ``EngineReplica``: ``slots`` jobs in flight at once."""

    def __init__(self, handle, signals, slots: int, default_model: Callable[[], str], attempts: int = ATTEMPTS) -> None:
        self.handle = handle.options(method_name="run", stream=True)
        self.signals = signals
        self.slots = slots
        self.default_model = default_model
        self.attempts = attempts
        self.reruns = 0  # jobs sent again after their replica died (for tests and the bench)
        self.actors: dict[str, str] = {}  # replica name → its Ray actor's name (in Serve's namespace), as replicas report it

    def run(self, job: Job, on_progress: ProgressCallback) -> GenerationResult:
        if job.work is not None:  # an X/Y/Z plot: each cell is one job on a replica
            return job.work(_ReplicaEngine(self, job), on_progress, job.cancel)
        return self.generate(job.request, on_progress, job.cancel, job)

    def generate(self, request: GenerationRequest, on_progress: ProgressCallback | None = None,
                 cancel: CancelToken | None = None, job: Job | None = None) -> GenerationResult:
        import ray.exceptions

        cancel = cancel or CancelToken()
        request = fixed_seeds(request if request.model else request.with_changes(model=self.default_model()))
        key = uuid.uuid4().hex
        cancel.listen(lambda signal: self.signals.send.remote(key, signal))
        if cancel.interrupted:
            self.signals.send.remote(key, "interrupt")
        try:
            for attempt in range(self.attempts):
                stream = self.handle.options(multiplexed_model_id=request.model).remote(request, key)
                try:
                    return self._follow(stream, on_progress, cancel, job)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as error:
                    if attempt + 1 == self.attempts:
                        raise GenerationError(f"the engine replicas kept failing: {error}") from error
                    self.reruns += 1
                    log.warning("a replica died while running a job; running it again from the start (%s)", error)
                    time.sleep(RETRY_WAITS_S[min(attempt, len(RETRY_WAITS_S) - 1)])
            raise AssertionError("unreachable")
        finally:
            self.signals.forget.remote(key)

    def _follow(self, stream, on_progress: ProgressCallback | None, cancel: CancelToken, job: Job | None) -> GenerationResult:
        for event in stream:
            kind = event["kind"]
            if kind == "started":
                self.actors[event["replica"]] = event["actor"]
                if job is not None:
                    job.ran_on = event["replica"]
            elif kind == "progress":
                if on_progress is not None:
                    on_progress(event["progress"])
            elif kind == "result":
                result = event["result"]
                if result.interrupted:
                    cancel.honour_interrupt()  # the replica honoured it; nothing is left pending here
                return result
            else:
                raise _rebuilt(*event["error"])
        raise GenerationError("the engine replica ended the job without a result")


def _rebuilt(kind: str, field: str | None, message: str) -> SfumatoError:
    """The replica's error as the same class here, so the API answers 422 for a bad field as in one process."""
    if kind == ValidationError.__name__ and field is not None:
        return ValidationError(field, message)
    return _ERRORS.get(kind, SfumatoError)(message)


class _ReplicaEngine:
    """What an X/Y/Z plot's ``run`` calls ``generate`` on: each cell goes to a replica like a job of its own."""

    def __init__(self, runner: ReplicaRunner, job: Job) -> None:
        self._runner, self._job = runner, job

    def generate(self, request: GenerationRequest, on_progress: ProgressCallback | None = None,
                 cancel: CancelToken | None = None) -> GenerationResult:
        return self._runner.generate(request, on_progress, cancel, self._job)
