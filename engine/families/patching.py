"""Latents whose sides a transformer's patches do not divide.

A DiT cuts the latent into p×p patches, so a picture whose latent side is odd (a multiple of 8 pixels but not of
16, for p = 2 on an 8× VAE) cannot be cut. diffusers' pipelines refuse or resize such sizes; ComfyUI pads the
latent up to whole patches and crops the answer back, so every size a UNet model draws works. Sfumato does as
ComfyUI: the padding repeats the edge (the patch's extra row or column sees the picture's own border) and only the
model call sees it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``x`` [B, C, H, W] with its bottom and right edges repeated up to multiples of ``patch``."""
    height, width = x.shape[-2:]
    extra_h, extra_w = -height % patch, -width % patch
    if not (extra_h or extra_w):
        return x
    return F.pad(x, (0, extra_w, 0, extra_h), mode="replicate")


def crop_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The model's answer for a padded latent, cut back to the latent's own size."""
    return x[..., :height, :width]
