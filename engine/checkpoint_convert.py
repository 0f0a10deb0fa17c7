"""Diffusers component weights to the original single-file ("LDM") key layout.

Single-file checkpoints as A1111 and ComfyUI share them keep the key names of
the original CompVis/Stability training code:

- ``model.diffusion_model.*``: the UNet (``input_blocks``, ``middle_block``,
  ``output_blocks``; ResNets named ``in_layers``/``emb_layers``/``out_layers``),
- ``first_stage_model.*``: the VAE (``encoder.down.N.block.M``, ``decoder.up``
  counted from the bottom, 1×1-conv attention ``q``/``k``/``v``/``proj_out``),
- ``cond_stage_model.transformer.text_model.*`` (SD 1.x) or
  ``conditioner.embedders.0.transformer.text_model.*`` (SDXL): the Hugging Face
  CLIP-L text model under a prefix,
- ``conditioner.embedders.1.model.*`` (SDXL): OpenCLIP ViT-bigG, whose attention
  keeps q/k/v fused in ``in_proj_weight`` and whose ``text_projection`` is the
  transpose of Hugging Face's.

The layouts are those of the original repos (CompVis/stable-diffusion
``ldm/modules/diffusionmodules/openaimodel.py`` and ``model.py``,
Stability-AI/generative-models ``sgm/modules/encoders/modules.py``,
mlfoundations/open_clip ``transformer.py``). ``save_single_file`` is the export
direction (tests build tiny single files with it; it also turns a diffusers
folder into a file A1111 and ComfyUI read). Before loading a single file, the
registry uses ``ldm_key_names`` on the config's empty modules to check that the
config and the file name exactly the same weights. Which components a family's
file holds, under which prefixes, is the family's to say
(``engine.families.<family>.single_file``); ``engine.families.detect_checkpoint``
tells the family from a file's keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer.text_model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."

# ResNet parameter names: diffusers -> LDM. UNet ResBlock (openaimodel.py) vs VAE ResnetBlock (model.py).
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                  "self_attn.out_proj": "attn.out_proj"}
OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                "embeddings.position_embedding.weight": "positional_embedding",
                "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def _split(key: str, parts: int) -> tuple[list[str], str]:
    pieces = key.split(".")
    return pieces[:parts], ".".join(pieces[parts:])


def _rename(table: dict[str, str], rest: str) -> str:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    raise KeyError(rest)


# -- UNet ------------------------------------------------------------------------
def unet_key(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    """One diffusers ``UNet2DConditionModel`` key -> its ``model.diffusion_model.*`` name.

    Input block 0 is ``conv_in``; level i then owns input blocks ``1 + i*(L+1) .. (i+1)*(L+1)``
    (L ResNet[+attention] blocks and one downsampler). Output level i owns ``i*(L+1) ..``, L+1
    blocks, the last one carrying the upsampler after its ResNet and attention.
    """
    span = layers_per_block + 1
    for old, new in UNET_TOP.items():
        if key.startswith(old + "."):
            return UNET_PREFIX + new + key[len(old):]
    head, rest = _split(key, 4)
    if head[0] == "down_blocks":
        level, kind, index = int(head[1]), head[2], int(head[3])
        if kind == "downsamplers":
            return f"{UNET_PREFIX}input_blocks.{(level + 1) * span}.0.op.{rest.removeprefix('conv.')}"
        block = 1 + level * span + index
        sub = _rename(UNET_RESNET, rest) if kind == "resnets" else rest
        return f"{UNET_PREFIX}input_blocks.{block}.{0 if kind == 'resnets' else 1}.{sub}"
    if head[0] == "up_blocks":
        level, kind, index = int(head[1]), head[2], int(head[3])
        if kind == "upsamplers":
            slot = 2 if level in up_blocks_with_attention else 1
            return f"{UNET_PREFIX}output_blocks.{level * span + layers_per_block}.{slot}.{rest}"
        block = level * span + index
        sub = _rename(UNET_RESNET, rest) if kind == "resnets" else rest
        return f"{UNET_PREFIX}output_blocks.{block}.{0 if kind == 'resnets' else 1}.{sub}"
    head, rest = _split(key, 3)
    if head[0] == "mid_block":
        kind, index = head[1], int(head[2])
        if kind == "attentions":
            return f"{UNET_PREFIX}middle_block.1.{rest}"
        return f"{UNET_PREFIX}middle_block.{2 * index}.{_rename(UNET_RESNET, rest)}"
    raise KeyError(f"no single-file name for UNet key {key!r}")


def unet_key_mapper(config: dict) -> Callable[[str], str]:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError("per-block layers_per_block has no single-file layout")
    with_attention = {i for i, kind in enumerate(config["up_block_types"]) if "CrossAttn" in kind}
    return lambda key: unet_key(key, layers, with_attention)


# -- VAE ---------------------------------------------------------------------------
def vae_key(key: str, levels: int) -> str:
    """One diffusers ``AutoencoderKL`` key -> its ``first_stage_model.*`` name (decoder levels reversed)."""
    side, _, rest = key.partition(".")
    if side in ("quant_conv", "post_quant_conv"):
        return VAE_PREFIX + key
    if rest.startswith("conv_norm_out."):
        return f"{VAE_PREFIX}{side}.norm_out.{rest.removeprefix('conv_norm_out.')}"
    if rest.startswith(("conv_in.", "conv_out.")):
        return f"{VAE_PREFIX}{side}.{rest}"
    head, tail = _split(rest, 3)
    if head[0] == "mid_block":
        kind, index = head[1], int(head[2])
        if kind == "attentions":
            return f"{VAE_PREFIX}{side}.mid.attn_1.{_rename(VAE_ATTENTION, tail)}"
        return f"{VAE_PREFIX}{side}.mid.block_{index + 1}.{_rename(VAE_RESNET, tail)}"
    head, tail = _split(rest, 4)
    level, kind, index = int(head[1]), head[2], int(head[3])
    if head[0] == "down_blocks":
        if kind == "downsamplers":
            return f"{VAE_PREFIX}{side}.down.{level}.downsample.{tail}"
        return f"{VAE_PREFIX}{side}.down.{level}.block.{index}.{_rename(VAE_RESNET, tail)}"
    if head[0] == "up_blocks":
        ldm_level = levels - 1 - level
        if kind == "upsamplers":
            return f"{VAE_PREFIX}{side}.up.{ldm_level}.upsample.{tail}"
        return f"{VAE_PREFIX}{side}.up.{ldm_level}.block.{index}.{_rename(VAE_RESNET, tail)}"
    raise KeyError(f"no single-file name for VAE key {key!r}")


def _vae_tensor(ldm_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The LDM VAE attention uses 1×1 convolutions where diffusers uses linear layers."""
    if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and tensor.ndim == 2:
        return tensor[:, :, None, None]
    return tensor


