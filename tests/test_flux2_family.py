"""The FLUX.2 [klein] family end to end on a tiny random-weight model (tests/_flux2_fixture.py): detection, the
batch-norm-normalised 2×2-folded latent, the size- and step-dependent flow shift, txt2img against diffusers' own
Flux2KleinPipeline, img2img and inpaint."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from PIL import Image

from engine.engine import Engine
from engine.families import FLUX2, for_pipeline_class
from engine.models import ModelRegistry
from engine.request import GenerationRequest, GenerationResult
from engine.sampling.denoiser import noise_table_for
from tests._flux2_fixture import SIZE, build_folder

NAME = "klein-tiny"
PROMPT = "a red fox in the snow"
LATENT_SIDE = SIZE // 4  # 2× VAE downsampling, then the 2×2 fold
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


def _shift(steps: int) -> float:
    """e^μ, μ from diffusers' own fit for this picture's tokens and steps."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    return math.exp(compute_empirical_mu(LATENT_SIDE * LATENT_SIDE, steps))


def test_the_folder_is_detected_as_flux2_klein(engine):
    assert for_pipeline_class("Flux2KleinPipeline") is FLUX2
    model = engine.registry.load(NAME)
    assert model.family.id == "flux2"
    assert (model.latent_channels, model.vae_scale_factor) == (128, 4)
    assert FLUX2.defaults == {"cfg_scale": 1.0, "steps": 4, "sampler": "Euler", "schedule": "Simple"}


def test_flux1_and_zimage_transformer_configs_are_not_flux2():
    import inspect

    from diffusers import FluxTransformer2DModel, ZImageTransformer2DModel

    from engine.families import ZIMAGE

    def defaults(cls) -> dict:
        return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"}

    assert not FLUX2.matches_config(defaults(FluxTransformer2DModel))
    assert not FLUX2.matches_config(defaults(ZImageTransformer2DModel))
    assert ZIMAGE.matches_config(defaults(ZImageTransformer2DModel))
    assert not ZIMAGE.matches_config(defaults(FluxTransformer2DModel))


@pytest.mark.parametrize("steps", [4, 20])
def test_the_noise_table_is_shifted_for_the_picture_and_the_steps(engine, steps):
    model = engine.registry.load(NAME)
    table, parameterization = noise_table_for(model, False, SIZE, SIZE, steps=steps)
    assert parameterization == "flow"
    shift = _shift(steps)
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000  # Esser et al. 2024's shift, written out
    assert torch.allclose(table.sigmas.double(), shift * t / (1 + (shift - 1) * t), rtol=0, atol=1e-6)


def test_the_latent_is_the_vae_latent_folded_and_batch_normalised(engine):
    model = engine.registry.load(NAME)
    vae = model.pipeline.vae
    z = torch.randn(1, 32, 6, 4)
    folded = model.to_model_latent(z)
    assert folded.shape == (1, 128, 3, 2)
    # channel c·4 + 2·dy + dx of pixel (i, j) is VAE channel c at (2i + dy, 2j + dx), then (· − μ_bn) / √(σ²_bn + ε)
    c, dy, dx, i, j = 5, 1, 0, 2, 1
    std = math.sqrt(float(vae.bn.running_var[c * 4 + 2 * dy + dx]) + vae.config.batch_norm_eps)
    expected = (float(z[0, c, 2 * i + dy, 2 * j + dx]) - float(vae.bn.running_mean[c * 4 + 2 * dy + dx])) / std
    assert math.isclose(float(folded[0, c * 4 + 2 * dy + dx, i, j]), expected, rel_tol=1e-5, abs_tol=1e-6)
    assert torch.allclose(model.to_vae_latent(folded), z, atol=1e-5)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_txt2img_matches_diffusers_flux2_klein_pipeline(engine, folder, cfg):
    from diffusers import Flux2KleinPipeline

    from engine.sampling import schedules

    steps, seed = 5, 5
    _run(engine, steps=1)  # warm: the prompt encoding is cached, as the pipeline's is not
    tick = time.perf_counter()
    ours = _array(_run(engine, steps=steps, seed=seed, cfg_scale=cfg).images[0].image)
    our_seconds = time.perf_counter() - tick

    table, _ = noise_table_for(engine.registry.load(NAME), False, SIZE, SIZE, steps=steps)
    sigmas = schedules.simple(table, steps)[:-1].double()
    shift = _shift(steps)
    unshifted = sigmas / (shift - (shift - 1) * sigmas)  # diffusers shifts the σs it is given
    noise = torch.randn((1, 128, LATENT_SIDE, LATENT_SIDE), generator=torch.Generator().manual_seed(seed))
    pipe = Flux2KleinPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    tick = time.perf_counter()
    theirs = pipe(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=steps, sigmas=unshifted.tolist(),
                  guidance_scale=cfg, latents=noise, output_type="np").images[0]
    their_seconds = time.perf_counter() - tick
    assert torch.allclose(pipe.scheduler.sigmas[:-1].double(), sigmas, atol=1e-6)  # the same σs ran
    difference = float(np.abs(ours - theirs).max())
    print(f"cfg {cfg}: engine vs diffusers max difference {difference * 255:.4f}/255; engine {our_seconds:.3f} s, "
          f"diffusers {their_seconds:.3f} s for {steps} steps (engine ÷ diffusers {our_seconds / their_seconds:.2f})")
    assert difference <= PARITY_TOLERANCE, difference
    other = _array(_run(engine, steps=steps, seed=seed + 1, cfg_scale=cfg).images[0].image)
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


def test_the_cheap_preview_is_the_published_32_channel_preview_averaged_over_each_2x2_fold():
    """ComfyUI publishes 32 rows for the unfolded latent; the folded latent's preview must be that preview's 2×2 mean."""
    from engine.families.flux2 import _UNFOLDED_RGB, unpatchify
    from engine.previews import CheapPreviewer

    folded = torch.randn(1, 128, 4, 6)
    factors, bias = torch.tensor(_UNFOLDED_RGB), torch.tensor(FLUX2.latent.rgb_bias)
    unfolded_rgb = torch.einsum("chw,cr->rhw", unpatchify(folded)[0], factors)  # [3, 8, 12]
    expected = unfolded_rgb.reshape(3, 4, 2, 6, 2).mean(dim=(2, 4)) + bias[:, None, None]
    ours = torch.from_numpy(CheapPreviewer(FLUX2).snapshot(folded))
    rgb = torch.einsum("chw,cr->rhw", ours, FLUX2.latent.to_rgb_matrix()[0]) + bias[:, None, None]
    assert torch.allclose(rgb, expected, atol=1e-5)
    assert CheapPreviewer(FLUX2)(folded).size == (6, 4)
