"""Interrupt and skip, from the front process to whichever replica runs a job.

A replica cannot be addressed through Ray Serve's handle (its router picks one), so the signals go through
one small Ray actor both sides know: the front ``send``s to a job's key, and the replica running that job
waits on ``since`` (a long poll, no busy loop) and applies what arrives to its own ``CancelToken``. A job
rerun on another replica reads every signal from the start, so an interrupted job stays interrupted.
"""
from __future__ import annotations

import asyncio

# How long one ``since`` call waits for a signal before returning none, so a replica's watcher notices its job ended.
WAIT_S = 0.5


class JobSignals:
    """Signals by job key (an async Ray actor: ``ray.remote(num_cpus=0)(JobSignals)``)."""

    def __init__(self) -> None:
        self._sent: dict[str, list[str]] = {}
        self._changed = asyncio.Condition()

    async def send(self, key: str, signal: str) -> None:
        async with self._changed:
            self._sent.setdefault(key, []).append(signal)
            self._changed.notify_all()

    async def since(self, key: str, seen: int, timeout: float = WAIT_S) -> list[str]:
        """The signals for ``key`` after the first ``seen``; waits up to ``timeout`` for one, else returns []."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: len(self._sent.get(key, ())) > seen), timeout)
            except asyncio.TimeoutError:
                return []
            return self._sent[key][seen:]

    async def forget(self, key: str) -> None:
        async with self._changed:
            self._sent.pop(key, None)
