"""One engine replica: a Ray Serve deployment that runs one job at a time on its own device.

Each replica builds its registry, extensions and engine as the studio does (``engine.studio``), from the
front's config and settings; it never writes outputs: it streams events back and the front saves.
A job's stream is a few plain dicts:

    {"kind": "started", "replica": name}
    {"kind": "progress", "progress": Progress}        (its preview drawn here, the newest only)
    {"kind": "result", "result": GenerationResult} | {"kind": "error", "error": (class name, field, message)}
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading

import ray
from ray import serve

from ..engine import Engine
from ..errors import SfumatoError, ValidationError
from ..request import CancelToken, GenerationRequest, Progress
from ..studio import StudioConfig, build_extensions, build_registry
from .signals import WAIT_S

# Serve forgets a replica's least recently used model past this count, as the registry (its default cache_size)
# unloads it: both agree on which models a replica holds, so routing by model sends jobs where the model is.
MODELS_PER_REPLICA = 2
# At most one progress event per frame (the UI shows 20 a second, ui/runner.py): a fast model steps every
# few milliseconds, and each event sent is work for the front process, which shares the machine's cores.
# Steps in between are merged (the newest wins, its preview the newest drawn); the result goes at once.
PROGRESS_FRAME_S = 0.05


class EngineReplica:
    """The deployment's class; ``cluster.start_replicas`` wraps it with ``serve.deployment`` and its options."""

    def __init__(self, config: StudioConfig, settings, signals, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(threads)
        self.threads = threads
        self.registry = build_registry(config, settings)
        self.engine = Engine(self.registry, build_extensions(config))
        self.signals = signals
        context = serve.get_replica_context()
        self.name = context.replica_id.unique_id
        self.actor_name = ray.get_runtime_context().get_actor_name()

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def model(self, model_id: str) -> str:
        """Load a model through the registry; Serve then routes later jobs for it here first."""
        from ..compute import run_on_compute_thread

        await asyncio.to_thread(self._on_threads, run_on_compute_thread, self.registry.load, model_id)
        return model_id

    async def run(self, request: GenerationRequest, key: str):
        """Run one job, streaming its events; interrupt and skip arrive through the signals actor under ``key``."""
        model_id = serve.get_multiplexed_model_id()
        try:
            if model_id:
                await self.model(model_id)
        except SfumatoError as error:
            yield _error_event(error)
            return
        yield {"kind": "started", "replica": self.name, "actor": self.actor_name}
        loop = asyncio.get_running_loop()
        progress_events: asyncio.Queue = asyncio.Queue()
        cancel, finished = CancelToken(), threading.Event()
        threading.Thread(target=self._watch, args=(key, cancel, finished), name=f"sfumato-signals-{key[:8]}", daemon=True).start()

        def on_progress(progress: Progress) -> None:
            loop.call_soon_threadsafe(progress_events.put_nowait, progress)

        job = asyncio.ensure_future(asyncio.to_thread(self._on_threads, self.engine.generate, request, on_progress, cancel))
        try:
            while True:
                if progress_events.empty():
                    if job.done():  # every step it reported is in the queue before it is done (both arrive in order)
                        break
                    waiting = asyncio.ensure_future(progress_events.get())
                    await asyncio.wait({waiting, job}, return_when=asyncio.FIRST_COMPLETED)
                    if not waiting.done():
                        waiting.cancel()
                        continue
                    backlog = [waiting.result()]
                else:
                    backlog = []
                while not progress_events.empty():  # a backlog: the newest step wins, as in the UI
                    backlog.append(progress_events.get_nowait())
                newest = backlog[-1]
                with_preview = next((progress for progress in reversed(backlog)
                                     if progress.has_preview and progress.image_index == newest.image_index), None)
                # The newest preview of the image now sampling, drawn here (off the compute thread), sent as pixels.
                yield {"kind": "progress", "progress": dataclasses.replace(
                    newest, preview_source=with_preview.preview if with_preview is not None else None)}
                await asyncio.wait({job}, timeout=PROGRESS_FRAME_S)  # the frame passes, or the job ends sooner
            try:
                result = job.result()
            except SfumatoError as error:
                yield _error_event(error)
                return
            yield {"kind": "result", "result": result}
        finally:
            finished.set()

    def _on_threads(self, fn, *args):
        import torch

        torch.set_num_threads(self.threads)  # per thread under OpenMP; the compute thread copies the caller's
        return fn(*args)

    def _watch(self, key: str, cancel: CancelToken, finished: threading.Event) -> None:
        """Apply the front's signals for this job to its token until the job ends."""
        seen = 0
        while not finished.is_set():
            try:
                signals = ray.get(self.signals.since.remote(key, seen, WAIT_S))
            except Exception:  # noqa: BLE001 - the signals actor gone: the job still runs, unstoppable from the front
                return
            seen += len(signals)
            for signal in signals:
                cancel.interrupt() if signal == "interrupt" else cancel.skip()


def _error_event(error: SfumatoError) -> dict:
    field = error.field if isinstance(error, ValidationError) else None
    message = error.message if isinstance(error, ValidationError) else str(error)
    return {"kind": "error", "error": (type(error).__name__, field, message)}
