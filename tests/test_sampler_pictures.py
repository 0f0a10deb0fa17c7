"""Every sampler draws what the prompt says on the demo model.

Each sampler in the engine's table draws three prompts × two seeds at its usual step count and its
Automatic schedule. ``training/evaluate.py`` reads each picture back with no learned parts. A picture
counts as right when the evaluator reads the asked shape colour, position and background, and when
at least ``MIN_CLEAN`` of its pixels are nearest, in the palette, to the asked colour or the asked
background. That last check catches a sampler that paints the right blob into a noisy, blotched
picture: diffusers' DDPM with ``clip_sample=True`` scores 0.61–0.77 on two of these prompts.

Calibration, measured on this model with the diffusers-backed samplers from before the sampling rewrite (clean fraction
of the worst picture over six prompts × two seeds; the samplers that draw correctly):
- Euler, DPM++ 2M, Euler a, DPM++ 2M SDE, Heun, DPM2, DPM2 a, UniPC, DEIS, LMS: 0.983–0.986, all six
  pictures right; PLMS 0.944.
- DDIM with ``clip_sample=True``: 0.09–0.62, 0 or 1 picture in 6 right. DDPM, same bug: 2 in 6 right.
``MIN_RIGHT`` = 5 of 6 leaves one miss for a stochastic sampler's unlucky seed. A sampler that is
broken the way DDIM is misses every picture.

Settings:
- **CFG 3**: the demo model card's best row (colour 0.99, position 1.00). At CFG 5, LMS with its
  Automatic schedule (Uniform in A1111) draws the wrong colour on half of these pictures. That happens
  in k-diffusion's own ``sample_lms`` too, so it is a property of 4th-order LMS at 20 steps on this
  model, not a bug to test for.
- **20 steps** for every sampler except LCM. DPM adaptive picks its own steps and ignores the count.
- **LCM: 4 steps at CFG 1.5.** LCM is meant for LCM-distilled weights at 4–8 steps with CFG 1–2, and
  A1111 users run it that way on any model. The demo model is not distilled. Run that way, it still
  draws right (k-diffusion-style LCM, 4 and 8 steps at CFG 1.5: every picture right; 8 steps at CFG 5:
  half wrong).

The prompts avoid the held-out combos on purpose: this tests samplers, not the model's generalisation
(``test_demo_model`` and the model card cover that). The file takes about 70 s on one core.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from engine import GenerationRequest
from training.evaluate import classify, palette_labels
from training.world import HELD_OUT_COMBOS, PALETTE

try:  # the sampler table's new home, once sampling is rewritten
    from engine.sampling.table import sampler_names
except ImportError:
    from engine.samplers import sampler_names


@dataclass(frozen=True)
class Ask:
    """A prompt and what it asks for."""

    colour: str
    shape: str
    position: str
    background: str

    @property
    def prompt(self) -> str:
        phrase = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom", "center": "in the center"}
        return f"a large {self.colour} {self.shape} {phrase[self.position]}, {self.background} background"


# Three colours, three shapes, three positions, three backgrounds.
ASKS = (
    Ask("red", "square", "left", "gray"),
    Ask("blue", "circle", "right", "yellow"),
    Ask("yellow", "triangle", "top", "black"),
)
SEEDS = (1, 2)
CFG = 3.0
STEPS = 20
# Samplers whose usual use differs from STEPS at CFG: (steps, cfg).
USUAL_ELSEWHERE = {"LCM": (4, 1.5)}
MIN_CLEAN = 0.90
MIN_RIGHT = 5  # of len(ASKS) * len(SEEDS) = 6 pictures

_PALETTE_NAMES = list(PALETTE)


def usual_settings(sampler: str) -> tuple[int, float]:
    """(steps, cfg_scale) an artist would use this sampler with on this model."""
    return USUAL_ELSEWHERE.get(sampler, (STEPS, CFG))


def clean_fraction(pixels: np.ndarray, ask: Ask) -> float:
    """Fraction of pixels whose nearest palette colour is the asked shape colour or background."""
    wanted = [_PALETTE_NAMES.index(ask.colour), _PALETTE_NAMES.index(ask.background)]
    return float(np.isin(palette_labels(pixels), wanted).mean())


def test_the_prompts_avoid_the_held_out_combos():
    assert not {(a.colour, a.shape, a.position) for a in ASKS} & set(HELD_OUT_COMBOS)
    assert len({a.colour for a in ASKS}) == len({a.position for a in ASKS}) == len({a.shape for a in ASKS}) == len(ASKS)


@pytest.mark.parametrize("sampler", sampler_names())
def test_every_sampler_draws_what_the_prompt_says(demo_engine, sampler):
    steps, cfg = usual_settings(sampler)
    verdicts = []
    for ask in ASKS:
        for seed in SEEDS:
            request = GenerationRequest(prompt=ask.prompt, model="sfumato-demo", sampler=sampler, schedule="Automatic",
                                        steps=steps, cfg_scale=cfg, seed=seed, preview_every=0)
            pixels = np.asarray(demo_engine.generate(request).images[0].image.convert("RGB"))
            reading, clean = classify(pixels), clean_fraction(pixels, ask)
            right = (reading.colour, reading.position, reading.background) == (ask.colour, ask.position, ask.background)
            verdicts.append((right and clean >= MIN_CLEAN,
                             f"{ask.prompt!r} seed {seed}: read {reading.colour}/{reading.position}/{reading.background}, clean {clean:.2f}"))
    n_right = sum(ok for ok, _ in verdicts)
    assert n_right >= MIN_RIGHT, f"{sampler} ({steps} steps, CFG {cfg:g}): {n_right}/{len(verdicts)} right\n" + "\n".join(
        ("  ok   " if ok else "  WRONG ") + line for ok, line in verdicts)
