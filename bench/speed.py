"""``python -m bench speed`` (``python launch.py bench speed``): Sfumato against the plain diffusers pipeline (issue #22).

For each model (the SD 1.x demo model, the flow demo, a demo-sized SDXL, the tests' tiny Flux.1 dev) and size (64², 256², 512²) it
times ``Engine.generate`` and the model's own diffusers pipeline on the same weights, sampler σs, steps, CFG and
seed, in interleaved pairs, and reports the median of the per-pair ratios against the goal (≤ 0.70) with the largest
pixel difference between the two pictures. The engine runs its default, exact path.

Then, on the demo models (the per-step overhead on both; the levers on the SD 1.x demo):

- **per-step overhead**: one engine step (its denoise time ÷ steps) against the bare model call it replays (the same
  traced call on the same inputs, timed right after), as (step − call) ÷ step; goal ≤ 2%. Beside it, the engine's own
  work alone: the same steps with the model call answered at no cost (its first answer given again);
- **levers**, each measured as engine-with ÷ engine-without in interleaved pairs, with the pixel difference:
  the traced model call (``engine.traced_calls``; default on) and what tracing costs once per shape; channels-last
  weights; the SDPA kernel (flash vs math); CFG 1 (the uncond half skipped) against CFG 7; and with ``--compile``
  torch.compile of the model call (its compile time; pixels compared). Token merging at 0.5 (A1111's opt-in ToMe,
  ``engine.token_merging``) at 256² and 512², and on the flow demo the first block cache (``engine.step_cache``) at
  thresholds 0.1, 0.2 and 0.3, each with its PSNR against the exact picture: they change pixels.

    python -m bench speed             the full run (minutes)
    python -m bench speed --quick     64² only, demo model, few pairs (development, CI smoke)

Figures go to ``bench/results/speed.json``. The machine's load from other programs lands on both sides of each pair
alike, but a shared 2-core machine still moves single figures by several percent: read the spread in the JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "results" / "speed.json"
RATIO_GOAL = 0.70
OVERHEAD_GOAL = 0.02
OVERHEAD_MODELS = ("demo", "flow-demo")  # the per-step overhead is measured on both built-in demo models
PROMPT = "a large red circle on the left, blue background"
NEGATIVE = "blurry, gray"
SEED = 1234


@dataclass(frozen=True)
class Point:
    size: int
    steps: int
    pairs: int


# (size, steps, pairs): fewer steps and pairs where one image takes seconds, so a full run stays within minutes.
FULL_POINTS = (Point(64, 20, 7), Point(256, 8, 3), Point(512, 3, 2))
QUICK_POINTS = (Point(64, 10, 3),)


@dataclass
class Subject:
    """One model as both sides run it."""

    label: str
    model: str
    sampler: str
    schedule: str
    cfg: float
    extra: dict = field(default_factory=dict)  # further request fields (Flux.1 dev's distilled CFG)
    peer: Callable | None = None  # (subject, model) -> run(size, steps): its diffusers side; None: a UNet's (unet_peer)


def _log(line: str) -> None:
    print(line, flush=True)


# -- the models ------------------------------------------------------------------------------------------------------

def build_models(folder: Path, quick: bool) -> tuple[object, list[Subject], list[str]]:
    """A registry over the SD 1.x demo model (or a tiny SD 1.x without it), the flow demo (the default model), a
    demo-sized SDXL and the tiny Flux.1 dev."""
    from engine import ModelRegistry
    from engine.models import BUILTIN_DIR
    from engine.tiny_models import build_sd1, build_sdxl

    from .fixtures import DEMO_SIZED_SDXL, FLOW_DEMO, SD1_DEMO, TINY_SD1, demo_model_available

    notes = []
    use_demo = demo_model_available()
    if not use_demo:
        build_sd1(folder / TINY_SD1, seed=0)
        notes.append(f"builtin/{SD1_DEMO} not found: the SD 1.x figures use the tiny random {TINY_SD1}")
    sd1 = SD1_DEMO if use_demo else TINY_SD1
    subjects = [Subject("demo", sd1, "DPM++ 2M", "Automatic", 7.0)]
    if not quick and use_demo and (BUILTIN_DIR / FLOW_DEMO / "model_index.json").is_file():
        subjects.append(Subject("flow-demo", FLOW_DEMO, "Euler", "Simple", 3.0, peer=sd3_peer))  # the default model, its card's settings
    if not quick:
        build_sdxl(folder / DEMO_SIZED_SDXL, seed=0, demo_sized=True)
        subjects.append(Subject("sdxl", DEMO_SIZED_SDXL, "DPM++ 2M", "Automatic", 7.0))
        try:
            from tests._flux_fixture import build_folder
        except ImportError as error:  # a packaged install without tests/
            notes.append(f"no Flux fixture ({error}): Flux figures skipped")
        else:
            build_folder(folder / "tiny-flux-dev", "dev")
            subjects.append(Subject("flux", "tiny-flux-dev", "Euler", "Simple", 1.0, {"distilled_cfg_scale": 3.5}, peer=flux_peer))
    registry = ModelRegistry(folder, builtin_dir=BUILTIN_DIR if use_demo else None, device="cpu", cache_size=4)
    return registry, subjects, notes


def _request(subject: Subject, size: int, steps: int, **changes):
    from engine import GenerationRequest

    fields = dict(prompt=PROMPT, negative_prompt=NEGATIVE if subject.cfg > 1 else "", model=subject.model,
                  sampler=subject.sampler, schedule=subject.schedule, steps=steps, cfg_scale=subject.cfg, width=size,
                  height=size, seed=SEED, preview_every=0, **subject.extra)
    fields.update(changes)
    return GenerationRequest(**fields)


def _flux_mu(image_tokens: int, config: dict) -> float:
    """diffusers' ``calculate_shift``: μ linear in the image's token count."""
    slope = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    return config["base_shift"] + slope * (image_tokens - config["base_image_seq_len"])


def peer_runner(subject: Subject, model) -> Callable[[int, int], object]:
    """``run(size, steps) -> PIL image``: the subject's diffusers pipeline on the same weights, sampler σs and seed."""
    return (subject.peer or unet_peer)(subject, model)


