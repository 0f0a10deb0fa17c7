"""``python -m bench --gpu`` (``python launch.py bench --gpu``): Sfumato against diffusers on CUDA.

Random-weight models shaped like the real ones (SD 1.5's UNet at 512², SDXL's at 1024²; text encoders and VAEs
small, since only the denoising loop is compared), fp16, the same sampler σs (DPM++ 2M / Karras), CFG 7 and seed on
both sides. Reports iterations per second for each side (steps ÷ the sampling loop's wall time; the engine's from its
denoise timing, diffusers' from the pipeline call less its decode), their ratio (interleaved pairs, median), and the
peak VRAM each side allocated. Then the engine alone in each offload mode (``--cpu-text-encoders``, ``--medvram``,
``--lowvram``): its it/s and peak VRAM. The smoke test runs all of this on the CPU with a tiny model, without the
VRAM figures.

Without CUDA it says so and exits 0: **these figures have not been measured on this project's machines** (no GPU
here); the first run on a CUDA machine is their first measurement.

    python -m bench --gpu [--steps 20] [--pairs 3] [--only sd15,sdxl] [--out bench/results/gpu.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from engine.tiny_models import build_sd15_shaped as build_sd15, build_sdxl_shaped as build_sdxl

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "results" / "gpu.json"
PROMPT = "a photograph of a lighthouse at dusk"
NEGATIVE = "blurry"
SEED = 1234


class _Memory:
    """Peak memory allocated on ``device`` since the last ``reset``, in MiB; None where the device keeps no count
    (the CPU, where the smoke test runs this bench's code on tiny models)."""

    def __init__(self, device: str):
        import torch

        self.cuda = torch.cuda if device == "cuda" else None

    def reset(self) -> None:
        if self.cuda is not None:
            self.cuda.synchronize()
            self.cuda.reset_peak_memory_stats()

    def peak_mb(self) -> float | None:
        if self.cuda is None:
            return None
        self.cuda.synchronize()
        return round(self.cuda.max_memory_allocated() / 2**20, 1)


def _request(name: str, size: int, steps: int):
    """The job both sides run: DPM++ 2M / Karras at CFG 7, no previews."""
    from engine import GenerationRequest

    return GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, model=name, sampler="DPM++ 2M", schedule="Automatic",
                             steps=steps, cfg_scale=7.0, width=size, height=size, seed=SEED, preview_every=0)


def measure(registry, engine, name: str, size: int, steps: int, pairs: int) -> dict:
    import torch

    from . import peer
    from .timing import interleave, median, pair_stats

    model = registry.load(name)
    pipe = peer.peer_pipeline(model)
    request = _request(name, size, steps)
    memory = _Memory(model.device.type)
    peaks: dict[str, list[float | None]] = {"sfumato": [], "diffusers": []}

    def engine_run(index: int) -> float:
        memory.reset()
        result = engine.generate(request)
        peaks["sfumato"].append(memory.peak_mb())
        return result.timings["denoise"]

    def peer_run(index: int) -> float:
        generator = torch.Generator("cpu").manual_seed(SEED)
        memory.reset()
        tick = time.perf_counter()
        latents = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0, width=size,
                       height=size, generator=generator, output_type="latent").images
        peak = memory.peak_mb()  # synchronizes first, so the time below includes the device's work
        seconds = time.perf_counter() - tick  # the loop and prompt encoding; no decode, as the engine's "denoise"
        peaks["diffusers"].append(peak)
        del latents
        return seconds

    times = interleave({"sfumato": engine_run, "diffusers": peer_run}, repetitions=pairs, warmup=1)
    stats = pair_stats(times["sfumato"], times["diffusers"])
    return {"model": name, "size": size, "steps": steps, "ratio": stats["ratio"], "spread": stats["spread"], "pairs": stats["pairs"],
            "sfumato_it_s": round(steps / median(times["sfumato"]), 2), "diffusers_it_s": round(steps / median(times["diffusers"]), 2),
            "sfumato_peak_vram_mb": _largest(peaks["sfumato"]), "diffusers_peak_vram_mb": _largest(peaks["diffusers"])}


def _largest(peaks: list[float | None]) -> float | None:
    return None if None in peaks else max(peaks)


