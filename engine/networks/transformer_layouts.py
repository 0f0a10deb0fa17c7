"""LoRA files for flow transformers (SD 3.5's MMDiT, Flux.1's) turned into diffusers' PEFT names.

A transformer LoRA trained by kohya's sd-scripts names the layers of the model's *original* layout
(``lora_unet_joint_blocks_0_x_block_attn_qkv``), where diffusers has its own modules: one fused
``qkv`` Linear is three (``to_q``, ``to_k``, ``to_v``) and the last adaLN modulations hold (shift,
scale) where the original holds (scale, shift). A low-rank update of a fused layer splits exactly:
ΔW = up·down, so the rows of ΔW that belong to ``to_q`` are ``up[rows]·down`` — each part keeps
``down`` and takes its rows of ``up``. Swapped halves swap the rows of ``up`` likewise.

Each converter returns ``transformer.<module path>.lora_A.weight`` = down and ``.lora_B.weight`` =
up·alpha/rank (kohya's scale folded in, so the adapter's own scale is the multiplier), ready for
the pipeline's ``load_lora_weights``. XLabs' Flux.1 files go through diffusers' own converter
(``diffusers.loaders.lora_conversion_utils``). kohya's names are mapped here, from the layouts
diffusers' single-file loaders read (``convert_sd3_transformer_checkpoint_to_diffusers``,
``convert_flux_transformer_checkpoint_to_diffusers``), with each fused layer's row counts read from
the model: diffusers' kohya Flux converter assumes the full-size model's widths.
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


FLUX_DOUBLE_LAYERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "img_attn_qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), False),
    "img_attn_proj": (("attn.to_out.0",), False),
    "img_mlp_0": (("ff.net.0.proj",), False),
    "img_mlp_2": (("ff.net.2",), False),
    "img_mod_lin": (("norm1.linear",), False),
    "txt_attn_qkv": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), False),
    "txt_attn_proj": (("attn.to_add_out",), False),
    "txt_mlp_0": (("ff_context.net.0.proj",), False),
    "txt_mlp_2": (("ff_context.net.2",), False),
    "txt_mod_lin": (("norm1_context.linear",), False),
}
FLUX_SINGLE_LAYERS: dict[str, tuple[tuple[str, ...], bool]] = {
    # One Linear for q, k, v and the MLP's first layer: its rows are 3 × width, then the MLP's width.
    "linear1": (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), False),
    "linear2": (("proj_out",), False),
    "modulation_lin": (("norm.linear",), False),
}
FLUX_GLOBAL_LAYERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "img_in": (("x_embedder",), False),
    "txt_in": (("context_embedder",), False),
    "time_in.in_layer": (("time_text_embed.timestep_embedder.linear_1",), False),
    "time_in.out_layer": (("time_text_embed.timestep_embedder.linear_2",), False),
    "vector_in.in_layer": (("time_text_embed.text_embedder.linear_1",), False),
    "vector_in.out_layer": (("time_text_embed.text_embedder.linear_2",), False),
    "guidance_in.in_layer": (("time_text_embed.guidance_embedder.linear_1",), False),
    "guidance_in.out_layer": (("time_text_embed.guidance_embedder.linear_2",), False),
    "final_layer.linear": (("proj_out",), False),
    "final_layer.adaLN_modulation.1": (("norm_out.linear",), True),
}

Layout = dict[str, tuple[tuple[str, ...], bool]]


def _present(transformer: torch.nn.Module, blocks: str, original: str, table: Layout, layout: Layout,
             swapped_in_last: str | None = None) -> None:
    """Add ``table``'s layers of every block of ``transformer.<blocks>`` to ``layout``, named ``<original>_<N>_<layer>``,
    where the transformer has all of a layer's modules."""
    have = {path for path, _ in transformer.named_modules()}
    count = len(getattr(transformer, blocks))
    for index in range(count):
        for name, (targets, swapped) in table.items():
            paths = tuple(f"{blocks}.{index}.{target}" for target in targets)
            if all(path in have for path in paths):
                last = index == count - 1 and name == swapped_in_last
                layout[f"{original}_{index}_{name}".replace(".", "_")] = (paths, swapped or last)


