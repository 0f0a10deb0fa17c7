"""Turning latents into preview images.

The cheap path is one linear map per latent pixel (latent channels × RGB plus a
bias), the approximation ComfyUI and A1111 use; on a tiny 8×8 latent it costs
microseconds. "full" decodes with the model's VAE; "taesd" uses a tiny
AutoencoderTiny when the user has its weights.
"""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .families import Family

PREVIEW_MAX_SIDE = 128


class DeferredPreview:
    """A preview drawn when first asked for, from a snapshot taken at the step.

    Right after a UNet call even this small numpy and PIL work runs on cold caches (about 0.2 ms,
    1% of a demo step, against 0.05 ms warm), so the sampling thread only copies the latent and
    the thread that shows the preview draws it, as A1111 draws its live preview when the
    progress endpoint asks.
    """

    def __init__(self, render: Callable[[np.ndarray], Image.Image], snapshot: np.ndarray):
        self._render, self._snapshot = render, snapshot
        self._image: Image.Image | None = None
        self._lock = threading.Lock()

    def image(self) -> Image.Image:
        with self._lock:
            if self._image is None:
                self._image, self._snapshot = self._render(self._snapshot), None
            return self._image


class CheapPreviewer:
    """Latent → RGB through the family's fixed factors. Allocation-light, no model call."""

    def __init__(self, family: Family):
        factors, bias = family.latent_to_rgb_matrix()
        self._factors, self._bias = factors.numpy(), bias.numpy()

    def __call__(self, latents: torch.Tensor) -> Image.Image:
        return self.render(self.snapshot(latents))

    def deferred(self, latents: torch.Tensor) -> DeferredPreview:
        return DeferredPreview(self.render, self.snapshot(latents))

    @staticmethod
    def snapshot(latents: torch.Tensor) -> np.ndarray:
        """The first image's latent, subsampled to the preview size, as a numpy copy on the CPU."""
        latent = latents[0].detach()
        channels, height, width = latent.shape
        stride = max(1, max(height, width) // PREVIEW_MAX_SIDE)
        return latent[:, ::stride, ::stride].to("cpu", torch.float32, copy=True).numpy()

    def render(self, latent: np.ndarray) -> Image.Image:
        # In numpy, and without BLAS: on a small latent torch's per-operation dispatch costs more than
        # the arithmetic, and a BLAS call wakes BLAS threads that then compete with torch's for the cores.
        rgb = self._bias + sum(latent[c, :, :, None] * self._factors[c] for c in range(latent.shape[0]))
        pixels = ((np.clip(rgb, -1, 1) + 1) * 127.5).astype(np.uint8)
        return Image.fromarray(pixels, "RGB")


class VaePreviewer:
    """Full decode with a VAE (the model's own, or a TAESD AutoencoderTiny)."""

    def __init__(self, vae, scaling_factor: float, shift: float = 0.0, to_vae_latent=None):
        self.vae = vae
        self.scaling_factor = scaling_factor
        self.shift = shift  # the model latent's shift (SD3, Flux): VAE latent = latent / scaling + shift
        self.to_vae_latent = to_vae_latent  # the family's own conversion where it is more than that (Flux.2's batch norm)
        first = next(vae.parameters())
        self._device, self._dtype = first.device, first.dtype

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor) -> Image.Image:
        latent = latents[:1].to(self._device, self._dtype)
        latent = self.to_vae_latent(latent) if self.to_vae_latent is not None else latent / self.scaling_factor + self.shift
        sample = self.vae.decode(latent).sample
        return tensor_to_pil(sample)[0]

    def deferred(self, latents: torch.Tensor) -> Image.Image:
        """Drawn now: a decode is torch work, which belongs on the compute thread (see engine.compute)."""
        return self(latents)


def parameter_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a module's weights. diffusers' ``.dtype`` property walks every submodule
    (about a millisecond on a VAE), too slow to ask once per image or preview."""
    return next(module.parameters()).dtype


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Decoder output in [-1, 1], NCHW, to PIL images."""
    array = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a), "RGB") for a in array]


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image to a 1×3×H×W tensor in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)
