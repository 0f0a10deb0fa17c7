"""Bench 7: what switching LoRAs costs, as a ratio to one generation.

Interleaved, on the bench's SD 1.x model: a plain generation, and a generation whose prompt names
another LoRA than the job before (two kohya LoCon files taking turns, so every job takes one set of
adapters off the model and puts the other on). The figure is the extra time of a switching job ÷ a
plain job, median of the pairs. Also, timed directly in the same run: putting a LoRA on and taking
it off again (``engine.networks.active`` around nothing) ÷ one plain generation; and reading a LoRA
file from disk, which the engine does once per file (its tensors stay cached).

The base model is never reloaded: that the registry hands out the same loaded model before and after is recorded.
"""
from __future__ import annotations

from engine import networks

from .fixtures import BenchContext, request
from .report import BenchResult, Row
from .timing import clock, interleave, median, ms

FILES = ("bench-lora-a", "bench-lora-b")


def _write_files(ctx: BenchContext, model_name: str) -> None:
    from tests._lora_files import kohya_lora  # the tests' builders: kohya LoCon files for a model's own layers

    folder = ctx.models.models_dir / "Lora"
    folder.mkdir(parents=True, exist_ok=True)
    pipeline = ctx.models.registry.load(model_name).pipeline
    for seed, name in enumerate(FILES):
        kohya_lora(pipeline, folder / f"{name}.safetensors", seed=seed, rank=8, alpha=4.0, conv=True, scale=0.1)
    ctx.engine.networks.refresh()


def switch_cost(ctx: BenchContext, model_name: str) -> dict:
    engine, mode = ctx.engine, ctx.mode
    registry = ctx.models.registry
    model_before = registry.load(model_name)

    def plain(index: int) -> float:
        tick = clock()
        engine.generate(request(model_name, mode))
        return clock() - tick

    def switching(index: int) -> float:
        name = FILES[index % 2]
        tick = clock()
        engine.generate(request(model_name, mode, prompt=f"{request(model_name, mode).prompt} <lora:{name}:0.8>"))
        return clock() - tick

    times = interleave({"plain": plain, "switching": switching}, mode.repetitions, budget_s=mode.ratio_budget_s)
    extra = [(switch - base) / base for base, switch in zip(times["plain"], times["switching"])]

    model = registry.load(model_name)
    jobs = {name: networks.prepare(engine.networks, f"x <lora:{name}:0.8>") for name in FILES}
    on_off = []
    for index in range(max(mode.repetitions, 5)):
        tick = clock()
        with networks.active(model, jobs[FILES[index % 2]]):
            pass
        on_off.append(clock() - tick)

    reads = []
    for index in range(max(mode.repetitions, 3)):
        networks.formats._read.cache_clear()
        tick = clock()
        networks.prepare(engine.networks, f"x <lora:{FILES[index % 2]}:1>")
        reads.append(clock() - tick)
    plain_s = median(times["plain"])
    return {
        "model": model_name, "plain_ms": ms(plain_s), "switching_ms": ms(median(times["switching"])),
        "switch_extra_ratio": round(median(extra), 4), "on_off_ms": ms(median(on_off)),
        "on_off_ratio": round(median(on_off) / plain_s, 4), "read_file_ms": ms(median(reads)),
        "read_file_ratio": round(median(reads) / plain_s, 4), "pairs": len(extra),
        "model_reloaded": registry.load(model_name) is not model_before,
    }


def run(ctx: BenchContext) -> BenchResult:
    model_name = ctx.models.sd1
    ctx.log(f"  LoRA switch ({model_name})")
    _write_files(ctx, model_name)
    figures = switch_cost(ctx, model_name)
    result = BenchResult("networks", "LoRA switch cost", {"lora_switch": figures})
    result.rows.append(Row("job switching LoRA: extra time ÷ plain job", figures["switch_extra_ratio"], "×", None,
                           f"{figures['switching_ms']:.1f} vs {figures['plain_ms']:.1f} ms, {figures['pairs']} pairs; "
                           f"base model reloaded: {'yes' if figures['model_reloaded'] else 'no'}"))
    result.rows.append(Row("LoRA on + off ÷ plain job", figures["on_off_ratio"], "×", None, f"{figures['on_off_ms']:.1f} ms"))
    result.rows.append(Row("reading a LoRA file (once per file) ÷ plain job", figures["read_file_ratio"], "×", None,
                           f"{figures['read_file_ms']:.1f} ms"))
    return result
