"""Tiny network files in every format Sfumato loads, built for a loaded pipeline's own layers.

Each builder returns the tensors it wrote, so a test can compute the weight change itself from
kohya's and LyCORIS's published formulas (never through Sfumato's code). Layer names follow each
format's convention: kohya flattens a module path with '_' under ``lora_unet_`` / ``lora_te_``
(``lora_te1_`` / ``lora_te2_`` for SDXL), and its text-encoder names start with ``text_model_``
as older transformers named CLIP's layers; diffusers/PEFT keys are ``<component>.<module path>``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

ATTENTION_LAYERS = ("attn1.to_q", "attn1.to_v", "attn2.to_k", "attn2.to_out.0", "ff.net.2")
TEXT_LAYERS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.fc1")


def unet_layers(unet, conv: bool = False) -> dict[str, torch.nn.Module]:
    """Attention and feed-forward Linears of every transformer block, plus (``conv``) the 3×3 resnet convolutions."""
    chosen = {}
    for path, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and path.endswith(ATTENTION_LAYERS):
            chosen[path] = module
        elif conv and isinstance(module, torch.nn.Conv2d) and path.endswith(("conv1", "conv2")) and "resnets" in path:
            chosen[path] = module
    return chosen


def text_layers(text_encoder) -> dict[str, torch.nn.Module]:
    return {path: module for path, module in text_encoder.named_modules()
            if isinstance(module, torch.nn.Linear) and path.endswith(TEXT_LAYERS)}


def kohya_name(prefix: str, path: str, text: bool, original=None) -> str:
    """kohya's name of a layer; ``original`` maps a UNet path to its SGM-layout name (kohya's SDXL files)."""
    if original is not None and not text:
        path = original(path)
    flat = path.replace(".", "_")
    if text and not flat.startswith("text_model_"):
        flat = "text_model_" + flat
    return prefix + flat


def targets(pipeline, conv: bool = False, text: bool = True) -> list[tuple[str, str, str, torch.nn.Module]]:
    """(kohya prefix, component, module path, module) for every layer a test network patches."""
    found = [("lora_unet_", "unet", path, module) for path, module in unet_layers(pipeline.unet, conv).items()]
    if text:
        encoders = ["text_encoder"] + (["text_encoder_2"] if getattr(pipeline, "text_encoder_2", None) is not None else [])
        for index, component in enumerate(encoders, start=1):
            prefix = "lora_te_" if len(encoders) == 1 else f"lora_te{index}_"
            found += [(prefix, component, path, module) for path, module in text_layers(getattr(pipeline, component)).items()]
    return found


def _randn(generator, *shape, scale=1.0):
    return torch.randn(*shape, generator=generator) * scale


def sgm_names(unet):
    """SDXL's SGM layout name of each UNet layer, as the single-file writer (checked against diffusers' loader) names it."""
    from engine.checkpoint_convert import UNET_PREFIX, unet_key_mapper

    mapper = unet_key_mapper(dict(unet.config))
    return lambda path: mapper(f"{path}.weight").removeprefix(UNET_PREFIX).removesuffix(".weight")


def kohya_lora(pipeline, path: Path, seed: int = 0, rank: int = 2, alpha: float = 1.0, conv: bool = False,
               scale: float = 0.3, text: bool = True, unet: bool = True, sgm: bool = False) -> dict[str, torch.Tensor]:
    """kohya's LoRA (LoCon with ``conv``): ``.lora_down.weight`` [r, in(, kh, kw)], ``.lora_up.weight`` [out, r(, 1, 1)], ``.alpha``.
    ``sgm``: UNet layers named in the SGM layout, as kohya's SDXL trainer names them."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    original = sgm_names(pipeline.unet) if sgm else None
    for prefix, component, module_path, module in targets(pipeline, conv, text):
        if component == "unet" and not unet:
            continue
        name = kohya_name(prefix, module_path, component != "unet", original)
        weight = module.weight
        if weight.ndim == 4:
            tensors[f"{name}.lora_down.weight"] = _randn(generator, rank, weight.shape[1], *weight.shape[2:], scale=scale)
            tensors[f"{name}.lora_up.weight"] = _randn(generator, weight.shape[0], rank, 1, 1, scale=scale)
        else:
            tensors[f"{name}.lora_down.weight"] = _randn(generator, rank, weight.shape[1], scale=scale)
            tensors[f"{name}.lora_up.weight"] = _randn(generator, weight.shape[0], rank, scale=scale)
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_output_name": path.stem})
    return tensors


def peft_lora(pipeline, path: Path, seed: int = 0, rank: int = 2, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """diffusers/PEFT layout: ``<component>.<module path>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r];
    no alpha (scale 1)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for _, component, module_path, module in targets(pipeline):
        tensors[f"{component}.{module_path}.lora_A.weight"] = _randn(generator, rank, module.weight.shape[1], scale=scale)
        tensors[f"{component}.{module_path}.lora_B.weight"] = _randn(generator, module.weight.shape[0], rank, scale=scale)
    save_file(tensors, str(path))
    return tensors


def loha(pipeline, path: Path, seed: int = 0, rank: int = 2, alpha: float = 1.0, scale: float = 0.5,
         conv: bool = False) -> dict[str, torch.Tensor]:
    """LyCORIS LoHa: ``hada_w1_a`` [out, r], ``hada_w1_b`` [r, in] (a convolution: [r, in·kh·kw]), same for w2, and ``.alpha``."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, component, module_path, module in targets(pipeline, conv):
        name = kohya_name(prefix, module_path, component != "unet")
        out_dim, in_dim = module.weight.shape[0], module.weight[0].numel()
        for factor in ("w1", "w2"):
            tensors[f"{name}.hada_{factor}_a"] = _randn(generator, out_dim, rank, scale=scale)
            tensors[f"{name}.hada_{factor}_b"] = _randn(generator, rank, in_dim, scale=scale)
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
    return tensors


def lokr(pipeline, path: Path, seed: int = 0, rank: int = 1, alpha: float = 1.0, scale: float = 0.6) -> dict[str, torch.Tensor]:
    """LyCORIS LoKr on Linear layers: ``lokr_w1`` [a, c] whole, ``lokr_w2_a`` [b, r] and ``lokr_w2_b`` [r, d], ``.alpha``;
    out = a·b, in = c·d, split as LyCORIS's ``factorization(dim, -1)`` splits them (the smaller factor first)."""
    from peft.tuners.lokr.layer import factorization

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, component, module_path, module in targets(pipeline):
        name = kohya_name(prefix, module_path, component != "unet")
        out_dim, in_dim = module.weight.shape
        (a, b), (c, d) = factorization(out_dim, -1), factorization(in_dim, -1)
        tensors[f"{name}.lokr_w1"] = _randn(generator, a, c, scale=scale)
        tensors[f"{name}.lokr_w2_a"] = _randn(generator, b, rank, scale=scale)
        tensors[f"{name}.lokr_w2_b"] = _randn(generator, rank, d, scale=scale)
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
    return tensors
