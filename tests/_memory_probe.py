"""Measures the peak RSS that loading a model and drawing one image add, in a fresh process (run by
tests/test_memory_estimate.py): ``python -m tests._memory_probe MODELS_DIR|builtin NAME SIZE`` prints one JSON line.

The baseline is taken after every library the load touches is imported and a first convolution has run, so the
figure is the model's and the job's, not Python's or torch's start-up. The kernel's high-water mark (VmHWM) is reset
there (``/proc/self/clear_refs``, Linux ≥ 4.0), so a transient peak during the imports cannot hide part of the load;
without that reset the figure falls back to ``ru_maxrss`` above the baseline.
"""
from __future__ import annotations

import json
import os
import resource
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def peak_rss() -> int:
    """The process's peak RSS since the last reset (VmHWM), else since it started (ru_maxrss, kB on Linux)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def main(models_dir: str, name: str, size: int) -> dict:
    import gc

    import psutil
    import torch

    torch.set_num_threads(1)
    import diffusers  # noqa: F401 - imported before the baseline, as the studio has it imported before any load
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401

    from engine.engine import Engine
    from engine.models import ModelRegistry
    from engine.request import GenerationRequest

    torch.nn.functional.conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 4, 3, 3), padding=1)
    gc.collect()
    baseline = psutil.Process().memory_info().rss if reset_peak() else max(psutil.Process().memory_info().rss, peak_rss())
    # "builtin": the shipped models (the demo model) only.
    engine = Engine(ModelRegistry(None) if models_dir == "builtin" else ModelRegistry(models_dir, builtin_dir=None))
    estimate = engine.registry.estimate_memory(name, size, size)
    engine.generate(GenerationRequest(prompt="a red fox", model=name, steps=2, seed=1, width=size, height=size, sampler="Euler"))
    return {"baseline": baseline, "peak": peak_rss(), "measured": peak_rss() - baseline, "estimate": estimate.ram_bytes,
            "weights": estimate.weight_bytes, "activations": estimate.activation_bytes}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
