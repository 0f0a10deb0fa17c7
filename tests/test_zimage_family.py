"""The Z-Image family end to end on a tiny random-weight model (tests/_zimage_fixture.py): detection, loading, the
flow noise table, txt2img against diffusers' own ZImagePipeline (whose transformer sees 1 − σ and answers −v, and
whose guidance scale g is A1111's CFG 1 + g), img2img and inpaint."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from engine.engine import Engine
from engine.families import ZIMAGE, for_pipeline_class
from engine.models import ModelRegistry
from engine.request import GenerationRequest, GenerationResult
from engine.sampling.denoiser import noise_table_for
from tests._zimage_fixture import SHIFT, SIZE, build_folder

NAME = "zimagetiny"
PROMPT = "a red fox in the snow"
NEGATIVE = "blurry"
# The engine's picture is rounded to uint8, diffusers' is the float picture: they agree to the rounding (0.5/255),
# plus float32 noise at a .5 boundary.
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
                                   "seed": 11, "cfg_scale": 1.0, **changes})
    return engine.generate(request)


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255


def test_the_folder_is_detected_as_zimage(engine):
    assert for_pipeline_class("ZImagePipeline") is ZIMAGE
    model = engine.registry.load(NAME)
    assert model.family.id == "zimage"
    assert (model.latent_channels, model.scaling_factor, model.latent_shift) == (16, 0.3611, 0.1159)
    table, parameterization = noise_table_for(model)
    assert parameterization == "flow"
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000  # Esser et al. 2024's shift, written out
    assert torch.allclose(table.sigmas.double(), SHIFT * t / (1 + (SHIFT - 1) * t), rtol=0, atol=1e-7)
    assert ZIMAGE.defaults == {"cfg_scale": 1.0, "steps": 8, "sampler": "Euler", "schedule": "Simple"}


def _diffusers_picture(folder, engine, steps: int, seed: int, cfg: float) -> tuple[np.ndarray, float]:
    from diffusers import ZImagePipeline

    from engine.sampling import schedules

    table, _ = noise_table_for(engine.registry.load(NAME))
    sigmas = schedules.simple(table, steps)[:-1].double()
    unshifted = sigmas / (SHIFT - (SHIFT - 1) * sigmas)  # diffusers shifts the σs it is given
    noise = torch.randn((1, 16, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(seed))  # A1111's CPU noise
    pipe = ZImagePipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    tick = time.perf_counter()
    theirs = pipe(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, sigmas=unshifted.tolist(),
                  guidance_scale=cfg - 1, latents=noise, output_type="np").images[0]
    seconds = time.perf_counter() - tick
    assert torch.allclose(pipe.scheduler.sigmas[:-1].double(), sigmas, atol=1e-6)  # the same σs ran
    return theirs, seconds


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_txt2img_matches_diffusers_zimage_pipeline(engine, folder, cfg):
    steps, seed = 6, 5
    _run(engine, steps=1, negative_prompt=NEGATIVE)  # warm: the prompt encoding is cached, as the pipeline's is not
    tick = time.perf_counter()
    ours = _array(_run(engine, steps=steps, seed=seed, cfg_scale=cfg, negative_prompt=NEGATIVE).images[0].image)
    our_seconds = time.perf_counter() - tick
    theirs, their_seconds = _diffusers_picture(folder, engine, steps, seed, cfg)
    difference = float(np.abs(ours - theirs).max())
    print(f"cfg {cfg}: engine vs diffusers max difference {difference * 255:.4f}/255; engine {our_seconds:.3f} s, "
          f"diffusers {their_seconds:.3f} s for {steps} steps (engine ÷ diffusers {our_seconds / their_seconds:.2f})")
    assert difference <= PARITY_TOLERANCE, difference
    other = _array(_run(engine, steps=steps, seed=seed + 1, cfg_scale=cfg, negative_prompt=NEGATIVE).images[0].image)
    assert float(np.abs(theirs - other).max()) > 0.05


def test_the_same_seed_repeats_and_another_differs(engine):
    first, again, other = _run(engine), _run(engine), _run(engine, seed=12)
    assert first.images[0].image.size == (SIZE, SIZE)
    assert np.array_equal(_array(first.images[0].image), _array(again.images[0].image))
    assert not np.array_equal(_array(first.images[0].image), _array(other.images[0].image))


def _init_image() -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rgb = np.stack([x * 8 % 256, y * 8 % 256, (x + y) * 4 % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def test_img2img_gives_the_right_size_and_moves_with_strength(engine):
    def picture(strength: float) -> np.ndarray:
        result = _run(engine, init_image=_init_image(), denoising_strength=strength)
        assert result.images[0].image.size == (SIZE, SIZE)
        return _array(result.images[0].image)

    unchanged = picture(0.0)
    distances = [float(np.abs(picture(strength) - unchanged).mean()) for strength in (0.3, 1.0)]
    assert 0 < distances[0] < distances[1], distances


def test_inpaint_keeps_the_unmasked_pixels_exactly(engine):
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, SIZE // 2:] = 255
    result = _run(engine, init_image=_init_image(), mask=Image.fromarray(mask, "L"), denoising_strength=0.75, mask_blur=0,
                  cfg_scale=3.0)
    out = np.asarray(result.images[0].image)
    original = np.asarray(_init_image())
    assert out.shape == original.shape
    assert np.array_equal(out[:, : SIZE // 2 - 1], original[:, : SIZE // 2 - 1])
    assert not np.array_equal(out[:, SIZE // 2 + 1:], original[:, SIZE // 2 + 1:])