# -- text encoders -----------------------------------------------------------------------
def _text_model_key(key: str) -> str:
    """transformers 5 ``CLIPTextModel`` keys have no ``text_model.`` prefix; ``...WithProjection`` keeps it."""
    return key.removeprefix("text_model.")


def clip_key(key: str, prefix: str) -> str:
    return prefix + _text_model_key(key)


QKV = ("q_proj", "k_proj", "v_proj")


def openclip_key(key: str, prefix: str = SDXL_OPENCLIP_PREFIX) -> str:
    """One Hugging Face ``CLIPTextModelWithProjection`` key -> its OpenCLIP name.

    OpenCLIP's ``nn.MultiheadAttention`` keeps q, k and v stacked in one ``in_proj_weight``
    (rows q, then k, then v), so the three projections share one name.
    """
    if key == "text_projection.weight":
        return prefix + "text_projection"
    name = _text_model_key(key)
    if name in OPENCLIP_TOP:
        return prefix + OPENCLIP_TOP[name]
    if not name.startswith("encoder.layers."):
        raise KeyError(f"no single-file name for OpenCLIP key {key!r}")
    index, _, rest = name.removeprefix("encoder.layers.").partition(".")
    base = f"{prefix}transformer.resblocks.{index}."
    parts = rest.split(".")
    if parts[0] == "self_attn" and parts[1] in QKV:
        return f"{base}attn.in_proj_{parts[2]}"
    return base + _rename(OPENCLIP_LAYER, rest)


