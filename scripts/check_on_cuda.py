"""The engine on a CUDA device, beside the CPU: ``python scripts/check_on_cuda.py``.

For a machine with an NVIDIA GPU. It prints, for the built-in demo model:
- the largest pixel difference between the CPU picture and the CUDA picture of the same seed, in float32
  and in the GPU's default half precision (noise is drawn on the CPU, so only arithmetic differs);
- that the same seed twice on CUDA gives identical pixels;
- how long an interrupt takes to free the engine inside a sampler step and during decoding on CUDA,
  and that the next job then runs.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from engine import Engine, GenerationRequest, ModelRegistry  # noqa: E402
from engine.request import CancelToken  # noqa: E402

PROMPTS = ("a large red circle on the left, blue background", "a small yellow triangle at the top, black background",
           "a green square in the center, white background")
SAMPLERS = ("Euler a", "DPM++ 2M", "Euler")


def engine_on(device: str, dtype: str) -> Engine:
    return Engine(ModelRegistry(None, builtin_dir=REPO / "builtin", device=device, dtype=dtype))


def pixels(engine: Engine, prompt: str, sampler: str, seed: int) -> np.ndarray:
    request = GenerationRequest(prompt=prompt, model="sfumato-demo", sampler=sampler, steps=20, cfg_scale=5, seed=seed)
    return np.asarray(engine.generate(request).images[0].image, dtype=np.int16)


def interrupt_after(engine: Engine, seconds: float, steps: int = 150) -> tuple[float, bool]:
    """Interrupt a long job after ``seconds``; return (time until generate returned, whether the next job ran)."""
    cancel = CancelToken()
    request = GenerationRequest(prompt=PROMPTS[0], model="sfumato-demo", steps=steps, width=512, height=512, seed=1)
    pressed: list[float] = []

    def press():
        time.sleep(seconds)
        pressed.append(time.perf_counter())
        cancel.interrupt()

    threading.Thread(target=press, daemon=True).start()
    engine.generate(request, cancel=cancel)
    freed = time.perf_counter() - pressed[0] if pressed else float("nan")
    after = engine.generate(GenerationRequest(prompt=PROMPTS[1], model="sfumato-demo", steps=4, seed=2))
    return freed, len(after.images) == 1


def main() -> None:
    cpu = engine_on("cpu", "float32")
    cuda32 = engine_on("cuda", "float32")
    cuda16 = engine_on("cuda", "auto")
    worst32 = worst16 = 0
    for prompt in PROMPTS:
        for sampler in SAMPLERS:
            reference = pixels(cpu, prompt, sampler, 42)
            on32 = pixels(cuda32, prompt, sampler, 42)
            on16 = pixels(cuda16, prompt, sampler, 42)
            worst32 = max(worst32, int(np.abs(reference - on32).max()))
            worst16 = max(worst16, int(np.abs(reference - on16).max()))
            assert np.array_equal(on16, pixels(cuda16, prompt, sampler, 42)), "same seed twice on CUDA differs"
            print(f"{sampler:>9} | {prompt[:40]:<40} | CPU vs CUDA fp32 max {int(np.abs(reference - on32).max())}/255, "
                  f"vs CUDA half {int(np.abs(reference - on16).max())}/255")
    print(f"WORST CPU vs CUDA: float32 {worst32}/255, half {worst16}/255; same seed twice on CUDA: identical")
    for label, delay in (("inside sampling", 0.5), ("early", 0.05)):
        freed, next_ran = interrupt_after(cuda16, delay)
        print(f"interrupt {label}: engine free after {freed * 1000:.0f} ms; next job ran: {next_ran}")


if __name__ == "__main__":
    main()
