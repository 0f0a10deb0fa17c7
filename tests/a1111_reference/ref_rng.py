"""A1111's per-image noise with "RNG: CPU" (modules/rng.py ``ImageRNG``), re-implemented from its behaviour.

- One CPU ``torch.Generator`` per image, seeded with that image's seed (seed + i in a batch).
- The first draw is the start noise, one image at a time, shaped [C, H/8, W/8]; a variation seed blends
  in a second draw from a fresh generator at the subseed by spherical interpolation (slerp over dim 1,
  with a plain lerp when the two are nearly parallel).
- After the first draw, a non-zero ENSD ("Eta noise seed delta") replaces each generator by a fresh one
  at seed + ENSD.
- Every later draw (ancestral and SDE steps, DDIM's η noise, Restart's renoising) continues the
  per-image generators: A1111 routes k-diffusion's ``torch.randn_like`` here.
"""
from __future__ import annotations

import torch


def cpu_generator(seed: int) -> torch.Generator:
    generator = torch.Generator("cpu")
    generator.manual_seed(int(seed))
    return generator


def slerp(weight: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation as A1111 applies it to [C, H, W] noise: normalised over dim 1."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * weight + high * (1 - weight)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - weight) * omega) / so).unsqueeze(1) * low + (torch.sin(weight * omega) / so).unsqueeze(1) * high


class ImageNoise:
    """The noise stream of one batch: ``next()`` gives [B, C, H, W], the first call the start noise."""

    def __init__(self, shape: tuple[int, int, int], seeds: list[int], subseeds: list[int] | None = None,
                 subseed_strength: float = 0.0, ensd: int = 0):
        self.shape = tuple(shape)
        self.seeds = list(seeds)
        self.subseeds = subseeds
        self.subseed_strength = subseed_strength
        self.ensd = ensd
        self.generators = [cpu_generator(seed) for seed in self.seeds]
        self.draws = 0

    def first(self) -> torch.Tensor:
        images = []
        for i, generator in enumerate(self.generators):
            noise = torch.randn(self.shape, generator=generator, dtype=torch.float32)
            if self.subseeds is not None and self.subseed_strength != 0:
                subseed = self.subseeds[i] if i < len(self.subseeds) else 0
                noise = slerp(self.subseed_strength, noise, torch.randn(self.shape, generator=cpu_generator(subseed)))
            images.append(noise)
        if self.ensd:
            self.generators = [cpu_generator(seed + self.ensd) for seed in self.seeds]
        return torch.stack(images)

    def next(self) -> torch.Tensor:
        self.draws += 1
        if self.draws == 1:
            return self.first()
        return torch.stack([torch.randn(self.shape, generator=generator, dtype=torch.float32) for generator in self.generators])


class TorchWithImageNoise:
    """Stands in for the ``torch`` module inside k-diffusion's sampling code, as A1111's hijack does:
    ``randn_like`` draws from the image noise stream, everything else is torch's own."""

    def __init__(self, noise: ImageNoise):
        self._noise = noise

    def randn_like(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self._noise.next().to(x.device, x.dtype)

    def __getattr__(self, name: str):
        return getattr(torch, name)
