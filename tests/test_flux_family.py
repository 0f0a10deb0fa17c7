"""The Flux.1 family end to end on tiny random-weight dev and schnell models (tests/_flux_fixture.py): detection,
the resolution-dependent flow noise table against diffusers' scheduler and the formula, txt2img against diffusers'
own FluxPipeline, the distilled CFG scale, img2img, inpaint and hires fix."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from engine.engine import Engine
from engine.families import FLUX_DEV, FLUX_SCHNELL, for_pipeline_class
from engine.families.flux import Flux1
from engine.infotext import parse_infotext, request_fields_from_infotext
from engine.models import ModelRegistry
from engine.request import GenerationRequest, GenerationResult
from engine.sampling.denoiser import noise_table_for
from tests._flux_fixture import DEV_SCHEDULER, SIZE, build_folder

PROMPT = "a red fox"
# As the SD3 test measured: ours is rounded to uint8, diffusers' is the float picture, so they agree to the rounding.
PARITY_TOLERANCE = 0.51 / 255


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("models")
    build_folder(folder / "dev", "dev")
    build_folder(folder / "schnell", "schnell")
    return folder


@pytest.fixture(scope="module")
def engine(models_dir):
    return Engine(ModelRegistry(models_dir, builtin_dir=None))


def _run(engine: Engine, model: str = "dev", **changes) -> GenerationResult:
    request = GenerationRequest(**{"prompt": PROMPT, "model": model, "steps": 4, "sampler": "Euler", "schedule": "Simple",
                                   "seed": 11, "cfg_scale": 1.0, **changes})
    return engine.generate(request)


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255


def _mu(image_tokens: int, config: dict) -> float:
    """diffusers' calculate_shift, written out: μ linear in the token count from (256, 0.5) to (4096, 1.15)."""
    slope = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    return config["base_shift"] + slope * (image_tokens - config["base_image_seq_len"])


def test_the_folders_are_detected_as_flux_dev_and_schnell(engine):
    assert for_pipeline_class("FluxPipeline").id == "flux"
    dev, schnell = engine.registry.load("dev"), engine.registry.load("schnell")
    assert (dev.family.name, schnell.family.name) == (FLUX_DEV.name, FLUX_SCHNELL.name)
    assert (dev.latent_channels, dev.scaling_factor, dev.latent_shift) == (16, 0.3611, 0.1159)
    assert dev.family.latent.tiny_decoder == "taef1"
    assert noise_table_for(dev)[1] == "flow"
    assert dev.family.request_inputs() == ("distilled_cfg_scale",)
    assert schnell.family.request_inputs() == ()
    assert dict(dev.family.defaults) == {"cfg_scale": 1.0, "distilled_cfg_scale": 3.5, "sampler": "Euler", "schedule": "Simple",
                                         "steps": 20}
    assert dict(schnell.family.defaults)["steps"] == 4 and "distilled_cfg_scale" not in schnell.family.defaults
    for family in (FLUX_DEV, FLUX_SCHNELL):  # each a valid request as it stands, so the UI can apply them as they are
        GenerationRequest(**family.defaults)


@pytest.mark.parametrize("size", [32, 64])
def test_dev_noise_table_is_diffusers_time_shift_for_the_image_size(engine, size):
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = engine.registry.load("dev")
    table, _ = noise_table_for(model, width=size, height=size)
    tokens = (size // 2 // 2) ** 2  # the fixture's VAE halves the picture, then 2×2 latent patches make a token
    mu = _mu(tokens, DEV_SCHEDULER)
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    assert torch.allclose(table.sigmas.double(), math.exp(mu) / (math.exp(mu) + (1 / t - 1)), rtol=0, atol=1e-7)
    scheduler = FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER)
    scheduler.set_timesteps(sigmas=t.flip(0).tolist(), mu=mu)
    assert torch.allclose(table.sigmas, scheduler.sigmas[:-1].flip(0).float(), rtol=0, atol=1e-6)
    assert table.flow and table.sigma_max == 1.0


def test_the_table_depends_on_the_size_on_dev_only(engine):
    dev, schnell = engine.registry.load("dev"), engine.registry.load("schnell")
    assert not torch.equal(noise_table_for(dev, width=32, height=32)[0].sigmas, noise_table_for(dev, width=64, height=64)[0].sigmas)
    small, large = (noise_table_for(schnell, width=size, height=size)[0].sigmas for size in (32, 64))
    assert torch.equal(small, large)
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    assert torch.allclose(small.double(), t, atol=1e-7)  # schnell: shift 1, no dynamic shifting


