"""Bench 3: what previews cost.

Variants of the same generation (warm prompt), differing only in the preview:
off (``preview_every=0``), the cheap latent→RGB map every step, and a full VAE
decode every step; cheap and full are each interleaved with off. In all three,
progress goes to a viewer thread that shows previews as the UI's job follower
does: the newest one at once, the next no sooner than a frame (50 ms) later; a
cheap preview is drawn there, where it is shown. Figures: cheap ÷ off (goal
≤ 1.02) and full ÷ off, plus the time the cheap previewer takes on the sampling
thread (its latent snapshot) and on the viewer's (drawing), timed inside the
same run.
"""
from __future__ import annotations

import queue
import threading

from engine.previews import CheapPreviewer
from ui.runner import FRAME_SECONDS

from .fixtures import BenchContext, request
from .report import BenchResult, Row
from .timing import clock, interleave, median, ms, pair_stats, time_inside

GOAL = 1.02
# The cost being measured (about 1%) is a tenth of the noise between two runs of a pair on a shared
# machine (their ratio spreads by ±10%), so cheap vs off gets three ratio budgets' worth of pairs:
# over 40 pairs, a run with previews on but nobody receiving them (no preview work) measured 1.006× off.
CHEAP_BUDGET_FACTOR = 3.0
VARIANTS = {"off": dict(preview_every=0), "cheap": dict(preview_every=1, preview_method="cheap"),
            "full": dict(preview_every=1, preview_method="full")}


class Viewer:
    """A thread that shows previews the way the UI's job follower does (``ui.runner.follow``):
    the newest one as soon as it can, then no sooner than a frame later."""

    def __init__(self) -> None:
        self.made = self.shown = 0
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._look, daemon=True)

    def __enter__(self) -> "Viewer":
        self._thread.start()
        return self

    def send(self, progress) -> None:
        self.made += progress.has_preview
        self._inbox.put(progress)

    def _look(self) -> None:
        while (progress := self._inbox.get()) is not None:
            while True:  # the backlog: newest wins
                try:
                    newer = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if newer is None:
                    self._show(progress)
                    return
                progress = newer
            self._show(progress)
            self._closed.wait(FRAME_SECONDS)

    def _show(self, progress) -> None:
        if progress.preview is not None:
            self.shown += 1

    def __exit__(self, *exc) -> None:
        self._inbox.put(None)
        self._closed.set()
        self._thread.join()


def measure(ctx: BenchContext, model_name: str) -> dict:
    mode, engine = ctx.mode, ctx.engine
    made: dict[str, int] = {}
    shown: dict[str, list[int]] = {name: [] for name in VARIANTS}

    def runner(variant: str):
        req = request(model_name, mode, **VARIANTS[variant])

        def run(index: int) -> float:
            with Viewer() as viewer:
                tick = clock()
                engine.generate(req, on_progress=viewer.send)
                seconds = clock() - tick
            made[variant] = viewer.made
            shown[variant].append(viewer.shown)
            return seconds
        return run

    # Cheap against off first, with the time budget (two cheap runs a round give it many pairs), then full against off.
    with time_inside(CheapPreviewer, "deferred") as snapshots, time_inside(CheapPreviewer, "render") as drawings:
        times = interleave({name: runner(name) for name in ("off", "cheap")}, mode.repetitions,
                           budget_s=mode.ratio_budget_s * CHEAP_BUDGET_FACTOR)
    full_times = interleave({name: runner(name) for name in ("off", "full")}, mode.repetitions)
    times["full"], times["off_vs_full"] = full_times["full"], full_times["off"]
    figures: dict = {"model": model_name, "steps": mode.steps, "size": mode.size,
                     "previews_per_image": dict(made), "previews_shown_per_image": {name: median(counts) for name, counts in shown.items()},
                     **{f"{name}_ms": ms(median(times[name])) for name in VARIANTS}}
    sampling_seconds = snapshots.seconds / max(snapshots.calls, 1) * made["cheap"]
    figures["cheap_previewer_ms_per_image"] = round(sampling_seconds * 1000, 3)
    figures["cheap_previewer_share"] = round(sampling_seconds / median(times["cheap"]), 5)
    figures["cheap_drawing_ms_per_image"] = round(drawings.seconds / max(drawings.calls, 1) * median(shown["cheap"]) * 1000, 3)
    for name, baseline in (("cheap", "off"), ("full", "off_vs_full")):
        stats = pair_stats(times[name], times[baseline])
        figures[name] = stats["ratio"]
        figures[f"{name}_detail"] = stats
    return figures


def run(ctx: BenchContext) -> BenchResult:
    ctx.log(f"  preview cost ({ctx.models.sd1})")
    figures = measure(ctx, ctx.models.sd1)
    result = BenchResult("preview_cost", "preview cost", figures)
    result.rows.append(Row("cheap previews every step ÷ off", figures["cheap"], "×", GOAL,
                           f"{figures['previews_per_image']['cheap']} previews/image, "
                           f"{figures['previews_shown_per_image']['cheap']:g} shown; fastest runs {figures['cheap_detail']['ratio_of_minimums']:.3f}×"))
    result.rows.append(Row("cheap previews' time on the sampling thread ÷ generation", figures["cheap_previewer_share"], "×",
                           GOAL - 1, f"{figures['cheap_previewer_ms_per_image']:.2f} ms per image (latent snapshots); drawing "
                           f"them took {figures['cheap_drawing_ms_per_image']:.2f} ms on the viewer's thread"))
    result.rows.append(Row("full-VAE previews every step ÷ off", figures["full"], "×", None,
                           f"{figures['previews_per_image']['full']} previews/image, "
                           f"{figures['previews_shown_per_image']['full']:g} shown"))
    return result
