"""img2img, inpainting and outpainting on tiny 4- and 9-channel models."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from engine import GenerationRequest, ValidationError
from engine import image_ops

MASKED_CONTENT = ["fill", "original", "latent noise", "latent nothing"]
AREAS = ["Whole picture", "Only masked"]


def source_image(width=64, height=64) -> Image.Image:
    rng = np.random.default_rng(0)
    base = np.zeros((height, width, 3), np.uint8)
    base[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    base[..., 1] = np.linspace(255, 0, height, dtype=np.uint8)[:, None]
    base[..., 2] = rng.integers(0, 255, (height, width), dtype=np.uint8)
    return Image.fromarray(base, "RGB")


def square_mask(width=64, height=64, box=(16, 16, 40, 40)) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def inpaint(model="tiny-sd1", **changes):
    base = dict(prompt="a green square", model=model, steps=6, cfg_scale=5.0, seed=3, preview_every=0, width=64, height=64,
                init_image=source_image(), mask=square_mask(), denoising_strength=0.9)
    return GenerationRequest(**{**base, **changes})


def effective_mask(request):
    _, soft = image_ops.prepare_mask(request.mask, request.invert_mask, request.mask_blur)
    return soft


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sd1-inpainting"])
@pytest.mark.parametrize("content", MASKED_CONTENT)
@pytest.mark.parametrize("area", AREAS)
def test_unmasked_pixels_are_bit_exact(engine, model, content, area):
    req = inpaint(model, masked_content=content, inpaint_area=area, inpaint_padding=8)
    out = np.asarray(engine.generate(req).images[0].image)
    original = np.asarray(req.init_image)
    keep = effective_mask(req) == 0
    assert out.shape == original.shape
    assert np.array_equal(out[keep], original[keep])
    changed = np.abs(out.astype(int) - original.astype(int)).sum(axis=2)
    inside = np.asarray(req.mask) > 0
    assert changed[inside].mean() > 5, "masked pixels did not change"


def test_inverted_mask_repaints_the_outside(engine):
    req = inpaint(invert_mask=True, mask_blur=2)
    out = np.asarray(engine.generate(req).images[0].image).astype(int)
    original = np.asarray(req.init_image).astype(int)
    keep = effective_mask(req) == 0
    inside = np.asarray(req.mask) > 0
    assert keep.any() and keep[inside].sum() > 100
    assert np.array_equal(out[keep], original[keep])
    assert np.abs(out - original)[~inside].mean() > 5


def test_nine_channel_model_is_detected(registry):
    assert registry.load("tiny-sd1-inpainting").is_inpainting_model
    assert not registry.load("tiny-sd1").is_inpainting_model


def test_img2img_strength_zero_returns_the_vae_round_trip_and_one_still_starts_from_the_input(engine):
    image = source_image()
    base = dict(prompt="x", model="tiny-sd1", steps=8, seed=5, init_image=image, preview_every=0)
    zero = np.asarray(engine.generate(GenerationRequest(**base, denoising_strength=0.0)).images[0].image).astype(int)
    loaded = engine.registry.load("tiny-sd1")
    round_trip = np.asarray(engine._decode(loaded, engine._encode(loaded, image))[0]).astype(int)
    assert np.array_equal(zero, round_trip)
    # A1111 starts every img2img pass from init + noise · σ₀, strength 1 included (σ₀ is then the model's σ_max):
    # the whole schedule runs, but the input is not thrown away as diffusers' pipeline does.
    full = engine.generate(GenerationRequest(**base, denoising_strength=1.0)).images[0].image
    other_input = engine.generate(GenerationRequest(**{**base, "init_image": source_image().rotate(90)}, denoising_strength=1.0)).images[0].image
    assert not np.array_equal(np.asarray(full), np.asarray(other_input))
    assert not np.array_equal(np.asarray(full).astype(int), zero)


def test_img2img_change_rises_with_strength(engine):
    image = source_image()
    outputs = {}
    for strength in (0.0, 0.1, 0.5, 1.0):
        outputs[strength] = np.asarray(engine.generate(GenerationRequest(
            prompt="x", model="tiny-sd1", steps=10, seed=5, init_image=image, denoising_strength=strength, preview_every=0)).images[0].image).astype(int)
    # Measured against strength 0 (the VAE round trip), so the tiny random VAE's own loss does not count.
    changes = [np.abs(outputs[s] - outputs[0.0]).mean() for s in (0.1, 0.5, 1.0)]
    assert changes == sorted(changes) and changes[0] < changes[-1]


def test_img2img_runs_the_last_round_s_times_steps_steps(engine):
    events = []
    engine.generate(GenerationRequest(prompt="x", model="tiny-sd1", steps=20, seed=5, init_image=source_image(),
                                      denoising_strength=0.33, preview_every=0), on_progress=events.append)
    assert events[-1].total_steps == round(0.33 * 20)


@pytest.mark.parametrize("mode", ["Just resize", "Crop and resize", "Resize and fill"])
def test_resize_modes_give_the_requested_size(engine, mode):
    wide = source_image(128, 64)
    result = engine.generate(GenerationRequest(prompt="x", model="tiny-sd1", steps=3, seed=1, init_image=wide, width=64,
                                               height=64, resize_mode=mode, denoising_strength=0.5, preview_every=0))
    assert result.images[0].image.size == (64, 64)


def test_resize_modes_keep_aspect_as_named():
    wide = Image.new("RGB", (128, 64), "black")
    ImageDraw.Draw(wide).rectangle((0, 0, 63, 63), fill="white")  # left half white
    cropped = np.asarray(image_ops.resize_image(wide, 64, 64, "Crop and resize").convert("L"))
    filled = np.asarray(image_ops.resize_image(wide, 64, 64, "Resize and fill").convert("L"))
    stretched = np.asarray(image_ops.resize_image(wide, 64, 64, "Just resize").convert("L"))
    assert cropped[:, :30].mean() > 200 and cropped[:, 34:].mean() < 50  # centre crop: half white, half black
    assert (filled[:16] == filled[16]).all() and (filled[48:] == filled[47]).all()  # letterbox filled by stretched edges
    assert filled[20:44, :30].mean() > 200 and filled[20:44, 34:].mean() < 50
    assert stretched[:, :30].mean() > 200 and stretched[:, 34:].mean() < 50


@pytest.mark.parametrize("sides", [(16, 0, 0, 0), (0, 16, 8, 0), (8, 8, 8, 8), (0, 0, 0, 24)])
def test_outpainting_grows_exactly_and_keeps_the_original(engine, sides):
    image = source_image()
    result = engine.generate(GenerationRequest(prompt="x", model="tiny-sd1", steps=4, seed=2, init_image=image,
                                               outpaint=sides, denoising_strength=1.0, preview_every=0))
    out = np.asarray(result.images[0].image)
    left, right, up, down = sides
    assert out.shape == (64 + up + down, 64 + left + right, 3)
    assert np.array_equal(out[up:up + 64, left:left + 64], np.asarray(image))
    grown = np.ones(out.shape[:2], bool)
    grown[up:up + 64, left:left + 64] = False
    assert out[grown].std() > 1, "new area was not filled"


def test_non_multiple_of_eight_inpaint_keeps_size_and_pixels(engine):
    image = source_image(70, 66)
    req = GenerationRequest(prompt="x", model="tiny-sd1", steps=4, seed=2, init_image=image, mask=square_mask(70, 66), preview_every=0)
    out = np.asarray(engine.generate(req).images[0].image)
    keep = effective_mask(req) == 0
    assert out.shape == (66, 70, 3) and np.array_equal(out[keep], np.asarray(image)[keep])


def test_mask_problems_get_specific_errors(engine):
    with pytest.raises(ValidationError, match="empty"):
        engine.generate(inpaint(mask=Image.new("L", (64, 64), 0)))
    with pytest.raises(ValidationError, match="must match"):
        inpaint(mask=Image.new("L", (32, 32), 255))
    with pytest.raises(ValidationError, match="must be an image"):
        inpaint(mask=b"not an image")


def test_mask_with_alpha_counts_only_opaque_paint():
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle((10, 10, 20, 20), fill=(255, 0, 0, 255))
    hard, _ = image_ops.prepare_mask(layer, invert=False, blur=0)
    assert hard[15, 15] == 255 and hard[40, 40] == 0 and hard.sum() == 255 * 11 * 11


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sdxl"])
def test_inpaint_infotext_records_the_a1111_keys(engine, model):
    result = engine.generate(inpaint(model, masked_content="latent noise", inpaint_area="Only masked", inpaint_padding=12, mask_blur=3))
    info = result.images[0].infotext
    for needle in ("Denoising strength: 0.9", "Mask blur: 3", "Masked content: latent noise", "Inpaint area: Only masked", "Masked area padding: 12"):
        assert needle in info


@pytest.mark.parametrize("init", [None, "image"])
def test_nine_channel_model_also_does_txt2img_and_img2img(engine, init):
    image = source_image() if init else None
    result = engine.generate(GenerationRequest(prompt="x", model="tiny-sd1-inpainting", steps=3, seed=1, width=64, height=64,
                                               init_image=image, preview_every=0))
    assert result.images[0].image.size == (64, 64)
