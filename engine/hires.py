"""Hires fix (A1111's "Hires. fix"): the first pass's picture upscaled, then sampled again as img2img.

The stage between txt2img's two sample passes. Facts followed (A1111 1.10, modules/processing.py,
``StableDiffusionProcessingTxt2Img``: ``calculate_target_resolution``, ``init``, ``sample``, ``sample_hr_pass``):

- Target size. With ``hr_resize_x`` = ``hr_resize_y`` = 0 it is ``int(width · hr_scale)`` × ``int(height · hr_scale)``.
  With one of them 0, the other side follows the first pass's aspect (integer division). With both set, the
  picture is upscaled to cover that size (the side whose aspect is wider matches, the other follows the aspect)
  and the upscaled latents are cropped to it: ``(upscaled − target) // 8`` latent pixels per axis, the odd one
  off the bottom/right.
- Upscaler. A latent mode (``upscalers.LATENT_UPSCALE_MODES``) resizes the latents with torch interpolation. Any
  other name is a pixel upscaler: the first pass is decoded to 8-bit pixels (truncated, as A1111 converts them),
  upscaled to the target size, and encoded again (with the VAE posterior's mean, as our img2img encodes). "None" is only the Lanczos resize A1111's ``resize_image`` ends with.
- The second pass is img2img on the upscaled latents: new noise for the new latent shape from the same seeds and
  variation seeds, the σ tail the denoising strength keeps, ``hr_second_pass_steps`` steps (0: the first pass's),
  the hires sampler and schedule ("Use same …": the first pass's) and the hires prompts (empty: the first pass's).
- Interrupted during the first pass, there is no second pass: the image is the first pass's. Skipped during the
  first pass, A1111 still upscales but its second pass stops before its first step, so the image is the upscaled
  first pass, decoded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from .errors import ValidationError
from .fields import SAME_SAMPLER, SAME_SCHEDULE
from .upscalers import LATENT_UPSCALE_MODES, PixelUpscaler, is_latent_upscaler, upscale_latents
from .upscalers.pixel import RESAMPLERS

NONE_UPSCALER = "None"


def second_pass_sampler(request: Any) -> str:
    return request.sampler if request.hr_sampler_name == SAME_SAMPLER else request.hr_sampler_name


def second_pass_schedule(request: Any) -> str:
    return request.schedule if request.hr_scheduler == SAME_SCHEDULE else request.hr_scheduler


def second_pass_steps(request: Any) -> int:
    return request.hr_second_pass_steps or request.steps


def second_pass_cfg(request: Any) -> float:
    return request.hr_cfg or request.cfg_scale


def applies(request: Any) -> bool:
    """Hires fix runs for txt2img only, as in A1111 (img2img has no second pass)."""
    return bool(request.enable_hr) and request.mode == "txt2img"


class _PlainResize:
    """A1111's "None" upscaler: no model, so ``resize_image`` only resizes with Lanczos to the exact size."""

    name, native_scale = NONE_UPSCALER, None

    def upscale(self, image: Image.Image, width: int, height: int) -> Image.Image:
        return image.resize((width, height), Image.Resampling.LANCZOS)


def upscaler_names(registry: Any = None) -> list[str]:
    """Every name ``hr_upscaler`` takes, in A1111's order: latent modes, then the pixel upscalers."""
    library = getattr(registry, "upscalers", None)
    pixel = list(library.names()) if library is not None and hasattr(library, "names") else [NONE_UPSCALER, *RESAMPLERS]
    if NONE_UPSCALER not in pixel:
        pixel.insert(0, NONE_UPSCALER)
    return list(dict.fromkeys([*LATENT_UPSCALE_MODES, *pixel]))


def find_pixel_upscaler(name: str, registry: Any = None) -> PixelUpscaler:
    """A pixel upscaler by name: "None" resizes; the rest come from the registry's library (Lanczos, Nearest, model
    files), whose errors name ``hr_upscaler`` and say why a file cannot be used."""
    if name == NONE_UPSCALER:
        return _PlainResize()  # the library's "None" keeps the size (Extras); hires still needs the target size
    if name in RESAMPLERS:
        return RESAMPLERS[name]
    library = getattr(registry, "upscalers", None)
    if library is not None and name in {file.name for file in library.files()}:
        return library.find(name, "hr_upscaler")  # a broken file's error says what is wrong with it
    raise ValidationError("hr_upscaler", f"no upscaler named {name!r}; choose one of {', '.join(upscaler_names(registry))}")


