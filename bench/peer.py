"""Bench 1: ``Engine.generate`` against the plain diffusers pipeline on the same model.

Both sides get the same weights (the peer pipeline loads the same diffusers
folder again, as a diffusers user would), the same sampler (DPM++ 2M with Karras σs, which is what the
engine's "Automatic" gives DPM++ 2M; diffusers' ``DPMSolverMultistepScheduler`` on the pipe), steps, CFG, size and
seed; previews are off in the engine and the peer's progress bar is off. The
figure is engine time ÷ pipeline time, median of interleaved pairs.

"cold prompt": every repetition uses a prompt neither side has seen, so the
engine's embedding cache cannot help (in-vocabulary prompts that fit the demo
model's 16-token window; beyond a window diffusers truncates while Sfumato, like
A1111, encodes the rest in further chunks, so the two would not draw the same).
"warm prompt": the same prompt every time, as when an artist re-rolls seeds; the
engine then skips the text encoder.
The images of each pair are compared pixel by pixel.
"""
from __future__ import annotations

import torch

from .fixtures import NEGATIVE, PROMPT, BenchContext, cold_prompts, max_pixel_diff, request
from .report import BenchResult, Row
from .timing import clock, interleave, median, ms, pair_stats

GOAL = 0.95


def peer_scheduler(config):
    """diffusers' DPM-Solver++(2M) over Karras σs from the model's whole σ range, ending at σ = 0: the nearest
    diffusers has to the engine's DPM++ 2M (it rounds the model's timesteps to integers and takes a first-order
    last step below 15 steps, so pixels agree closely, not exactly)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True,
                                                   final_sigmas_type="zero")


def peer_pipeline(model):
    """A plain diffusers pipeline on the same weights, with the engine's DPM++ 2M scheduler.

    A diffusers folder is loaded again, as diffusers loads it, so the peer's modules carry none of
    the engine's load-time changes (``engine.attention_calls``); other models share the engine's
    loaded modules, which can only flatter the peer.
    """
    cls = model.family.pipeline_class()
    if model.entry.kind == "diffusers":
        pipe = cls.from_pretrained(model.entry.path, local_files_only=True, use_safetensors=True, dtype=model.dtype,
                                   **model.family.load_options)
        pipe.to(model.device)
    else:
        pipe = cls.from_pipe(model.pipeline)
    pipe.scheduler = peer_scheduler(model.pipeline.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare(ctx: BenchContext, model_name: str) -> dict:
    engine, mode = ctx.engine, ctx.mode
    model = ctx.models.registry.load(model_name)
    pipe = peer_pipeline(model)
    images: dict[tuple[str, int], object] = {}

    def engine_run(prompt_for):
        def run(index: int) -> float:
            req = request(model_name, mode, prompt=prompt_for(index))
            tick = clock()
            result = engine.generate(req)
            seconds = clock() - tick
            images[("engine", index)] = result.images[0].image
            return seconds
        return run

    def peer_run(prompt_for):
        def run(index: int) -> float:
            generator = torch.Generator("cpu").manual_seed(1234)
            tick = clock()
            output = pipe(prompt=prompt_for(index), negative_prompt=NEGATIVE, num_inference_steps=mode.steps, guidance_scale=7.0,
                          width=mode.size, height=mode.size, generator=generator, output_type="pil")
            seconds = clock() - tick
            images[("peer", index)] = output.images[0]
            return seconds
        return run

    figures: dict = {"model": model_name, "steps": mode.steps, "size": mode.size, "sampler": "DPM++ 2M", "cfg": 7.0}
    for label, prompt_for in (("cold_prompt", cold_prompts()), ("warm_prompt", lambda _index: PROMPT)):
        images.clear()
        times = interleave({"engine": engine_run(prompt_for), "peer": peer_run(prompt_for)}, mode.repetitions,
                           budget_s=mode.ratio_budget_s)
        stats = pair_stats(times["engine"], times["peer"])
        diffs = [max_pixel_diff(images[("engine", i)], images[("peer", i)]) for i in range(len(times["engine"]))]
        figures[label] = stats["ratio"]
        figures[f"{label}_detail"] = {"engine_ms": ms(median(times["engine"])), "diffusers_ms": ms(median(times["peer"])), **stats,
                                      "ratios": [round(e / p, 4) for e, p in zip(times["engine"], times["peer"])]}
        figures[f"{label}_max_pixel_diff"] = max(diffs)
        figures["max_pixel_diff"] = max(figures.get("max_pixel_diff", 0), max(diffs))
    return figures


def run(ctx: BenchContext) -> BenchResult:
    result = BenchResult("engine_vs_diffusers", "engine vs diffusers")
    for family, model_name in (("sd1", ctx.models.sd1), ("sdxl", ctx.models.sdxl)):
        ctx.log(f"  engine vs diffusers: {family} ({model_name})")
        figures = compare(ctx, model_name)
        result.figures[family] = figures
        for label in ("cold_prompt", "warm_prompt"):
            detail = figures[f"{label}_detail"]
            result.rows.append(Row(f"engine ÷ diffusers, {family} {label.replace('_', ' ')}", figures[label], "×", GOAL,
                                   f"{model_name}: {detail['engine_ms']:.0f} vs {detail['diffusers_ms']:.0f} ms; "
                                   f"fastest runs {detail['ratio_of_minimums']:.3f}×"))
        for label in ("warm_prompt", "cold_prompt"):
            # No goal: the engine samples as A1111 does (fractional timesteps, second order to the end), which
            # diffusers' scheduler does not, so the pictures agree closely rather than exactly (see peer_scheduler).
            result.rows.append(Row(f"max pixel diff vs diffusers, {family} {label.replace('_', ' ')}",
                                   figures[f"{label}_max_pixel_diff"], "/255", None))
    return result
