"""Bench 5: the two caches an artist feels.

Repeat prompt: a generation whose (prompt, negative) was seen before reuses the
cached text embeddings. Interleaved: a new prompt every repetition vs the same
prompt every repetition; the figure is the time saved per generation, with the
encoder's hit/miss counts as evidence the cache did the saving.

Model switch: re-selecting a model the registry still holds vs loading it cold.
Two registries over the same folders, one holding a single model (every switch
is a cold load) and one holding two (a switch back is a cache hit); each
repetition loads the other model first, then times loading the bench model.
Goal: cached ≤ 5% of cold.
"""
from __future__ import annotations

from engine import ModelRegistry

from .fixtures import TINY_SD1, TINY_SD1_B, BenchContext, cold_prompts, request
from .report import BenchResult, Row
from .timing import clock, interleave, median, ms

SWITCH_GOAL = 0.05


def repeat_prompt(ctx: BenchContext, model_name: str) -> dict:
    mode, engine = ctx.mode, ctx.engine
    encoder = ctx.models.registry.load(model_name).prompt_encoder
    hits_before, misses_before = encoder.hits, encoder.misses

    encode_seconds: dict[str, list[float]] = {"new": [], "repeat": []}

    def generation(kind: str, prompt_for):
        def run(index: int) -> float:
            tick = clock()
            result = engine.generate(request(model_name, mode, prompt=prompt_for(index)))
            seconds = clock() - tick
            if index >= 0:
                encode_seconds[kind].append(result.timings["encode"])
            return seconds
        return run

    times = interleave({"new": generation("new", cold_prompts()),
                        "repeat": generation("repeat", lambda _index: "a repeated prompt, blue background")},
                       mode.repetitions, budget_s=mode.ratio_budget_s)
    saved = [new - repeat for new, repeat in zip(times["new"], times["repeat"])]
    return {
        "model": model_name, "new_prompt_ms": ms(median(times["new"])), "repeat_prompt_ms": ms(median(times["repeat"])),
        "saved_ms": ms(median(saved)), "ratio": round(median([r / n for n, r in zip(times["new"], times["repeat"])]), 4),
        "encode_new_ms": ms(median(encode_seconds["new"])), "encode_repeat_ms": ms(median(encode_seconds["repeat"])),
        "encode_ratio": round(median(encode_seconds["repeat"]) / max(median(encode_seconds["new"]), 1e-9), 4),
        "encoder_hits": encoder.hits - hits_before, "encoder_misses": encoder.misses - misses_before,
    }


def model_switch(ctx: BenchContext, model_name: str) -> dict:
    base = ctx.models.registry
    other = TINY_SD1_B if model_name != TINY_SD1_B else TINY_SD1
    device = base.device.type
    cold = ModelRegistry(base.models_dir, base.builtin_dir, device=device, cache_size=1)
    warm = ModelRegistry(base.models_dir, base.builtin_dir, device=device, cache_size=2)

    def switch(registry: ModelRegistry):
        def run(index: int) -> float:
            registry.load(other)
            tick = clock()
            registry.load(model_name)
            return clock() - tick
        return run

    times = interleave({"cold": switch(cold), "cached": switch(warm)}, ctx.mode.repetitions)
    return {
        "model": model_name, "cold_load_ms": ms(median(times["cold"])), "cached_ms": ms(median(times["cached"])),
        "ratio": round(median([c / k for k, c in zip(times["cold"], times["cached"])]), 6),
    }


def run(ctx: BenchContext) -> BenchResult:
    ctx.log(f"  repeat prompt and model switch ({ctx.models.sd1})")
    prompt = repeat_prompt(ctx, ctx.models.sd1)
    switch = model_switch(ctx, ctx.models.sd1)
    result = BenchResult("caches", "repeat prompt / model switch", {"repeat_prompt": prompt, "model_switch": switch})
    # The cache's effect is on prompt encoding; the demo's text encoder is so small that the whole
    # generation shows it only within the machine's noise, so that ratio is shown without a goal.
    result.rows.append(Row("prompt encoding, repeat ÷ new prompt", prompt["encode_ratio"], "×", 1.0,
                           f"{prompt['encode_repeat_ms']:.2f} vs {prompt['encode_new_ms']:.2f} ms; encoder hits "
                           f"{prompt['encoder_hits']}, misses {prompt['encoder_misses']}"))
    result.rows.append(Row("whole generation, repeat ÷ new prompt", prompt["ratio"], "×", None,
                           f"saves {prompt['saved_ms']:.1f} ms/generation (median of pairs)"))
    result.rows.append(Row("re-select cached model ÷ cold load", switch["ratio"], "×", SWITCH_GOAL,
                           f"{switch['cached_ms']:.2f} vs {switch['cold_load_ms']:.0f} ms"))
    return result
