"""Outpainting: no seam at the old edge, the original kept bit for bit, and a mask preview without a painted mask."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine import GenerationRequest, image_ops

OLD_WIDTH, GROWTH = 64, 32


def seam_ratio(image: Image.Image, edge_x: int) -> float:
    """Mean absolute colour step across the old edge (columns edge_x-1 | edge_x), over the median step between
    any other two neighbouring columns: about 1 when nothing marks the edge, far above 1 for a visible seam."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    steps = np.abs(np.diff(pixels, axis=1)).mean(axis=(0, 2))
    return float(steps[edge_x - 1] / max(np.median(np.delete(steps, edge_x - 1)), 0.25))


def outpaint_right(engine, base: Image.Image, prompt: str, seed: int, **changes) -> Image.Image:
    request = GenerationRequest(prompt=prompt, seed=seed, steps=20, init_image=base,
                                outpaint=(0, GROWTH, 0, 0), denoising_strength=0.75, mask_blur=4, **changes)
    return engine.generate(request).images[0].image


@pytest.mark.parametrize("prompt", ["a large red circle on the left, blue background", "a large orange circle, gray background"])
def test_outpainting_leaves_no_seam_at_the_old_edge_and_keeps_the_original(demo_engine, prompt):
    base = demo_engine.generate(GenerationRequest(prompt=prompt, seed=1, steps=20)).images[0].image
    for seed in (100, 101):
        grown = outpaint_right(demo_engine, base, prompt, seed)
        assert grown.size == (OLD_WIDTH + GROWTH, 64)
        assert np.array_equal(np.asarray(grown)[:, :OLD_WIDTH], np.asarray(base))  # the original, bit for bit
        # measured on these prompts: 18-21 before (noise and a half-strength step at the edge), 0.06-0.22 after
        assert seam_ratio(grown, OLD_WIDTH) < 2.0


def test_the_blend_fades_in_from_the_old_edge_over_the_stretched_edge_not_the_noise():
    original = Image.new("RGB", (OLD_WIDTH, 64), (30, 70, 220))
    canvas = image_ops.inpaint_canvas(original, None, False, 4, (0, GROWTH, 0, 0), seed=3)
    assert np.array_equal(np.asarray(canvas.backdrop)[:, :OLD_WIDTH], np.asarray(original))
    assert np.all(np.asarray(canvas.backdrop) == (30, 70, 220))  # stretched edge, no noise
    assert not np.all(np.asarray(canvas.image)[:, OLD_WIDTH:] == (30, 70, 220))  # the model still starts from noise
    ramp = canvas.soft_mask[32]
    assert np.all(ramp[:OLD_WIDTH] == 0) and 0 < ramp[OLD_WIDTH] < 64 and ramp[-1] == 255
    assert np.all(np.diff(ramp.astype(int)) >= 0)

    generated = Image.new("RGB", canvas.image.size, (220, 30, 30))  # the worst case: a totally different colour
    result = image_ops.composite(canvas.backdrop, generated, canvas.soft_mask)
    assert np.array_equal(np.asarray(result)[:, :OLD_WIDTH], np.asarray(original))
    steps = np.abs(np.diff(np.asarray(result, dtype=np.float32), axis=1)).mean(axis=(0, 2))
    colour_change = np.abs(np.subtract((220, 30, 30), (30, 70, 220))).mean()
    # the change is spread over the ramp: the old edge takes no bigger step than any column of the ramp,
    # a ninth of the change at mask blur 4 (it was over half, plus the noise, before)
    assert steps[OLD_WIDTH - 1] <= steps[OLD_WIDTH:].max() + 1 and steps[OLD_WIDTH - 1] < 0.15 * colour_change


def test_painting_and_outpainting_together_repaint_both():
    original = Image.new("RGB", (OLD_WIDTH, 64), (128, 128, 128))
    mask = Image.new("L", (OLD_WIDTH, 64), 0)
    mask.paste(255, (10, 10, 20, 20))
    canvas = image_ops.inpaint_canvas(original, mask, False, 0, (8, 0, 0, 0))
    assert canvas.hard_mask[15, 8 + 15] == 255 and canvas.hard_mask[40, 8 + 40] == 0 and canvas.hard_mask[0, 0] == 255
    assert canvas.soft_mask[40, 8 + 40] == 0


def test_the_mask_preview_works_with_outpainting_alone():
    from ui.masks import mask_preview

    source = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    shown = np.asarray(mask_preview(Image.fromarray(source), None, False, 4, (0, 16, 0, 8)))
    assert shown.shape == (72, 80, 3)
    assert np.array_equal(shown[:64, :64], source)  # kept exactly: not tinted
    assert shown[70, 78, 0] > 200 and shown[70, 78, 1] < 120  # the new area is tinted red


def test_the_mask_preview_still_asks_for_a_mask_without_outpainting():
    from engine.errors import ValidationError
    from ui.masks import mask_preview

    with pytest.raises(ValidationError, match="mask"):
        mask_preview(Image.new("RGB", (64, 64)), None, False, 4)
