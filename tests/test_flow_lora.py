"""LoRA on the flow families (SD 3.5, Flux.1), in the layouts users' files have, on the tiny fixture models.

Each file is written here from its format's published naming, for the fixture's own module shapes:

- SD 3.5, kohya's sd-scripts: ``lora_unet_`` + the original MMDiT module path flattened with '_'
  (``joint_blocks_0_x_block_attn_qkv`` — one fused qkv Linear), ``lora_te1_`` / ``lora_te2_`` for CLIP-L / CLIP-G;
- SD 3.5, diffusers/PEFT: ``transformer.<diffusers module path>.lora_A.weight`` / ``.lora_B.weight`` (no alpha);
- SD 3.5, OneTrainer: kohya's tensors under ``lora_transformer_`` + the diffusers module path flattened with '_';
- Flux.1, kohya: ``lora_unet_`` + BFL's module path flattened (``double_blocks_0_img_attn_qkv``, the single blocks'
  ``single_blocks_0_linear1`` = q, k, v and the MLP's first layer in one Linear), ``lora_te1_`` for CLIP-L;
- Flux.1, XLabs: ``double_blocks.N.processor.qkv_lora1.down.weight`` / ``.up.weight`` (no alpha);
- Flux.1, ai-toolkit: diffusers' names under ``transformer.`` with ``lora_A`` / ``lora_B``.

The expected weights are kohya's formula W + multiplier·(alpha/rank)·up@down applied by hand to the ORIGINAL layout's
weight, which the test assembles from diffusers' modules itself (q, k and v stacked; the last block's context
modulation and the final layer's stored as (shift, scale) where the original has (scale, shift)), as diffusers'
single-file loader lays the original checkpoint out.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.engine import Engine
from engine.models import ModelRegistry
from engine.networks import active, prepare
from engine.request import GenerationRequest
from tests._sd3_fixture import build_folder as build_sd3_folder

SD3_NAME = "sd3tiny"
PROMPT = "a red fox"
RANK = 2


# -- the original layout of SD 3.5's MMDiT, read from diffusers' modules ------------------------------
def _swap(weight: torch.Tensor) -> torch.Tensor:
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first])


def sd3_original_weights(transformer) -> dict[str, torch.Tensor]:
    """kohya's flattened original-layout name → that layer's weight, assembled from the diffusers transformer."""
    def w(path):
        return transformer.get_submodule(path).weight.detach().clone()

    layers = {}
    blocks = len(transformer.transformer_blocks)
    for i in range(blocks):
        b = f"transformer_blocks.{i}"
        last = i == blocks - 1
        layers[f"joint_blocks_{i}_x_block_attn_qkv"] = torch.cat([w(f"{b}.attn.to_q"), w(f"{b}.attn.to_k"), w(f"{b}.attn.to_v")])
        layers[f"joint_blocks_{i}_x_block_attn_proj"] = w(f"{b}.attn.to_out.0")
        layers[f"joint_blocks_{i}_x_block_mlp_fc1"] = w(f"{b}.ff.net.0.proj")
        layers[f"joint_blocks_{i}_x_block_mlp_fc2"] = w(f"{b}.ff.net.2")
        layers[f"joint_blocks_{i}_x_block_adaLN_modulation_1"] = w(f"{b}.norm1.linear")
        layers[f"joint_blocks_{i}_context_block_attn_qkv"] = torch.cat(
            [w(f"{b}.attn.add_q_proj"), w(f"{b}.attn.add_k_proj"), w(f"{b}.attn.add_v_proj")])
        context_modulation = w(f"{b}.norm1_context.linear")
        layers[f"joint_blocks_{i}_context_block_adaLN_modulation_1"] = _swap(context_modulation) if last else context_modulation
        if not last:  # the last block's context stream ends after attention
            layers[f"joint_blocks_{i}_context_block_attn_proj"] = w(f"{b}.attn.to_add_out")
            layers[f"joint_blocks_{i}_context_block_mlp_fc1"] = w(f"{b}.ff_context.net.0.proj")
    layers["context_embedder"] = w("context_embedder")
    layers["final_layer_adaLN_modulation_1"] = _swap(w("norm_out.linear"))
    layers["t_embedder_mlp_0"] = w("time_text_embed.timestep_embedder.linear_1")
    return layers


def text_weights(pipeline, encoders=(("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"))) -> dict[str, torch.Tensor]:
    """kohya's CLIP names (SD 3.5: ``lora_te1_`` CLIP-L, ``lora_te2_`` CLIP-G, with the old ``text_model_`` part) → weight."""
    layers = {}
    for prefix, component in encoders:
        encoder = getattr(pipeline, component)
        for path, module in encoder.named_modules():
            # During a job the layer is a peft wrapper, whose ``weight`` is its base layer's.
            if hasattr(module, "weight") and path.endswith(("self_attn.q_proj", "mlp.fc1")):
                flat = path.replace(".", "_")
                layers[prefix + (flat if flat.startswith("text_model_") else "text_model_" + flat)] = module.weight.detach().clone()
    return layers


