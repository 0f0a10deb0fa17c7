"""Initial noise that depends only on the seed, never on the device.

Noise is drawn on the CPU with a seeded ``torch.Generator`` and then moved, so
the same seed gives the same picture on CPU, CUDA or MPS. Image ``i`` of a batch
uses ``seed + i`` and so equals a single run at that seed.
"""
from __future__ import annotations

import random

import torch

MAX_SEED = 2**32 - 1


def resolve_seed(seed: int) -> int:
    """-1 means "pick one"; the picked seed is reported back to the artist."""
    return random.randint(0, MAX_SEED) if seed == -1 else int(seed)


def cpu_generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(int(seed) % (MAX_SEED + 1))


def noise_for_seed(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=cpu_generator(seed), dtype=torch.float32)


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two noise tensors (Shoemake 1985), as A1111 blends variation seeds."""
    a_flat, b_flat = a.flatten(), b.flatten()
    dot = torch.clamp((a_flat / a_flat.norm()) @ (b_flat / b_flat.norm()), -1.0, 1.0)
    if dot.abs() > 0.9995:
        return (1 - t) * a + t * b
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b


def initial_noise(seed: int, shape: tuple[int, ...], subseed: int | None = None, subseed_strength: float = 0.0) -> torch.Tensor:
    """Noise for one image (shape without batch dim gets a leading 1)."""
    noise = noise_for_seed(seed, shape)
    if subseed is not None and subseed_strength > 0:
        noise = slerp(subseed_strength, noise, noise_for_seed(subseed, shape))
    return noise
