"""Tiny random-weight upscaler files, their keys written out from the published architectures (not built
with spandrel's classes), so the tests check that spandrel's detection takes them as the real files are laid out.

- ESRGAN (Wang et al. 2018, "ESRGAN: Enhanced Super-Resolution GANs"), the original repository's RRDBNet as
  ``nn.Sequential`` keys: ``model.0`` the first conv; ``model.1.sub.<b>.RDB<r>.conv<c>.0`` the dense blocks'
  convs (growth 32 channels) and ``model.1.sub.<nb>`` the trunk conv; then per ×2 an upsample, a conv
  (``model.3``, ``model.6``) and a LeakyReLU; ``model.8`` the HR conv and ``model.10`` the last conv.
- Real-ESRGAN's SRVGGNetCompact (Wang et al. 2021): ``body.0`` a conv, ``body.1`` its PReLU, then conv/PReLU pairs,
  and a last conv to 3·scale² channels before a pixel shuffle.
"""
from __future__ import annotations

from pathlib import Path

import torch

GROWTH = 32  # ESRGAN's dense-block growth channels (gc), fixed in the published model


def _conv(state: dict, key: str, in_ch: int, out_ch: int, generator: torch.Generator, std: float = 0.05) -> None:
    state[f"{key}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=generator) * std
    state[f"{key}.bias"] = torch.randn(out_ch, generator=generator) * 0.01


def esrgan_state(filters: int = 4, blocks: int = 1, scale: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """The original ESRGAN key layout at ``scale`` (2 or 4), with ``filters`` channels and ``blocks`` RRDBs."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    _conv(state, "model.0", 3, filters, generator)
    for block in range(blocks):
        for rdb in (1, 2, 3):
            for conv in range(1, 6):
                in_ch = filters + (conv - 1) * GROWTH
                out_ch = filters if conv == 5 else GROWTH
                _conv(state, f"model.1.sub.{block}.RDB{rdb}.conv{conv}.0", in_ch, out_ch, generator)
    _conv(state, f"model.1.sub.{blocks}", filters, filters, generator)
    index = 3
    for _ in range({2: 1, 4: 2}[scale]):  # [Upsample, conv, LeakyReLU] per doubling
        _conv(state, f"model.{index}", filters, filters, generator)
        index += 3
    _conv(state, f"model.{index - 1}", filters, filters, generator)  # HR conv
    _conv(state, f"model.{index + 1}", filters, 3, generator, std=0.2)  # last conv
    return state


def compact_state(filters: int = 4, convs: int = 1, scale: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    """SRVGGNetCompact's ``body.N`` layout."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    _conv(state, "body.0", 3, filters, generator)
    state["body.1.weight"] = torch.full((filters,), 0.25)
    for index in range(convs):
        _conv(state, f"body.{2 + 2 * index}", filters, filters, generator)
        state[f"body.{3 + 2 * index}.weight"] = torch.full((filters,), 0.25)
    _conv(state, f"body.{2 + 2 * convs}", filters, 3 * scale * scale, generator, std=0.2)
    return state


def write_upscalers(models_dir: Path) -> dict[str, Path]:
    """``models/ESRGAN/4x-tiny-esrgan.pth`` (a zip pickle of tensors), ``models/ESRGAN/legacy/2x-legacy-esrgan.pth``
    (torch's pre-1.6 pickle format, as the original ESRGAN releases are) and
    ``models/upscale_models/sub/2x-tiny-compact.safetensors``; returns the paths by name."""
    from safetensors.torch import save_file

    esrgan = models_dir / "ESRGAN" / "4x-tiny-esrgan.pth"
    compact = models_dir / "upscale_models" / "sub" / "2x-tiny-compact.safetensors"
    esrgan.parent.mkdir(parents=True, exist_ok=True)
    compact.parent.mkdir(parents=True, exist_ok=True)
    torch.save(esrgan_state(), esrgan)
    legacy = models_dir / "ESRGAN" / "legacy" / "2x-legacy-esrgan.pth"
    legacy.parent.mkdir(exist_ok=True)
    torch.save(esrgan_state(scale=2, seed=2), legacy, _use_new_zipfile_serialization=False)
    save_file(compact_state(), str(compact))
    return {"4x-tiny-esrgan": esrgan, "2x-legacy-esrgan": legacy, "2x-tiny-compact": compact}
