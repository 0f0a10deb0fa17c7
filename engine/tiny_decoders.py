"""TAESD tiny decoders for live previews, when the artist has their weights (madebyollin's Tiny AutoEncoder).

Each family's ``LatentFormat.tiny_decoder`` names its variant: ``taesd`` (SD 1.x/2.x), ``taesdxl`` (SDXL), ``taesd3``
(SD 3.5), ``taef1`` (Flux.1). The files are found where the other studios keep them:
- A1111 and Forge: ``models/VAE-taesd/<variant>_decoder.pth`` (A1111 downloads them there);
- ComfyUI: ``models/vae_approx/<variant>_decoder.pth`` (or ``.safetensors``).
madebyollin publishes both ``.pth`` and ``.safetensors``; a ``.safetensors`` file is preferred, and a ``.pth`` is read
with ``torch.load(weights_only=True)``, the restricted unpickler that builds tensors and nothing else.

A decoder file holds madebyollin's decoder-only ``nn.Sequential`` layout: ``Clamp`` at index 0 (no weights), then
``1.weight`` (the first conv), ``3.conv.0.weight``… for the blocks. diffusers' ``DecoderTiny`` does the clamp outside
its ``layers``, so original index N is ``layers.{N-1}`` (diffusers' ``convert_tiny_autoencoder_to_diffusers.py``);
a file already in diffusers' layout (``decoder.layers.*``) loads as it is. The weights load strictly into an
``AutoencoderTiny`` decoder whose latent channels are read from the first conv.

A TAESD decoder takes the latent as the model sees it (SD3/Flux: already shifted and scaled) and returns pixels in
[-1, 1] (diffusers maps the original's [0, 1]), so a preview decodes the sampler's latent with no scaling.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TINY_DECODER_FOLDERS = ("VAE-taesd", "vae_approx")  # A1111/Forge, ComfyUI
SUFFIXES = (".safetensors", ".pth")  # the safe format first
DIFFUSERS_PREFIX = "decoder.layers."


def decoder_file_names(variant: str) -> tuple[str, ...]:
    return tuple(f"{variant}_decoder{suffix}" for suffix in SUFFIXES)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{path.name} holds no plain state dict of tensors")
    return state


def to_diffusers_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """madebyollin's decoder keys (``N.rest``, N counted with the weightless Clamp at 0) → ``DecoderTiny``'s
    ``layers.{N-1}.rest``; a diffusers-layout file's ``decoder.layers.*`` keys lose their ``decoder.`` prefix."""
    converted = {}
    for key, value in state.items():
        if key.startswith(DIFFUSERS_PREFIX):
            converted[key.removeprefix("decoder.")] = value
        elif key.startswith("encoder."):
            continue  # a whole AutoencoderTiny: only the decoder draws previews
        else:
            index, rest = key.split(".", 1)
            converted[f"layers.{int(index) - 1}.{rest}"] = value
    return converted


def load_tiny_decoder(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """An ``AutoencoderTiny`` with the file's decoder weights (loaded strictly), in eval mode on ``device``."""
    from diffusers import AutoencoderTiny

    state = to_diffusers_layout(read_state_dict(path))
    first_conv = state.get("layers.0.weight")
    if first_conv is None or first_conv.ndim != 4:
        raise ValueError(f"{path.name} is not a TAESD decoder (no first convolution layers.0 / 1.weight)")
    model = AutoencoderTiny(latent_channels=int(first_conv.shape[1]))
    model.decoder.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False).to(device, dtype)


class TinyDecoderLibrary:
    """Finds and caches the TAESD decoders under a models folder; says once per variant when one is missing."""

    def __init__(self, models_dir: Path | None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.models_dir = Path(models_dir) if models_dir else None
        self.device, self.dtype = device, dtype
        self._loaded: dict[str, object] = {}
        self._told: set[str] = set()
        self._lock = threading.Lock()

    def find(self, variant: str) -> Path | None:
        if self.models_dir is None:
            return None
        for folder in TINY_DECODER_FOLDERS:
            for name in decoder_file_names(variant):
                if (self.models_dir / folder / name).is_file():
                    return self.models_dir / folder / name
        return None

    def get(self, variant: str):
        """The variant's decoder, or None (no file, or an unreadable one) after saying why, once."""
        with self._lock:
            if variant in self._loaded:
                return self._loaded[variant]
            path = self.find(variant)
            if path is None:
                self._tell(variant, f"no {variant} tiny decoder: put {decoder_file_names(variant)[0]} (or .pth) in "
                                    f"models/{TINY_DECODER_FOLDERS[0]} or models/{TINY_DECODER_FOLDERS[1]}; "
                                    "previews use the cheap colour approximation")
                return None
            try:
                decoder = load_tiny_decoder(path, self.device, self.dtype)
            except Exception as error:  # noqa: BLE001 - a bad preview file never stops a job
                self._tell(variant, f"{path.name} could not be loaded ({type(error).__name__}: {error}); "
                                    "previews use the cheap colour approximation")
                self._loaded[variant] = None  # not retried every job; a refresh (a new library) tries again
                return None
            self._loaded[variant] = decoder
            return decoder

    def _tell(self, variant: str, message: str) -> None:
        if variant not in self._told:
            self._told.add(variant)
            log.warning(message)
