"""A1111 1.10's hires fix with a latent upscaler, for the parity test (facts from modules/processing.py,
``StableDiffusionProcessingTxt2Img.sample`` and ``sample_hr_pass``; no code copied):

- the first pass is plain txt2img at the first size;
- its latents are resized with ``torch.nn.functional.interpolate`` to (target height // 8, target width // 8) using the
  latent mode's (mode, antialias): "Latent" is bilinear without antialiasing;
- a pixel upscaler instead: the first pass decoded, truncated to 8 bits, resized (Lanczos/Nearest: one PIL resize to
  the target size), and encoded again (here with the posterior's mean; see the package notes on img2img);
- the second pass is img2img on them (``sample_img2img``) with a new per-image RNG for the new latent shape, seeded
  with the same seeds, ``hr_second_pass_steps or steps`` steps and the request's denoising strength.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from PIL import Image

from .ref_render import Params, decode, encode_image, sample_latents, to_uint8

PIXEL_RESAMPLERS = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
# A1111's ``shared.latent_upscale_modes``: name -> (interpolate mode, antialias)
LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}


@torch.no_grad()
def hires_latents(pipe, p: Params, conditioning, hires_conditioning, scale: float = 2.0, upscaler: str = "Latent",
                  hr_steps: int = 0, hr_sampler: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(first pass latents, second pass latents) for a "Hires upscale: ``scale``" request (one image)."""
    first = sample_latents(pipe, p, conditioning)
    width, height = int(p.width * scale), int(p.height * scale)
    if upscaler in PIXEL_RESAMPLERS:
        picture = Image.fromarray(to_uint8(decode(pipe, first))[0], "RGB").resize((width, height), PIXEL_RESAMPLERS[upscaler])
        upscaled = encode_image(pipe, picture)
    else:
        mode, antialias = LATENT_MODES[upscaler]
        options = {"antialias": antialias} if mode in ("bilinear", "bicubic") else {}
        upscaled = F.interpolate(first, size=(height // 8, width // 8), mode=mode, **options)
    second = replace(p, width=width, height=height, steps=hr_steps or p.steps, sampler=hr_sampler or p.sampler)
    return first, sample_latents(pipe, second, hires_conditioning, init_latent=upscaled)