def memory_mode_rows(folder: Path, name: str, size: int, steps: int, device: str) -> list[dict]:
    """The engine alone in each offload mode (A1111's ``--medvram``/``--lowvram``, Forge's ``--cpu-text-encoders``):
    its it/s and peak VRAM, one timed run after a warm-up, each mode on a registry of its own."""
    from engine import Engine, ModelRegistry
    from engine.performance import MEMORY_MODES, PerformanceOptions

    request = _request(name, size, steps)
    memory = _Memory(device)
    rows = []
    for mode in MEMORY_MODES:
        if mode == "normal":
            continue  # measured beside diffusers above
        engine = Engine(ModelRegistry(folder, builtin_dir=None, device=device, performance=PerformanceOptions(memory_mode=mode)))
        engine.generate(request)
        memory.reset()
        denoise = engine.generate(request).timings["denoise"]
        rows.append({"model": name, "size": size, "steps": steps, "memory_mode": mode, "sfumato_it_s": round(steps / denoise, 2),
                     "sfumato_peak_vram_mb": memory.peak_mb()})
        del engine
    return rows


def run_points(points: list[tuple[str, int, Callable[[Path], object]]], device: str, steps: int,
               pairs: int) -> tuple[list[dict], list[dict]]:
    """Build each (model name, size, builder) in a temporary folder and measure it on ``device``, on the compute
    thread: against diffusers, then the engine alone in each offload mode."""
    from engine import Engine, ModelRegistry
    from engine.compute import run_on_compute_thread
    from engine.performance import PerformanceOptions

    def run() -> tuple[list[dict], list[dict]]:
        rows, mode_rows = [], []
        with tempfile.TemporaryDirectory(prefix="sfumato-gpu-bench-") as folder:
            for name, _, build in points:
                build(Path(folder) / name)
            registry = ModelRegistry(Path(folder), builtin_dir=None, device=device, performance=PerformanceOptions())
            engine = Engine(registry)
            for name, size, _ in points:
                print(f"[{name}] {size}², {steps} steps, {pairs} pairs", flush=True)
                rows.append(measure(registry, engine, name, size, steps, pairs))
            del engine, registry
            for name, size, _ in points:
                print(f"[{name}] {size}², offload modes", flush=True)
                mode_rows += memory_mode_rows(Path(folder), name, size, steps, device)
        return rows, mode_rows

    return run_on_compute_thread(run)


def describe(row: dict) -> str:
    def vram(side: str) -> str:
        peak = row.get(f"{side}_peak_vram_mb")
        return "" if peak is None else f", peak VRAM {peak:.0f} MiB"

    if "memory_mode" in row:
        return f"  {row['model']} {row['size']}², {row['memory_mode']}: Sfumato {row['sfumato_it_s']} it/s{vram('sfumato')}"
    return (f"  {row['model']} {row['size']}²: Sfumato {row['sfumato_it_s']} it/s{vram('sfumato')}, diffusers "
            f"{row['diffusers_it_s']} it/s{vram('diffusers')}; time ratio {row['ratio']:.3f}× (spread {row['spread']:.3f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench --gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--only", default="sd15,sdxl", help="comma-separated: sd15 (512²), sdxl (1024²)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args, _unknown = parser.parse_known_args(argv)  # the CPU bench's flags (--quick, ...) are accepted and ignored
    import torch

    if not torch.cuda.is_available():
        print("bench --gpu: no CUDA device here; nothing measured. The GPU figures (it/s vs diffusers, peak VRAM for "
              "SD1.5- and SDXL-shaped models at 512²/1024²) are UNMEASURED until this runs on a CUDA machine.")
        return 0
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .fixtures import quiet_libraries

    quiet_libraries()
    points = {"sd15": ("gpu-sd15", 512, build_sd15), "sdxl": ("gpu-sdxl", 1024, build_sdxl)}
    rows, mode_rows = run_points([points[key.strip()] for key in args.only.split(",") if key.strip() in points], "cuda", args.steps,
                      args.pairs)
    device = torch.cuda.get_device_name(0)
    for row in rows + mode_rows:
        print(describe(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows, "memory_modes": mode_rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