@dataclass(frozen=True)
class HiresPlan:
    """What the hires stage does for one request; sizes in pixels."""

    upscale_width: int  # what the upscaler produces (A1111's hr_upscale_to_x/y)
    upscale_height: int
    width: int  # the second pass's size, after the crop to hr_resize_x × hr_resize_y
    height: int
    crop_x: int  # latent pixels cropped off the width (both resize values set)
    crop_y: int
    upscaler: str
    pixel_upscaler: PixelUpscaler | None  # None for a latent mode
    sampler: str
    schedule: str
    steps: int
    cfg_scale: float
    prompt: str
    negative_prompt: str


def target_size(request: Any, width: int, height: int, vae_scale_factor: int) -> tuple[int, int, int, int]:
    """(upscaled width, upscaled height, latent pixels to crop off x, off y), by A1111's ``calculate_target_resolution``."""
    resize_x, resize_y = request.hr_resize_x, request.hr_resize_y
    if resize_x == 0 and resize_y == 0:
        return int(width * request.hr_scale), int(height * request.hr_scale), 0, 0
    if resize_y == 0:
        return resize_x, resize_x * height // width, 0, 0
    if resize_x == 0:
        return resize_y * width // height, resize_y, 0, 0
    if width / height < resize_x / resize_y:
        upscaled = (resize_x, resize_x * height // width)
    else:
        upscaled = (resize_y * width // height, resize_y)
    return (*upscaled, (upscaled[0] - resize_x) // vae_scale_factor, (upscaled[1] - resize_y) // vae_scale_factor)


def plan(request: Any, width: int, height: int, vae_scale_factor: int, size_limits: tuple[int, int],
         registry: Any = None) -> HiresPlan:
    """The hires stage for a txt2img request whose first pass is ``width`` × ``height``.

    Raises ValidationError naming what set a size the model cannot draw (``hr_scale``, ``hr_resize_x`` or
    ``hr_resize_y``) or an unknown ``hr_upscaler``.
    """
    upscale_w, upscale_h, crop_x, crop_y = target_size(request, width, height, vae_scale_factor)
    final_w, final_h = upscale_w - crop_x * vae_scale_factor, upscale_h - crop_y * vae_scale_factor
    low, high = size_limits
    for axis, value, upscaled in (("x", final_w, upscale_w), ("y", final_h, upscale_h)):
        blamed = "hr_scale" if request.hr_resize_x == 0 and request.hr_resize_y == 0 else (
            f"hr_resize_{axis}" if getattr(request, f"hr_resize_{axis}") else f"hr_resize_{'y' if axis == 'x' else 'x'}")
        side = "width" if axis == "x" else "height"
        if not low <= value <= high:
            raise ValidationError(blamed, f"the hires {side} would be {value}; this model draws {low} to {high} pixels a side")
        if upscaled % vae_scale_factor or value % vae_scale_factor:
            raise ValidationError(blamed, f"the hires {side} would be {upscaled}, not a multiple of {vae_scale_factor}; "
                                          f"choose a scale or size that gives one")
    name = request.hr_upscaler
    pixel = None if is_latent_upscaler(name) else find_pixel_upscaler(name, registry)
    return HiresPlan(upscale_width=upscale_w, upscale_height=upscale_h, width=final_w, height=final_h, crop_x=crop_x,
                     crop_y=crop_y, upscaler=name, pixel_upscaler=pixel, sampler=second_pass_sampler(request),
                     schedule=second_pass_schedule(request), steps=second_pass_steps(request),
                     cfg_scale=second_pass_cfg(request), prompt=request.hr_prompt or request.prompt,
                     negative_prompt=request.hr_negative_prompt or request.negative_prompt)


def upscale(hires: HiresPlan, latents: torch.Tensor, vae_scale_factor: int,
            decode: Callable[[torch.Tensor], np.ndarray],
            encode: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """The first pass's latents at the second pass's size: interpolated (latent modes), or decoded, upscaled as
    pixels and encoded (A1111's order), then cropped to ``hr_resize_x`` × ``hr_resize_y`` when both were set.

    ``decode`` gives the VAE's pictures as (N, H, W, 3) floats in [0, 1]; they become 8-bit pictures by truncation,
    as A1111 makes them before its upscalers."""
    height, width = hires.upscale_height // vae_scale_factor, hires.upscale_width // vae_scale_factor
    if hires.pixel_upscaler is None:
        upscaled = upscale_latents(latents.float(), hires.upscaler, height, width)
    else:
        pictures = [Image.fromarray((255.0 * unit).astype(np.uint8), "RGB") for unit in decode(latents)]
        pictures = [hires.pixel_upscaler.upscale(picture, hires.upscale_width, hires.upscale_height) for picture in pictures]
        upscaled = torch.cat([encode(picture) for picture in pictures]).float()
    top, left = hires.crop_y // 2, hires.crop_x // 2
    return upscaled[:, :, top:upscaled.shape[2] - (hires.crop_y + 1) // 2, left:upscaled.shape[3] - (hires.crop_x + 1) // 2]
