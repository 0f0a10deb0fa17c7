"""Each model family tells its own models apart and carries its constants: detection from diffusers
configs, single-file keys and ControlNet keys; latent format; parameterization and noise table; the
UNet's extra inputs; sizes; and a model folder's own sfumato.json."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine.checkpoint_convert import save_single_file
from engine.families import (FAMILIES, SD1, SD2, SDXL, detect_checkpoint, detect_family, detect_pipeline, detect_unet_keys,
                             for_pipeline_class)
from engine.prompts import Conditioning
from engine.tiny_models import build_sd1, build_sdxl
from tests._checkpoints import build_sd2_like

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "engine" / "configs"
DEMO = ROOT / "builtin" / "sfumato-demo"


def config(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {"sd1": build_sd1(root / "sd1"), "sd2": build_sd2_like(root / "sd2"), "sdxl": build_sdxl(root / "sdxl")}


@pytest.fixture(scope="module")
def single_file_keys(tiny, tmp_path_factory) -> dict[str, set[str]]:
    """Each tiny model written as an original-layout single file, read back as key names only."""
    root = tmp_path_factory.mktemp("single")
    keys = {}
    for name, folder in tiny.items():
        path = save_single_file(folder, root / f"{name}.safetensors")
        with safe_open(str(path), framework="pt") as handle:
            keys[name] = set(handle.keys())
    return keys


# -- detection ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, family", [("sd1", SD1), ("sdxl", SDXL)])
def test_shipped_full_size_unet_configs_are_their_families(name, family):
    assert detect_family(config(CONFIGS / name / "unet" / "config.json")) is family


def test_an_sd2_unet_config_reads_1024_wide_text():
    sd2_768_v = {"_class_name": "UNet2DConditionModel", "cross_attention_dim": 1024, "addition_embed_type": None,
                 "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True}
    assert detect_family(sd2_768_v) is SD2
    assert detect_family({**sd2_768_v, "cross_attention_dim": 768}) is SD1


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_tiny_models_are_their_families_by_config(tiny, name):
    assert detect_family(config(tiny[name] / "unet" / "config.json")).id == name


def test_a_config_no_family_claims_is_refused():
    with pytest.raises(ValueError, match="SD 1.x, SD 2.x, SDXL, SD 3.5 and Flux.1"):
        detect_family({"_class_name": "AuraFlowTransformer2DModel", "joint_attention_dim": 4096})


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_single_files_are_their_families_by_key_names(single_file_keys, name):
    assert detect_checkpoint(single_file_keys[name]).id == name


def test_single_file_markers_are_the_original_text_encoder_prefixes(single_file_keys):
    assert any(key.startswith("cond_stage_model.transformer.text_model.") for key in single_file_keys["sd1"])
    assert any(key.startswith("cond_stage_model.model.transformer.resblocks.") for key in single_file_keys["sd2"])
    assert any(key.startswith("conditioner.embedders.0.transformer.text_model.") for key in single_file_keys["sdxl"])
    assert any(key.startswith("conditioner.embedders.1.model.transformer.resblocks.") for key in single_file_keys["sdxl"])


@pytest.mark.parametrize("keys, reason", [
    ({"model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.model.ln_final.weight"}, "refiner"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"}, "LoRA"),
    ({"encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight"}, "VAE"),
    ({"cond_stage_model.transformer.text_model.final_layer_norm.weight"}, "no UNet weights"),
    ({"model.diffusion_model.input_blocks.0.0.weight"}, "no text encoder weights"),
])
def test_files_that_are_no_checkpoint_are_refused_saying_what_they_look_like(keys, reason):
    with pytest.raises(ValueError, match=reason):
        detect_checkpoint(keys)


@pytest.mark.parametrize("name, text_width, extra", [
    ("sd1", 768, set()), ("sd2", 1024, set()), ("sdxl", 2048, {"control_model.label_emb.0.0.weight"})])
def test_controlnet_keys_tell_the_family_they_were_made_for(name, text_width, extra):
    probe = "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    keys = {"control_model.input_hint_block.0.weight", probe} | extra
    shapes = {probe: [320, text_width]}
    assert detect_unet_keys(keys, shapes.__getitem__, "control_model.").id == name


def test_pipeline_classes_name_the_families_that_load_them():
    assert for_pipeline_class("StableDiffusionPipeline") is SD1  # SD 2.x shares it; the UNet config tells them apart
    assert for_pipeline_class("StableDiffusionXLInpaintPipeline") is SDXL
    assert for_pipeline_class("HunyuanDiTPipeline") is None
    assert "text_encoder_2" in SDXL.components and "text_encoder_2" not in SD1.components


# -- latent format ------------------------------------------------------------------------------
def test_latent_formats_carry_the_published_constants():
    def constants(family):
        return family.latent.channels, family.latent.scaling_factor, family.latent.shift, family.latent.tiny_decoder

    assert constants(SD1) == (4, 0.18215, 0.0, "taesd")
    assert SD2.latent == SD1.latent
    assert constants(SDXL) == (4, 0.13025, 0.0, "taesdxl")
    assert SD1.latent.rgb_factors[0] == (0.3512, 0.2297, 0.3227) and SD1.latent.rgb_bias == (0.0, 0.0, 0.0)
    assert SDXL.latent.rgb_factors[3] == (-0.3165, -0.2492, -0.2188) and SDXL.latent.rgb_bias == (0.1084, -0.0175, -0.0011)
    factors, bias = SDXL.latent_to_rgb_matrix()
    assert factors.shape == (4, 3) and bias.shape == (3,)


def test_sizes_and_modes():
    assert (SD1.native_size, SD2.native_size, SDXL.native_size) == ((512, 512), (768, 768), (1024, 1024))
    assert (SD1.max_size, SDXL.max_size) == (2048, 4096)
    assert all(family.modes == ("txt2img", "img2img", "inpaint") for family in FAMILIES)


# -- parameterization and noise table ------------------------------------------------------------
def reference_sigmas(beta_start: float, beta_end: float, steps: int = 1000) -> torch.Tensor:
    """Ho et al.'s ᾱ for latent diffusion's scaled-linear βs, in float64, as σ = √((1 − ᾱ)/ᾱ)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


