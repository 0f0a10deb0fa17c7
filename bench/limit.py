"""Bench 2: the engine against the compute it cannot avoid.

The floor for one image is ``steps`` UNet calls at the CFG batch (uncond + cond
stacked) plus one VAE decode; everything else (scheduler arithmetic, noise,
prompt handling, post-processing, bookkeeping) is overhead. Each repetition
times one ``Engine.generate`` (warm prompt, previews off) and then, right after,
the floor itself: the same number of UNet calls on inputs of the same shapes,
and one decode. The figure is the median of engine ÷ floor.

``step_ms`` (one denoising step as the engine runs it) is recorded here too:
the first-preview bench compares its latency with it, and so is the time spent
inside diffusers' DPM-Solver ``step``, the sampler's own arithmetic (about
0.2 ms a step), which is most of the gap on a small UNet. The goal applies to the
demo model and the demo-sized SDXL; the tiny SDXL, whose UNet call takes a few
milliseconds, is shown as a magnifying glass on per-step costs.
"""
from __future__ import annotations

import torch

from engine.sampling import samplers as sampler_functions
from engine.sampling.denoiser import GuidedDenoiser

from .fixtures import PROMPT, NEGATIVE, BenchContext, request
from .report import BenchResult, Row
from .timing import clock, interleave, median, ms, pair_stats, time_inside

GOAL = 1.05


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def floor_runner(model, size: int, batch: int = 1, do_cfg: bool = True):
    """A callable timing ``steps`` bare UNet calls plus one VAE decode, for a model and image size."""
    pipe, device, dtype = model.pipeline, model.device, model.dtype
    conditioning = model.prompt_encoder.encode(PROMPT, NEGATIVE)
    embeds = conditioning.prompt_embeds.repeat(batch, 1, 1)
    if do_cfg:
        embeds = torch.cat([conditioning.negative_embeds.repeat(batch, 1, 1), embeds])
    embeds = embeds.to(device, dtype)
    rows = embeds.shape[0]
    added = model.family.unet_kwargs(conditioning, size, size).batched(batch, do_cfg, device, dtype)
    side = size // model.vae_scale_factor
    latents = torch.randn((rows, pipe.unet.config.in_channels, side, side), generator=torch.Generator("cpu").manual_seed(0)).to(device, dtype)
    decode_latents = latents[:batch, : pipe.vae.config.latent_channels]
    timestep = torch.tensor(500, device=device)

    @torch.inference_mode()
    def run(steps: int) -> tuple[float, float]:
        """Seconds for ``steps`` UNet calls, and for one decode."""
        _sync(device)
        tick = clock()
        for _ in range(steps):
            pipe.unet(latents, timestep, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)
        _sync(device)
        unet_seconds = clock() - tick
        tick = clock()
        pipe.vae.decode(decode_latents / model.scaling_factor, return_dict=False)[0].float().cpu()
        return unet_seconds, clock() - tick

    return run


def measure(ctx: BenchContext, model_name: str) -> dict:
    mode, engine = ctx.mode, ctx.engine
    model = ctx.models.registry.load(model_name)
    floor = floor_runner(model, mode.size)
    parts: dict[str, list[float]] = {"unet": [], "decode": [], "step": []}

    def engine_run(index: int) -> float:
        tick = clock()
        result = engine.generate(request(model_name, mode))
        seconds = clock() - tick
        if index >= 0:
            parts["step"].append(result.timings["denoise"] / mode.steps)
        return seconds

    def floor_run(index: int) -> float:
        unet_seconds, decode_seconds = floor(mode.steps)
        if index >= 0:
            parts["unet"].append(unet_seconds / mode.steps)
            parts["decode"].append(decode_seconds)
        return unet_seconds + decode_seconds

    # The sampler's own arithmetic: time inside DPM++ 2M's function less the model calls it makes.
    with time_inside(sampler_functions, "sample_dpmpp_2m") as sampler_time, time_inside(GuidedDenoiser, "__call__") as model_time:
        times = interleave({"engine": engine_run, "floor": floor_run}, mode.repetitions, budget_s=mode.ratio_budget_s)
    ratios = [e / f for e, f in zip(times["engine"], times["floor"])]
    runs = len(times["engine"]) + 1  # the warm-up round's engine run is timed too
    sampler_ms_per_job = (sampler_time.seconds - model_time.seconds) / runs * 1000
    return {
        "model": model_name, "steps": mode.steps, "size": mode.size, **pair_stats(times["engine"], times["floor"]),
        "engine_ms": ms(median(times["engine"])), "floor_ms": ms(median(times["floor"])),
        "unet_call_ms": ms(median(parts["unet"])), "decode_ms": ms(median(parts["decode"])),
        "step_ms": ms(median(parts["step"])), "sampler_step_ms_per_job": round(sampler_ms_per_job, 3),
        "sampler_share_of_floor": round(sampler_ms_per_job / ms(median(times["floor"])), 4),
        "ratios": [round(r, 4) for r in ratios],
    }


def run(ctx: BenchContext) -> BenchResult:
    result = BenchResult("engine_vs_limit", "engine vs compute floor")
    models = [("sd1", ctx.models.sd1, GOAL), ("sdxl", ctx.models.sdxl, GOAL)]
    if ctx.models.tiny_sdxl != ctx.models.sdxl:
        # A UNet call of a few milliseconds: a magnifying glass on per-step costs, shown without a goal.
        models.append(("tiny sdxl", ctx.models.tiny_sdxl, None))
    for family, model_name, goal in models:
        ctx.log(f"  engine vs compute floor: {family} ({model_name})")
        figures = measure(ctx, model_name)
        result.figures[family.replace(" ", "_")] = figures
        result.rows.append(Row(f"engine ÷ (steps × UNet + decode), {family}", figures["ratio"], "×", goal,
                               f"{figures['engine_ms']:.0f} vs {figures['floor_ms']:.0f} ms; UNet call {figures['unet_call_ms']:.1f} ms; "
                               f"fastest runs {figures['ratio_of_minimums']:.3f}×"))
        result.rows.append(Row(f"  of which the DPM++ 2M arithmetic ÷ floor, {family}", figures["sampler_share_of_floor"], "×", None,
                               f"{figures['sampler_step_ms_per_job']:.1f} ms per image in the sampler function, model calls excluded"))
    result.rows.append(Row("one engine step (sd1)", result.figures["sd1"]["step_ms"], "ms"))
    return result
