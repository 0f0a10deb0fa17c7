"""Side-by-side timing and peak-memory sampling.

Every figure the benches report is a ratio of two things measured in the same
run, repetitions interleaved (A B, B A, A B, ...) so that load from other
processes lands on both sides alike. The figure is the median of the per-pair
ratios: a pair shares its moment in time, so one noisy pair moves the median
far less than it would move a ratio of two separate medians.
"""
from __future__ import annotations

import gc
import os
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch


@dataclass(frozen=True)
class Mode:
    """How hard to push: ``smoke`` for CI (seconds), ``quick`` for development, ``full`` for the README."""

    name: str
    repetitions: int
    steps: int
    size: int
    scaling_sizes: tuple[int, ...]
    scaling_batches: tuple[int, ...]
    scaling_budget_s: float  # stop growing the image before one generation would take longer than this
    use_demo_model: bool
    # A side-by-side ratio keeps adding rounds past ``repetitions`` until this many seconds have gone
    # (at most MAX_ROUNDS): cheap comparisons get more pairs, so their medians are as steady as the
    # slow ones' on a noisy machine.
    ratio_budget_s: float = 0.0
    # Past the budget above, sizes keep growing as short points (a few steps, one run) while one of them
    # is predicted to take less than this and to fit in the memory left: per-step time and peak memory
    # up to the largest size that fits.
    scaling_short_budget_s: float = 0.0


MAX_ROUNDS = 120

MODES: dict[str, Mode] = {
    "smoke": Mode("smoke", 1, 3, 64, (64, 128), (1, 2), 2.0, False),
    "quick": Mode("quick", 7, 10, 64, (64, 128, 256, 512), (1, 2, 4), 2.0, True, ratio_budget_s=4.0,
                  scaling_short_budget_s=5.0),
    "full": Mode("full", 21, 20, 64, (64, 128, 256, 512, 768, 1024, 1536, 2048), (1, 2, 4, 8), 5.0, True, ratio_budget_s=30.0,
                 scaling_short_budget_s=40.0),
}


def clock() -> float:
    return time.perf_counter()


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def interleave(runners: dict[str, Callable[[int], float]], repetitions: int, warmup: int = 1,
               budget_s: float = 0.0) -> dict[str, list[float]]:
    """Run each runner ``repetitions`` times, rotating the order every round, then keep adding
    rounds while the measured rounds have taken less than ``budget_s`` (up to ``MAX_ROUNDS``).

    A runner takes the repetition index (so it can vary its prompt) and returns
    the seconds it measured. Warm-up rounds use negative indices and are discarded.
    """
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    index, started = -warmup, clock()
    while index < repetitions or (index < MAX_ROUNDS and clock() - started < budget_s):
        if index == 0:
            started = clock()
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = runners[name](index)
            if index >= 0:
                times[name].append(seconds)
        index += 1
    return times


def pair_stats(a: list[float], b: list[float]) -> dict:
    """The figure (median of per-pair a/b) and two noise indicators for the JSON details.

    ``ratio_of_minimums`` is min(a)/min(b): on a loaded machine the fastest run of each side
    is the one least disturbed, so a large gap between it and ``ratio`` means the run was noisy.
    ``spread`` is the interquartile range of the per-pair ratios.
    """
    ratios = sorted(x / y for x, y in zip(a, b) if y > 0)
    if not ratios:
        return {"ratio": float("nan"), "ratio_of_minimums": float("nan"), "spread": float("nan"), "pairs": 0}
    quartile = lambda q: ratios[min(len(ratios) - 1, int(q * (len(ratios) - 1) + 0.5))]  # noqa: E731
    return {"ratio": round(median(ratios), 4), "ratio_of_minimums": round(min(a) / min(b), 4),
            "spread": round(quartile(0.75) - quartile(0.25), 4), "pairs": len(ratios)}


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


@dataclass
class _Timer:
    seconds: float = 0.0
    calls: int = 0


@contextmanager
def time_inside(cls, method: str = "__call__") -> Iterator[_Timer]:
    """Adds up the wall time spent inside ``cls.<method>`` while the block runs: a part's own cost
    (the previewer's, the sampler step's), which an end-to-end ratio shows only through the noise."""
    timer, original = _Timer(), getattr(cls, method)

    def timed(instance, *args, **kwargs):  # for a module's function, ``instance`` is simply its first argument
        tick = clock()
        try:
            return original(instance, *args, **kwargs)
        finally:
            timer.seconds += clock() - tick
            timer.calls += 1

    setattr(cls, method, timed)
    try:
        yield timer
    finally:
        setattr(cls, method, original)


# -- memory ----------------------------------------------------------------------

def rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:  # psutil missing: fall back to the lifetime peak
        return max_rss_mb()


def available_mb() -> float | None:
    """Memory the machine has available now, in MiB; None without psutil."""
    try:
        import psutil

        return psutil.virtual_memory().available / 2**20
    except Exception:  # noqa: BLE001 - psutil missing
        return None


def max_rss_mb() -> float:
    """Lifetime peak RSS of this process (``getrusage``: kilobytes on Linux, bytes on macOS; psutil on Windows)."""
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


class PeakMemory:
    """Peak memory while the ``with`` block runs.

    ``getrusage`` only knows the lifetime peak, so RSS is sampled from a thread
    every ``interval`` seconds; on CUDA the allocator's own peak is read too.
    ``peak_mb`` is the process RSS peak, ``delta_mb`` its rise above the RSS at entry.
    """

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.start_mb = self.peak_mb = 0.0
        self.cuda_peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        self.start_mb = self.peak_mb = rss_mb()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())
        if torch.cuda.is_available():
            self.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20

    @property
    def delta_mb(self) -> float:
        return self.peak_mb - self.start_mb


def set_threads(threads: int | None) -> int:
    """Pin torch's intra-op threads (None: keep torch's default). Returns the count in use."""
    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)
    return torch.get_num_threads()
