"""The SD 3.5 family end to end on a tiny random-weight model (tests/_sd3_fixture.py): detection, loading,
the flow noise table against diffusers' scheduler, txt2img against diffusers' own StableDiffusion3Pipeline,
every k-sampler, img2img and inpaint."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine.engine import Engine
from engine.families import SD3, for_pipeline_class
from engine.models import ModelRegistry
from engine.request import GenerationRequest, GenerationResult
from engine.sampling import table as sampler_table
from engine.sampling.denoiser import noise_table_for
from tests._sd3_fixture import SHIFT, SIZE, build_folder

NAME = "sd3tiny"
PROMPT = "a red fox"
# Measured: the engine's Euler + Simple picture and diffusers' StableDiffusion3Pipeline given the same σs, noise and
# prompts differ by at most 0.4997/255: ours is rounded to uint8, theirs is the float picture, so the two agree to
# the rounding (0.51/255 allows for float32 noise at a .5 boundary).
PARITY_TOLERANCE = 0.51 / 255


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.set_num_threads(1)
    return build_folder(tmp_path_factory.mktemp("models") / NAME)


@pytest.fixture(scope="module")
def engine(folder):
    return Engine(ModelRegistry(folder.parent, builtin_dir=None))


def _run(engine: Engine, **changes) -> GenerationResult:
    request = GenerationRequest(**{"prompt": PROMPT, "model": NAME, "steps": 4, "sampler": "Euler", "schedule": "Simple",
                                   "seed": 11, **changes})
    return engine.generate(request)


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255


def test_the_folder_is_detected_as_sd3(engine):
    assert for_pipeline_class("StableDiffusion3Pipeline") is SD3
    model = engine.registry.load(NAME)
    assert model.family.id == "sd3"
    assert (model.latent_channels, model.scaling_factor, model.latent_shift) == (16, 1.5305, 0.0609)
    assert noise_table_for(model)[1] == "flow"


def test_the_noise_table_is_diffusers_flow_sigmas_with_shift(engine):
    from diffusers import FlowMatchEulerDiscreteScheduler

    table, _ = noise_table_for(engine.registry.load(NAME))
    reference = FlowMatchEulerDiscreteScheduler(shift=SHIFT).sigmas.flip(0)  # its 1000 training σs, descending
    assert torch.allclose(table.sigmas, reference.float(), rtol=0, atol=1e-6)
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000  # Esser et al. 2024's shift, written out
    assert torch.allclose(table.sigmas.double(), SHIFT * t / (1 + (SHIFT - 1) * t), rtol=0, atol=1e-7)
    assert table.sigma_max == 1.0


def test_txt2img_has_the_native_size_and_the_same_seed_repeats(engine):
    first, again, other = _run(engine), _run(engine), _run(engine, seed=12)
    assert first.images[0].image.size == (SIZE, SIZE)
    assert np.array_equal(_array(first.images[0].image), _array(again.images[0].image))
    assert not np.array_equal(_array(first.images[0].image), _array(other.images[0].image))
    assert "Sampler: Euler" in first.images[0].infotext


def test_txt2img_matches_diffusers_stable_diffusion_3_pipeline(engine, folder):
    from diffusers import StableDiffusion3Pipeline

    from engine.sampling import schedules

    steps, seed, cfg = 6, 5, 5.0
    ours = _array(_run(engine, steps=steps, seed=seed, cfg_scale=cfg).images[0].image)

    table, _ = noise_table_for(engine.registry.load(NAME))
    sigmas = schedules.simple(table, steps)[:-1].double()
    unshifted = sigmas / (SHIFT - (SHIFT - 1) * sigmas)  # diffusers shifts the σs it is given
    noise = torch.randn((1, 16, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(seed))  # A1111's CPU noise
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPT, negative_prompt="", height=SIZE, width=SIZE, sigmas=unshifted.tolist(), guidance_scale=cfg,
                  latents=noise, output_type="np").images[0]
    assert torch.allclose(pipe.scheduler.sigmas[:-1].double(), sigmas, atol=1e-6)  # the same σs ran
    difference = float(np.abs(ours - theirs).max())
    print("engine vs diffusers max difference", difference * 255, "/255")
    assert difference <= PARITY_TOLERANCE, difference
    assert float(np.abs(theirs - _array(_run(engine, steps=steps, seed=seed + 1, cfg_scale=cfg).images[0].image)).max()) > 0.05


# The samplers without noise between steps that run on σ as they are; tests/test_flow_samplers.py runs the rest.
NOISELESS = [spec.name for spec in sampler_table.SAMPLERS if spec.module in ("samplers", "restart")
             and spec.noise == sampler_table.NO_NOISE]


@pytest.mark.parametrize("sampler", NOISELESS)
def test_every_noiseless_k_sampler_gives_a_finite_picture(engine, sampler):
    result = _run(engine, sampler=sampler, schedule="Automatic", steps=3)
    picture = result.images[0].image
    assert picture.size == (SIZE, SIZE)
    assert np.isfinite(_array(picture)).all()


def test_a_size_past_the_transformers_position_table_is_refused_naming_the_field(engine):
    """The fixture's table holds 32×32 patches of 2×2 latent pixels, 2 image pixels each: 128 a side at most, where
    diffusers would fail inside the model; the limit holds for hires fix's second pass too."""
    from engine.errors import ValidationError

    assert _run(engine, width=128, height=64, steps=1).images[0].image.size == (128, 64)
    with pytest.raises(ValidationError) as refused:
        _run(engine, width=160, steps=1)
    assert refused.value.field == "width" and "(32..128)" in refused.value.message
    with pytest.raises(ValidationError) as hires:
        _run(engine, width=64, height=64, enable_hr=True, hr_scale=4.0, steps=1)
    assert "128" in hires.value.message


