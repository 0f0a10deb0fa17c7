"""Z-Image and Flux.2 Klein as users keep their files (issue #19): the transformer alone in its original key layout,
the Qwen3 text encoder and the VAE as files of their own, in the Forge/ComfyUI folders. They load back and draw the same
pixels as the diffusers folder they were written from; files of another model are refused with the file named, and
the model loaded before stays loaded.

The converters here write the published key names (not Sfumato's loader):
- Z-Image's transformer as Tongyi-MAI's code and ComfyUI's ``z_image_turbo_bf16.safetensors`` name it: ``x_embedder``,
  ``final_layer``, fused ``attention.qkv``, ``attention.out``, ``attention.q_norm``/``k_norm``; the rest as diffusers;
- the Qwen3 encoder as transformers saves a ``Qwen3ForCausalLM`` (``model.layers.N...``, ``model.embed_tokens``,
  ``model.norm``), without the output head (Qwen3-4B ties it to the embedding, so its files have none);
- Flux.1's VAE (Z-Image's) in the CompVis names of BFL's ``ae.safetensors``.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from engine.engine import Engine
from engine.errors import ModelError
from engine.models import ModelRegistry
from engine.request import GenerationRequest
from tests import _flow_files as files

PROMPT = "a red fox"


def _draw(engine: Engine, model: str, **changes) -> np.ndarray:
    request = GenerationRequest(**{"prompt": PROMPT, "model": model, "steps": 3, "sampler": "Euler", "schedule": "Simple",
                                   "seed": 5, **changes})
    return np.asarray(engine.generate(request).images[0].image, dtype=np.int16)


def zimage_original(transformer) -> dict[str, torch.Tensor]:
    """A ``ZImageTransformer2DModel``'s weights under the original names."""
    state = {key: value.detach().clone() for key, value in transformer.state_dict().items()}
    out = {}
    for key in list(state):
        if key.endswith(".attention.to_q.weight"):
            block = key[: -len("to_q.weight")]
            out[block + "qkv.weight"] = torch.cat([state.pop(block + f"to_{x}.weight") for x in "qkv"])
    renames = (("all_x_embedder.2-1.", "x_embedder."), ("all_final_layer.2-1.", "final_layer."),
               (".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
               (".attention.norm_k.", ".attention.k_norm."))
    for key, value in state.items():
        for ours, theirs in renames:
            key = key.replace(ours, theirs)
        out[key] = value
    return out


def qwen3_file(encoder) -> dict[str, torch.Tensor]:
    """A Qwen3 encoder (``Qwen3Model`` or ``Qwen3ForCausalLM``) as a ``Qwen3ForCausalLM`` file has it, without lm_head."""
    state = {key: value.detach().clone() for key, value in encoder.state_dict().items() if not key.startswith("lm_head.")}
    return {key if key.startswith("model.") else "model." + key: value for key, value in state.items()}


def save(tensors: dict[str, torch.Tensor], path):
    files._save(tensors, path)
    return path


def zimage_split(pipeline, models, folder, name: str = "z_image_turbo", transformer_dir: str = "diffusion_models",
                 encoder_dir: str = "text_encoders", vae_dir: str = "vae", with_tokenizer: bool = True):
    """ComfyUI's Z-Image files: the transformer alone (its config folder beside it, no tokenizer there),
    qwen_3_4b.safetensors (its tokenizer in qwen_3_4b.tokenizer/ as the error message asks), ae.safetensors."""
    transformer = save(zimage_original(pipeline.transformer), models / transformer_dir / f"{name}.safetensors")
    files.copy_configs(folder, transformer.with_suffix(".config"))
    shutil.rmtree(transformer.with_suffix(".config") / "tokenizer")
    encoder = save(qwen3_file(pipeline.text_encoder), models / encoder_dir / "qwen_3_4b.safetensors")
    if with_tokenizer:
        pipeline.tokenizer.save_pretrained(encoder.with_name("qwen_3_4b.tokenizer"))
    files.save_vae(pipeline.vae, models / vae_dir / "ae.safetensors")
    return transformer


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    """The tiny Z-Image as a diffusers folder, and that folder's picture."""
    from tests._zimage_fixture import build_folder, build_pipeline

    torch.set_num_threads(1)
    models = tmp_path_factory.mktemp("zimage-reference")
    folder = build_folder(models / "zimage-tiny")
    return build_pipeline(), folder, _draw(Engine(ModelRegistry(models, builtin_dir=None)), "zimage-tiny")


def test_zimage_split_files_draw_what_the_folder_draws_once_the_tokenizer_is_where_the_error_says(zimage, tmp_path):
    pipeline, folder, reference = zimage
    zimage_split(pipeline, tmp_path, folder, with_tokenizer=False)
    registry = ModelRegistry(tmp_path, builtin_dir=None)
    assert registry.get("z_image_turbo").usable, registry.get("z_image_turbo").problem
    where = tmp_path / "text_encoders" / "qwen_3_4b.tokenizer"
    with pytest.raises(ModelError, match=r"Qwen3 text encoder needs its tokenizer.*vocab.json, merges.txt and "
                                         r"tokenizer_config.json.*" + str(where)):
        registry.load("z_image_turbo")
    assert registry.get("z_image_turbo").usable  # the tokenizer is the module's problem, not the model file's
    pipeline.tokenizer.save_pretrained(where)
    registry = ModelRegistry(tmp_path, builtin_dir=None)
    assert np.array_equal(_draw(Engine(registry), "z_image_turbo"), reference)
    assert registry.load("z_image_turbo").family.id == "zimage"


def test_zimage_files_in_forges_folders_load_too(zimage, tmp_path):
    pipeline, folder, reference = zimage
    zimage_split(pipeline, tmp_path, folder, "zimage-forge", "Stable-diffusion", "text_encoder", "VAE")
    assert np.array_equal(_draw(Engine(ModelRegistry(tmp_path, builtin_dir=None)), "zimage-forge"), reference)


def test_a_vae_or_qwen3_of_another_model_is_refused_naming_the_file_and_the_loaded_model_stays(zimage, tmp_path):
    from tests._flux2_fixture import build_pipeline as build_flux2

    pipeline, folder, reference = zimage
    zimage_split(pipeline, tmp_path, folder)
    registry = ModelRegistry(tmp_path, builtin_dir=None)
    engine = Engine(registry)
    assert np.array_equal(_draw(engine, "z_image_turbo"), reference)
    flux2 = build_flux2()
    save(flux2_vae_original(flux2.vae), tmp_path / "vae" / "flux2-vae.safetensors")
    with pytest.raises(ModelError, match="flux2-vae.safetensors is a VAE for 32-channel latents, but this model draws "
                                         "16-channel latents"):
        registry.load("z_image_turbo", modules=("flux2-vae.safetensors",))
    (tmp_path / "text_encoders" / "qwen_3_4b.safetensors").unlink()
    save(qwen3_file(flux2.text_encoder), tmp_path / "text_encoders" / "qwen_3_8b.safetensors")
    other = ModelRegistry(tmp_path, builtin_dir=None)
    with pytest.raises(ModelError, match="qwen_3_8b.safetensors is a Qwen3-kind text encoder of width 16, but this "
                                         "model's text_encoder needs width 32"):
        other.load("z_image_turbo")
    assert other.get("z_image_turbo").usable
    assert registry.loaded_names() == ["z_image_turbo"]  # loaded before the failed loads, still there
    assert np.array_equal(_draw(engine, "z_image_turbo"), reference)


def test_a_zimage_gguf_transformer_loads_through_diffusers_converter(zimage, tmp_path):
    pipeline, folder, reference = zimage
    transformer = zimage_split(pipeline, tmp_path, folder)
    gguf_path, count = files.write_gguf(zimage_original(pipeline.transformer),
                                        tmp_path / "diffusion_models" / "z_image_turbo-Q8_0.gguf", "lumina2", "Q8_0")
    shutil.copytree(transformer.with_suffix(".config"), gguf_path.with_suffix(".config"))
    transformer.unlink()
    assert count > 0
    registry = ModelRegistry(tmp_path, builtin_dir=None)
    drawn = _draw(Engine(registry), "z_image_turbo-Q8_0")
    from diffusers.quantizers.gguf.utils import GGUFParameter

    assert GGUFParameter in {type(p) for p in registry.load("z_image_turbo-Q8_0").pipeline.transformer.parameters()}
    assert float(np.abs(drawn - reference).max()) <= 3


def test_the_shipped_zimage_config_has_the_published_size_and_is_picked_by_shape():
    import json

    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from engine.families import ZIMAGE
    from engine.models import SINGLE_FILE_CONFIGS

    folder = SINGLE_FILE_CONFIGS / "zimage"
    with torch.device("meta"):
        model = ZImageTransformer2DModel.from_config(json.loads((folder / "transformer" / "config.json").read_text()))
        encoder = Qwen3Model(Qwen3Config.from_pretrained(folder / "text_encoder"))
    weights = sum(t.numel() for t in model.state_dict().values())
    assert abs(weights - 6.15e9) < 0.1e9, weights  # "6B parameters"
    assert abs(sum(t.numel() for t in encoder.state_dict().values()) - 4.02e9) < 0.05e9  # Qwen3-4B
    original = zimage_original(_MetaView(model))
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
    layout = ZIMAGE.file_layout
    assert layout.config_variant(set(original), shapes.__getitem__) == ""
    assert layout.config_variant(set(original), lambda key: [32, 32]) is None


class _MetaView:
    def __init__(self, model):
        self._names = list(model.state_dict())

    def state_dict(self):
        return {name: torch.zeros(2) for name in self._names}


def flux2_vae_original(vae) -> dict[str, torch.Tensor]:
    """An ``AutoencoderKLFlux2`` under BFL's names: the CompVis layout with the quant convs inside the encoder and
    decoder (``encoder.quant_conv``, ``decoder.post_quant_conv``) and the batch norm's ``bn.running_mean/var``."""
    from diffusers import AutoencoderKL

    c = vae.config
    plain = AutoencoderKL(in_channels=c.in_channels, out_channels=c.out_channels, down_block_types=c.down_block_types,
                          up_block_types=c.up_block_types, block_out_channels=c.block_out_channels,
                          layers_per_block=c.layers_per_block, latent_channels=c.latent_channels,
                          norm_num_groups=c.norm_num_groups, use_quant_conv=False, use_post_quant_conv=False)
    state = vae.state_dict()
    plain.load_state_dict({k: v for k, v in state.items() if k in plain.state_dict()})
    out = files._vae_tensors(plain)
    for ours, theirs in (("quant_conv", "encoder.quant_conv"), ("post_quant_conv", "decoder.post_quant_conv")):
        for part in ("weight", "bias"):
            if f"{ours}.{part}" in state:
                out[f"{theirs}.{part}"] = state[f"{ours}.{part}"].clone()
    out["bn.running_mean"], out["bn.running_var"] = state["bn.running_mean"].clone(), state["bn.running_var"].clone()
    return out


# -- Flux.2 Klein ---------------------------------------------------------------------------------------------------


def flux2_original(transformer) -> dict[str, torch.Tensor]:
    """A ``Flux2Transformer2DModel``'s weights under BFL's names (FLUX.2's ``model.py``): ``img_in``/``txt_in``,
    ``time_in.in_layer/out_layer``, the shared ``*_modulation*.lin``, fused ``img_attn/txt_attn.qkv``, ``*.proj``,
    ``*_mlp.0/2``, RMS norms' ``scale``, ``single_blocks.N.linear1/linear2``, the final adaLN as (shift, scale)."""
    state = {key: value.detach().clone() for key, value in transformer.state_dict().items()}
    out = {"img_in.weight": state.pop("x_embedder.weight"), "txt_in.weight": state.pop("context_embedder.weight"),
           "time_in.in_layer.weight": state.pop("time_guidance_embed.timestep_embedder.linear_1.weight"),
           "time_in.out_layer.weight": state.pop("time_guidance_embed.timestep_embedder.linear_2.weight"),
           "final_layer.linear.weight": state.pop("proj_out.weight"),
           "final_layer.adaLN_modulation.1.weight": files._swap_halves(state.pop("norm_out.linear.weight"))}
    for name in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"):
        out[f"{name}.lin.weight"] = state.pop(f"{name}.linear.weight")
    for i in range(transformer.config.num_layers):
        ours, orig = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        out[f"{orig}img_attn.qkv.weight"] = torch.cat([state.pop(f"{ours}attn.to_{x}.weight") for x in "qkv"])
        out[f"{orig}txt_attn.qkv.weight"] = torch.cat([state.pop(f"{ours}attn.add_{x}_proj.weight") for x in "qkv"])
        for theirs, name in (("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
                             ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
                             ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
                             ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
                             ("img_attn.proj.weight", "attn.to_out.0.weight"), ("txt_attn.proj.weight", "attn.to_add_out.weight"),
                             ("img_mlp.0.weight", "ff.linear_in.weight"), ("img_mlp.2.weight", "ff.linear_out.weight"),
                             ("txt_mlp.0.weight", "ff_context.linear_in.weight"),
                             ("txt_mlp.2.weight", "ff_context.linear_out.weight")):
            out[orig + theirs] = state.pop(ours + name)
    for i in range(transformer.config.num_single_layers):
        ours, orig = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for theirs, name in (("linear1.weight", "attn.to_qkv_mlp_proj.weight"), ("linear2.weight", "attn.to_out.weight"),
                             ("norm.query_norm.scale", "attn.norm_q.weight"), ("norm.key_norm.scale", "attn.norm_k.weight")):
            out[orig + theirs] = state.pop(ours + name)
    assert not state, f"unconverted transformer weights: {sorted(state)[:5]}"
    return out


def flux2_split(pipeline, models, folder, name: str = "flux-2-klein-4b", transformer_dir: str = "diffusion_models"):
    """Flux.2 Klein as ComfyUI users keep it: BFL's transformer alone (config folder beside it, no tokenizer there),
    qwen_3_4b.safetensors with its tokenizer in qwen_3_4b.tokenizer/, flux2-vae.safetensors."""
    transformer = save(flux2_original(pipeline.transformer), models / transformer_dir / f"{name}.safetensors")
    files.copy_configs(folder, transformer.with_suffix(".config"))
    shutil.rmtree(transformer.with_suffix(".config") / "tokenizer")
    encoder = save(qwen3_file(pipeline.text_encoder), models / "text_encoders" / "qwen_3_4b.safetensors")
    pipeline.tokenizer.save_pretrained(encoder.with_name("qwen_3_4b.tokenizer"))
    save(flux2_vae_original(pipeline.vae), models / "vae" / "flux2-vae.safetensors")
    return transformer


@pytest.fixture(scope="module")
def flux2(tmp_path_factory):
    """The tiny Klein, with a VAE that has FLUX.2's quant convs (as the published one does), as a diffusers folder,
    and that folder's picture."""
    import json

    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline

    from tests._flux2_fixture import SIZE, build_pipeline

    torch.set_num_threads(1)
    base = build_pipeline()
    torch.manual_seed(1)
    vae = AutoencoderKLFlux2(**{**{k: v for k, v in base.vae.config.items() if not k.startswith("_")},
                                "use_quant_conv": True, "use_post_quant_conv": True})
    vae.bn.load_state_dict(base.vae.bn.state_dict())
    pipeline = Flux2KleinPipeline(transformer=base.transformer, scheduler=base.scheduler, vae=vae,
                                  text_encoder=base.text_encoder, tokenizer=base.tokenizer, is_distilled=False)
    models = tmp_path_factory.mktemp("flux2-reference")
    folder = models / "klein-tiny"
    pipeline.save_pretrained(folder, safe_serialization=True)
    (folder / "sfumato.json").write_text(json.dumps({"native_width": SIZE, "native_height": SIZE}))
    return pipeline, folder, _draw(Engine(ModelRegistry(models, builtin_dir=None)), "klein-tiny")


def test_flux2_klein_split_files_draw_what_the_folder_draws(flux2, tmp_path):
    pipeline, folder, reference = flux2
    flux2_split(pipeline, tmp_path, folder)
    registry = ModelRegistry(tmp_path, builtin_dir=None)
    assert registry.get("flux-2-klein-4b").usable, registry.get("flux-2-klein-4b").problem
    assert np.array_equal(_draw(Engine(registry), "flux-2-klein-4b"), reference)
    model = registry.load("flux-2-klein-4b")
    assert model.family.id == "flux2"
    assert model.pipeline.vae.quant_conv is not None


def test_flux2_with_a_zimage_vae_or_a_qwen3_of_another_width_is_refused_naming_the_file(flux2, zimage, tmp_path):
    pipeline, folder, reference = flux2
    flux2_split(pipeline, tmp_path, folder)
    registry = ModelRegistry(tmp_path, builtin_dir=None)
    engine = Engine(registry)
    assert np.array_equal(_draw(engine, "flux-2-klein-4b"), reference)
    files.save_vae(zimage[0].vae, tmp_path / "vae" / "ae.safetensors")
    with pytest.raises(ModelError, match="ae.safetensors is a VAE for 16-channel latents, but this model draws "
                                         "32-channel latents"):
        registry.load("flux-2-klein-4b", modules=("ae.safetensors",))
    save(qwen3_file(zimage[0].text_encoder), tmp_path / "text_encoders" / "qwen_3_4b.safetensors")
    with pytest.raises(ModelError, match="qwen_3_4b.safetensors is a Qwen3-kind text encoder of width 32, but this "
                                         "model's text_encoder needs width 16"):
        ModelRegistry(tmp_path, builtin_dir=None).load("flux-2-klein-4b")
    assert registry.loaded_names() == ["flux-2-klein-4b"]
    assert np.array_equal(_draw(engine, "flux-2-klein-4b"), reference)


def test_a_flux2_gguf_transformer_loads_through_diffusers_converter(flux2, tmp_path):
    pipeline, folder, reference = flux2
    transformer = flux2_split(pipeline, tmp_path, folder)
    gguf_path, count = files.write_gguf(flux2_original(pipeline.transformer),
                                        tmp_path / "diffusion_models" / "flux-2-klein-4b-Q8_0.gguf", "flux", "Q8_0")
    shutil.copytree(transformer.with_suffix(".config"), gguf_path.with_suffix(".config"))
    transformer.unlink()
    assert count > 0
    registry = ModelRegistry(tmp_path, builtin_dir=None)
    drawn = _draw(Engine(registry), "flux-2-klein-4b-Q8_0")
    from diffusers.quantizers.gguf.utils import GGUFParameter

    assert GGUFParameter in {type(p) for p in registry.load("flux-2-klein-4b-Q8_0").pipeline.transformer.parameters()}
    assert float(np.abs(drawn - reference).max()) <= 3


def test_the_shipped_klein_configs_have_the_published_sizes_and_are_picked_by_shape():
    import json

    from diffusers import Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from engine.families import FLUX2
    from engine.models import SINGLE_FILE_CONFIGS

    base = SINGLE_FILE_CONFIGS / "flux2"
    for variant, folder, size, encoder_size in (("", base, 3.9e9, 4.02e9), ("9b", base / "variants" / "9b", 9.1e9, 8.19e9)):
        with torch.device("meta"):
            model = Flux2Transformer2DModel.from_config(json.loads((folder / "transformer" / "config.json").read_text()))
            encoder = Qwen3ForCausalLM(Qwen3Config.from_pretrained(folder / "text_encoder"))
        weights = sum(t.numel() for t in model.state_dict().values())
        assert abs(weights - size) < 0.15e9, weights
        encoder_weights = sum(t.numel() for t in encoder.state_dict().values())
        if encoder.config.tie_word_embeddings:
            encoder_weights -= encoder.lm_head.weight.numel()
        assert abs(encoder_weights - encoder_size) < 0.05e9, encoder_weights
        shapes = {key: list(value.shape) for key, value in flux2_original(model).items()}
        assert FLUX2.file_layout.config_variant(set(shapes), shapes.__getitem__) == variant
    assert FLUX2.file_layout.config_variant({"img_in.weight"}, lambda key: [6144, 128]) is None  # FLUX.2 [dev]
