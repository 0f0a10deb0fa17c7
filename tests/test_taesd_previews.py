"""Previews on every family: the cheap linear previews on 16-channel latents, and TAESD tiny decoders read from the
artist's files (engine/tiny_decoders.py) in madebyollin's original decoder-only layout, checked against that
original architecture rebuilt here (its ``nn.Sequential``, as madebyollin/taesd's ``taesd.py`` defines it)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from engine.engine import Engine
from engine.families import SD1, SD3
from engine.models import ModelRegistry
from engine.previews import CheapPreviewer, VaePreviewer
from engine.request import GenerationRequest
from engine.tiny_decoders import TinyDecoderLibrary
from tests._sd3_fixture import build_folder


# -- madebyollin's original decoder (the reference) ------------------------------------------------------------
class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(n, n, 3, padding=1), nn.ReLU(), nn.Conv2d(n, n, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(n, n, 3, padding=1))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def original_decoder(latent_channels: int, seed: int) -> nn.Sequential:
    """Output in [0, 1] (roughly): the original's convention; random weights, scaled so the output varies."""
    torch.manual_seed(seed)

    def up():
        return [nn.Upsample(scale_factor=2), nn.Conv2d(64, 64, 3, padding=1, bias=False)]

    decoder = nn.Sequential(Clamp(), nn.Conv2d(latent_channels, 64, 3, padding=1), nn.ReLU(),
                            Block(64), Block(64), Block(64), *up(), Block(64), Block(64), Block(64), *up(),
                            Block(64), Block(64), Block(64), *up(), Block(64), nn.Conv2d(64, 3, 3, padding=1))
    return decoder.eval()


def reference_pixels(decoder: nn.Sequential, latent: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        image = decoder(latent[:1]) * 2 - 1  # [0, 1] -> [-1, 1]
    return ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()


def test_a_safetensors_taesd_decoder_in_the_original_layout_previews_as_the_original_decodes(tmp_path):
    decoder = original_decoder(4, seed=3)
    assert "1.weight" in decoder.state_dict() and "3.conv.0.weight" in decoder.state_dict()  # the published key names
    (tmp_path / "VAE-taesd").mkdir()
    save_file(decoder.state_dict(), tmp_path / "VAE-taesd" / "taesd_decoder.safetensors")
    tiny = TinyDecoderLibrary(tmp_path).get(SD1.latent.tiny_decoder)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * 2
    preview = np.asarray(VaePreviewer(tiny, 1.0)(latent))
    expected = reference_pixels(decoder, latent)
    assert preview.shape == (64, 64, 3) and expected.std() > 5
    assert np.abs(preview.astype(int) - expected.astype(int)).max() <= 1


def test_an_sd3_run_previews_with_taesd3_from_a_pth_in_comfyuis_folder(tmp_path):
    """16 channels; ``.pth`` read with ``weights_only=True``; found in ComfyUI's ``models/vae_approx``; the engine picks it
    by the family's ``LatentFormat.tiny_decoder`` and its previews are the original decoder's pictures."""
    torch.set_num_threads(1)
    decoder = original_decoder(16, seed=4)
    (tmp_path / "vae_approx").mkdir()
    torch.save(decoder.state_dict(), tmp_path / "vae_approx" / "taesd3_decoder.pth")
    build_folder(tmp_path / "sd3tiny")
    engine = Engine(ModelRegistry(tmp_path, builtin_dir=None))
    model = engine.registry.load("sd3tiny")
    request = GenerationRequest(prompt="a fox", model="sd3tiny", steps=2, seed=1, sampler="Euler", preview_method="taesd",
                                preview_every=1)
    previewer = engine._previewer(request, model)
    assert isinstance(previewer, VaePreviewer)
    latent = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(6)) * 2
    preview = np.asarray(previewer(latent))
    assert np.abs(preview.astype(int) - reference_pixels(decoder, latent).astype(int)).max() <= 1
    previews = []
    engine.generate(request, on_progress=lambda progress: previews.append(progress.preview) if progress.preview_source else None)
    assert len(previews) == 2 and previews[0].size == (128, 128)  # a 16×16 latent, upsampled 8× by TAESD


def test_without_the_file_the_cheap_preview_stands_in_and_it_is_said_once(tmp_path, caplog):
    build_folder(tmp_path / "sd3tiny")
    engine = Engine(ModelRegistry(tmp_path, builtin_dir=None))
    model = engine.registry.load("sd3tiny")
    request = GenerationRequest(prompt="a fox", model="sd3tiny", preview_method="taesd")
    with caplog.at_level(logging.WARNING, logger="engine.tiny_decoders"):
        first, second = engine._previewer(request, model), engine._previewer(request, model)
    assert isinstance(first, CheapPreviewer) and isinstance(second, CheapPreviewer)
    said = [record.getMessage() for record in caplog.records if "taesd3" in record.getMessage()]
    assert len(said) == 1 and "models/VAE-taesd" in said[0] and "models/vae_approx" in said[0]


def test_cheap_previews_on_a_16_channel_latent_are_the_linear_map_of_its_factors():
    factors = np.array(SD3.latent.rgb_factors, dtype=np.float64)
    bias = np.array(SD3.latent.rgb_bias, dtype=np.float64)
    assert factors.shape == (SD3.latent.channels, 3) == (16, 3)
    latent = torch.randn(1, 16, 6, 5, generator=torch.Generator().manual_seed(7)) * 3
    rgb = np.einsum("chw,ck->hwk", latent[0].double().numpy(), factors) + bias
    expected = ((np.clip(rgb, -1, 1) + 1) * 127.5).astype(np.uint8)  # A1111/ComfyUI truncate to uint8
    preview = np.asarray(CheapPreviewer(SD3)(latent))
    assert preview.shape == (6, 5, 3)
    assert np.abs(preview.astype(int) - expected.astype(int)).max() <= 1