def _init_image() -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rgb = np.stack([x * 8 % 256, y * 8 % 256, (x + y) * 4 % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def test_img2img_stays_near_the_init_latent_at_low_strength(engine):
    def picture(strength: float) -> np.ndarray:
        return _array(_run(engine, init_image=_init_image(), denoising_strength=strength).images[0].image)

    unchanged = picture(0.0)  # the init image through the VAE and back: the random VAE's version of it
    distances = [float(np.abs(picture(strength) - unchanged).mean()) for strength in (0.2, 0.6, 1.0)]
    print("img2img mean distance from the strength-0 picture at 0.2, 0.6, 1.0:", distances)
    assert distances[0] < distances[1] < distances[2], distances


def test_inpaint_keeps_the_unmasked_pixels_exactly(engine):
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, SIZE // 2:] = 255
    result = _run(engine, init_image=_init_image(), mask=Image.fromarray(mask, "L"), denoising_strength=0.75,
                  mask_blur=0)
    out = np.asarray(result.images[0].image)
    original = np.asarray(_init_image())
    assert out.shape == original.shape
    assert np.array_equal(out[:, : SIZE // 2 - 1], original[:, : SIZE // 2 - 1])
    assert not np.array_equal(out[:, SIZE // 2 + 1:], original[:, SIZE // 2 + 1:])


def test_img2img_starts_on_the_flow_path(engine):
    """The init latent is noised to σ₀ as (1 − σ₀)·x₀ + σ₀·ε (rectified flow), not x₀ + σ₀·ε."""
    from engine.sampling import sample_pass

    table, _ = noise_table_for(engine.registry.load(NAME))
    spec = sampler_table.find_sampler("Euler")
    sigmas = sample_pass.pass_sigmas(spec, table, "Simple", 10, 0.5)
    init, noise = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    start = sample_pass.start_latent(spec, table, sigmas, noise, init, 10, 0.5)
    sigma = float(sigmas[0])
    assert 0 < sigma < 1
    assert torch.allclose(start, (1 - sigma) * init + sigma * noise, atol=1e-6)


def test_hires_fix_runs_its_second_pass_on_the_flow_model(engine):
    result = _run(engine, enable_hr=True, hr_scale=2.0, denoising_strength=0.5)
    picture = result.images[0].image
    assert picture.size == (2 * SIZE, 2 * SIZE)
    assert np.isfinite(_array(picture)).all()


SHORT_WINDOW = 16  # the flow demo's CLIP window: a model may declare fewer than CLIP's 77 tokens


@pytest.fixture(scope="module")
def short_window_folder(tmp_path_factory):
    folder = build_folder(tmp_path_factory.mktemp("short") / "sd3short")
    for name in ("tokenizer", "tokenizer_2"):
        config_file = folder / name / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config_file.write_text(json.dumps({**config, "model_max_length": SHORT_WINDOW}))
    return folder


def test_a_model_with_a_short_clip_window_draws_what_diffusers_draws(short_window_folder):
    """diffusers' SD3 pipeline pads CLIP to the tokenizer's ``model_max_length``; the engine reads the same window
    (not A1111's 77) for such a model, so the pictures agree, and they differ from reading 77 tokens."""
    from diffusers import StableDiffusion3Pipeline

    from engine.sampling import schedules

    engine = Engine(ModelRegistry(short_window_folder.parent, builtin_dir=None))
    steps, seed, cfg = 4, 5, 5.0
    request = GenerationRequest(prompt=PROMPT, model="sd3short", steps=steps, sampler="Euler", schedule="Simple",
                                seed=seed, cfg_scale=cfg)
    ours = _array(engine.generate(request).images[0].image)
    table, _ = noise_table_for(engine.registry.load("sd3short"))
    sigmas = schedules.simple(table, steps)[:-1].double()
    noise = torch.randn((1, 16, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(seed))
    pipe = StableDiffusion3Pipeline.from_pretrained(short_window_folder, text_encoder_3=None, tokenizer_3=None,
                                                    local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer_max_length == SHORT_WINDOW
    theirs = pipe(PROMPT, negative_prompt="", height=SIZE, width=SIZE, sigmas=(sigmas / (SHIFT - (SHIFT - 1) * sigmas)).tolist(),
                  guidance_scale=cfg, latents=noise, output_type="np").images[0]
    assert float(np.abs(ours - theirs).max()) <= PARITY_TOLERANCE
    long_window = StableDiffusion3Pipeline.from_pretrained(short_window_folder, text_encoder_3=None, tokenizer_3=None,
                                                           local_files_only=True)
    long_window.tokenizer.model_max_length = long_window.tokenizer_2.model_max_length = long_window.tokenizer_max_length = 77
    long_window.set_progress_bar_config(disable=True)
    other = long_window(PROMPT, negative_prompt="", height=SIZE, width=SIZE, guidance_scale=cfg, latents=noise,
                        sigmas=(sigmas / (SHIFT - (SHIFT - 1) * sigmas)).tolist(), output_type="np").images[0]
    assert float(np.abs(other - theirs).max()) > 2 / 255  # the window is part of the picture


def test_a_long_prompt_fills_as_many_short_windows_as_it_needs(short_window_folder):
    from engine.families.sd3 import PROMPTS
    from engine.flow_prompts import FlowPromptEncoder, clip_chunks

    pipe = Engine(ModelRegistry(short_window_folder.parent, builtin_dir=None)).registry.load("sd3short").pipeline
    encoder = FlowPromptEncoder(pipe, PROMPTS)
    long_prompt = "a red fox jumps over the lazy dog"  # the character tokenizer: more than 14 tokens
    chunks = clip_chunks(pipe.tokenizer, long_prompt, SHORT_WINDOW - 2)
    assert len(chunks) >= 2 and all(len(chunk) <= SHORT_WINDOW - 2 for chunk in chunks)
    context = encoder.encode(long_prompt, "").prompt_embeds
    t5_tokens = PROMPTS.plain.max_tokens
    assert context.shape[1] == len(chunks) * SHORT_WINDOW + t5_tokens
    assert encoder.encode(PROMPT, "").prompt_embeds.shape[1] == SHORT_WINDOW + t5_tokens
