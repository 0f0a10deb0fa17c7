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
    shapes["cap_embedder.1.weight"] = shapes["cap_embedder.1.weight"]
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