def _globals(transformer: torch.nn.Module, table: Layout, layout: Layout) -> None:
    have = {path for path, _ in transformer.named_modules()}
    for name, (targets, swapped) in table.items():
        if all(target in have for target in targets):
            layout[name.replace(".", "_")] = (targets, swapped)


def sd3_layout(transformer: torch.nn.Module) -> Layout:
    """kohya's flattened original name (without ``lora_unet_``) → (diffusers module paths, halves swapped), for the
    modules this SD 3.5 transformer has. The last joint block has no context output (``context_pre_only``): its
    context adaLN holds only (shift, scale), the swapped order of the original's (scale, shift)."""
    layout: Layout = {}
    _present(transformer, "transformer_blocks", "joint_blocks", SD3_BLOCK_LAYERS, layout,
             swapped_in_last="context_block.adaLN_modulation.1")
    _globals(transformer, SD3_GLOBAL_LAYERS, layout)
    return layout


def flux_layout(transformer: torch.nn.Module) -> Layout:
    """The same for a Flux.1 transformer: BFL's ``double_blocks`` / ``single_blocks`` names, as kohya's sd-scripts
    writes them (and diffusers' ``_convert_kohya_flux_lora_to_diffusers`` reads them for full-size Flux.1)."""
    layout: Layout = {}
    _present(transformer, "transformer_blocks", "double_blocks", FLUX_DOUBLE_LAYERS, layout)
    _present(transformer, "single_transformer_blocks", "single_blocks", FLUX_SINGLE_LAYERS, layout)
    _globals(transformer, FLUX_GLOBAL_LAYERS, layout)
    return layout


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _kohya_on_layout(tensors: dict[str, torch.Tensor], transformer: torch.nn.Module, layout: Layout,
                     title: str) -> dict[str, torch.Tensor]:
    """kohya tensors of original-layout layers in diffusers' PEFT names: each part of a fused layer keeps ``down`` and
    takes its rows of ``up`` (as many as its module's outputs)."""
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
        rows = [transformer.get_submodule(path).weight.shape[0] for path in paths]
        if sum(rows) != up.shape[0]:
            raise NetworkError(f"{name} changes {up.shape[0]} outputs where this {title} model's layer has {sum(rows)}; "
                               "was it made for another base model?")
        for path, part in zip(paths, up.split(rows, dim=0)):
            converted[f"transformer.{path}.lora_A.weight"] = down
            converted[f"transformer.{path}.lora_B.weight"] = part.contiguous()
    if unknown:
        raise NetworkError(f"{len(unknown)} of its transformer layers have no place in this {title} model, like "
                           f"{', '.join(sorted(unknown)[:3])}; was it made for another base model?")
    return converted


def sd3_kohya(tensors: dict[str, torch.Tensor], transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An SD 3.5 kohya LoRA's ``lora_unet_`` tensors in diffusers' PEFT names (see the module docstring)."""
    return _kohya_on_layout(tensors, transformer, sd3_layout(transformer), "SD 3.5")


def flux_kohya(tensors: dict[str, torch.Tensor], transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A Flux.1 kohya LoRA's ``lora_unet_`` tensors (``double_blocks`` / ``single_blocks`` with fused qkv and, in single
    blocks, the fused qkv + MLP ``linear1``). Mapped here rather than by diffusers' converter, which assumes the
    full-size model's widths (3072, 12288) when it splits ``linear1``; this reads them from the model."""
    return _kohya_on_layout(tensors, transformer, flux_layout(transformer), "Flux.1")


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


def flux_xlabs(tensors: dict[str, torch.Tensor], transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An XLabs Flux.1 LoRA (``double_blocks.N.processor.qkv_lora1.down.weight`` …, no alpha: its scale is 1) through
    diffusers' ``_convert_xlabs_flux_lora_to_diffusers``."""
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    return _diffusers_converter(_convert_xlabs_flux_lora_to_diffusers, tensors, "XLabs")


# A family's ``lora_layout`` → (kohya converter, XLabs converter or None).
KOHYA_CONVERTERS: dict[str, Callable[[dict, torch.nn.Module], dict]] = {"sd3": sd3_kohya, "flux": flux_kohya}
XLABS_CONVERTERS: dict[str, Callable[[dict, torch.nn.Module], dict]] = {"flux": flux_xlabs}
