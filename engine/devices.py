"""Choosing the torch device and dtype."""
from __future__ import annotations

import os

import torch

from .errors import ValidationError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")


def pick_device(preference: str = "auto") -> torch.device:
    if preference not in DEVICE_CHOICES:
        raise ValidationError("device", f"must be one of {', '.join(DEVICE_CHOICES)}; got {preference!r}")
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValidationError("device", "CUDA was asked for but torch sees no CUDA device")
    if preference == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValidationError("device", "MPS was asked for but this machine has no Metal device")
    return torch.device(preference)


def pick_dtype(device: torch.device, preference: str = "auto") -> torch.dtype:
    """Half precision where the device runs it well; float32 on the CPU.

    CPU half-precision convolutions are slower than float32 on most CPUs and
    bfloat16 changes the pixels, so the CPU default stays float32.
    """
    if preference not in DTYPE_CHOICES:
        raise ValidationError("dtype", f"must be one of {', '.join(DTYPE_CHOICES)}; got {preference!r}")
    if preference != "auto":
        return getattr(torch, preference)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() and os.environ.get("SFUMATO_PREFER_BF16") else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def configure_cpu_threads() -> None:
    """Use every core unless the environment already chose (tests pin OMP_NUM_THREADS=1)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
