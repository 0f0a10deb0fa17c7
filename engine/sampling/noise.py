"""Placeholder noise sources (the `ksamplers` branch replaces this file)."""
from __future__ import annotations

import torch

from ..seeds import cpu_generator, slerp


class ImageNoise:
    def __init__(self, shape, seeds, subseeds=None, subseed_strength=0.0, source="CPU", eta_noise_seed_delta=0, device="cpu"):
        self.shape, self.seeds, self.subseeds = tuple(shape), list(seeds), subseeds
        self.subseed_strength, self.delta, self.device = subseed_strength, eta_noise_seed_delta, device
        self.generators = [cpu_generator(seed) for seed in self.seeds]

    def first(self) -> torch.Tensor:
        xs = []
        for i, generator in enumerate(self.generators):
            noise = torch.randn(self.shape, generator=generator)
            if self.subseeds is not None and self.subseed_strength:
                noise = slerp(self.subseed_strength, noise, torch.randn(self.shape, generator=cpu_generator(self.subseeds[i])))
            xs.append(noise)
        if self.delta:
            self.generators = [cpu_generator(seed + self.delta) for seed in self.seeds]
        return torch.stack(xs).to(self.device)

    def next(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device)


def ancestral_noise(image_noise: ImageNoise):
    return lambda sigma, sigma_next: image_noise.next()