@pytest.mark.parametrize("family, name", [(SD1, "sd1"), (SDXL, "sdxl")])
def test_noise_tables_span_the_sigmas_a1111_uses(family, name):
    table = family.noise_table(config(CONFIGS / name / "scheduler" / "scheduler_config.json"))
    assert table.sigma_max == pytest.approx(14.6146, abs=1e-4) and table.sigma_min == pytest.approx(0.0292, abs=1e-4)
    reference = reference_sigmas(0.00085, 0.012)
    assert torch.allclose(table.sigmas.double(), reference, rtol=1e-3)  # σ from float32 ᾱ, as A1111 computes it


def test_each_family_brings_its_align_your_steps_list():
    scheduler = config(CONFIGS / "sd1" / "scheduler" / "scheduler_config.json")
    sd15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
    xl = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)
    assert SD1.noise_table(scheduler).align_your_steps == sd15
    assert SD2.noise_table(scheduler).align_your_steps == sd15  # A1111 uses the SD 1.5 list for every non-SDXL model
    assert SDXL.noise_table(scheduler).align_your_steps == xl


def test_zero_terminal_snr_follows_the_config_unless_asked():
    scheduler = config(CONFIGS / "sd1" / "scheduler" / "scheduler_config.json")
    assert SD1.noise_table(scheduler).sigma_max < 15
    assert SD1.noise_table({**scheduler, "rescale_betas_zero_snr": True}).sigma_max > 4000
    assert SD1.noise_table({**scheduler, "rescale_betas_zero_snr": True}, zero_terminal_snr=False).sigma_max < 15


def test_parameterization_comes_from_the_prediction_type():
    assert SD1.parameterization(config(CONFIGS / "sd1" / "scheduler" / "scheduler_config.json")) == "eps"
    assert SD1.parameterization(config(DEMO / "scheduler" / "scheduler_config.json")) == "v"
    assert SDXL.parameterization({}) == "eps"
    with pytest.raises(ValueError, match="sample"):
        SD1.parameterization({"prediction_type": "sample"})


# -- the per-step model call -----------------------------------------------------------------------
def test_sdxl_gives_the_unet_pooled_text_and_size_numbers_laid_out_like_the_text():
    positive, negative = torch.full((1, 8), 1.0), torch.full((1, 8), -1.0)
    conditioning = Conditioning(torch.zeros(1, 77, 16), torch.zeros(1, 77, 16), pooled=positive, negative_pooled=negative)
    added = SDXL.unet_kwargs(conditioning, width=96, height=64).batched(2, True, torch.device("cpu"), torch.float16)
    assert added["time_ids"].tolist() == [[64, 96, 0, 0, 64, 96]] * 4 and added["time_ids"].dtype == torch.float16
    assert added["text_embeds"][:, 0].tolist() == [-1, -1, 1, 1]  # [negative × batch, positive × batch]
    without_cfg = SDXL.unet_kwargs(conditioning, 96, 64).batched(2, False, torch.device("cpu"), torch.float32)
    assert without_cfg["text_embeds"][:, 0].tolist() == [1, 1]
    assert SD1.unet_kwargs(conditioning, 96, 64).batched(2, True, torch.device("cpu"), torch.float32) is None


# -- a model's own sfumato.json ------------------------------------------------------------------
def test_the_demo_models_family_file_overrides_name_size_and_preview_only():
    demo = detect_family(config(DEMO / "unet" / "config.json"), DEMO)
    data = config(DEMO / "sfumato.json")
    assert type(demo) is type(SD1)
    assert demo.name == data["family"] and demo.native_size == (data["native_width"], data["native_height"])
    assert demo.latent_rgb_factors == tuple(tuple(row) for row in data["latent_rgb_factors"])
    assert demo.min_size <= 64 and demo.latent.scaling_factor == SD1.latent.scaling_factor
    assert demo.text_layers(2) == SD1.text_layers(2)


def test_a_loaded_pipeline_is_told_by_its_denoisers_config(tiny):
    from types import SimpleNamespace

    for name, folder in tiny.items():
        pipeline = SimpleNamespace(unet=SimpleNamespace(config=config(folder / "unet" / "config.json")))
        assert detect_pipeline(pipeline).id == name
    with pytest.raises(ValueError, match="none of the families"):
        detect_pipeline(SimpleNamespace(transformer=SimpleNamespace(config={"joint_attention_dim": 4096})))