@pytest.fixture(scope="module")
def diffusers_pipes(models_dir):
    from diffusers import FluxPipeline

    pipes = {}
    for name in ("dev", "schnell"):
        pipe = FluxPipeline.from_pretrained(models_dir / name, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = pipe
    return pipes


@pytest.mark.parametrize("model, steps, cfg, negative", [("dev", 6, 1.0, ""), ("dev", 4, 3.0, "blurry"), ("schnell", 4, 1.0, "")])
def test_txt2img_matches_diffusers_flux_pipeline(engine, diffusers_pipes, model, steps, cfg, negative):
    from diffusers import FluxPipeline

    from engine.sampling import schedules

    seed, guidance = 5, 4.0
    ours = _array(_run(engine, model, steps=steps, seed=seed, cfg_scale=cfg, negative_prompt=negative,
                       distilled_cfg_scale=guidance).images[0].image)

    loaded = engine.registry.load(model)
    table, _ = noise_table_for(loaded, width=SIZE, height=SIZE)
    sigmas = schedules.simple(table, steps)[:-1].double()
    config = loaded.pipeline.scheduler.config
    if config["use_dynamic_shifting"]:  # diffusers shifts the σs it is given: hand it the unshifted ones
        mu = _mu((SIZE // 4) ** 2, config)
        given = 1 / (1 + math.exp(mu) * (1 / sigmas - 1))
    else:
        given = sigmas
    latent = SIZE // 2
    noise = torch.randn((1, 16, latent, latent), generator=torch.Generator().manual_seed(seed))  # A1111's CPU noise
    pipe = diffusers_pipes[model]
    # Schnell reads 256 T5 tokens (Black Forest Labs' limit; diffusers' docs pass it too), dev diffusers' default 512.
    t5_tokens = 512 if model == "dev" else 256
    theirs = pipe(PROMPT, negative_prompt=negative or None, true_cfg_scale=cfg, height=SIZE, width=SIZE,
                  sigmas=given.tolist(), guidance_scale=guidance, output_type="np", max_sequence_length=t5_tokens,
                  latents=FluxPipeline._pack_latents(noise, 1, 16, latent, latent)).images[0]
    assert torch.allclose(pipe.scheduler.sigmas[:-1].double(), sigmas, atol=1e-6)  # the same σs ran
    difference = float(np.abs(ours - theirs).max())
    print(f"{model} engine vs diffusers max difference", difference * 255, "/255")
    assert difference <= PARITY_TOLERANCE, difference
    other = _array(_run(engine, model, steps=steps, seed=seed + 1, cfg_scale=cfg, negative_prompt=negative,
                        distilled_cfg_scale=guidance).images[0].image)
    assert float(np.abs(theirs - other).max()) > 0.05


def _batches(engine: Engine, model: str, **changes) -> list[int]:
    """The batch size of each transformer call in one job (2: the negative prompt ran beside the prompt)."""
    transformer = engine.registry.load(model).pipeline.transformer
    rows: list[int] = []
    handle = transformer.register_forward_hook(lambda module, args, kwargs, output: rows.append(kwargs["hidden_states"].shape[0]),
                                               with_kwargs=True)
    try:
        _run(engine, model, **changes)
    finally:
        handle.remove()
    return rows


def test_cfg_1_runs_no_negative_pass_and_schnell_runs_four_steps(engine):
    assert _batches(engine, "schnell", steps=4) == [1] * 4
    assert _batches(engine, "dev", steps=3) == [1] * 3
    assert _batches(engine, "dev", steps=3, cfg_scale=2.0) == [2] * 3  # real CFG: prompt and negative in one batch


def test_distilled_cfg_changes_dev_and_round_trips_through_the_infotext(engine):
    plain, guided = _run(engine, distilled_cfg_scale=3.5), _run(engine, distilled_cfg_scale=6.0)
    assert not np.array_equal(_array(plain.images[0].image), _array(guided.images[0].image))
    assert "Distilled CFG Scale: 6," in guided.images[0].infotext
    parsed = request_fields_from_infotext(parse_infotext(guided.images[0].infotext))
    assert parsed["distilled_cfg_scale"] == 6.0 and parsed["cfg_scale"] == 1.0


def test_schnell_ignores_the_distilled_cfg_and_does_not_write_it(engine):
    plain, guided = _run(engine, "schnell", distilled_cfg_scale=3.5), _run(engine, "schnell", distilled_cfg_scale=6.0)
    assert np.array_equal(_array(plain.images[0].image), _array(guided.images[0].image))
    assert "Distilled CFG" not in guided.images[0].infotext


def test_txt2img_has_the_native_size_and_the_same_seed_repeats(engine):
    first, again, other = _run(engine), _run(engine), _run(engine, seed=12)
    assert first.images[0].image.size == (SIZE, SIZE)
    assert np.array_equal(_array(first.images[0].image), _array(again.images[0].image))
    assert not np.array_equal(_array(first.images[0].image), _array(other.images[0].image))


def test_a_wide_picture_and_an_odd_latent_side(engine):
    result = _run(engine, width=2 * SIZE + 8, height=SIZE * 2)
    assert result.images[0].image.size == (2 * SIZE + 8, 2 * SIZE)
    # An 8x VAE makes a 1000-pixel side 125 latent pixels: the call pads it to whole 2×2 patches and crops back.
    call = engine.registry.load("dev").family.model_call(engine.registry.load("dev").pipeline)
    x = torch.randn(1, 16, 6, 7)
    text, pooled = torch.randn(1, 5, 32), torch.randn(1, 32)
    out = call(x, torch.tensor([500.0]), encoder_hidden_states=text,
               added_cond_kwargs={"pooled_projections": pooled, "distilled_cfg_scale": 3.5})[0]
    assert out.shape == x.shape and torch.isfinite(out).all()


def _init_image() -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rgb = np.stack([x * 8 % 256, y * 8 % 256, (x + y) * 4 % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def test_img2img_has_the_init_size_and_stays_nearer_it_at_low_strength(engine):
    def picture(strength: float, image: Image.Image | None = None) -> np.ndarray:
        return _array(_run(engine, init_image=image or _init_image(), denoising_strength=strength).images[0].image)

    unchanged = picture(0.0)  # the init image through the VAE and back: the random VAE's version of it
    assert unchanged.shape == (SIZE, SIZE, 3)
    # The random transformer's velocity is large, so even a little denoising moves the picture far: compare the ends.
    near, far = (float(np.abs(picture(strength) - unchanged).mean()) for strength in (0.05, 1.0))
    assert near < far, (near, far)
    wide = _init_image().resize((2 * SIZE, SIZE + 8))
    assert picture(0.5, wide).shape == (SIZE + 8, 2 * SIZE, 3)


def test_inpaint_keeps_the_unmasked_pixels_exactly(engine):
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, SIZE // 2:] = 255
    result = _run(engine, init_image=_init_image(), mask=Image.fromarray(mask, "L"), denoising_strength=0.75, mask_blur=0)
    out, original = np.asarray(result.images[0].image), np.asarray(_init_image())
    assert out.shape == original.shape
    assert np.array_equal(out[:, : SIZE // 2 - 1], original[:, : SIZE // 2 - 1])
    assert not np.array_equal(out[:, SIZE // 2 + 1:], original[:, SIZE // 2 + 1:])


def test_hires_fix_samples_its_second_pass_on_the_new_sizes_table(engine, monkeypatch):
    sizes = []
    original = Flux1.noise_table_for_latent

    def recording(self, config, latent_size, zero_terminal_snr=None, **options):
        sizes.append(latent_size)
        return original(self, config, latent_size, zero_terminal_snr, **options)

    monkeypatch.setattr(Flux1, "noise_table_for_latent", recording)
    result = _run(engine, enable_hr=True, hr_scale=2.0, denoising_strength=0.5)
    assert result.images[0].image.size == (2 * SIZE, 2 * SIZE)
    assert sizes == [(SIZE // 2, SIZE // 2), (SIZE, SIZE)]


def test_t5s_tied_embedding_is_saved_once_but_a_missing_one_is_refused(models_dir, tmp_path):
    """T5's ``encoder.embed_tokens`` is ``shared`` under a second name, so the file holds it once; a file without
    either is still a mismatch."""
    import shutil

    from safetensors.torch import load_file, save_file

    from engine.errors import ModelError

    weights = models_dir / "dev" / "text_encoder_2" / "model.safetensors"
    assert "shared.weight" in load_file(weights) and "encoder.embed_tokens.weight" not in load_file(weights)
    broken = tmp_path / "models" / "broken"
    shutil.copytree(models_dir / "dev", broken)
    tensors = load_file(broken / "text_encoder_2" / "model.safetensors")
    del tensors["shared.weight"]
    save_file(tensors, broken / "text_encoder_2" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="shared.weight|embed_tokens"):
        ModelRegistry(broken.parent, builtin_dir=None).load("broken")
