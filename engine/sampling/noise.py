"""A1111's noise sources: the start noise, the ancestral draws, and the Brownian tree of the SDE samplers.

Facts (A1111 1.10: modules/rng.py, modules/sd_samplers_common.py):

- Every image of a batch owns one generator seeded with its seed. Its first draw is the image's start noise; every
  later ``torch.randn_like`` inside a k-diffusion sampler (ancestral steps, Euler's churn noise, DPM fast/adaptive)
  is the next draw of each image's generator, stacked. So image ``i`` of a batch equals a single run at its seed.
- "Eta noise seed delta" (ENSD): once the start noise is drawn, each generator is reseeded with seed + ENSD, so the
  ancestral draws change while the start noise stays.
- A variation seed ("subseed") draws its own first noise and is blended in by spherical interpolation.
- RNG source "CPU" draws on a CPU ``torch.Generator``; "GPU" on a CUDA generator; "NV" emulates CUDA's Philox
  stream on any device (engine/philox_noise.py).
- DPM++ SDE, 2M SDE and 3M SDE draw from a Brownian tree per image (torchsde), seeded with the image's seed and
  spanning [smallest positive σ, largest σ] of the schedule, so batches are deterministic per image.

Nothing here touches torch's global RNG.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torchsde

from ..errors import ValidationError
from ..philox_noise import PhiloxNormalGenerator
from .types import NoiseSource

RNG_SOURCES = ("CPU", "GPU", "NV")


class _SeededStream:
    """One image's normal stream on one RNG source; ``randn`` continues the stream, as a torch generator does."""

    def __init__(self, seed: int, source: str):
        self.source = source
        if source == "NV":
            self._generator = PhiloxNormalGenerator(int(seed))
        else:
            device = "cuda" if source == "GPU" else "cpu"
            self._generator = torch.Generator(device).manual_seed(int(seed))

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.source == "NV":
            return self._generator.randn(shape)
        return torch.randn(shape, generator=self._generator, device=self._generator.device, dtype=torch.float32)


def variation_slerp(strength: float, noise: torch.Tensor, subnoise: torch.Tensor) -> torch.Tensor:
    """Blend a variation seed's noise into an image's noise the way A1111 does (spherical interpolation, Shoemake 1985).

    For one image's (C, H, W) noise, A1111 normalizes along dim 1 (height), so each (channel, column) vector is
    interpolated on its own angle, not the whole tensor on one angle. When the vectors are nearly parallel on
    average (mean cosine > 0.9995) it falls back to a linear blend whose weights are the other way round
    (``noise·t + subnoise·(1 − t)``); that only matters when the two noises are almost equal, and is kept as is.
    """
    noise_unit = noise / torch.norm(noise, dim=1, keepdim=True)
    subnoise_unit = subnoise / torch.norm(subnoise, dim=1, keepdim=True)
    cosine = (noise_unit * subnoise_unit).sum(1)
    if cosine.mean() > 0.9995:
        return noise * strength + subnoise * (1 - strength)
    omega = torch.acos(cosine)
    sin_omega = torch.sin(omega)
    noise_weight = (torch.sin((1.0 - strength) * omega) / sin_omega).unsqueeze(1)
    subnoise_weight = (torch.sin(strength * omega) / sin_omega).unsqueeze(1)
    return noise_weight * noise + subnoise_weight * subnoise


class ImageNoise:
    """A1111's per-image noise generators for one batch (its ``ImageRNG``).

    ``shape`` is one image's latent shape (C, H, W); ``seeds`` has one seed per image. ``first()`` gives the start
    noise [B, C, H, W]; ``next()`` gives each image's next draw (and the start noise if ``first()`` was not called).
    """

    def __init__(self, shape: Sequence[int], seeds: Sequence[int], subseeds: Sequence[int] | None = None,
                 subseed_strength: float = 0.0, source: str = "CPU", eta_noise_seed_delta: int = 0,
                 device: torch.device | str = "cpu"):
        if source not in RNG_SOURCES:
            raise ValidationError("rng", f"unknown RNG source {source!r}; choose one of {', '.join(RNG_SOURCES)}")
        if source == "GPU" and not torch.cuda.is_available():
            raise ValidationError("rng", "the GPU noise source needs a CUDA device, and none is available; "
                                         "choose NV to reproduce GPU noise on this machine")
        self.shape = tuple(int(size) for size in shape)
        self.seeds = [int(seed) for seed in seeds]
        self.subseeds = None if subseeds is None else [int(seed) for seed in subseeds]
        self.subseed_strength = float(subseed_strength)
        self.source = source
        self.eta_noise_seed_delta = int(eta_noise_seed_delta or 0)
        self.device = torch.device(device)
        self._streams = [_SeededStream(seed, source) for seed in self.seeds]
        self._started = False

    def _stack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([tensor.to(self.device) for tensor in tensors]).to(torch.float32)

    def first(self) -> torch.Tensor:
        """The start noise: each image's first draw, blended with its variation seed's first draw when asked."""
        images = []
        for index, stream in enumerate(self._streams):
            noise = stream.randn(self.shape)
            if self.subseeds is not None and self.subseed_strength != 0:
                # A1111 gives images beyond the subseed list variation seed 0.
                subseed = self.subseeds[index] if index < len(self.subseeds) else 0
                subnoise = _SeededStream(subseed, self.source).randn(self.shape).to(noise.device)
                noise = variation_slerp(self.subseed_strength, noise, subnoise)
            images.append(noise)
        if self.eta_noise_seed_delta:
            self._streams = [_SeededStream(seed + self.eta_noise_seed_delta, self.source) for seed in self.seeds]
        self._started = True
        return self._stack(images)

    def next(self) -> torch.Tensor:
        """Each image's next draw from its own generator, stacked [B, C, H, W]."""
        if not self._started:
            return self.first()
        return self._stack([stream.randn(self.shape) for stream in self._streams])


def ancestral_noise(image_noise: ImageNoise) -> NoiseSource:
    """The noise A1111's k-diffusion samplers get for ancestral and churn steps: the images' next draws."""

    def draw(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return image_noise.next()

    return draw


class _BrownianNoise:
    """Unit-variance increments of one Brownian motion per image (Brownian tree: Li et al. 2020, torchsde).

    The increment W(σ_next) − W(σ) is divided by √|σ_next − σ|, so each call gives standard normal noise; the sign
    follows the direction of the step, as k-diffusion's BrownianTreeNoiseSampler does.
    """

    def __init__(self, x: torch.Tensor, sigma_min: torch.Tensor, sigma_max: torch.Tensor, seeds: Sequence[int]):
        if len(seeds) != x.shape[0]:
            raise ValueError(f"brownian noise: {len(seeds)} seeds for a batch of {x.shape[0]}")
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        self._orientation = 1 if t0 < t1 else -1
        if self._orientation < 0:
            t0, t1 = t1, t0
        start = torch.zeros_like(x[0])
        self._trees = [torchsde.BrownianTree(t0, start, t1, entropy=int(seed)) for seed in seeds]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        low, high, direction = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        increment = torch.stack([tree(low, high) for tree in self._trees]) * (self._orientation * direction)
        return increment / (t1 - t0).abs().sqrt()


def brownian_noise(x: torch.Tensor, sigmas: torch.Tensor, seeds: Sequence[int]) -> NoiseSource:
    """A1111's noise for the SDE samplers: a Brownian tree per image, seeded with its seed, over the schedule's σ range."""
    return _BrownianNoise(x, sigmas[sigmas > 0].min(), sigmas.max(), seeds)
