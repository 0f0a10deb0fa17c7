"""Black Forest Labs' Flux.1 key names (their reference ``flux/model.py``) to diffusers' ``FluxTransformer2DModel``.

diffusers' own single-file converter fixes the width at Flux.1's 3072, so a transformer of another width (a
distilled or tiny one) would be split wrongly; this one reads the width from the config. The names:

- ``img_in`` / ``txt_in`` / ``time_in`` / ``vector_in`` / ``guidance_in`` (``in_layer``, ``out_layer``): the input
  projections and embedders;
- ``double_blocks.N``: ``img_attn``/``txt_attn`` with fused ``qkv``, ``proj`` and RMS ``norm.query_norm.scale`` /
  ``key_norm.scale``; ``img_mlp.0/2``, ``txt_mlp.0/2``; ``img_mod.lin``, ``txt_mod.lin``;
- ``single_blocks.N``: ``linear1`` (q, k, v and the MLP's input fused, in that order), ``linear2``,
  ``modulation.lin``, ``norm.query_norm.scale`` / ``key_norm.scale``;
- ``final_layer.linear`` and ``final_layer.adaLN_modulation.1``, whose halves are (shift, scale) where diffusers
  keeps (scale, shift).
"""
from __future__ import annotations

import torch

MLP_RATIO = 4  # Flux.1's MLP width over its attention width


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _embedder(out: dict, state: dict, original: str, ours: str) -> None:
    for layer, linear in (("in_layer", "linear_1"), ("out_layer", "linear_2")):
        for part in ("weight", "bias"):
            out[f"{ours}.{linear}.{part}"] = state.pop(f"{original}.{layer}.{part}")


def flux_to_diffusers(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A Flux.1 transformer's weights (without the ``model.diffusion_model.`` prefix) in diffusers' names.
    Keys already in diffusers' names pass through."""
    if "x_embedder.weight" in state:
        return state
    state = dict(state)
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    out: dict[str, torch.Tensor] = {}
    _embedder(out, state, "time_in", "time_text_embed.timestep_embedder")
    _embedder(out, state, "vector_in", "time_text_embed.text_embedder")
    if "guidance_in.in_layer.weight" in state:
        _embedder(out, state, "guidance_in", "time_text_embed.guidance_embedder")
    for part in ("weight", "bias"):
        out[f"context_embedder.{part}"] = state.pop(f"txt_in.{part}")
        out[f"x_embedder.{part}"] = state.pop(f"img_in.{part}")
        out[f"proj_out.{part}"] = state.pop(f"final_layer.linear.{part}")
        out[f"norm_out.linear.{part}"] = _swap_halves(state.pop(f"final_layer.adaLN_modulation.1.{part}"))
    doubles = sorted({int(key.split(".")[1]) for key in state if key.startswith("double_blocks.")})
    singles = sorted({int(key.split(".")[1]) for key in state if key.startswith("single_blocks.")})
    for i in doubles:
        src, dst = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for part in ("weight", "bias"):
            out[f"{dst}norm1.linear.{part}"] = state.pop(f"{src}img_mod.lin.{part}")
            out[f"{dst}norm1_context.linear.{part}"] = state.pop(f"{src}txt_mod.lin.{part}")
            for name, chunk in zip(("to_q", "to_k", "to_v"), state.pop(f"{src}img_attn.qkv.{part}").chunk(3, dim=0)):
                out[f"{dst}attn.{name}.{part}"] = chunk
            for name, chunk in zip(("add_q_proj", "add_k_proj", "add_v_proj"),
                                   state.pop(f"{src}txt_attn.qkv.{part}").chunk(3, dim=0)):
                out[f"{dst}attn.{name}.{part}"] = chunk
            out[f"{dst}attn.to_out.0.{part}"] = state.pop(f"{src}img_attn.proj.{part}")
            out[f"{dst}attn.to_add_out.{part}"] = state.pop(f"{src}txt_attn.proj.{part}")
            out[f"{dst}ff.net.0.proj.{part}"] = state.pop(f"{src}img_mlp.0.{part}")
            out[f"{dst}ff.net.2.{part}"] = state.pop(f"{src}img_mlp.2.{part}")
            out[f"{dst}ff_context.net.0.proj.{part}"] = state.pop(f"{src}txt_mlp.0.{part}")
            out[f"{dst}ff_context.net.2.{part}"] = state.pop(f"{src}txt_mlp.2.{part}")
        for ours, theirs in (("attn.norm_q", "img_attn.norm.query_norm"), ("attn.norm_k", "img_attn.norm.key_norm"),
                             ("attn.norm_added_q", "txt_attn.norm.query_norm"),
                             ("attn.norm_added_k", "txt_attn.norm.key_norm")):
            out[f"{dst}{ours}.weight"] = state.pop(f"{src}{theirs}.scale")
    for i in singles:
        src, dst = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for part in ("weight", "bias"):
            out[f"{dst}norm.linear.{part}"] = state.pop(f"{src}modulation.lin.{part}")
            q, k, v, mlp = torch.split(state.pop(f"{src}linear1.{part}"), (inner, inner, inner, inner * MLP_RATIO), dim=0)
            out[f"{dst}attn.to_q.{part}"], out[f"{dst}attn.to_k.{part}"], out[f"{dst}attn.to_v.{part}"] = q, k, v
            out[f"{dst}proj_mlp.{part}"] = mlp
            out[f"{dst}proj_out.{part}"] = state.pop(f"{src}linear2.{part}")
        out[f"{dst}attn.norm_q.weight"] = state.pop(f"{src}norm.query_norm.scale")
        out[f"{dst}attn.norm_k.weight"] = state.pop(f"{src}norm.key_norm.scale")
    out.update(state)  # anything left is not Flux.1's: the load names it as a weight with no place
    return out
