"""Upscalers, as A1111 offers them for hires fix and the Extras tab.

Two kinds, by where they work:
- latent upscalers (``latent.py``): resize the sampler's latents with torch interpolation; used by hires fix only.
- pixel upscalers (``pixel.py`` for Lanczos/Nearest, ``model_files.py`` for ESRGAN-family model files): PIL image
  in, PIL image out; used by hires fix (decode → upscale → encode) and by the Extras tab.

``UpscalerLibrary`` (``library.py``) lists every name a user can pick, in A1111's order, and finds one by name;
the model registry holds one as ``registry.upscalers``. spandrel, which builds the model files' networks, is
imported on first need (``torchvision_stand_in.py`` says why it needs a stand-in).
"""
from .latent import LATENT_UPSCALE_MODES, is_latent_upscaler, upscale_latents
from .library import UpscalerLibrary
from .pixel import PixelUpscaler

__all__ = ["LATENT_UPSCALE_MODES", "is_latent_upscaler", "upscale_latents", "PixelUpscaler", "UpscalerLibrary"]
