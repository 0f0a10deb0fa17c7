"""Bench: what tiling saves when a model upscaler enlarges a picture.

One tiny random ESRGAN (the tests' original-layout file: 4 filters, 1 RRDB, ESRGAN's fixed 32 growth channels,
×4) upscales a square picture once whole and once in A1111's 192-pixel tiles with 8 pixels of overlap
(``engine.upscalers.model_files``). Each run is a fresh child process, so its peak resident memory
(``getrusage``) minus the peak it had before the run (model loaded, picture decoded) is the run's own:
the network's activations, which grow with the area it sees at once, plus the output canvas. The figure is
tiled ÷ whole; also each peak and time, and the largest pixel difference between the two results.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .report import BenchResult, Row

SIDE = 512
SMOKE_SIDE = 256  # still 2×2 tiles, a quarter of the work
GOAL = 0.5  # tiles must at least halve the extra memory
_CHILD = """
import json, resource, sys, time
import numpy as np, torch
from PIL import Image
torch.set_num_threads({threads})
from engine.upscalers.library import UpscalerLibrary
from engine.upscalers.model_files import image_to_bgr, run_tiled
upscaler = UpscalerLibrary({models!r}).find("4x-bench-esrgan")
descriptor = upscaler.descriptor
x = image_to_bgr(Image.fromarray(np.random.RandomState(0).randint(0, 256, ({side}, {side}, 3), dtype=np.uint8)))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tick = time.perf_counter()
out = run_tiled(descriptor, x, 4, tile={tile})
seconds = time.perf_counter() - tick
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
torch.save(out.half(), {result!r})
print(json.dumps({{"extra_mb": (peak - before) / 1024, "seconds": seconds}}))
"""


def _child(models: Path, side: int, tile: int, result: Path, threads: int) -> dict:
    code = _CHILD.format(models=str(models), side=side, tile=tile, result=str(result), threads=threads)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(side: int = SIDE, threads: int = 1) -> dict:
    import torch

    from tests._upscaler_files import esrgan_state  # the tests' builder: ESRGAN's original key layout

    with tempfile.TemporaryDirectory() as folder:
        models = Path(folder) / "models"
        (models / "ESRGAN").mkdir(parents=True)
        torch.save(esrgan_state(), models / "ESRGAN" / "4x-bench-esrgan.pth")
        whole = _child(models, side, 0, Path(folder) / "whole.pt", threads)
        tiled = _child(models, side, 192, Path(folder) / "tiled.pt", threads)
        difference = (torch.load(Path(folder) / "whole.pt").float() - torch.load(Path(folder) / "tiled.pt").float()).abs().max()
    return {"side": side, "tile": 192, "overlap": 8, "whole_extra_mb": round(whole["extra_mb"], 1),
            "tiled_extra_mb": round(tiled["extra_mb"], 1), "ratio": round(tiled["extra_mb"] / max(whole["extra_mb"], 1e-9), 4),
            "whole_s": round(whole["seconds"], 3), "tiled_s": round(tiled["seconds"], 3),
            "max_difference_255": round(float(difference) * 255, 3)}


def run(ctx) -> BenchResult:
    side = SMOKE_SIDE if ctx.mode.name == "smoke" else SIDE
    ctx.log(f"  tiny ESRGAN ×4 on {side}², whole vs 192-pixel tiles")
    figures = measure(side, ctx.threads or 1)
    result = BenchResult("upscaling", "model upscaler: tiled vs whole", figures)
    result.rows.append(Row("tiled ÷ whole, extra peak memory", figures["ratio"], goal=GOAL,
                           note=f"{figures['tiled_extra_mb']} vs {figures['whole_extra_mb']} MiB"))
    result.rows.append(Row("tiled ÷ whole, time", round(figures["tiled_s"] / max(figures["whole_s"], 1e-9), 4),
                           note=f"{figures['tiled_s']} vs {figures['whole_s']} s"))
    return result


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))
