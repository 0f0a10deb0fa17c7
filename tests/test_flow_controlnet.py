"""ControlNet on the flow families (SD 3.5's SD3ControlNetModel, Flux.1's FluxControlNetModel), against diffusers'
own ControlNet pipelines.

A tiny SD3ControlNetModel (FluxControlNetModel) is built here for the tiny SD 3.5 (Flux.1 dev) fixture, with random,
non-zero output layers (a fresh ControlNet's are zero and would prove nothing). diffusers' ControlNet pipelines draw
the control latents from the VAE posterior (``latent_dist.sample()``); Sfumato encodes to the posterior's mean so
that a seed repeats, and the reference is given the same mean here.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.engine import Engine
from engine.models import ModelRegistry
from engine.request import GenerationRequest
from engine.sampling import schedules
from engine.sampling.denoiser import noise_table_for
from tests._sd3_fixture import SHIFT, SIZE, build_folder as build_sd3_folder

REPO = Path(__file__).resolve().parent.parent
SD3_NAME = "sd3tiny"
SD3_CN = "tiny-sd3-cn"
PROMPT = "a red fox"
STEPS, SEED, CFG = 4, 5, 4.0
PARITY_TOLERANCE = 0.51 / 255  # ours is rounded to uint8, theirs is the float picture (tests/test_sd3_family.py)


def build_sd3_controlnet(out: Path, seed: int = 3) -> Path:
    from diffusers import SD3ControlNetModel

    torch.manual_seed(seed)
    controlnet = SD3ControlNetModel(
        sample_size=SIZE // 2, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64, out_channels=16, pos_embed_max_size=32,
        force_zeros_for_pooled_projection=False)
    with torch.no_grad():
        for module in [*controlnet.controlnet_blocks, controlnet.pos_embed_input.proj]:
            module.weight.normal_(0.0, 0.3)
            module.bias.normal_(0.0, 0.3)
    controlnet.save_pretrained(out, safe_serialization=True)
    return out


def control_image() -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    square = ((x > 8) & (x < 24) & (y > 8) & (y < 24)).astype(np.uint8) * 255
    return Image.fromarray(np.stack([square, 255 - square, square // 2], axis=-1), "RGB")


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from engine.extensions import ExtensionManager

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("flow-cn")
    build_sd3_folder(root / SD3_NAME)
    build_sd3_controlnet(root / "ControlNet" / SD3_CN)
    # The same weights as one diffusers-layout file, with its config beside it (``<name>.config/config.json``).
    shutil.copy(root / "ControlNet" / SD3_CN / "diffusion_pytorch_model.safetensors", root / "ControlNet" / "sd3-cn-file.safetensors")
    (root / "ControlNet" / "sd3-cn-file.config").mkdir()
    shutil.copy(root / "ControlNet" / SD3_CN / "config.json", root / "ControlNet" / "sd3-cn-file.config" / "config.json")
    manager = ExtensionManager(REPO / "extensions", tmp_path_factory.mktemp("ext-state") / "extensions.json",
                               models_dir=root, builtin_dir=None)
    assert "controlnet" in manager.loaded, manager.failed
    return Engine(ModelRegistry(root, builtin_dir=None), manager), root


def _unit(**changes) -> dict:
    return {"image": control_image(), "module": "none", "model": SD3_CN, **changes}


def _run(engine, units=None, **changes) -> np.ndarray:
    request = GenerationRequest(**{"prompt": PROMPT, "negative_prompt": "", "model": SD3_NAME, "steps": STEPS,
                                   "sampler": "Euler", "schedule": "Simple", "seed": SEED, "cfg_scale": CFG,
                                   "extensions": {"controlnet": units} if units else {}, **changes})
    return np.asarray(engine.generate(request).images[0].image, dtype=np.float32) / 255


def _diffusers(engine, folder: Path, monkeypatch, **control) -> np.ndarray:
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    table, _ = noise_table_for(engine.registry.load(SD3_NAME))
    sigmas = schedules.simple(table, STEPS)[:-1].double()
    unshifted = sigmas / (SHIFT - (SHIFT - 1) * sigmas)  # diffusers shifts the σs it is given
    noise = torch.randn((1, 16, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(SEED))  # A1111's CPU noise
    controlnet = SD3ControlNetModel.from_pretrained(folder / "ControlNet" / SD3_CN, local_files_only=True)
    pipe = StableDiffusion3ControlNetPipeline.from_pretrained(folder / SD3_NAME, controlnet=controlnet, text_encoder_3=None,
                                                              tokenizer_3=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, negative_prompt="", height=SIZE, width=SIZE, sigmas=unshifted.tolist(), guidance_scale=CFG,
                latents=noise, control_image=control_image(), output_type="np", **control).images[0]


def test_sd3_controlnet_matches_diffusers_pipeline_at_weight_1(sd3, monkeypatch):
    engine, root = sd3
    ours = _run(engine, [_unit()])
    theirs = _diffusers(engine, root, monkeypatch, controlnet_conditioning_scale=1.0)
    difference = float(np.abs(ours - theirs).max())
    print("SD3 ControlNet: engine vs diffusers max difference", difference * 255, "/255")
    assert difference <= PARITY_TOLERANCE, difference * 255
    assert float(np.abs(ours - _run(engine)).max()) > 0.05, "the ControlNet changed nothing: the test proves nothing"


def test_sd3_controlnet_weight_scales_residuals_like_diffusers(sd3, monkeypatch):
    engine, root = sd3
    ours = _run(engine, [_unit(weight=0.6)])
    theirs = _diffusers(engine, root, monkeypatch, controlnet_conditioning_scale=0.6)
    assert float(np.abs(ours - theirs).max()) <= PARITY_TOLERANCE


def test_weight_0_is_identical_to_no_unit(sd3):
    engine, _ = sd3
    assert np.array_equal(_run(engine, [_unit(weight=0.0)]), _run(engine))


def test_start_and_end_steps_are_respected(sd3, monkeypatch):
    """sd-webui-controlnet keeps step i of N while start ≤ i/N ≤ end; diffusers while start ≤ i/N and (i+1)/N ≤ end.
    So ours at end e is diffusers' at end e + 1/N; a start is the same test in both."""
    engine, root = sd3
    late = _run(engine, [_unit(guidance_start=0.5)])
    assert float(np.abs(late - _diffusers(engine, root, monkeypatch, control_guidance_start=0.5)).max()) <= PARITY_TOLERANCE
    early = _run(engine, [_unit(guidance_end=0.25)])  # steps 0 and 1 of 4
    theirs = _diffusers(engine, root, monkeypatch, control_guidance_end=0.25 + 1 / STEPS)
    assert float(np.abs(early - theirs).max()) <= PARITY_TOLERANCE
    full = _run(engine, [_unit()])
    assert not np.array_equal(late, full) and not np.array_equal(early, full) and not np.array_equal(late, early)


