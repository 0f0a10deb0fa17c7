"""Back off a client address that keeps giving wrong passwords.

Without a limit a script tries about a thousand passwords a second. Here a few
mistakes cost nothing (people mistype); the ``free_failures``-th wrong password
locks the address out for 1 s, each one after that for twice as long, up to
``max_lockout_s``. Every login attempt during a lockout, right or wrong, is
answered 429 with ``Retry-After``: answering a right password would tell a
guesser it had found it. ``forget_after_s`` without a failure clears the
address. A success does not: a legitimate client polling from the same address
(one NAT, or loopback) would otherwise reset a guesser's count for it.
The Gradio login form and HTTP Basic on the API share one limiter, so the
guesses add up across both doors.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

FREE_FAILURES = 5
MAX_LOCKOUT_S = 300.0
FORGET_AFTER_S = 15 * 60.0
MAX_TRACKED_ADDRESSES = 10_000  # a flood of addresses must not grow memory without bound


@dataclass
class _Record:
    failures: int = 0
    last_failure: float = 0.0
    locked_until: float = 0.0


@dataclass
class LoginLimiter:
    free_failures: int = FREE_FAILURES
    max_lockout_s: float = MAX_LOCKOUT_S
    forget_after_s: float = FORGET_AFTER_S
    clock: Callable[[], float] = time.monotonic
    _records: dict[str, _Record] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def retry_after(self, address: str) -> int:
        """Whole seconds this address must wait before its next login attempt; 0 when it may try now."""
        with self._lock:
            record = self._current(address)
            if record is None:
                return 0
            wait = record.locked_until - self.clock()
            return math.ceil(wait) if wait > 0 else 0

    def failed(self, address: str) -> None:
        """Count a wrong password; past the free ones, lock the address for twice as long as last time."""
        with self._lock:
            now = self.clock()
            record = self._current(address)
            if record is None:
                self._make_room(now)
                record = self._records[address] = _Record()
            record.failures += 1
            record.last_failure = now
            beyond = record.failures - self.free_failures
            if beyond >= 0:
                record.locked_until = now + min(self.max_lockout_s, 2.0 ** beyond)

    def _current(self, address: str) -> _Record | None:
        record = self._records.get(address)
        if record is not None and self.clock() - record.last_failure > self.forget_after_s:
            del self._records[address]
            return None
        return record

    def _make_room(self, now: float) -> None:
        if len(self._records) < MAX_TRACKED_ADDRESSES:
            return
        for address, record in list(self._records.items()):
            if now - record.last_failure > self.forget_after_s or record.locked_until <= now:
                del self._records[address]
        while len(self._records) >= MAX_TRACKED_ADDRESSES:  # still full: drop the oldest
            del self._records[next(iter(self._records))]
