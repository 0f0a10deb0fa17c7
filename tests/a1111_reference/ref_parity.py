"""One sampler × schedule compared between the engine and the reference: shared by the parity test
and ``scripts/a1111_parity_table.py``. Only the engine's public surface is used (Engine, ModelRegistry,
GenerationRequest, and its prompt encoder's output as conditioning)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .ref_render import Params, decode, make_cond, sample_latents, to_uint8

TOLERANCE = 2  # /255, max over pixels: issue #16's exactness target
PROMPT, NEGATIVE = "a red circle", "blurry"
SEED, STEPS, CFG = 1234, 20, 7.0


@dataclass(frozen=True)
class Outcome:
    sampler: str
    schedule: str
    max_diff: int | None = None  # /255
    refused: str | None = None  # the engine's reason
    exact_truncation: bool = False  # bit-identical to A1111's truncating conversion
    exact_rounding: bool = False  # bit-identical to the rounding variant
    latent_diff: float | None = None  # max |Δ latent| / std(reference latent), when the engine's latent was seen

    @property
    def matched(self) -> bool:
        return self.max_diff is not None and self.max_diff <= TOLERANCE

    def cell(self) -> str:
        if self.refused is not None:
            return f"refused: {self.refused}"
        return f"{self.max_diff}"


def engine_conditioning(loaded, prompt: str, negative: str, width: int, height: int) -> tuple[dict, dict]:
    """The engine's own prompt encoding, as the reference's conditioning dicts."""
    conditioning = loaded.prompt_encoder.encode(prompt, negative)
    return (make_cond(conditioning.prompt_embeds, conditioning.pooled, width, height),
            make_cond(conditioning.negative_embeds, conditioning.negative_pooled, width, height))


class ReferenceCache:
    """Reference pictures per (model, sampler, resolved σs): "Automatic" and the schedule it resolves to,
    and the schedule-blind timestep samplers, are computed once."""

    def __init__(self):
        self._images: dict[tuple, tuple[np.ndarray, np.ndarray, torch.Tensor]] = {}

    def get(self, registry, model: str, sampler: str, schedule: str, size: int, init_image=None,
            strength: float = 0.75) -> tuple[np.ndarray, np.ndarray]:
        loaded = registry.load(model)
        pipe = loaded.pipeline
        p = Params.from_infotext({"Prompt": PROMPT, "Negative prompt": NEGATIVE, "Steps": STEPS, "Sampler": sampler,
                                  "Schedule type": schedule, "CFG scale": CFG, "Seed": SEED, "Size": f"{size}x{size}",
                                  "Denoising strength": strength})
        from .ref_render import SAMPLERS, encode_image, resolved_schedule

        facts = SAMPLERS[sampler]
        blind = facts.kind == "timesteps"
        key = (model, sampler, "any" if blind else resolved_schedule(sampler, schedule), size,
               None if init_image is None else (init_image.tobytes(), strength))
        if key not in self._images:
            conditioning = engine_conditioning(loaded, PROMPT, NEGATIVE, size, size)
            with torch.no_grad():
                init = None if init_image is None else encode_image(pipe, init_image)
                latents = sample_latents(pipe, p, conditioning, init)
                decoded = decode(pipe, latents)
            self._images[key] = (to_uint8(decoded)[0], to_uint8(decoded, rounding=True)[0], latents)
        return self._images[key]


def compare(engine, registry, model: str, sampler: str, schedule: str, size: int = 64, cache: ReferenceCache | None = None,
            init_image=None, strength: float = 0.75) -> Outcome:
    """txt2img, or img2img from ``init_image`` (already ``size`` square, so neither side resizes it)."""
    from engine import GenerationRequest
    from engine.errors import SfumatoError

    cache = cache or ReferenceCache()
    truncated, rounded, reference_latents = cache.get(registry, model, sampler, schedule, size, init_image, strength)
    img2img = {} if init_image is None else {"init_image": init_image, "denoising_strength": strength}
    try:
        request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, model=model, sampler=sampler, schedule=schedule,
                                    steps=STEPS, cfg_scale=CFG, width=size, height=size, seed=SEED, rng="CPU", preview_every=0,
                                    **img2img)
        with _latents_seen(engine) as seen:
            result = engine.generate(request)
    except (SfumatoError, ValueError) as error:
        return Outcome(sampler, schedule, refused=str(error).splitlines()[0][:120])
    ours = np.asarray(result.images[0].image.convert("RGB"), dtype=np.int16)
    diff = int(np.abs(ours - truncated.astype(np.int16)).max())
    latent_diff = None
    if seen:
        latent_diff = float((seen[-1].float().cpu() - reference_latents).abs().max() / reference_latents.std())
    return Outcome(sampler, schedule, max_diff=diff, exact_truncation=bool(np.array_equal(ours, truncated)),
                   exact_rounding=bool(np.array_equal(ours, rounded)), latent_diff=latent_diff)


@contextmanager
def _latents_seen(engine):
    """The latents the engine decodes, read by wrapping its ``_decode`` for one call (nothing seen if it has none).

    Tiny random-weight models saturate their VAE, so a pixel tolerance says little there; the latent says more."""
    seen: list[torch.Tensor] = []
    original = getattr(type(engine), "_decode", None)
    if original is None:
        yield seen
        return
    function = original.__func__ if hasattr(original, "__func__") else original

    def recording(model, latents):
        seen.append(latents.detach().clone())
        return function(model, latents)

    engine._decode = recording
    try:
        yield seen
    finally:
        del engine._decode


def compare_hires(engine, registry, model: str, sampler: str, strength: float, size: int = 64, scale: float = 2.0,
                  upscaler: str = "Latent") -> Outcome:
    """txt2img with hires fix (a latent mode, or Lanczos/Nearest) against the reference's two passes."""
    from engine import GenerationRequest

    from .ref_hires import hires_latents

    loaded = registry.load(model)
    p = Params.from_infotext({"Prompt": PROMPT, "Negative prompt": NEGATIVE, "Steps": STEPS, "Sampler": sampler,
                              "Schedule type": "Automatic", "CFG scale": CFG, "Seed": SEED, "Size": f"{size}x{size}",
                              "Denoising strength": strength})
    conditioning = engine_conditioning(loaded, PROMPT, NEGATIVE, size, size)
    big = int(size * scale)
    _, reference_latents = hires_latents(loaded.pipeline, p, conditioning, engine_conditioning(loaded, PROMPT, NEGATIVE, big, big),
                                         scale=scale, upscaler=upscaler)
    truncated = to_uint8(decode(loaded.pipeline, reference_latents))[0]
    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, model=model, sampler=sampler, steps=STEPS, cfg_scale=CFG,
                                width=size, height=size, seed=SEED, rng="CPU", preview_every=0, enable_hr=True, hr_scale=scale,
                                hr_upscaler=upscaler, denoising_strength=strength)
    with _latents_seen(engine) as seen:
        result = engine.generate(request)
    ours = np.asarray(result.images[0].image.convert("RGB"), dtype=np.int16)
    if ours.shape != truncated.shape:
        return Outcome(sampler, "Automatic", refused=f"size {ours.shape[:2]}, A1111's {truncated.shape[:2]}")
    latent_diff = None
    if seen:
        latent_diff = float((seen[-1].float().cpu() - reference_latents).abs().max() / reference_latents.std())
    return Outcome(sampler, "Automatic", max_diff=int(np.abs(ours - truncated.astype(np.int16)).max()),
                   exact_truncation=bool(np.array_equal(ours, truncated)), latent_diff=latent_diff)