def test_control_modes_other_than_balanced_change_the_picture(sd3):
    engine, _ = sd3
    balanced = _run(engine, [_unit()])
    for mode in ("My prompt is more important", "ControlNet is more important"):
        picture = _run(engine, [_unit(control_mode=mode)])
        assert np.isfinite(picture).all()
        assert not np.array_equal(picture, balanced), mode


def test_a_single_file_with_its_config_beside_it_draws_what_the_folder_draws(sd3):
    engine, _ = sd3
    assert np.array_equal(_run(engine, [_unit(model="sd3-cn-file")]), _run(engine, [_unit()]))


def test_an_unknown_controlnet_is_refused_with_a_reason(sd3):
    from engine.errors import ValidationError

    engine, _ = sd3
    with pytest.raises(ValidationError, match="not found|another kind"):
        _run(engine, [_unit(model="no-such-controlnet")])


# -- Flux.1 ---------------------------------------------------------------------------------------------
FLUX_NAME = "fluxtiny"
FLUX_CN = "tiny-flux-cn"
GUIDANCE = 3.5


def build_flux_controlnet(out: Path, seed: int = 4) -> Path:
    """An InstantX-style FluxControlNetModel (it reads the control image's packed latents) for the tiny Flux fixture."""
    from diffusers import FluxControlNetModel

    torch.manual_seed(seed)
    controlnet = FluxControlNetModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    with torch.no_grad():
        for module in [*controlnet.controlnet_blocks, *controlnet.controlnet_single_blocks, controlnet.controlnet_x_embedder]:
            module.weight.normal_(0.0, 0.3)
            module.bias.normal_(0.0, 0.3)
    controlnet.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    from engine.extensions import ExtensionManager
    from tests._flux_fixture import build_folder as build_flux_folder

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("flux-cn")
    build_flux_folder(root / FLUX_NAME, "dev")
    build_flux_controlnet(root / "ControlNet" / FLUX_CN)
    manager = ExtensionManager(REPO / "extensions", tmp_path_factory.mktemp("ext-state") / "extensions.json",
                               models_dir=root, builtin_dir=None)
    return Engine(ModelRegistry(root, builtin_dir=None), manager), root


