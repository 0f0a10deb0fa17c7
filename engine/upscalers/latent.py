"""A1111's latent upscale modes: hires fix resizes the first pass's latents with ``torch.nn.functional.interpolate``.

The names and their (mode, antialias) pairs are A1111's ``latent_upscale_modes``; "Latent" is its hires default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LatentUpscaleMode:
    mode: str  # torch.nn.functional.interpolate's ``mode``
    antialias: bool


LATENT_UPSCALE_MODES: dict[str, LatentUpscaleMode] = {
    "Latent": LatentUpscaleMode("bilinear", False),
    "Latent (antialiased)": LatentUpscaleMode("bilinear", True),
    "Latent (bicubic)": LatentUpscaleMode("bicubic", False),
    "Latent (bicubic antialiased)": LatentUpscaleMode("bicubic", True),
    "Latent (nearest)": LatentUpscaleMode("nearest", False),
    "Latent (nearest-exact)": LatentUpscaleMode("nearest-exact", False),
}


def is_latent_upscaler(name: str) -> bool:
    return name in LATENT_UPSCALE_MODES


def upscale_latents(latents: torch.Tensor, name: str, height: int, width: int) -> torch.Tensor:
    """``latents`` (N, C, h, w) resized to (height, width) latent pixels with the named mode."""
    spec = LATENT_UPSCALE_MODES[name]
    if spec.mode in ("bilinear", "bicubic"):  # torch accepts antialias only for these
        return F.interpolate(latents, size=(height, width), mode=spec.mode, antialias=spec.antialias)
    return F.interpolate(latents, size=(height, width), mode=spec.mode)