def openclip_tensors(state: dict[str, torch.Tensor], prefix: str = SDXL_OPENCLIP_PREFIX) -> dict[str, torch.Tensor]:
    """A Hugging Face ``CLIPTextModelWithProjection`` state dict in OpenCLIP's layout.

    OpenCLIP multiplies by ``text_projection`` from the right (``x @ text_projection``),
    so it is stored as the transpose of the Linear weight.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name = openclip_key(key, prefix)
        projection = key.split(".")[-2]
        if name.endswith(("in_proj_weight", "in_proj_bias")):
            fused.setdefault(name, {})[projection] = tensor
        elif name.endswith("text_projection"):
            out[name] = tensor.t().contiguous()
        else:
            out[name] = tensor
    for name, parts in fused.items():
        out[name] = torch.cat([parts[projection] for projection in QKV])
    return out


# -- whole pipelines -----------------------------------------------------------------------
@dataclass(frozen=True)
class LayoutComponent:
    """One diffusers component of a pipeline and how its weights are written in a single file."""

    attribute: str  # the pipeline attribute holding the module
    convert: Callable[[object], dict[str, torch.Tensor]]  # module -> tensors under their single-file names
    names: Callable[[object], set[str]] | None = None  # the names alone, where converting would cost more (None: convert's keys)

    def key_names(self, module) -> set[str]:
        return self.names(module) if self.names is not None else set(self.convert(module))


def _unet_tensors(unet) -> dict[str, torch.Tensor]:
    mapper = unet_key_mapper(dict(unet.config))
    return {mapper(key): tensor for key, tensor in unet.state_dict().items()}


def _vae_tensors(vae) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, tensor in vae.state_dict().items():
        name = vae_key(key, levels)
        out[name] = _vae_tensor(name, tensor)
    return out


UNET = LayoutComponent("unet", _unet_tensors)
VAE = LayoutComponent("vae", _vae_tensors)


def clip_component(attribute: str, prefix: str) -> LayoutComponent:
    """A Hugging Face CLIP text model kept as it is under ``prefix`` (the original repos wrap the same module)."""
    return LayoutComponent(attribute, lambda model: {clip_key(key, prefix): tensor for key, tensor in model.state_dict().items()
                                                     if not key.endswith("position_ids")})


def openclip_component(attribute: str, prefix: str) -> LayoutComponent:
    """A text model stored in OpenCLIP's layout under ``prefix`` (q/k/v fused, projection transposed)."""
    return LayoutComponent(attribute, lambda model: openclip_tensors(model.state_dict(), prefix),
                           names=lambda model: {openclip_key(key, prefix) for key in model.state_dict()})


def _fused_away(converted: dict[str, torch.Tensor]) -> int:
    """OpenCLIP fuses q/k/v: each ``in_proj_*`` name stands for three Hugging Face keys."""
    return 2 * sum(name.endswith(("in_proj_weight", "in_proj_bias")) for name in converted)


def _layout_components(pipeline) -> tuple[LayoutComponent, ...]:
    """The pipeline's family says where each of its components goes."""
    from .families import detect_pipeline  # the families build their layouts from this module

    return detect_pipeline(pipeline).single_file.components


def pipeline_to_single_file(pipeline) -> dict[str, torch.Tensor]:
    """Every weight of a diffusers pipeline under its original single-file name, in its family's layout."""
    tensors: dict[str, torch.Tensor] = {}
    for component in _layout_components(pipeline):
        module = getattr(pipeline, component.attribute)
        converted = component.convert(module)
        if len(converted) != len(module.state_dict()) - _fused_away(converted):
            raise ValueError(f"{component.attribute}: two weights map to one single-file name")
        tensors.update(converted)
    return {key: tensor.detach().to("cpu").contiguous() for key, tensor in tensors.items()}


def save_single_file(pipeline_or_folder, path: Path | str) -> Path:
    """Write a diffusers pipeline (object or folder) as one A1111-style ``.safetensors``."""
    from safetensors.torch import save_file

    pipeline = pipeline_or_folder
    if isinstance(pipeline_or_folder, (str, Path)):
        from diffusers import DiffusionPipeline

        pipeline = DiffusionPipeline.from_pretrained(pipeline_or_folder, local_files_only=True, use_safetensors=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(pipeline_to_single_file(pipeline), str(path), metadata={"format": "pt"})
    return path


def ldm_key_names(pipeline) -> dict[str, set[str]]:
    """Per component, the single-file names its weights come from (used to spot unused weights)."""
    return {component.attribute: component.key_names(getattr(pipeline, component.attribute))
            for component in _layout_components(pipeline)}


# -- reading a single file's layout ------------------------------------------------------
UNET_INPUT_CONV = UNET_PREFIX + "input_blocks.0.0.weight"
# Weights a single file may carry that no diffusers module takes (buffers, CLIP's logit scale).
IGNORABLE_SUFFIXES = ("position_ids", "logit_scale")


# Files that are not a full SD 1.x/2.x/SDXL checkpoint, told from their keys, and what to say about them.
NOT_A_CHECKPOINT = (
    ("conditioner.embedders.0.model.", "an SDXL refiner (it has no first text encoder), which cannot be used as the main model"),
    ("lora_unet_", "a LoRA, not a checkpoint: it belongs in models/Lora"),
    ("lora_te", "a LoRA, not a checkpoint: it belongs in models/Lora"),
    # a control model for an extension: A1111 keeps those in models/<the extension's folder>, not with checkpoints
    ("control_model.", "a control model, not a checkpoint: it belongs in the models folder of the extension that uses it"),
    ("encoder.down.", "a VAE, not a checkpoint: it belongs in models/VAE"),
)


def ignorable(key: str) -> bool:
    return key.endswith(IGNORABLE_SUFFIXES)