def onetrainer_layers(transformer) -> dict[str, torch.Tensor]:
    """Diffusers module paths flattened with '_' → weight, for a few attention and feed-forward layers (during a job a
    peft wrapper, whose ``weight`` is its base layer's)."""
    return {path.replace(".", "_"): module.weight.detach().clone() for path, module in transformer.named_modules()
            if hasattr(module, "weight") and path.endswith(("attn.to_k", "attn.add_v_proj", "ff.net.0.proj"))}


def _randn(generator, *shape, scale=0.3):
    return torch.randn(*shape, generator=generator) * scale


def kohya_file(path, weights: dict[str, torch.Tensor], seed: int, alpha: float, prefix: str = "lora_unet_") -> dict:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for flat, weight in weights.items():
        name = flat if flat.startswith("lora_te") else prefix + flat
        tensors[f"{name}.lora_down.weight"] = _randn(generator, RANK, weight.shape[1])
        tensors[f"{name}.lora_up.weight"] = _randn(generator, weight.shape[0], RANK)
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora_sd3", "ss_output_name": path.stem})
    return tensors


def sd3_peft_file(path, transformer, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for path_, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and path_.startswith("transformer_blocks.") and path_.endswith(
                ("attn.to_q", "attn.to_v", "attn.add_k_proj", "ff.net.2", "norm1.linear")):
            tensors[f"transformer.{path_}.lora_A.weight"] = _randn(generator, RANK, module.weight.shape[1])
            tensors[f"transformer.{path_}.lora_B.weight"] = _randn(generator, module.weight.shape[0], RANK)
    save_file(tensors, str(path))
    return tensors


# -- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("flow-lora")
    build_sd3_folder(root / SD3_NAME)
    engine = Engine(ModelRegistry(root, builtin_dir=None))
    pipeline = engine.registry.load(SD3_NAME).pipeline
    (root / "Lora").mkdir()
    unet_layers, text = sd3_original_weights(pipeline.transformer), text_weights(pipeline)
    files = {
        "sd3-kohya": kohya_file(root / "Lora" / "sd3-kohya.safetensors", {**unet_layers, **text}, seed=1, alpha=1.0),
        "sd3-peft": sd3_peft_file(root / "Lora" / "sd3-peft.safetensors", pipeline.transformer, seed=2),
        "sd3-onetrainer": kohya_file(root / "Lora" / "sd3-onetrainer.safetensors", onetrainer_layers(pipeline.transformer),
                                     seed=3, alpha=4.0, prefix="lora_transformer_"),
    }
    engine.networks.refresh()
    return engine, files


def _run(engine, prompt=PROMPT, **changes):
    request = GenerationRequest(**{"prompt": prompt, "model": SD3_NAME, "steps": 3, "sampler": "Euler",
                                   "schedule": "Simple", "seed": 7, **changes})
    return engine.generate(request).images[0]


def _pixels(image) -> np.ndarray:
    return np.asarray(image.image if hasattr(image, "image") else image, dtype=np.int16)


# -- tests ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd3-kohya", "sd3-peft", "sd3-onetrainer"])
def test_weight_0_is_pixel_identical_and_weight_1_changes_the_picture(sd3, name):
    engine, _ = sd3
    plain = _pixels(_run(engine))
    assert np.array_equal(_pixels(_run(engine, f"{PROMPT} <lora:{name}:0>")), plain)
    changed = _pixels(_run(engine, f"{PROMPT} <lora:{name}:1>"))
    assert np.abs(changed - plain).max() > 2, "the LoRA changed nothing visible"
    # The undo is bit-exact: the next job without the tag draws the same picture as before it.
    assert np.array_equal(_pixels(_run(engine)), plain)


def test_sd3_kohya_weights_are_kohyas_formula_on_the_original_layout(sd3):
    engine, files = sd3
    tensors = files["sd3-kohya"]
    loaded = engine.registry.load(SD3_NAME)
    pipeline = loaded.pipeline
    multiplier = 0.8
    before_unet, before_text = sd3_original_weights(pipeline.transformer), text_weights(pipeline)
    with active(loaded, prepare(engine.networks, f"x <lora:sd3-kohya:{multiplier}>")):
        during_unet, during_text = sd3_original_weights(pipeline.transformer), text_weights(pipeline)
    after_unet = sd3_original_weights(pipeline.transformer)
    checked = 0
    for name, before, during in [(("lora_unet_" + k), before_unet[k], during_unet[k]) for k in before_unet] + \
                                [(k, before_text[k], during_text[k]) for k in before_text]:
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        expected = before + multiplier * (float(tensors[f"{name}.alpha"]) / RANK) * (up @ down)
        assert torch.allclose(during, expected, atol=1e-5, rtol=0), name
        assert (during - before).abs().max() > 1e-3, name
        checked += 1
    assert checked == len(tensors) // 3
    assert all(torch.equal(after_unet[k], before_unet[k]) for k in before_unet), "the undo is not bit-exact"


def test_sd3_peft_weights_are_w_plus_b_at_a(sd3):
    engine, files = sd3
    tensors = files["sd3-peft"]
    loaded = engine.registry.load(SD3_NAME)
    transformer = loaded.pipeline.transformer
    paths = [key.removeprefix("transformer.").removesuffix(".lora_A.weight") for key in tensors if key.endswith("lora_A.weight")]
    before = {path: transformer.get_submodule(path).weight.detach().clone() for path in paths}
    with active(loaded, prepare(engine.networks, "x <lora:sd3-peft:1>")):
        for path in paths:
            a, b = tensors[f"transformer.{path}.lora_A.weight"], tensors[f"transformer.{path}.lora_B.weight"]
            assert torch.allclose(transformer.get_submodule(path).weight, before[path] + b @ a, atol=1e-5, rtol=0), path
    assert all(torch.equal(transformer.get_submodule(path).weight, before[path]) for path in paths)


def test_sd3_onetrainer_weights_are_kohyas_formula_on_diffusers_modules(sd3):
    engine, files = sd3
    tensors = files["sd3-onetrainer"]
    loaded = engine.registry.load(SD3_NAME)
    transformer = loaded.pipeline.transformer
    before = onetrainer_layers(transformer)
    with active(loaded, prepare(engine.networks, "x <lora:sd3-onetrainer:-0.5>")):
        during = onetrainer_layers(transformer)
    for flat, weight in before.items():
        name = "lora_transformer_" + flat
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        expected = weight - 0.5 * (float(tensors[f"{name}.alpha"]) / RANK) * (up @ down)
        assert torch.allclose(during[flat], expected, atol=1e-5, rtol=0), flat
    assert all(torch.equal(onetrainer_layers(transformer)[flat], weight) for flat, weight in before.items())


def test_the_infotext_writes_lora_hashes(sd3):
    engine, _ = sd3
    image = _run(engine, f"{PROMPT} <lora:sd3-kohya:0.5>")
    assert "<lora:sd3-kohya:0.5>" in image.infotext
    assert 'Lora hashes: "sd3-kohya: ' in image.infotext


def test_an_xlabs_flux_lora_on_sd3_fails_with_the_files_name(sd3):
    from engine.networks import NetworkError

    engine, _ = sd3
    tensors = {"double_blocks.0.processor.qkv_lora1.down.weight": torch.zeros(RANK, 16),
               "double_blocks.0.processor.qkv_lora1.up.weight": torch.zeros(48, RANK)}
    save_file(tensors, str(engine.networks.models_dir / "Lora" / "stray-xlabs.safetensors"))
    engine.networks.refresh()
    plain = _pixels(_run(engine))
    with pytest.raises(NetworkError, match="stray-xlabs.*XLabs"):
        _run(engine, f"{PROMPT} <lora:stray-xlabs:1>")
    assert np.array_equal(_pixels(_run(engine)), plain)


# -- Flux.1 ---------------------------------------------------------------------------------------------
FLUX_NAME = "fluxtiny"


def flux_original_weights(transformer) -> dict[str, torch.Tensor]:
    """kohya's flattened BFL-layout name → weight, assembled from the diffusers Flux transformer: a double block's
    ``img_attn_qkv`` is q, k, v stacked; a single block's ``linear1`` is q, k, v and the MLP's first layer stacked;
    the final layer's modulation is stored (shift, scale) in diffusers where BFL has (scale, shift)."""
    def w(path):
        return transformer.get_submodule(path).weight.detach().clone()

    layers = {}
    for i in range(len(transformer.transformer_blocks)):
        b = f"transformer_blocks.{i}"
        layers[f"double_blocks_{i}_img_attn_qkv"] = torch.cat([w(f"{b}.attn.to_q"), w(f"{b}.attn.to_k"), w(f"{b}.attn.to_v")])
        layers[f"double_blocks_{i}_img_attn_proj"] = w(f"{b}.attn.to_out.0")
        layers[f"double_blocks_{i}_img_mlp_0"] = w(f"{b}.ff.net.0.proj")
        layers[f"double_blocks_{i}_img_mlp_2"] = w(f"{b}.ff.net.2")
        layers[f"double_blocks_{i}_img_mod_lin"] = w(f"{b}.norm1.linear")
        layers[f"double_blocks_{i}_txt_attn_qkv"] = torch.cat(
            [w(f"{b}.attn.add_q_proj"), w(f"{b}.attn.add_k_proj"), w(f"{b}.attn.add_v_proj")])
        layers[f"double_blocks_{i}_txt_attn_proj"] = w(f"{b}.attn.to_add_out")
        layers[f"double_blocks_{i}_txt_mlp_0"] = w(f"{b}.ff_context.net.0.proj")
        layers[f"double_blocks_{i}_txt_mod_lin"] = w(f"{b}.norm1_context.linear")
    for i in range(len(transformer.single_transformer_blocks)):
        b = f"single_transformer_blocks.{i}"
        layers[f"single_blocks_{i}_linear1"] = torch.cat(
            [w(f"{b}.attn.to_q"), w(f"{b}.attn.to_k"), w(f"{b}.attn.to_v"), w(f"{b}.proj_mlp")])
        layers[f"single_blocks_{i}_linear2"] = w(f"{b}.proj_out")
        layers[f"single_blocks_{i}_modulation_lin"] = w(f"{b}.norm.linear")
    layers["txt_in"] = w("context_embedder")
    layers["guidance_in_in_layer"] = w("time_text_embed.guidance_embedder.linear_1")
    layers["final_layer_adaLN_modulation_1"] = _swap(w("norm_out.linear"))
    return layers


def flux_clip_weights(pipeline) -> dict[str, torch.Tensor]:
    """kohya's ``lora_te1_`` names of CLIP-L's layers (Flux.1's first text encoder) → weight."""
    return text_weights(pipeline, encoders=(("lora_te1_", "text_encoder"),))


# XLabs' LoRA processor: per double block, qkv_lora1 / proj_lora1 on the image stream, qkv_lora2 / proj_lora2 on the
# text stream (x-flux, ``DoubleStreamBlockLoraProcessor``); no alpha, scale 1.
XLABS_DOUBLE = {"qkv_lora1": "img_attn_qkv", "proj_lora1": "img_attn_proj", "qkv_lora2": "txt_attn_qkv",
                "proj_lora2": "txt_attn_proj"}


def xlabs_file(path, transformer, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    original = flux_original_weights(transformer)
    tensors = {}
    for i in range(len(transformer.transformer_blocks)):
        for processor, layer in XLABS_DOUBLE.items():
            weight = original[f"double_blocks_{i}_{layer}"]
            tensors[f"double_blocks.{i}.processor.{processor}.down.weight"] = _randn(generator, RANK, weight.shape[1])
            tensors[f"double_blocks.{i}.processor.{processor}.up.weight"] = _randn(generator, weight.shape[0], RANK)
    save_file(tensors, str(path))
    return tensors


def ai_toolkit_file(path, transformer, seed: int) -> dict:
    """ai-toolkit's Flux LoRA: diffusers module names under ``transformer.``, ``lora_A`` / ``lora_B``, no alpha."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("attn.to_q", "attn.to_v", "attn.add_k_proj", "proj_mlp",
                                                                    "ff.net.2", "norm1.linear")):
            tensors[f"transformer.{name}.lora_A.weight"] = _randn(generator, RANK, module.weight.shape[1])
            tensors[f"transformer.{name}.lora_B.weight"] = _randn(generator, module.weight.shape[0], RANK)
    save_file(tensors, str(path))
    return tensors


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    from tests._flux_fixture import build_folder as build_flux_folder

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("flux-lora")
    build_flux_folder(root / FLUX_NAME, "dev")
    engine = Engine(ModelRegistry(root, builtin_dir=None))
    pipeline = engine.registry.load(FLUX_NAME).pipeline
    (root / "Lora").mkdir()
    files = {
        "flux-kohya": kohya_file(root / "Lora" / "flux-kohya.safetensors",
                                 {**flux_original_weights(pipeline.transformer), **flux_clip_weights(pipeline)}, seed=4,
                                 alpha=1.0),
        "flux-xlabs": xlabs_file(root / "Lora" / "flux-xlabs.safetensors", pipeline.transformer, seed=5),
        "flux-aitoolkit": ai_toolkit_file(root / "Lora" / "flux-aitoolkit.safetensors", pipeline.transformer, seed=6),
    }
    engine.networks.refresh()
    return engine, files


def _run_flux(engine, prompt=PROMPT):
    request = GenerationRequest(prompt=prompt, model=FLUX_NAME, steps=3, sampler="Euler", schedule="Simple", seed=7,
                                cfg_scale=1.0)
    return engine.generate(request).images[0]


@pytest.mark.parametrize("name", ["flux-kohya", "flux-xlabs", "flux-aitoolkit"])
def test_flux_weight_0_is_pixel_identical_weight_1_changes_and_the_undo_is_exact(flux, name):
    engine, _ = flux
    plain = _pixels(_run_flux(engine))
    assert np.array_equal(_pixels(_run_flux(engine, f"{PROMPT} <lora:{name}:0>")), plain)
    changed = _run_flux(engine, f"{PROMPT} <lora:{name}:1>")
    assert np.abs(_pixels(changed) - plain).max() > 2, "the LoRA changed nothing visible"
    assert f'Lora hashes: "{name}: ' in changed.infotext
    assert np.array_equal(_pixels(_run_flux(engine)), plain)


def test_flux_kohya_weights_are_kohyas_formula_on_bfls_layout(flux):
    engine, files = flux
    tensors = files["flux-kohya"]
    loaded = engine.registry.load(FLUX_NAME)
    pipeline = loaded.pipeline
    multiplier = 1.3
    before, before_text = flux_original_weights(pipeline.transformer), flux_clip_weights(pipeline)
    with active(loaded, prepare(engine.networks, f"x <lora:flux-kohya:{multiplier}>")):
        during, during_text = flux_original_weights(pipeline.transformer), flux_clip_weights(pipeline)
    pairs = [("lora_unet_" + k, before[k], during[k]) for k in before] + [(k, before_text[k], during_text[k]) for k in before_text]
    for name, weight, merged in pairs:
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        expected = weight + multiplier * (float(tensors[f"{name}.alpha"]) / RANK) * (up @ down)
        assert torch.allclose(merged, expected, atol=1e-5, rtol=0), name
    assert len(pairs) == len(tensors) // 3
    after = flux_original_weights(pipeline.transformer)
    assert all(torch.equal(after[k], before[k]) for k in before), "the undo is not bit-exact"


def test_flux_xlabs_weights_are_w_plus_up_at_down(flux):
    engine, files = flux
    tensors = files["flux-xlabs"]
    loaded = engine.registry.load(FLUX_NAME)
    transformer = loaded.pipeline.transformer
    before = flux_original_weights(transformer)
    with active(loaded, prepare(engine.networks, "x <lora:flux-xlabs:1>")):
        during = flux_original_weights(transformer)
    for i in range(len(transformer.transformer_blocks)):
        for processor, layer in XLABS_DOUBLE.items():
            key = f"double_blocks_{i}_{layer}"
            down = tensors[f"double_blocks.{i}.processor.{processor}.down.weight"]
            up = tensors[f"double_blocks.{i}.processor.{processor}.up.weight"]
            assert torch.allclose(during[key], before[key] + up @ down, atol=1e-5, rtol=0), key


def test_flux_ai_toolkit_weights_are_w_plus_b_at_a(flux):
    engine, files = flux
    tensors = files["flux-aitoolkit"]
    loaded = engine.registry.load(FLUX_NAME)
    transformer = loaded.pipeline.transformer
    paths = [key.removeprefix("transformer.").removesuffix(".lora_A.weight") for key in tensors if key.endswith("lora_A.weight")]
    before = {path: transformer.get_submodule(path).weight.detach().clone() for path in paths}
    with active(loaded, prepare(engine.networks, "x <lora:flux-aitoolkit:0.5>")):
        for path in paths:
            a, b = tensors[f"transformer.{path}.lora_A.weight"], tensors[f"transformer.{path}.lora_B.weight"]
            assert torch.allclose(transformer.get_submodule(path).weight, before[path] + 0.5 * b @ a, atol=1e-5, rtol=0), path
    assert all(torch.equal(transformer.get_submodule(path).weight, before[path]) for path in paths)
