"""Bench 8: what hires fix costs, as a ratio to its first pass.

Interleaved, on the bench's SD 1.x model: a plain txt2img job at the bench's size, and the same job with hires fix
×2 (the "Latent" upscaler, as many second-pass steps as first, denoising 0.7: A1111's UI default). The figure is
(hires job − plain job) ÷ plain job, median of the pairs: what the upscale and the second pass add. The second pass
runs int(0.7 · steps) + 1 steps on four times the latent pixels, so it is several first passes' worth of UNet work.
"""
from __future__ import annotations

from .fixtures import BenchContext, request
from .report import BenchResult, Row
from .timing import clock, interleave, median, ms

SCALE, STRENGTH = 2.0, 0.7


def hires_cost(ctx: BenchContext, model_name: str) -> dict:
    engine, mode = ctx.engine, ctx.mode
    plain_request = request(model_name, mode)
    hires_request = request(model_name, mode, enable_hr=True, hr_scale=SCALE, hr_upscaler="Latent", denoising_strength=STRENGTH)
    for job in (plain_request, hires_request):  # warm: each size's first calls out of the timings
        engine.generate(job)

    def run(job):
        def timed(index: int) -> float:
            tick = clock()
            engine.generate(job)
            return clock() - tick
        return timed

    times = interleave({"plain": run(plain_request), "hires": run(hires_request)}, mode.repetitions, budget_s=mode.ratio_budget_s)
    extra = [(hires - plain) / plain for plain, hires in zip(times["plain"], times["hires"])]
    return {"model": model_name, "size": mode.size, "steps": mode.steps, "plain_ms": ms(median(times["plain"])),
            "hires_ms": ms(median(times["hires"])), "second_pass_ratio": round(median(extra), 3), "pairs": len(extra)}


def run(ctx: BenchContext) -> BenchResult:
    model_name = ctx.models.sd1
    ctx.log(f"  hires fix ×{SCALE:g} ({model_name})")
    figures = hires_cost(ctx, model_name)
    print(f"hires: upscale + second pass ÷ first pass = {figures['second_pass_ratio']:.3f} "
          f"({figures['hires_ms']:.1f} vs {figures['plain_ms']:.1f} ms, {figures['size']}² → ×{SCALE:g}, {figures['steps']} steps)")
    result = BenchResult("hires", "Hires fix cost", {"hires_fix": figures})
    result.rows.append(Row(f"hires fix ×{SCALE:g} (Latent, strength {STRENGTH}): extra time ÷ first pass", figures["second_pass_ratio"],
                           "×", None, f"{figures['hires_ms']:.1f} vs {figures['plain_ms']:.1f} ms at {figures['size']}², "
                                      f"{figures['steps']} steps, {figures['pairs']} pairs"))
    return result
