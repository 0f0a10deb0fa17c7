"""Bench 3: what previews cost.

Three interleaved variants of the same generation (warm prompt, a progress
callback attached in all three so only the preview differs): previews off
(``preview_every=0``), the cheap latent→RGB map every step, and a full VAE
decode every step. Figures: cheap ÷ off (goal ≤ 1.02) and full ÷ off.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from engine.previews import CheapPreviewer

from .fixtures import BenchContext, request
from .report import BenchResult, Row
from .timing import clock, interleave, median, ms, pair_stats

GOAL = 1.02
VARIANTS = {"off": dict(preview_every=0), "cheap": dict(preview_every=1, preview_method="cheap"),
            "full": dict(preview_every=1, preview_method="full")}


def measure(ctx: BenchContext, model_name: str) -> dict:
    mode, engine = ctx.mode, ctx.engine
    previews: dict[str, int] = {}

    def runner(variant: str):
        req = request(model_name, mode, **VARIANTS[variant])

        def on_progress(progress) -> None:
            if progress.preview is not None:
                previews[variant] = previews.get(variant, 0) + 1

        def run(index: int) -> float:
            previews[variant] = 0
            tick = clock()
            engine.generate(req, on_progress=on_progress)
            return clock() - tick
        return run

    with time_inside(CheapPreviewer) as spent:
        times = interleave({name: runner(name) for name in VARIANTS}, mode.repetitions, budget_s=mode.ratio_budget_s)
    figures: dict = {"model": model_name, "steps": mode.steps, "size": mode.size,
                     "previews_per_image": dict(previews), **{f"{name}_ms": ms(median(t)) for name, t in times.items()}}
    previewer_seconds_per_image = spent.seconds / max(spent.calls, 1) * previews["cheap"]
    figures["cheap_previewer_ms_per_image"] = round(previewer_seconds_per_image * 1000, 3)
    figures["cheap_previewer_share"] = round(previewer_seconds_per_image / median(times["cheap"]), 5)
    for name in ("cheap", "full"):
        stats = pair_stats(times[name], times["off"])
        figures[name] = stats["ratio"]
        figures[f"{name}_detail"] = stats
    return figures


@dataclass
class _Timer:
    seconds: float = 0.0
    calls: int = 0


@contextmanager
def time_inside(cls) -> Iterator[_Timer]:
    """Adds up the wall time spent inside ``cls.__call__`` while the block runs: the previewer's own
    cost, which the end-to-end ratio can only show through the machine's noise."""
    timer, original = _Timer(), cls.__call__

    def timed(instance, *args, **kwargs):
        tick = clock()
        try:
            return original(instance, *args, **kwargs)
        finally:
            timer.seconds += clock() - tick
            timer.calls += 1

    cls.__call__ = timed
    try:
        yield timer
    finally:
        cls.__call__ = original


def run(ctx: BenchContext) -> BenchResult:
    ctx.log(f"  preview cost ({ctx.models.sd1})")
    figures = measure(ctx, ctx.models.sd1)
    result = BenchResult("preview_cost", "preview cost", figures)
    result.rows.append(Row("cheap previews every step ÷ off", figures["cheap"], "×", GOAL,
                           f"{figures['previews_per_image']['cheap']} previews/image; "
                           f"fastest runs {figures['cheap_detail']['ratio_of_minimums']:.3f}×"))
    result.rows.append(Row("time inside the cheap previewer ÷ generation", figures["cheap_previewer_share"], "×", GOAL - 1,
                           f"{figures['cheap_previewer_ms_per_image']:.2f} ms per image for {figures['previews_per_image']['cheap']} previews"))
    result.rows.append(Row("full-VAE previews every step ÷ off", figures["full"], "×", None,
                           f"{figures['previews_per_image']['full']} previews/image"))
    return result
