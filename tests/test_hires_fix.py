"""Hires fix on txt2img (A1111's "Hires. fix"): first pass → upscale → second pass, on the demo model at tiny sizes.

The exactness of the second pass against A1111 is in test_a1111_parity.py (test_demo_hires_fix_matches_a1111); here:
the sizes A1111's rules give, what the upscalers do to the picture, progress over both passes, interrupt and skip,
the infotext it writes and reads back, and the errors that name the field to change.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine import GenerationRequest
from engine.errors import ValidationError
from engine.request import CancelToken

FAST = dict(model="sfumato-demo", steps=4, cfg_scale=3.0, seed=1, rng="CPU", preview_every=0, sampler="Euler")


def _request(**changes) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a large red circle", **FAST, **changes})


# --- sizes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("first, hires, expected", [
    ((64, 64), dict(hr_scale=1.5), (96, 96)),  # by a scale
    ((64, 96), dict(hr_resize_x=128), (128, 192)),  # one side; the other follows the aspect
    ((64, 96), dict(hr_resize_y=144), (96, 144)),
    ((64, 64), dict(hr_resize_x=128, hr_resize_y=96), (128, 96)),  # both: cover 128x128, crop the height to 96
    ((64, 96), dict(hr_resize_x=128, hr_resize_y=128), (128, 128)),  # cover 128x192, crop the height to 128
])
def test_the_image_comes_out_at_the_hires_size_and_the_infotext_keeps_the_first(demo_engine, first, hires, expected):
    width, height = first
    result = demo_engine.generate(_request(width=width, height=height, steps=2, enable_hr=True, **hires))
    assert result.images[0].image.size == expected
    assert f"Size: {width}x{height}," in result.images[0].infotext  # A1111 writes the first pass's size


def test_a_both_sides_resize_crops_the_middle_of_the_covering_upscale():
    """Both resize values set: A1111 upscales to cover them, then crops the latents, half off each end (odd one off
    the bottom/right). Checked on the latents the upscale stage hands the second pass."""
    import torch
    import torch.nn.functional as F

    from engine import hires

    first = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0))  # a 96x64 first pass
    # 128x104 would cover with 104 · 96 // 64 = 156 columns, not a multiple of 8: refused, naming a resize value
    with pytest.raises(ValidationError) as error:
        hires.plan(_request(width=96, height=64, enable_hr=True, hr_resize_x=128, hr_resize_y=104), 96, 64, 8, (64, 2048))
    assert error.value.field.startswith("hr_resize_")
    plan = hires.plan(_request(width=96, height=64, enable_hr=True, hr_resize_x=144, hr_resize_y=64), 96, 64, 8, (64, 2048))
    assert (plan.upscale_width, plan.upscale_height, plan.width, plan.height) == (144, 96, 144, 64)
    out = hires.upscale(plan, first, 8, decode=None, encode=None)
    covering = F.interpolate(first, size=(12, 18), mode="bilinear", antialias=False)
    assert torch.equal(out, covering[:, :, 2:10])  # (12 - 8) = 4 rows: 2 off the top, 2 off the bottom


@pytest.mark.parametrize("hires, field", [
    (dict(hr_scale=1.3), "hr_scale"),  # 83 px: not a multiple of 8
    (dict(hr_scale=8.0, width=512, height=512), "hr_scale"),  # 4096 px: past the family's largest side
    (dict(hr_resize_x=100), "hr_resize_x"),
    (dict(hr_resize_y=3000), "hr_resize_y"),
    (dict(hr_upscaler="4x-Nothing"), "hr_upscaler"),
])
def test_a_size_or_upscaler_the_model_cannot_use_is_refused_naming_the_field(demo_engine, hires, field):
    with pytest.raises(ValidationError) as error:
        demo_engine.generate(_request(**{"width": 64, "height": 64, "enable_hr": True, **hires}))
    assert error.value.field == field
    if field == "hr_upscaler":
        assert "Latent" in error.value.message and "Lanczos" in error.value.message  # the choices are listed


def test_hires_settings_are_ignored_without_enable_hr(demo_engine):
    plain = demo_engine.generate(_request(width=64, height=64))
    off = demo_engine.generate(_request(width=64, height=64, hr_scale=2.0, hr_upscaler="Lanczos", denoising_strength=0.3))
    assert off.images[0].image.size == (64, 64)
    assert plain.images[0].image.tobytes() == off.images[0].image.tobytes()
    assert "Hires" not in off.images[0].infotext and "Denoising strength" not in off.images[0].infotext


# --- what the upscalers do to the picture ---------------------------------------------------------

def _red(pixels: np.ndarray) -> np.ndarray:
    pixels = pixels.astype(np.int16)
    return (pixels[..., 0] > 150) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)


def _centre(mask: np.ndarray) -> np.ndarray:
    rows, columns = np.nonzero(mask)
    return np.array([columns.mean() / mask.shape[1], rows.mean() / mask.shape[0]])


def _detail(image: Image.Image) -> float:
    """Mean absolute difference between neighbouring pixels: how much edge the picture has."""
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    return float(np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean())


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_keeps_the_red_circle_in_place_and_is_sharper_than_a_plain_resize(demo_engine, upscaler):
    prompt = "a large red circle on the left, gray background"
    settings = dict(prompt=prompt, steps=10, width=64, height=64)
    first = demo_engine.generate(_request(**settings)).images[0].image
    hires = demo_engine.generate(_request(**settings, enable_hr=True, hr_upscaler=upscaler, denoising_strength=0.5)).images[0].image
    assert hires.size == (128, 128)
    first_red, hires_red = _red(np.asarray(first)), _red(np.asarray(hires))
    assert first_red.mean() > 0.05, "the first pass drew no red circle"
    assert np.abs(_centre(hires_red) - _centre(first_red)).max() < 0.06  # the same place, relative to the picture
    assert 0.6 < hires_red.mean() / first_red.mean() < 1.4  # about the same share of the picture
    plain = first.resize((128, 128), Image.Resampling.LANCZOS)
    assert _detail(hires) > 1.1 * _detail(plain), (_detail(hires), _detail(plain))


def test_latent_and_pixel_upscalers_take_different_paths(demo_engine):
    settings = dict(steps=3, width=64, height=64, enable_hr=True, denoising_strength=0.5)
    pictures = {name: np.asarray(demo_engine.generate(_request(**settings, hr_upscaler=name)).images[0].image, dtype=np.int16)
                for name in ("Latent", "Latent (nearest)", "Lanczos", "Nearest")}
    for a, b in (("Latent", "Latent (nearest)"), ("Latent", "Lanczos"), ("Lanczos", "Nearest")):
        assert np.abs(pictures[a] - pictures[b]).max() > 8, f"{a} and {b} gave the same picture"


# --- progress, previews, interrupt, skip ------------------------------------------------------------

def test_progress_and_previews_run_through_both_passes(demo_engine):
    seen = []
    result = demo_engine.generate(_request(width=64, height=64, steps=4, enable_hr=True, hr_second_pass_steps=6,
                                           denoising_strength=0.5, preview_every=1), on_progress=seen.append)
    # A1111: the second pass runs int(0.5 · 6) + 1 = 4 steps of its 6-step schedule.
    total = 4 + 4
    assert [p.step for p in seen] == list(range(1, total + 1))
    assert {p.total_steps for p in seen} == {total}
    sizes = [p.preview.size for p in seen]
    assert max(sizes[:4]) < min(sizes[4:])  # the second pass's previews are at its larger size
    assert result.images[0].stopped_early is None


def _stop_at(step: int, how: str):
    cancel = CancelToken()

    def on_progress(progress):
        if progress.step == step and progress.image_index == 0:
            getattr(cancel, how)()

    return cancel, on_progress


def test_an_interrupt_in_the_first_pass_returns_the_first_pass_picture(demo_engine):
    cancel, on_progress = _stop_at(2, "interrupt")
    result = demo_engine.generate(_request(width=64, height=64, enable_hr=True), on_progress=on_progress, cancel=cancel)
    image = result.images[0]
    assert result.interrupted and image.image.size == (64, 64)
    # the interrupt lands inside step 3: the picture is step 2's
    assert (image.stopped_early.reason, image.stopped_early.step, image.stopped_early.total_steps) == ("interrupted", 2, 4 + 4)


def test_an_interrupt_in_the_second_pass_returns_its_picture_so_far(demo_engine):
    cancel, on_progress = _stop_at(5, "interrupt")
    result = demo_engine.generate(_request(width=64, height=64, enable_hr=True), on_progress=on_progress, cancel=cancel)
    image = result.images[0]
    assert result.interrupted and image.image.size == (128, 128)
    assert (image.stopped_early.reason, image.stopped_early.step) == ("interrupted", 5)  # one step into the second pass


def test_a_skip_in_the_first_pass_still_upscales_and_the_next_image_runs(demo_engine):
    """A1111: the skipped first pass is upscaled, and its second pass stops before its first step."""
    cancel, on_progress = _stop_at(2, "skip")
    result = demo_engine.generate(_request(width=64, height=64, enable_hr=True, batch_count=2), on_progress=on_progress,
                                  cancel=cancel)
    skipped, finished = result.images
    assert not result.interrupted
    assert skipped.image.size == finished.image.size == (128, 128)
    assert (skipped.stopped_early.reason, skipped.stopped_early.step) == ("skipped", 3)
    assert finished.stopped_early is None


# --- infotext ---------------------------------------------------------------------------------------

def test_the_infotext_writes_a1111s_hires_keys_and_reads_them_back(demo_engine):
    from engine.infotext import parse_infotext, request_fields_from_infotext

    request = _request(width=64, height=64, steps=3, enable_hr=True, hr_resize_x=128, hr_resize_y=96, hr_second_pass_steps=2,
                       hr_upscaler="Lanczos", hr_sampler_name="DPM++ 2M", hr_scheduler="Exponential", hr_prompt="a blue square",
                       hr_negative_prompt="blurry", denoising_strength=0.45, hr_cfg=5.5)
    text = demo_engine.generate(request).images[0].infotext
    params = parse_infotext(text)
    assert {key: params[key] for key in ("Size", "Hires resize", "Hires steps", "Hires upscaler", "Hires sampler",
                                         "Hires schedule type", "Hires prompt", "Hires negative prompt", "Denoising strength",
                                         "Hires CFG Scale")} == {
        "Size": "64x64", "Hires resize": "128x96", "Hires steps": "2", "Hires upscaler": "Lanczos", "Hires sampler": "DPM++ 2M",
        "Hires schedule type": "Exponential", "Hires prompt": "a blue square", "Hires negative prompt": "blurry",
        "Denoising strength": "0.45", "Hires CFG Scale": "5.5"}
    assert "Hires upscale" not in params  # a resize, not a scale
    read = request_fields_from_infotext(params)
    for name in ("enable_hr", "hr_resize_x", "hr_resize_y", "hr_second_pass_steps", "hr_upscaler", "hr_sampler_name",
                 "hr_scheduler", "hr_prompt", "hr_negative_prompt", "denoising_strength", "hr_cfg"):
        assert read[name] == getattr(request, name), name


def test_optional_hires_keys_are_left_out_when_they_repeat_the_first_pass(demo_engine):
    from engine.infotext import parse_infotext

    request = _request(width=64, height=64, steps=2, enable_hr=True, hr_sampler_name="Euler", hr_scheduler="Automatic",
                       hr_prompt="a large red circle", hr_cfg=3.0)
    params = parse_infotext(demo_engine.generate(request).images[0].infotext)
    assert (params["Hires upscale"], params["Hires upscaler"], params["Denoising strength"]) == ("2", "Latent", "0.75")
    for key in ("Hires steps", "Hires sampler", "Hires schedule type", "Hires prompt", "Hires negative prompt", "Hires resize",
                "Hires CFG Scale"):
        assert key not in params, key


def test_a_hires_cfg_of_its_own_guides_only_the_second_pass(demo_engine):
    """Forge's Hires CFG Scale: 0 or the first pass's CFG is the same picture; another value changes the second pass."""
    base = dict(width=64, height=64, steps=3, enable_hr=True, hr_upscaler="Lanczos", denoising_strength=0.6)
    same = [np.asarray(demo_engine.generate(_request(**base, hr_cfg=cfg)).images[0].image) for cfg in (0.0, FAST["cfg_scale"])]
    np.testing.assert_array_equal(same[0], same[1])
    unguided = np.asarray(demo_engine.generate(_request(**base, hr_cfg=1.0)).images[0].image)
    assert np.abs(unguided.astype(int) - same[0]).max() > 8


def test_an_a1111_hires_infotext_turns_hires_fix_on():
    from engine.infotext import loading_notes, parse_infotext, request_fields_from_infotext

    text = ("a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 5, Size: 512x512, "
            "Denoising strength: 0.7, Hires upscale: 1.5, Hires steps: 10, Hires upscaler: R-ESRGAN 4x+, RNG: CPU, Version: v1.10.1")
    params = parse_infotext(text)
    read = request_fields_from_infotext(params)
    assert (read["enable_hr"], read["hr_scale"], read["hr_second_pass_steps"], read["hr_upscaler"], read["denoising_strength"]) == (
        True, 1.5, 10, "R-ESRGAN 4x+", 0.7)
    assert loading_notes(params, read) == []
    assert "enable_hr" not in request_fields_from_infotext(parse_infotext(text.replace("Denoising strength: 0.7, ", "")))
