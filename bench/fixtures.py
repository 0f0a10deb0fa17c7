"""The models the benches run on, and small helpers shared by every bench.

The SD 1.x figures use the built-in SD 1.x demo model (``sfumato-demo``) when it
is there; otherwise, and always in smoke mode, a tiny random SD 1.x
from ``engine.tiny_models``. SDXL figures use a random SDXL whose UNet has the
demo model's layout (in smoke mode the tiny SDXL of the tests); the engine-vs-floor
bench also reports the tiny SDXL, whose 7 ms UNet call makes the strictest test of
per-step overhead. Models are built once per bench run into a temporary folder.
"""
from __future__ import annotations

import itertools
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from engine import Engine, GenerationRequest, ModelRegistry
from engine.models import BUILTIN_DIR
from training import world

from .timing import MAX_ROUNDS, Mode

# The built-in SD 1.x-layout demo plays the SD 1.x model (the studio's default is the flow demo now).
SD1_DEMO = "sfumato-demo"
FLOW_DEMO = "sfumato-demo-flow"  # the default model; bench speed measures it beside the SD 1.x demo
TINY_SD1 = "tiny-sd1"
TINY_SD1_B = "tiny-sd1-b"  # a second model, for model-switch timings
TINY_SDXL = "tiny-sdxl"
DEMO_SIZED_SDXL = "demo-sized-sdxl"  # an SDXL UNet laid out like the demo model's
PROMPT = "a large red circle on the left, blue background"
NEGATIVE = "blurry, gray"


def quiet_libraries() -> None:
    """No progress bars or advisory warnings from diffusers/transformers in bench output."""
    import logging
    import warnings

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - quieter output is a nicety
        pass
    logging.getLogger("sfumato").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def build_tiny_models(folder: Path) -> Path:
    """Tiny SD 1.x (two of them) and SDXL folders under ``folder``; returns ``folder``."""
    from engine.tiny_models import build_sd1, build_sdxl

    folder.mkdir(parents=True, exist_ok=True)
    for name, build in ((TINY_SD1, lambda p: build_sd1(p, seed=0)), (TINY_SD1_B, lambda p: build_sd1(p, seed=1)),
                        (TINY_SDXL, lambda p: build_sdxl(p, seed=0)), (DEMO_SIZED_SDXL, lambda p: build_sdxl(p, seed=0, demo_sized=True))):
        if not (folder / name / "model_index.json").exists():
            build(folder / name)
    return folder


def demo_model_available() -> bool:
    return (BUILTIN_DIR / SD1_DEMO / "model_index.json").is_file()


@dataclass
class BenchModels:
    """A registry holding the bench models, and which one plays each role."""

    registry: ModelRegistry
    models_dir: Path
    sd1: str
    sdxl: str
    notes: list[str] = field(default_factory=list)
    tiny_sdxl: str = TINY_SDXL
    _temp: tempfile.TemporaryDirectory | None = None

    @classmethod
    def create(cls, mode: Mode, device: str = "cpu", models_dir: Path | None = None) -> "BenchModels":
        temp = None
        if models_dir is None:
            temp = tempfile.TemporaryDirectory(prefix="sfumato-bench-")
            models_dir = Path(temp.name)
        build_tiny_models(models_dir)
        notes: list[str] = []
        sd1 = TINY_SD1
        use_demo = mode.use_demo_model and demo_model_available()
        registry = ModelRegistry(models_dir, builtin_dir=BUILTIN_DIR if use_demo else None, device=device, cache_size=4)
        if use_demo:
            try:
                registry.load(SD1_DEMO)
                sd1 = SD1_DEMO
            except Exception as error:  # noqa: BLE001 - a half-written demo model must not stop the bench
                notes.append(f"demo model present but not loadable ({error}); SD 1.x figures use {TINY_SD1}")
        elif mode.use_demo_model:
            notes.append(f"builtin/{SD1_DEMO} not found; SD 1.x figures use the tiny random {TINY_SD1}")
        # With the demo model, SDXL figures use an SDXL whose UNet call costs about what the demo's does,
        # so the two families are compared at equal compute; smoke runs keep everything tiny.
        sdxl = DEMO_SIZED_SDXL if mode.use_demo_model else TINY_SDXL
        return cls(registry, models_dir, sd1, sdxl, notes, _temp=temp)

    def engine(self) -> Engine:
        return Engine(self.registry)

    def close(self) -> None:
        if self._temp is not None:
            self._temp.cleanup()


def request(model: str, mode: Mode, prompt: str = PROMPT, **changes) -> GenerationRequest:
    """The bench's standard request: DPM++ 2M, CFG 7, fixed seed, previews off unless asked."""
    fields = dict(prompt=prompt, negative_prompt=NEGATIVE, model=model, sampler="DPM++ 2M", schedule="Automatic",
                  steps=mode.steps, cfg_scale=7.0, width=mode.size, height=mode.size, seed=1234, preview_every=0)
    fields.update(changes)
    return GenerationRequest(**fields)


_COLD_SERIES = itertools.count(0)
# The demo model's own vocabulary, so cold prompts stay inside its 16-token window (where diffusers
# and Sfumato compute the same tensors) and mean something to it: 8 × 3 × 5 × 9 = 1,080 prompts.
_COLD_COMBOS = list(itertools.product(world.COLOURS, world.SHAPES, world.POSITION_PHRASES.values(), world.PALETTE))
_COLD_SERIES_LENGTH = MAX_ROUNDS + 1  # a series never reaches into the next one


def cold_prompts() -> Callable[[int], str]:
    """Prompts no earlier repetition (of any bench in this process) used, so the embedding cache cannot help.

    The returned function maps a repetition index to its prompt, so two runners of one pair
    can ask for the same prompt.
    """
    series = next(_COLD_SERIES)

    def prompt(index: int) -> str:
        colour, shape, place, background = _COLD_COMBOS[(series * _COLD_SERIES_LENGTH + index + 1) % len(_COLD_COMBOS)]
        return f"a large {colour} {shape} {place}, {background} background"
    return prompt


def max_pixel_diff(a: Image.Image, b: Image.Image) -> int:
    if a.size != b.size:
        return 255
    return int(np.abs(np.asarray(a.convert("RGB"), dtype=np.int16) - np.asarray(b.convert("RGB"), dtype=np.int16)).max())


def psnr(a: Image.Image, b: Image.Image) -> float:
    """Peak signal-to-noise ratio of ``a`` against ``b`` in dB (inf: identical): how far an approximation moved the picture."""
    error = np.mean((np.asarray(a.convert("RGB"), dtype=np.float64) - np.asarray(b.convert("RGB"), dtype=np.float64)) ** 2)
    return math.inf if error == 0 else float(10 * np.log10(255**2 / error))


@dataclass
class BenchContext:
    """What every bench receives: the mode, the models, an engine over them, where to write, how to log."""

    mode: Mode
    models: BenchModels
    engine: Engine
    out_dir: Path
    log: object = print  # Callable[[str], None]
    threads: int | None = None  # torch threads, passed on to server child processes
