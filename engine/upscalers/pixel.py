"""Pixel upscalers: a PIL image in, a larger PIL image out.

Every pixel upscaler (Lanczos, Nearest, and each model file) has this one shape, so hires fix and the
Extras tab never care which kind they hold.
"""
from __future__ import annotations

from typing import Protocol

from PIL import Image


class PixelUpscaler(Protocol):
    name: str  # as the user picks it and the infotext writes it ("Lanczos", "4x-UltraSharp")
    native_scale: int | None  # a model's fixed factor (reading it loads the model); None for resamplers

    def upscale(self, image: Image.Image, width: int, height: int) -> Image.Image:
        """``image`` enlarged to exactly width × height (a model runs at its native scale, then is resized to fit)."""
        ...


class PilResampler:
    """A1111's "Lanczos" and "Nearest": one PIL resize."""

    def __init__(self, name: str, resample: Image.Resampling):
        self.name, self.native_scale, self._resample = name, None, resample

    def upscale(self, image: Image.Image, width: int, height: int) -> Image.Image:
        return image.resize((width, height), self._resample)


RESAMPLERS: dict[str, PilResampler] = {
    "Lanczos": PilResampler("Lanczos", Image.Resampling.LANCZOS),
    "Nearest": PilResampler("Nearest", Image.Resampling.NEAREST),
}