def _run_flux(engine, units=None) -> np.ndarray:
    request = GenerationRequest(prompt=PROMPT, model=FLUX_NAME, steps=STEPS, sampler="Euler", schedule="Simple",
                                seed=SEED, cfg_scale=1.0, distilled_cfg_scale=GUIDANCE,
                                extensions={"controlnet": units} if units else {})
    return np.asarray(engine.generate(request).images[0].image, dtype=np.float32) / 255


def _flux_diffusers(engine, root: Path, monkeypatch, **control) -> np.ndarray:
    import math

    from diffusers import FluxControlNetModel, FluxControlNetPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    loaded = engine.registry.load(FLUX_NAME)
    table, _ = noise_table_for(loaded, width=SIZE, height=SIZE)
    sigmas = schedules.simple(table, STEPS)[:-1].double()
    config = loaded.pipeline.scheduler.config
    # diffusers shifts the σs it is given by μ (calculate_shift, linear in the token count): hand it the unshifted ones.
    slope = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    mu = config["base_shift"] + slope * ((SIZE // 4) ** 2 - config["base_image_seq_len"])
    given = 1 / (1 + math.exp(mu) * (1 / sigmas - 1))
    latent = SIZE // 2
    noise = torch.randn((1, 16, latent, latent), generator=torch.Generator().manual_seed(SEED))  # A1111's CPU noise
    controlnet = FluxControlNetModel.from_pretrained(root / "ControlNet" / FLUX_CN, local_files_only=True)
    pipe = FluxControlNetPipeline.from_pretrained(root / FLUX_NAME, controlnet=controlnet, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, height=SIZE, width=SIZE, sigmas=given.tolist(), guidance_scale=GUIDANCE, output_type="np",
                latents=FluxControlNetPipeline._pack_latents(noise, 1, 16, latent, latent), control_image=control_image(),
                **control).images[0]


def _flux_unit(**changes) -> dict:
    return {"image": control_image(), "module": "none", "model": FLUX_CN, **changes}


def test_flux_controlnet_matches_diffusers_pipeline_at_weight_1(flux, monkeypatch):
    engine, root = flux
    ours = _run_flux(engine, [_flux_unit()])
    theirs = _flux_diffusers(engine, root, monkeypatch, controlnet_conditioning_scale=1.0)
    difference = float(np.abs(ours - theirs).max())
    print("Flux ControlNet: engine vs diffusers max difference", difference * 255, "/255")
    assert difference <= PARITY_TOLERANCE, difference * 255
    assert float(np.abs(ours - _run_flux(engine)).max()) > 0.05, "the ControlNet changed nothing: the test proves nothing"


def test_flux_weight_0_is_identical_and_start_end_are_respected(flux, monkeypatch):
    engine, root = flux
    plain = _run_flux(engine)
    assert np.array_equal(_run_flux(engine, [_flux_unit(weight=0.0)]), plain)
    late = _run_flux(engine, [_flux_unit(guidance_start=0.5)])
    theirs = _flux_diffusers(engine, root, monkeypatch, control_guidance_start=0.5)
    assert float(np.abs(late - theirs).max()) <= PARITY_TOLERANCE
    early = _run_flux(engine, [_flux_unit(guidance_end=0.25)])  # steps 0 and 1 of 4 (diffusers: end + 1/N)
    theirs = _flux_diffusers(engine, root, monkeypatch, control_guidance_end=0.25 + 1 / STEPS)
    assert float(np.abs(early - theirs).max()) <= PARITY_TOLERANCE


def test_a_controlnet_fits_only_its_own_familys_transformer(sd3, flux):
    import json

    from engine.errors import ValidationError

    (sd3_engine, sd3_root), (flux_engine, flux_root) = sd3, flux
    cn = sd3_engine.extensions.module("controlnet")
    sd3_config = json.loads((sd3_root / "ControlNet" / SD3_CN / "config.json").read_text())
    flux_config = json.loads((flux_root / "ControlNet" / FLUX_CN / "config.json").read_text())
    sd3_transformer = sd3_engine.registry.load(SD3_NAME).pipeline.transformer.config
    flux_transformer = flux_engine.registry.load(FLUX_NAME).pipeline.transformer.config
    assert cn.models.fits(sd3_config, sd3_transformer) and cn.models.fits(flux_config, flux_transformer)
    assert not cn.models.fits(sd3_config, flux_transformer) and not cn.models.fits(flux_config, sd3_transformer)
    # Put the Flux ControlNet where the SD 3.5 engine looks: it is refused by name, with the reason.
    shutil.copytree(flux_root / "ControlNet" / FLUX_CN, sd3_root / "ControlNet" / FLUX_CN)
    with pytest.raises(ValidationError, match="another kind of base model"):
        _run(sd3_engine, [_unit(model=FLUX_CN)])
