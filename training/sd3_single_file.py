"""SD 3.5's single-file layouts, written from a diffusers ``StableDiffusion3Pipeline``: the demo flow model's export and
the tests' tiny SD 3.5 files.

The converters follow the published key names, not Sfumato's loader (which reads these files through diffusers'
single-file conversion):
- SD 3.5's MMDiT as Stability's reference code names it (``sd3_impls.py``/``mmditx.py``: ``joint_blocks.N.x_block``
  / ``context_block`` with fused ``attn.qkv``, ``adaLN_modulation.1``, ``mlp.fc1/fc2``, ``x_embedder``,
  ``t_embedder``, ``y_embedder``, ``final_layer``; the adaLN of the last context block and of the final layer is
  (shift, scale) where diffusers keeps (scale, shift));
- the VAE in the CompVis layout (``engine.checkpoint_convert``'s writer, checked against A1111 files elsewhere);
- text encoders as Hugging Face names them, under ``text_encoders.<clip_l|clip_g|t5xxl>.transformer.`` in an
  all-in-one file (ComfyUI's SD 3 checkpoints), bare in a split file (``clip_l.safetensors``).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.checkpoint_convert import VAE_PREFIX
from engine.checkpoint_convert import _vae_tensors as _prefixed_vae_tensors

CONFIG_SUFFIXES = (".json", ".txt")


def _vae_tensors(vae) -> dict[str, torch.Tensor]:
    """The VAE under CompVis names, without the ``first_stage_model.`` prefix (as a VAE file of its own has them)."""
    return {key.removeprefix(VAE_PREFIX): value for key, value in _prefixed_vae_tensors(vae).items()}


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def mmdit_original(transformer) -> dict[str, torch.Tensor]:
    """An ``SD3Transformer2DModel``'s weights under the MMDiT reference code's names."""
    state = {key: value.detach().clone() for key, value in transformer.state_dict().items()}
    layers = transformer.config.num_layers
    out = {
        "pos_embed": state.pop("pos_embed.pos_embed"),
        "x_embedder.proj.weight": state.pop("pos_embed.proj.weight"), "x_embedder.proj.bias": state.pop("pos_embed.proj.bias"),
        "context_embedder.weight": state.pop("context_embedder.weight"), "context_embedder.bias": state.pop("context_embedder.bias"),
        "final_layer.linear.weight": state.pop("proj_out.weight"), "final_layer.linear.bias": state.pop("proj_out.bias"),
    }
    for original, ours in (("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
                           ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
                           ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
                           ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")):
        for part in ("weight", "bias"):
            out[f"{original}.{part}"] = state.pop(f"{ours}.{part}")
    for part in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{part}"] = _swap_halves(state.pop(f"norm_out.linear.{part}"))
    for i in range(layers):
        ours, orig = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == layers - 1
        for part in ("weight", "bias"):
            out[f"{orig}x_block.attn.qkv.{part}"] = torch.cat([state.pop(f"{ours}attn.to_{x}.{part}") for x in "qkv"])
            out[f"{orig}context_block.attn.qkv.{part}"] = torch.cat(
                [state.pop(f"{ours}attn.add_{x}_proj.{part}") for x in "qkv"])
            out[f"{orig}x_block.attn.proj.{part}"] = state.pop(f"{ours}attn.to_out.0.{part}")
            out[f"{orig}x_block.adaLN_modulation.1.{part}"] = state.pop(f"{ours}norm1.linear.{part}")
            context_ada = state.pop(f"{ours}norm1_context.linear.{part}")
            out[f"{orig}context_block.adaLN_modulation.1.{part}"] = _swap_halves(context_ada) if last else context_ada
            out[f"{orig}x_block.mlp.fc1.{part}"] = state.pop(f"{ours}ff.net.0.proj.{part}")
            out[f"{orig}x_block.mlp.fc2.{part}"] = state.pop(f"{ours}ff.net.2.{part}")
            if f"{ours}attn2.to_q.{part}" in state:  # MMDiT-X (SD 3.5 Medium): self-attention over the image alone
                out[f"{orig}x_block.attn2.qkv.{part}"] = torch.cat([state.pop(f"{ours}attn2.to_{x}.{part}") for x in "qkv"])
                out[f"{orig}x_block.attn2.proj.{part}"] = state.pop(f"{ours}attn2.to_out.0.{part}")
            if not last:
                out[f"{orig}context_block.attn.proj.{part}"] = state.pop(f"{ours}attn.to_add_out.{part}")
                out[f"{orig}context_block.mlp.fc1.{part}"] = state.pop(f"{ours}ff_context.net.0.proj.{part}")
                out[f"{orig}context_block.mlp.fc2.{part}"] = state.pop(f"{ours}ff_context.net.2.{part}")
        for original, ours_name in (("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
                                    ("context_block.attn.ln_q", "attn.norm_added_q"),
                                    ("context_block.attn.ln_k", "attn.norm_added_k"),
                                    ("x_block.attn2.ln_q", "attn2.norm_q"), ("x_block.attn2.ln_k", "attn2.norm_k")):
            if f"transformer_blocks.{i}.{ours_name}.weight" in state:  # RMS q/k norms (SD 3.5)
                out[f"joint_blocks.{i}.{original}.weight"] = state.pop(f"transformer_blocks.{i}.{ours_name}.weight")
    assert not state, f"unconverted transformer weights: {sorted(state)[:5]}"
    return out


def mmdit_original_names(transformer) -> list[str]:
    """The original names of a (possibly meta-device) MMDiT's weights."""
    return list(mmdit_original(_MetaView(transformer)))


class _MetaView:
    """A transformer whose state dict is made of tiny stand-ins (the names are all ``mmdit_original`` reads)."""

    def __init__(self, transformer):
        self.config = transformer.config
        self._names = list(transformer.state_dict())

    def state_dict(self):
        return {name: torch.zeros(2) for name in self._names}


def hf_text_encoder(encoder) -> dict[str, torch.Tensor]:
    """A text encoder's weights under Hugging Face's published names: a CLIP's under ``text_model.`` (transformers 5
    leaves that level out of a CLIPTextModel's state dict; clip_l.safetensors files have it)."""
    state = {key: value.detach().clone() for key, value in encoder.state_dict().items() if not key.endswith("position_ids")}
    if type(encoder).__name__.startswith("CLIPText"):
        state = {key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key: value
                 for key, value in state.items()}
    return state


def copy_configs(folder: Path, target: Path) -> Path:
    """A diffusers folder's configs and tokenizer files, without its weights (a ``<name>.config/`` folder)."""
    for path in Path(folder).rglob("*"):
        if path.is_file() and path.suffix in CONFIG_SUFFIXES:
            destination = target / path.relative_to(folder)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)
    return target


def sd3_all_in_one(pipeline, path: Path, with_config_from: Path | None = None, dtype: torch.dtype | None = None) -> Path:
    """Stability's SD 3.5 single-file layout."""
    tensors = {"model.diffusion_model." + k: v for k, v in mmdit_original(pipeline.transformer).items()}
    tensors.update({"first_stage_model." + k: v for k, v in _vae_tensors(pipeline.vae).items()})
    for name, encoder in (("clip_l", pipeline.text_encoder), ("clip_g", pipeline.text_encoder_2),
                          ("t5xxl", getattr(pipeline, "text_encoder_3", None))):
        if encoder is not None:
            tensors.update({f"text_encoders.{name}.transformer.{k}": v for k, v in hf_text_encoder(encoder).items()})
    _save(tensors, path, dtype)
    if with_config_from is not None:
        copy_configs(with_config_from, path.with_suffix(".config"))
    return path


def _save(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
