"""What kind of network a file holds, read from its tensor names.

Formats that load:
- kohya LoRA: ``lora_unet_*``, ``lora_te_*`` (``lora_te1_*`` / ``lora_te2_*`` for SDXL's two encoders; OneTrainer's
  ``lora_transformer_*`` for a flow transformer, diffusers' module names flattened) with
  ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``; with convolution layers it is a LoCon.
- diffusers / PEFT LoRA: ``unet.…lora_A.weight`` / ``text_encoder.…lora.down.weight`` and friends.
- LyCORIS LoHa (``.hada_w1_a`` …) and LoKr (``.lokr_w1`` …) under kohya's ``lora_unet_`` / ``lora_te_`` names.
- XLabs' Flux.1 LoRA: ``double_blocks.N.processor.qkv_lora1.down.weight`` / ``.up.weight`` and friends.

Every other layout is refused with its name (OFT, a full-weight "diff", a checkpoint, an embedding…),
never loaded as a silent no-op.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelError

KOHYA_LORA = "kohya LoRA"
KOHYA_LOCON = "kohya LoCon (LoRA with convolution layers)"
DIFFUSERS_LORA = "diffusers/PEFT LoRA"
LOHA = "LyCORIS LoHa"
LOKR = "LyCORIS LoKr"
XLABS_LORA = "XLabs Flux LoRA"

# Layouts recognised but not loaded: a key fragment, and what it means to the artist.
UNSUPPORTED = (
    (".hada_t1", "LyCORIS LoHa with Tucker-decomposed convolutions (hada_t1)"),
    (".lokr_t2", "LyCORIS LoKr with Tucker-decomposed convolutions (lokr_t2)"),
    (".lora_mid.", "LyCORIS LoCon with Tucker-decomposed convolutions (lora_mid)"),
    (".oft_blocks", "LyCORIS OFT"),
    (".oft_diag", "LyCORIS OFT"),
    (".w_norm", "LyCORIS norm-layer training (w_norm)"),
    (".diff", "LyCORIS full fine-tune (diff)"),
    (".a1.weight", "LyCORIS GLoRA"),
    ("dora_scale", "a DoRA (weight-decomposed LoRA)"),
    ("model.diffusion_model.", "a Stable Diffusion checkpoint, not a LoRA (put it in models/Stable-diffusion)"),
    ("emb_params", "a textual-inversion embedding, not a LoRA (put it in models/embeddings)"),
    ("string_to_param", "a textual-inversion embedding, not a LoRA (put it in models/embeddings)"),
)


class NetworkError(ModelError):
    """A network file could not be read or applied; the message names the file."""


@dataclass(frozen=True)
class NetworkWeights:
    """A network file's tensors, as the file has them, and the format they are in."""

    format: str
    tensors: dict[str, torch.Tensor]

    @property
    def lycoris(self) -> bool:
        return self.format in (LOHA, LOKR)


def detect_format(tensors: dict[str, torch.Tensor]) -> str:
    """The format's name (one of the constants above); ``ValueError`` saying what the file is otherwise."""
    keys = list(tensors)
    for fragment, meaning in UNSUPPORTED:
        if any(fragment in key for key in keys):
            raise ValueError(f"it is {meaning}, which Sfumato does not load")
    if any(".hada_w1_a" in key for key in keys):
        return LOHA
    if any(".lokr_w1" in key for key in keys):
        if any(".lokr_" in key and tensors[key].ndim == 4 for key in keys):
            raise ValueError("it is a LyCORIS LoKr with convolution layers, which Sfumato does not load yet (LoKr on "
                             "Linear layers loads)")
        return LOKR
    if any(".processor." in key and ("_lora" in key) and key.endswith(".down.weight") for key in keys):
        return XLABS_LORA
    downs = [key for key in keys if key.endswith(".lora_down.weight")]
    if downs and all(key.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for key in downs):
        convolutions = any(tensors[key].ndim == 4 and tuple(tensors[key].shape[2:]) != (1, 1) for key in downs)
        return KOHYA_LOCON if convolutions else KOHYA_LORA
    if any(part in key for key in keys for part in (".lora_A.", ".lora.down.", "lora_linear_layer.down")):
        return DIFFUSERS_LORA
    shown = ", ".join(keys[:3]) or "no tensors"
    raise ValueError(f"its layout is no LoRA format Sfumato knows (keys like {shown}); Sfumato loads "
                     f"{KOHYA_LORA}, {KOHYA_LOCON}, {DIFFUSERS_LORA}, {XLABS_LORA}, {LOHA} and {LOKR} files")


@functools.lru_cache(maxsize=4)  # an SDXL LoRA can be hundreds of MB: a few files, enough to switch between
def _read(path: str, identity: tuple) -> NetworkWeights:
    from safetensors.torch import load_file

    name = Path(path).name
    try:
        tensors = load_file(path, device="cpu")
    except Exception as error:  # safetensors raises its own error kinds for a truncated or corrupt file
        raise NetworkError(f"LoRA file {name} is not a readable safetensors file (truncated or corrupt?): {error}") from error
    try:
        return NetworkWeights(format=detect_format(tensors), tensors=tensors)
    except ValueError as error:
        raise NetworkError(f"LoRA file {name}: {error}") from error


def read_network(path: Path, identity: tuple) -> NetworkWeights:
    """The file's weights; the last few files read stay in memory (keyed by ``identity``, which changes with the file),
    so switching between a handful of LoRAs reads each from disk once. Callers must not modify the tensors."""
    return _read(str(path), identity)
