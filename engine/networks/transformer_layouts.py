"""LoRA files for flow transformers (SD 3.5's MMDiT, Flux.1's) turned into diffusers' PEFT names.

A transformer LoRA trained by kohya's sd-scripts names the layers of the model's *original* layout
(``lora_unet_joint_blocks_0_x_block_attn_qkv``), where diffusers has its own modules: one fused
``qkv`` Linear is three (``to_q``, ``to_k``, ``to_v``) and the last adaLN modulations hold (shift,
scale) where the original holds (scale, shift). A low-rank update of a fused layer splits exactly:
ΔW = up·down, so the rows of ΔW that belong to ``to_q`` are ``up[rows]·down`` — each part keeps
``down`` and takes its rows of ``up``. Swapped halves swap the rows of ``up`` likewise.

Each converter returns ``transformer.<module path>.lora_A.weight`` = down and ``.lora_B.weight`` =
up·alpha/rank (kohya's scale folded in, so the adapter's own scale is the multiplier), ready for
the pipeline's ``load_lora_weights``. Flux.1's kohya and XLabs files go through diffusers' own
converters (``diffusers.loaders.lora_conversion_utils``); SD 3.5's kohya names are mapped here,
from the layout diffusers' single-file loader reads (``convert_sd3_transformer_checkpoint_to_diffusers``).
"""
from __future__ import annotations

from typing import Callable

import torch

from .formats import NetworkError

DENOISER_PREFIX = "lora_unet_"  # kohya's prefix for the denoiser, whatever the family

# SD 3.5 (MMDiT): original module under ``joint_blocks.N.`` → (diffusers modules under ``transformer_blocks.N.``, whether
# the original's two halves (scale, shift) are swapped in diffusers). A fused qkv lists its three parts in row order.
SD3_BLOCK_LAYERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "x_block.attn.qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), False),
    "x_block.attn.proj": (("attn.to_out.0",), False),
    "x_block.attn2.qkv": (("attn2.to_q", "attn2.to_k", "attn2.to_v"), False),
    "x_block.attn2.proj": (("attn2.to_out.0",), False),
    "x_block.mlp.fc1": (("ff.net.0.proj",), False),
    "x_block.mlp.fc2": (("ff.net.2",), False),
    "x_block.adaLN_modulation.1": (("norm1.linear",), False),
    "context_block.attn.qkv": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), False),
    "context_block.attn.proj": (("attn.to_add_out",), False),
    "context_block.mlp.fc1": (("ff_context.net.0.proj",), False),
    "context_block.mlp.fc2": (("ff_context.net.2",), False),
    "context_block.adaLN_modulation.1": (("norm1_context.linear",), False),  # swapped in the last block (below)
}
SD3_GLOBAL_LAYERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "x_embedder.proj": (("pos_embed.proj",), False),
    "context_embedder": (("context_embedder",), False),
    "t_embedder.mlp.0": (("time_text_embed.timestep_embedder.linear_1",), False),
    "t_embedder.mlp.2": (("time_text_embed.timestep_embedder.linear_2",), False),
    "y_embedder.mlp.0": (("time_text_embed.text_embedder.linear_1",), False),
    "y_embedder.mlp.2": (("time_text_embed.text_embedder.linear_2",), False),
    "final_layer.linear": (("proj_out",), False),
    "final_layer.adaLN_modulation.1": (("norm_out.linear",), True),
}


def _sd3_layout(transformer: torch.nn.Module) -> dict[str, tuple[tuple[str, ...], bool]]:
    """kohya's flattened original name (without ``lora_unet_``) → (diffusers module paths, halves swapped), for the
    modules this transformer has. The last joint block has no context output (``context_pre_only``): its context
    adaLN holds only (shift, scale), the swapped order of the original's (scale, shift)."""
    have = {path for path, _ in transformer.named_modules()}
    layout = {}
    blocks = len(transformer.transformer_blocks)
    for index in range(blocks):
        for original, (targets, swapped) in SD3_BLOCK_LAYERS.items():
            paths = tuple(f"transformer_blocks.{index}.{target}" for target in targets)
            if all(path in have for path in paths):
                last_context = index == blocks - 1 and original == "context_block.adaLN_modulation.1"
                layout[f"joint_blocks_{index}_{original}".replace(".", "_")] = (paths, swapped or last_context)
    for original, (targets, swapped) in SD3_GLOBAL_LAYERS.items():
        if all(target in have for target in targets):
            layout[original.replace(".", "_")] = (targets, swapped)
    return layout


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def sd3_kohya(tensors: dict[str, torch.Tensor], transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An SD 3.5 kohya LoRA's ``lora_unet_`` tensors in diffusers' PEFT names (see the module docstring)."""
    layout = _sd3_layout(transformer)
    converted, unknown = {}, []
    for key, down in tensors.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        flat = name.removeprefix(DENOISER_PREFIX)
        if flat not in layout:
            unknown.append(name)
            continue
        up = tensors.get(f"{name}.lora_up.weight")
        if up is None:
            raise NetworkError(f"{name} has a lora_down but no lora_up weight")
        rank = down.shape[0]
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(rank)
        paths, swapped = layout[flat]
        up = up.reshape(up.shape[0], -1) * (alpha / rank)
        if swapped:
            up = _swap_halves(up)
        for path, rows in zip(paths, up.chunk(len(paths), dim=0)):
            converted[f"transformer.{path}.lora_A.weight"] = down
            converted[f"transformer.{path}.lora_B.weight"] = rows.contiguous()
    if unknown:
        raise NetworkError(f"{len(unknown)} of its transformer layers have no place in this SD 3.5 model, like "
                           f"{', '.join(sorted(unknown)[:3])}; was it made for another base model?")
    return converted


def _diffusers_converter(converter: Callable[[dict], dict], tensors: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """One of diffusers' Flux converters on a copy of ``tensors``; they pop what they convert and only log what they
    leave, so anything left over is refused here rather than silently not applied."""
    remaining = dict(tensors)
    converted = converter(remaining)
    left = [key for key in remaining if not key.endswith(".alpha")]
    if left:
        raise NetworkError(f"{len(left)} of its {what} tensors have no place in a Flux.1 transformer, like "
                           f"{', '.join(sorted(left)[:3])}")
    return {key if key.startswith("transformer.") else f"transformer.{key}": value for key, value in converted.items()}


def flux_kohya(tensors: dict[str, torch.Tensor], transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A Flux.1 kohya LoRA's ``lora_unet_`` tensors (``double_blocks``/``single_blocks`` with fused qkv and, in single
    blocks, the fused qkv+mlp ``linear1``) through diffusers' ``_convert_kohya_flux_lora_to_diffusers``."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    return _diffusers_converter(_convert_kohya_flux_lora_to_diffusers, tensors, "kohya")


def flux_xlabs(tensors: dict[str, torch.Tensor], transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An XLabs Flux.1 LoRA (``double_blocks.N.processor.qkv_lora1.down.weight`` …, no alpha: its scale is 1) through
    diffusers' ``_convert_xlabs_flux_lora_to_diffusers``."""
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    return _diffusers_converter(_convert_xlabs_flux_lora_to_diffusers, tensors, "XLabs")


# A family's ``lora_layout`` → (kohya converter, XLabs converter or None).
KOHYA_CONVERTERS: dict[str, Callable[[dict, torch.nn.Module], dict]] = {"sd3": sd3_kohya, "flux": flux_kohya}
XLABS_CONVERTERS: dict[str, Callable[[dict, torch.nn.Module], dict]] = {"flux": flux_xlabs}
