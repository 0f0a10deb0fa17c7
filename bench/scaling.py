"""Bench 6: time and memory against image size and batch size.

Sizes grow from 64² while one generation stays within the mode's budget (a few
seconds). Past it they keep growing as short points, a few steps and one run each,
while one is predicted to stay within a larger budget and to fit in the memory the
machine has available; the largest size that fitted is reported. Batches run at
the bench size. Each point is the median of a few runs; memory is the peak RSS
while the job ran, sampled from a thread (and the CUDA allocator's peak on a
GPU). ``peak_rss_mb`` for the whole bench process comes from ``getrusage``.
The plot shows time per step against both.
"""
from __future__ import annotations

from pathlib import Path

from .fixtures import BenchContext, request
from .report import BenchResult, Row
from .timing import PeakMemory, available_mb, clock, max_rss_mb, median, ms

POINT_REPETITIONS = 3
SHORT_POINT_STEPS = 3
MEMORY_HEADROOM = 0.5  # a short point may use at most this share of the memory available before it


def point(ctx: BenchContext, model_name: str, size: int, batch: int, short: bool = False) -> dict:
    """One size and batch: median of a few full runs after a warm-up, or (``short``) one run of a few steps."""
    mode, engine = ctx.mode, ctx.engine
    steps_per_run = SHORT_POINT_STEPS if short else mode.steps
    req = request(model_name, mode, width=size, height=size, batch_size=batch, steps=steps_per_run)
    if not short:
        engine.generate(req)  # warm-up: first touches of a new shape allocate
    totals, steps, peaks, deltas, cuda = [], [], [], [], []
    for _ in range(1 if short else min(POINT_REPETITIONS, mode.repetitions)):
        with PeakMemory() as memory:
            tick = clock()
            result = engine.generate(req)
            totals.append(clock() - tick)
        steps.append(result.timings["denoise"] / steps_per_run)
        peaks.append(memory.peak_mb)
        deltas.append(memory.delta_mb)
        if memory.cuda_peak_mb is not None:
            cuda.append(memory.cuda_peak_mb)
    figures = {"size": size, "batch": batch, "total_ms": ms(median(totals)), "step_ms": ms(median(steps)),
               "step_ms_per_image": ms(median(steps) / batch), "peak_rss_mb": round(max(peaks), 1),
               "job_rss_delta_mb": round(median(deltas), 1), "steps": steps_per_run, "short": short}
    if cuda:
        figures["cuda_peak_mb"] = round(max(cuda), 1)
    return figures


def _predicted_seconds(previous: dict, growth: float, steps: int) -> float:
    """One generation with ``steps`` steps at ``growth`` times the last point's pixels; each part grows at least as much."""
    step_s = previous["step_ms"] / 1000
    other_s = max(0.0, previous["total_ms"] / 1000 - step_s * previous["steps"])  # prompt, setup, VAE decode
    return (step_s * steps + other_s) * growth


def measure(ctx: BenchContext, model_name: str) -> dict:
    mode = ctx.mode
    family = ctx.models.registry.load(model_name).family
    sizes: list[dict] = []
    for size in mode.scaling_sizes:
        if size > family.max_size:
            break
        short = False
        if sizes:
            previous = sizes[-1]
            growth = (size / previous["size"]) ** 2
            short = previous["short"] or _predicted_seconds(previous, growth, mode.steps) > mode.scaling_budget_s
            if short and _predicted_seconds(previous, growth, SHORT_POINT_STEPS) > mode.scaling_short_budget_s:
                break
            available = available_mb()
            if short and available is not None and previous["job_rss_delta_mb"] * growth > available * MEMORY_HEADROOM:
                break
        ctx.log(f"    {size}×{size}" + (f" ({SHORT_POINT_STEPS} steps, one run)" if short else ""))
        sizes.append(point(ctx, model_name, size, 1, short=short))
    batches = []
    for batch in mode.scaling_batches:
        ctx.log(f"    batch {batch}")
        batches.append(point(ctx, model_name, mode.size, batch))
    return {"model": model_name, "steps": mode.steps, "sizes": sizes, "batches": batches,
            "largest_size": sizes[-1]["size"] if sizes else None}


def plot(figures: dict, path: Path) -> Path | None:
    """Time per step vs image side and vs batch size (matplotlib, Agg backend)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except Exception:  # noqa: BLE001 - no plot is not a failed bench
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = figures["sizes"]
    left.plot([p["size"] for p in sizes], [p["step_ms"] for p in sizes], "o-", label="time per step")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xticks([p["size"] for p in sizes], [str(p["size"]) for p in sizes])
    left.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    left.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    left.yaxis.set_minor_formatter(ticker.NullFormatter())
    left.set_xlabel("image side (px)")
    left.set_ylabel("ms per step")
    left.set_title(f"size ({figures['model']}, batch 1)")
    memory = left.twinx()
    memory.plot([p["size"] for p in sizes], [p["job_rss_delta_mb"] for p in sizes], "s--", color="tab:red", label="job RSS rise")
    memory.set_ylabel("job RSS rise (MiB)", color="tab:red")
    batches = figures["batches"]
    right.plot([p["batch"] for p in batches], [p["step_ms"] for p in batches], "o-", label="whole batch")
    right.plot([p["batch"] for p in batches], [p["step_ms_per_image"] for p in batches], "s--", label="per image")
    right.set_xticks([p["batch"] for p in batches])
    right.set_xlabel("batch size")
    right.set_ylabel("ms per step")
    right.set_title(f"batch ({figures['batches'][0]['size'] if batches else ''}px)")
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(ctx: BenchContext) -> BenchResult:
    ctx.log(f"  scaling ({ctx.models.sd1})")
    figures = measure(ctx, ctx.models.sd1)
    figures["process_peak_rss_mb"] = round(max_rss_mb(), 1)
    plotted = plot(figures, ctx.out_dir / "scaling.png")
    figures["plot"] = plotted.name if plotted else None
    result = BenchResult("scaling", "scaling", figures)
    for p in figures["sizes"]:
        how = f"{p['steps']} steps, one run: " if p["short"] else ""
        result.rows.append(Row(f"{p['size']}² batch 1: ms per step", p["step_ms"], "ms", None,
                               f"{how}total {p['total_ms']:.0f} ms, job RSS +{p['job_rss_delta_mb']:.0f} MiB"))
    for p in figures["batches"][1:]:
        result.rows.append(Row(f"{p['size']}² batch {p['batch']}: ms per step", p["step_ms"], "ms", None,
                               f"{p['step_ms_per_image']:.1f} ms per image-step, job RSS +{p['job_rss_delta_mb']:.0f} MiB"))
    result.rows.append(Row("peak RSS of the bench process", figures["process_peak_rss_mb"], "MiB"))
    return result
