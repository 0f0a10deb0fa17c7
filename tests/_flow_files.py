"""Tiny flow models written as users keep them: original single files and Forge/ComfyUI split files.

The converters follow the published key names, not Sfumato's loader. SD 3.5's writers live in
``training.sd3_single_file`` (the demo flow model exports with them); Flux.1's are here.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from training.sd3_single_file import (_save, _swap_halves, _vae_tensors, copy_configs, hf_text_encoder,  # noqa: F401
                                      mmdit_original, mmdit_original_names, sd3_all_in_one)

def sd3_split(pipeline, models: Path, name: str, folder: Path, transformer_dir: str = "diffusion_models",
              encoder_dir: str = "text_encoders", vae_dir: str = "vae", vae_name: str = "sd3_vae") -> Path:
    """ComfyUI's split layout: the MMDiT alone (no prefix) with its config folder beside it, clip_l/clip_g in the
    text encoder folder, the VAE (CompVis names, no prefix) in the VAE folder."""
    transformer = models / transformer_dir / f"{name}.safetensors"
    _save(mmdit_original(pipeline.transformer), transformer)
    copy_configs(folder, transformer.with_suffix(".config"))
    _save(hf_text_encoder(pipeline.text_encoder), models / encoder_dir / "clip_l.safetensors")
    _save(hf_text_encoder(pipeline.text_encoder_2), models / encoder_dir / "clip_g.safetensors")
    _save(_vae_tensors(pipeline.vae), models / vae_dir / f"{vae_name}.safetensors")
    return transformer


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def tiny_t5(d_model: int, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=256, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def add_t5_to_config(config_dir: Path, t5) -> None:
    """Make a ``<name>.config/`` folder name a T5 text encoder (as SD 3.5's full configs do), with no tokenizer files."""
    t5.config.save_pretrained(config_dir / "text_encoder_3")
    edit_json(config_dir / "model_index.json", text_encoder_3=["transformers", "T5EncoderModel"],
              tokenizer_3=["transformers", "T5TokenizerFast"])


def tiny_vae(latent_channels: int, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32)


def save_vae(vae, path: Path) -> Path:
    _save(_vae_tensors(vae), path)
    return path


def save_text_encoder(encoder, path: Path) -> Path:
    _save(hf_text_encoder(encoder), path)
    return path


def mmdit_gguf(transformer, path: Path, quantized: str | None = None) -> tuple[Path, int]:
    """The MMDiT under its original names in a GGUF file (see ``write_gguf``)."""
    return write_gguf(mmdit_original(transformer), path, "sd3", quantized)


def write_gguf(tensors: dict[str, torch.Tensor], path: Path, arch: str, quantized: str | None = None) -> tuple[Path, int]:
    """Tensors in a GGUF file, as city96's conversions lay them out: F16 (1-D tensors F32), and with ``quantized``
    (e.g. "Q8_0") each 2-D weight whose rows are whole blocks quantized to that type.
    Returns the path and how many tensors were quantized."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch=arch)
    count = 0
    for name, tensor in tensors.items():
        array = tensor.float().numpy()
        kind = getattr(gguf.GGMLQuantizationType, quantized) if quantized else None
        block = gguf.GGML_QUANT_SIZES[kind][0] if kind is not None else 0
        if kind is not None and array.ndim == 2 and array.shape[-1] % block == 0:
            data = gguf.quants.quantize(array, kind)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)
            count += 1
        else:
            writer.add_tensor(name, array.astype(np.float16) if array.ndim > 1 else array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, count


def sd3_with_t5(folder: Path, seed: int = 0):
    """The tiny SD 3.5 of ``tests._sd3_fixture`` with a tiny T5 (width 64, the MMDiT's joint width), saved as a
    diffusers folder; returns the pipeline."""
    import tempfile

    from diffusers import StableDiffusion3Pipeline

    from tests._sd3_fixture import SIZE, build_pipeline
    from tests._t5_tokenizer import build_t5_tokenizer

    base = build_pipeline(seed)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_t5_tokenizer(Path(scratch))
    pipeline = StableDiffusion3Pipeline(
        transformer=base.transformer, scheduler=base.scheduler, vae=base.vae, text_encoder=base.text_encoder,
        tokenizer=base.tokenizer, text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
        text_encoder_3=tiny_t5(d_model=base.transformer.config.joint_attention_dim, seed=seed + 1), tokenizer_3=tokenizer)
    pipeline.save_pretrained(folder, safe_serialization=True)
    (folder / "sfumato.json").write_text(json.dumps({"native_width": SIZE, "native_height": SIZE}))
    return pipeline


def flux_original(transformer) -> dict[str, torch.Tensor]:
    """A ``FluxTransformer2DModel``'s weights under Black Forest Labs' names (``flux/model.py``, ``flux/modules/layers.py``):
    fused ``qkv`` and ``linear1`` (q, k, v, MLP in), ``*_mod.lin``/``modulation.lin``, RMS norms' ``scale``, and the final
    adaLN as (shift, scale)."""
    state = {key: value.detach().clone() for key, value in transformer.state_dict().items()}
    out = {}

    def embedder(original: str, ours: str) -> None:
        for layer, linear in (("in_layer", "linear_1"), ("out_layer", "linear_2")):
            for part in ("weight", "bias"):
                out[f"{original}.{layer}.{part}"] = state.pop(f"{ours}.{linear}.{part}")

    embedder("time_in", "time_text_embed.timestep_embedder")
    embedder("vector_in", "time_text_embed.text_embedder")
    if "time_text_embed.guidance_embedder.linear_1.weight" in state:
        embedder("guidance_in", "time_text_embed.guidance_embedder")
    for part in ("weight", "bias"):
        out[f"txt_in.{part}"] = state.pop(f"context_embedder.{part}")
        out[f"img_in.{part}"] = state.pop(f"x_embedder.{part}")
        out[f"final_layer.linear.{part}"] = state.pop(f"proj_out.{part}")
        out[f"final_layer.adaLN_modulation.1.{part}"] = _swap_halves(state.pop(f"norm_out.linear.{part}"))
    for i in range(transformer.config.num_layers):
        ours, orig = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for part in ("weight", "bias"):
            out[f"{orig}img_mod.lin.{part}"] = state.pop(f"{ours}norm1.linear.{part}")
            out[f"{orig}txt_mod.lin.{part}"] = state.pop(f"{ours}norm1_context.linear.{part}")
            out[f"{orig}img_attn.qkv.{part}"] = torch.cat([state.pop(f"{ours}attn.to_{x}.{part}") for x in "qkv"])
            out[f"{orig}txt_attn.qkv.{part}"] = torch.cat([state.pop(f"{ours}attn.add_{x}_proj.{part}") for x in "qkv"])
            out[f"{orig}img_attn.proj.{part}"] = state.pop(f"{ours}attn.to_out.0.{part}")
            out[f"{orig}txt_attn.proj.{part}"] = state.pop(f"{ours}attn.to_add_out.{part}")
            out[f"{orig}img_mlp.0.{part}"] = state.pop(f"{ours}ff.net.0.proj.{part}")
            out[f"{orig}img_mlp.2.{part}"] = state.pop(f"{ours}ff.net.2.{part}")
            out[f"{orig}txt_mlp.0.{part}"] = state.pop(f"{ours}ff_context.net.0.proj.{part}")
            out[f"{orig}txt_mlp.2.{part}"] = state.pop(f"{ours}ff_context.net.2.{part}")
        for theirs, name in (("img_attn.norm.query_norm", "attn.norm_q"), ("img_attn.norm.key_norm", "attn.norm_k"),
                             ("txt_attn.norm.query_norm", "attn.norm_added_q"), ("txt_attn.norm.key_norm", "attn.norm_added_k")):
            out[f"{orig}{theirs}.scale"] = state.pop(f"{ours}{name}.weight")
    for i in range(transformer.config.num_single_layers):
        ours, orig = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for part in ("weight", "bias"):
            out[f"{orig}modulation.lin.{part}"] = state.pop(f"{ours}norm.linear.{part}")
            out[f"{orig}linear1.{part}"] = torch.cat([state.pop(f"{ours}attn.to_{x}.{part}") for x in "qkv"]
                                                     + [state.pop(f"{ours}proj_mlp.{part}")])
            out[f"{orig}linear2.{part}"] = state.pop(f"{ours}proj_out.{part}")
        out[f"{orig}norm.query_norm.scale"] = state.pop(f"{ours}attn.norm_q.weight")
        out[f"{orig}norm.key_norm.scale"] = state.pop(f"{ours}attn.norm_k.weight")
    assert not state, f"unconverted transformer weights: {sorted(state)[:5]}"
    return out


def flux_all_in_one(pipeline, path: Path, with_config_from: Path | None = None) -> Path:
    """A Flux.1 all-in-one file as ComfyUI's checkpoints have it: ``model.diffusion_model.*`` (BFL names),
    ``text_encoders.clip_l.transformer.*``, ``text_encoders.t5xxl.transformer.*`` and ``vae.*`` (CompVis names)."""
    tensors = {"model.diffusion_model." + k: v for k, v in flux_original(pipeline.transformer).items()}
    tensors.update({"vae." + k: v for k, v in _vae_tensors(pipeline.vae).items()})
    tensors.update({f"text_encoders.clip_l.transformer.{k}": v for k, v in hf_text_encoder(pipeline.text_encoder).items()})
    tensors.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in hf_text_encoder(pipeline.text_encoder_2).items()})
    _save(tensors, path)
    if with_config_from is not None:
        copy_configs(with_config_from, path.with_suffix(".config"))
    return path


def flux_split(pipeline, models: Path, name: str, folder: Path, transformer_dir: str = "diffusion_models",
               encoder_dir: str = "text_encoders", vae_dir: str = "vae") -> Path:
    """Flux.1 as ComfyUI users keep it: the BFL transformer alone (``flux1-dev.safetensors``) with its config folder,
    ``clip_l.safetensors`` and ``t5xxl_fp16.safetensors`` (T5's tokenizer in ``t5xxl_fp16.tokenizer/``), ``ae.safetensors``."""
    transformer = models / transformer_dir / f"{name}.safetensors"
    _save(flux_original(pipeline.transformer), transformer)
    copy_configs(folder, transformer.with_suffix(".config"))
    shutil.rmtree(transformer.with_suffix(".config") / "tokenizer_2")  # T5's tokenizer comes with its file instead
    _save(hf_text_encoder(pipeline.text_encoder), models / encoder_dir / "clip_l.safetensors")
    t5 = models / encoder_dir / "t5xxl_fp16.safetensors"
    _save(hf_text_encoder(pipeline.text_encoder_2), t5)
    pipeline.tokenizer_2.save_pretrained(t5.with_name(t5.stem + ".tokenizer"))
    _save(_vae_tensors(pipeline.vae), models / vae_dir / "ae.safetensors")
    return transformer