def unet_peer(subject: Subject, model) -> Callable[[int, int], object]:
    """A UNet model's diffusers pipeline with DPM-Solver++(2M) over Karras σs, as the engine's DPM++ 2M "Automatic"."""
    import torch

    from . import peer

    pipe = peer.peer_pipeline(model)

    def run(size: int, steps: int):
        generator = torch.Generator("cpu").manual_seed(SEED)
        return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=subject.cfg, width=size,
                    height=size, generator=generator, output_type="pil").images[0]
    return run


def flux_peer(subject: Subject, model) -> Callable[[int, int], object]:
    """diffusers' ``FluxPipeline`` on the engine's Euler / Simple σs and CPU noise, at the subject's distilled CFG."""
    import torch
    from diffusers import FluxPipeline

    from engine.sampling import schedules
    from engine.sampling.denoiser import noise_table_for

    pipe = FluxPipeline.from_pretrained(model.entry.path, local_files_only=True, dtype=model.dtype)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.scheduler.config

    def run(size: int, steps: int):
        table, _ = noise_table_for(model, width=size, height=size, steps=steps)
        sigmas = schedules.simple(table, steps)[:-1].double()
        latent = size // model.vae_scale_factor
        if config.get("use_dynamic_shifting"):  # the pipeline shifts the σs it is given: hand it unshifted ones
            mu = _flux_mu((latent // 2) ** 2, config)
            sigmas = 1 / (1 + math.exp(mu) * (1 / sigmas - 1))
        noise = torch.randn((1, 16, latent, latent), generator=torch.Generator().manual_seed(SEED))  # the engine's CPU noise
        return pipe(PROMPT, height=size, width=size, sigmas=sigmas.tolist(), guidance_scale=subject.extra["distilled_cfg_scale"],
                    true_cfg_scale=subject.cfg, max_sequence_length=512, output_type="pil",
                    latents=FluxPipeline._pack_latents(noise, 1, 16, latent, latent)).images[0]
    return run


def sd3_peer(subject: Subject, model) -> Callable[[int, int], object]:
    """diffusers' ``StableDiffusion3Pipeline`` (no T5 where the model has none) on the engine's Euler / Simple σs and
    CPU noise: the same picture within rounding (``tests/test_demo_flow_training.py`` pins it)."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    from engine.sampling import schedules
    from engine.sampling.denoiser import noise_table_for

    absent = {name: None for name in ("text_encoder_3", "tokenizer_3") if not (Path(model.entry.path) / name).is_dir()}
    pipe = StableDiffusion3Pipeline.from_pretrained(model.entry.path, local_files_only=True, dtype=model.dtype, **absent)
    pipe.set_progress_bar_config(disable=True)
    shift = float(pipe.scheduler.config.get("shift", 1.0))
    channels = pipe.transformer.config.in_channels

    def run(size: int, steps: int):
        table, _ = noise_table_for(model, width=size, height=size, steps=steps)
        sigmas = schedules.simple(table, steps)[:-1].double()
        unshifted = sigmas / (shift - (shift - 1) * sigmas)  # the pipeline shifts the σs it is given
        latent = size // model.vae_scale_factor
        noise = torch.randn((1, channels, latent, latent), generator=torch.Generator().manual_seed(SEED))
        return pipe(PROMPT, negative_prompt=NEGATIVE if subject.cfg > 1 else "", height=size, width=size,
                    sigmas=unshifted.tolist(), guidance_scale=subject.cfg, latents=noise, output_type="pil").images[0]
    return run


# -- measuring -------------------------------------------------------------------------------------------------------

def timed(function: Callable[[], object]) -> tuple[float, object]:
    from .timing import clock

    tick = clock()
    value = function()
    return clock() - tick, value


def pairs(a: Callable[[], tuple[float, object]], b: Callable[[], tuple[float, object]], count: int) -> dict:
    """``count`` interleaved pairs after one warm-up round: median a ÷ b, both medians, and the largest pixel
    difference between the two sides' images."""
    from .fixtures import max_pixel_diff, psnr
    from .timing import interleave, median, ms, pair_stats

    images: dict[str, object] = {}

    def side(name: str, run: Callable[[], tuple[float, object]]):
        def runner(index: int) -> float:
            seconds, image = run()
            images[name] = image
            return seconds
        return runner

    diffs: list[int] = []

    def b_then_compare(index: int) -> float:
        seconds = side("b", b)(index)
        if "a" in images:
            diffs.append(max_pixel_diff(images["a"], images["b"]))
        return seconds

    times = interleave({"a": side("a", a), "b": b_then_compare}, repetitions=count, warmup=1)
    stats = pair_stats(times["a"], times["b"])
    return {**stats, "a_ms": ms(median(times["a"])), "b_ms": ms(median(times["b"])), "max_pixel_diff": max(diffs) if diffs else None,
            # the last pair's pictures (both sides are deterministic); None: identical
            "psnr_db": None if math.isinf(db := psnr(images["a"], images["b"])) else round(db, 1),
            "ratios": [round(x / y, 4) for x, y in zip(times["a"], times["b"])]}


def engine_side(engine, request) -> Callable[[], tuple[float, object]]:
    def run():
        seconds, result = timed(lambda: engine.generate(request))
        return seconds, result.images[0].image
    return run


def compare_with_diffusers(engine, registry, subject: Subject, points: tuple[Point, ...]) -> list[dict]:
    model = registry.load(subject.model)
    peer = peer_runner(subject, model)
    rows = []
    for point in points:
        if point.size > model.max_size:  # the flow demo's position table ends at 256²
            rows.append({"model": subject.label, "model_name": subject.model, "size": point.size,
                         "skipped": f"{subject.model} draws at most {model.max_size}² pixels"})
            continue
        _log(f"  {subject.label} {point.size}²: {point.steps} steps, {point.pairs} pairs")
        figures = pairs(engine_side(engine, _request(subject, point.size, point.steps)),
                        lambda: timed(lambda: peer(point.size, point.steps)), point.pairs)
        rows.append({"model": subject.label, "model_name": subject.model, "size": point.size, "steps": point.steps,
                     "sampler": subject.sampler, "cfg": subject.cfg, **figures})
    return rows


def step_overhead(engine, registry, subject: Subject, size: int, steps: int, runs: int) -> dict:
    """(engine step − model call) ÷ engine step: per run, the denoise time less the time spent replaying the traced
    model call inside it, both from the same run (so load from other programs lands on both)."""
    from engine import traced_calls

    from .timing import clock, median

    model = registry.load(subject.model)
    engine.generate(_request(subject, size, steps))  # warm: traces this shape, caches the prompt
    cache = traced_calls.cache_of(getattr(model.pipeline, model.family.denoiser))
    if cache is None or not cache.traces:
        return {"model": subject.label, "skipped": "the model call is not traced (eager): nothing to time it by"}
    inside = [0.0]

    def timing(replay):
        def run(*args):
            tick = clock()
            try:
                return replay(*args)
            finally:
                inside[0] += clock() - tick
        return run

    def stand_in(replay):  # the call's first answer, given again at no cost: what is left is the engine's own work
        answers: list = []

        def run(*args):
            if not answers:
                answers.append(replay(*args))
            return answers[0]
        return run

    originals = dict(cache.traces)
    step_s, call_s, shares, own_s = [], [], [], []
    try:
        cache.traces.update({key: timing(replay) for key, replay in originals.items()})
        for _ in range(runs):
            inside[0] = 0.0
            denoise = engine.generate(_request(subject, size, steps)).timings["denoise"]
            step_s.append(denoise / steps)
            call_s.append(inside[0] / steps)
            shares.append((denoise - inside[0]) / denoise)
        cache.traces.update({key: stand_in(replay) for key, replay in originals.items()})
        for _ in range(runs * 3):
            own_s.append(engine.generate(_request(subject, size, steps)).timings["denoise"] / steps)
    finally:
        cache.traces.update(originals)
    return {"model": subject.label, "model_name": model.entry.name, "size": size, "steps": steps, "sampler": subject.sampler,
            "step_ms": round(median(step_s) * 1000, 3), "model_call_ms": round(median(call_s) * 1000, 3),
            "overhead": round(median(shares), 4), "overhead_ms": round(median([s - c for s, c in zip(step_s, call_s)]) * 1000, 3),
            "shares": [round(share, 4) for share in shares],
            # The same step with the model call answered at no cost: the engine's Python and small tensor ops alone.
            # The overhead above is larger because those ops run right after the model's work, on cold caches.
            "own_work_ms": round(median(own_s) * 1000, 3), "own_work": round(median(own_s) / median(step_s), 4)}


@contextmanager
def _channels_last(module) -> Iterator[None]:
    import torch

    module.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        module.to(memory_format=torch.contiguous_format)


@contextmanager
def _sdpa_math() -> Iterator[None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def _with(context: Callable, run: Callable[[], tuple[float, object]]) -> Callable[[], tuple[float, object]]:
    def wrapped():
        with context():
            return run()
    return wrapped


def levers(engine, registry, subject: Subject, quick: bool, compile_too: bool) -> list[dict]:
    """Each lever as engine-with ÷ engine-without on the demo model, interleaved, with the pixel difference."""
    from engine import traced_calls

    model = registry.load(subject.model)
    denoiser = getattr(model.pipeline, model.family.denoiser)
    cache = traced_calls.enable(denoiser)
    count = 3 if quick else 5
    sizes = (64,) if quick else (64, 256)
    results = []

    def engine_run(size: int, steps: int, **changes):
        return engine_side(engine, _request(subject, size, steps, **changes))

    for size in sizes:
        steps = 10 if size > 64 else 20
        _log(f"  lever: traced model call, {size}²")
        on = engine_run(size, steps)

        def off(run=on):
            cache.active = False
            try:
                return run()
            finally:
                cache.active = True
        figures = pairs(on, off, count)
        # What a trace costs once per shape (the first image at a new size pays it): every trace made so far, averaged.
        figures["trace_s"] = round(cache.trace_seconds / max(cache.traced, 1), 3)
        figures["traces_made"] = cache.traced
        results.append({"lever": "traced model call", "exact": True, "size": size, "steps": steps, **figures})

    _log("  lever: channels-last weights, 64²")
    plain = engine_run(64, 20)
    results.append({"lever": "channels-last", "exact": None, "size": 64, "steps": 20,
                    **pairs(_with(lambda: _channels_last(denoiser), plain), plain, count)})
    size = 64 if quick else 256
    _log(f"  lever: SDPA math kernel instead of flash, {size}²")
    plain = engine_run(size, 10)
    results.append({"lever": "SDPA math (vs flash)", "exact": None, "size": size, "steps": 10,
                    **pairs(_with(_sdpa_math, plain), plain, count)})
    _log("  lever: CFG 1 (uncond skipped) vs CFG 7, 64²")
    results.append({"lever": "CFG 1 skips the uncond half (vs CFG 7; another picture)", "exact": None, "size": 64, "steps": 20,
                    **pairs(engine_run(64, 20, cfg_scale=1.0, negative_prompt=""), engine_run(64, 20), count)})
    for size in sizes if quick else (256, 512):
        steps = 10 if size < 512 else 3
        _log(f"  lever: token merging 0.5 (changes pixels), {size}²")
        results.append({"lever": "token merging 0.5 (opt-in; changes pixels)", "exact": False, "size": size, "steps": steps,
                        **pairs(engine_run(size, steps, token_merging_ratio=0.5), engine_run(size, steps), count)})
    if compile_too:
        results.append(compile_lever(engine, model, subject, count))
    return results


def first_block_cache_levers(engine, subject: Subject, count: int = 5) -> list[dict]:
    """The first block cache on a flow model (opt-in; changes pixels) at a few thresholds, against the exact engine,
    with its PSNR against the exact picture."""
    rows = []
    for size, steps in ((64, 20), (256, 10)):
        for threshold in (0.1, 0.2, 0.3):
            _log(f"  lever: first block cache {threshold} on {subject.label} (changes pixels), {size}²")
            exact = engine_side(engine, _request(subject, size, steps))
            cached = engine_side(engine, _request(subject, size, steps, first_block_cache=threshold))
            rows.append({"lever": f"first block cache {threshold} on {subject.label} (opt-in; changes pixels)", "exact": False,
                         "size": size, "steps": steps, **pairs(cached, exact, count)})
    return rows


def compile_lever(engine, model, subject: Subject, count: int) -> dict:
    """torch.compile of the denoiser against the traced call: compile time (first call), speed, pixels."""
    import torch

    _log("  lever: torch.compile of the model call, 64² (compiles first)")
    name = model.family.denoiser
    original = getattr(model.pipeline, name)
    compiled = torch.compile(original)
    traced = engine_side(engine, _request(subject, 64, 20))

    def with_compiled():
        setattr(model.pipeline, name, compiled)
        try:
            return traced()
        finally:
            setattr(model.pipeline, name, original)
    compile_s, _ = timed(with_compiled)  # the first call compiles
    second_s, _ = timed(with_compiled)
    figures = pairs(with_compiled, traced, count)
    return {"lever": "torch.compile (vs traced call)", "exact": None, "size": 64, "steps": 20,
            "first_image_s": round(compile_s, 2), "compile_s_about": round(compile_s - second_s, 2), **figures}


# -- report ----------------------------------------------------------------------------------------------------------

def verdict(value: float | None, goal: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "SKIP"
    return "PASS" if value <= goal else "FAIL"


def print_report(document: dict) -> None:
    print("\nSfumato ÷ diffusers pipeline (median of interleaved pairs; goal ≤ %.2f):" % RATIO_GOAL)
    for row in document["vs_diffusers"]:
        if "skipped" in row:
            print(f"  SKIP  {row['model']:9s} {row['size']:4d}²  ({row['skipped']})")
            continue
        print(f"  {verdict(row['ratio'], RATIO_GOAL)}  {row['model']:9s} {row['size']:4d}²  {row['ratio']:.3f}×  "
              f"({row['a_ms']:.0f} vs {row['b_ms']:.0f} ms, {row['steps']} steps, {row['pairs']} pairs, spread {row['spread']:.3f}, "
              f"max pixel diff {row['max_pixel_diff']}/255)")
    if document.get("step_overhead"):
        print(f"\nPer-step overhead outside the model call (goal ≤ {OVERHEAD_GOAL:.0%}):")
    for overhead in document.get("step_overhead") or []:
        if "overhead" in overhead:
            print(f"  {verdict(overhead['overhead'], OVERHEAD_GOAL)}  {overhead['model']}: {overhead['overhead']:.2%} of a step "
                  f"({overhead['overhead_ms']:.2f} ms of {overhead['step_ms']:.2f} ms; model call {overhead['model_call_ms']:.2f} ms), "
                  f"{overhead['size']}², {overhead['sampler']}; the engine's own work alone (model call at no cost) "
                  f"{overhead['own_work_ms']:.2f} ms, {overhead['own_work']:.2%}")
        else:
            print(f"  SKIP  {overhead.get('model')}: {overhead.get('skipped')}")
    if document.get("levers"):
        print("\nLevers (engine with ÷ without, on the SD 1.x demo unless named; < 1 is faster):")
        for row in document["levers"]:
            extra = ""
            if "trace_s" in row:
                extra = f", one trace takes {row['trace_s']:.2f} s once per shape ({row['traces_made']} made)"
            if "compile_s_about" in row:
                extra = f", first image {row['first_image_s']:.1f} s (compile ≈ {row['compile_s_about']:.1f} s)"
            if row.get("exact") is False:
                extra += f", PSNR {row['psnr_db']:.1f} dB against the exact picture"
            print(f"  {row['lever']}, {row['size']}²: {row['ratio']:.3f}× ({row['a_ms']:.0f} vs {row['b_ms']:.0f} ms), "
                  f"max pixel diff {row['max_pixel_diff']}/255{extra}")
    meta = document["meta"]
    print(f"\nload average {meta['load_average']}, {meta['threads']} torch thread(s), {meta['cpu_count']} CPUs: "
          "figures from a shared machine move by several percent between runs.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64² only, the demo model, few pairs (development, CI smoke)")
    parser.add_argument("--only", default="", help="comma-separated models: demo, flow-demo, sdxl, flux")
    parser.add_argument("--sizes", default="", help="comma-separated sizes (default 64,256,512; 64 with --quick)")
    parser.add_argument("--no-levers", action="store_true", help="skip the lever measurements")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (compiles for minutes on a CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier on a shared machine)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (default bench/results/speed.json)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    import torch

    from engine import Engine

    from .fixtures import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(args.threads)
    points = QUICK_POINTS if args.quick else FULL_POINTS
    if args.sizes:
        wanted = {int(size) for size in args.sizes.split(",")}
        points = tuple(point for point in FULL_POINTS + QUICK_POINTS if point.size in wanted)
        points = tuple({point.size: point for point in points}.values())
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory(prefix="sfumato-speed-") as folder:
        registry, subjects, notes = build_models(Path(folder), args.quick)
        if args.only:
            chosen = {name.strip() for name in args.only.split(",")}
            subjects = [subject for subject in subjects if subject.label in chosen]
        engine = Engine(registry)
        document: dict = {"vs_diffusers": [], "step_overhead": [], "levers": []}
        for subject in subjects:
            _log(f"[{subject.label}: {subject.model}]")
            document["vs_diffusers"] += compare_with_diffusers(engine, registry, subject, points)
        for subject in subjects:
            if subject.label in OVERHEAD_MODELS:
                _log(f"[per-step overhead: {subject.label}]")
                document["step_overhead"].append(step_overhead(engine, registry, subject, 64, 20, 3 if args.quick else 7))
        demo = next((subject for subject in subjects if subject.label == "demo"), None)
        flow_demo = next((subject for subject in subjects if subject.label == "flow-demo"), None)
        if not args.no_levers:
            _log("[levers]")
            if demo is not None:
                document["levers"] = levers(engine, registry, demo, args.quick, args.compile)
            if flow_demo is not None:
                document["levers"] += first_block_cache_levers(engine, flow_demo)
    import diffusers

    document["meta"] = {"mode": "quick" if args.quick else "full", "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                        "torch": torch.__version__, "diffusers": diffusers.__version__, "notes": notes,
                        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "load_average": f"{load_before:.1f} → {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"}
    return document


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from engine.compute import run_on_compute_thread

    document = run_on_compute_thread(run, args)  # where Engine.generate runs anyway (see bench/README.md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print_report(document)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
