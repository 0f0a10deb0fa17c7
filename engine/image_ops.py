"""Pixel-space preparation for img2img, inpainting and outpainting.

Everything here is plain PIL/NumPy/OpenCV on uint8 images: resizing an init
image to the target size, turning an uploaded or painted mask into a clean
0..255 mask, filling masked areas, growing the canvas for outpainting, and the
final composite that makes unmasked pixels bit-exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageFilter

from .errors import ValidationError

RESAMPLE = Image.LANCZOS


def resize_image(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """Fit an image to width×height the way A1111's three resize modes do."""
    image = image.convert("RGB")
    if image.size == (width, height):
        return image
    if mode == "Just resize":
        return image.resize((width, height), RESAMPLE)
    src_w, src_h = image.size
    if mode == "Crop and resize":
        scale = max(width / src_w, height / src_h)
        new_w, new_h = max(width, round(src_w * scale)), max(height, round(src_h * scale))
        resized = image.resize((new_w, new_h), RESAMPLE)
        left, top = (new_w - width) // 2, (new_h - height) // 2
        return resized.crop((left, top, left + width, top + height))
    if mode == "Resize and fill":
        scale = min(width / src_w, height / src_h)
        new_w, new_h = max(1, round(src_w * scale)), max(1, round(src_h * scale))
        resized = np.asarray(image.resize((new_w, new_h), RESAMPLE))
        left, top = (width - new_w) // 2, (height - new_h) // 2
        filled = cv2.copyMakeBorder(resized, top, height - new_h - top, left, width - new_w - left, cv2.BORDER_REPLICATE)
        return Image.fromarray(filled, "RGB")
    raise ValidationError("resize_mode", f"unknown resize mode {mode!r}")


def mask_to_array(mask: Image.Image) -> np.ndarray:
    """A mask image to uint8 0..255 where 255 means "repaint".

    Documented handling: white = repaint. A mask with an alpha channel counts
    only where it is opaque (luminance × alpha), so a brush layer painted on a
    transparent canvas works as-is.
    """
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        rgba = np.asarray(mask.convert("RGBA"), dtype=np.float32)
        luminance = np.asarray(mask.convert("RGBA").convert("L"), dtype=np.float32)
        alpha = rgba[..., 3] / 255.0
        # A brush layer is often painted in black or colour on transparency: treat any opaque paint as mask.
        if luminance[alpha > 0].size and luminance[alpha > 0].max() < 128:
            luminance = np.full_like(luminance, 255.0)
        return np.clip(luminance * alpha, 0, 255).round().astype(np.uint8)
    return np.asarray(mask.convert("L"), dtype=np.uint8).copy()


def prepare_mask(mask: Image.Image, invert: bool, blur: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (hard mask, blurred mask), both uint8 0..255. Raises on an empty mask."""
    hard = mask_to_array(mask)
    hard = np.where(hard >= 128, 255, 0).astype(np.uint8)
    if invert:
        hard = 255 - hard
    if not hard.any():
        raise ValidationError("mask", "the mask is empty: paint (white) the area to repaint, or turn off 'inpaint not masked'")
    return hard, blur_mask(hard, blur)


def blur_mask(mask: np.ndarray, blur: int) -> np.ndarray:
    if blur <= 0:
        return mask.copy()
    return np.array(Image.fromarray(mask, "L").filter(ImageFilter.GaussianBlur(blur)), dtype=np.uint8)


def fill_masked(image: Image.Image, hard_mask: np.ndarray) -> Image.Image:
    """A1111's "fill": masked pixels replaced by colours flowing in from the surroundings."""
    array = np.asarray(image.convert("RGB"))
    radius = max(3, min(array.shape[:2]) // 8)
    filled = cv2.inpaint(array, (hard_mask > 0).astype(np.uint8), radius, cv2.INPAINT_TELEA)
    filled = cv2.GaussianBlur(filled, (0, 0), radius)
    result = np.where(hard_mask[..., None] > 0, filled, array)
    return Image.fromarray(result.astype(np.uint8), "RGB")


@dataclass(frozen=True)
class Canvas:
    """An outpainting canvas: the grown image, the mask of new area and where the original sits.

    ``image`` is what the model starts from: stretched edge pixels plus a little noise, so the
    sampler has texture to work on. ``backdrop`` is the same canvas without the noise: the
    generated pixels are blended over it, so where the blend fades out at the old edge the
    picture continues the edge instead of showing that noise.
    """

    image: Image.Image
    backdrop: Image.Image
    mask: np.ndarray
    original_box: tuple[int, int, int, int]


def extend_canvas(image: Image.Image, left: int, right: int, up: int, down: int, seed: int) -> Canvas:
    """Grow the canvas; new area = stretched edge pixels (plus a little noise in ``image``), masked white."""
    array = np.asarray(image.convert("RGB"))
    stretched = cv2.copyMakeBorder(array, up, down, left, right, cv2.BORDER_REPLICATE)
    height, width = array.shape[:2]
    mask = np.full(stretched.shape[:2], 255, np.uint8)
    mask[up:up + height, left:left + width] = 0
    noise = np.random.default_rng(seed).normal(0, 24, stretched.shape).astype(np.int16)
    noisy = np.where(mask[..., None] > 0, np.clip(stretched.astype(np.int16) + noise, 0, 255), stretched).astype(np.uint8)
    return Canvas(Image.fromarray(noisy, "RGB"), Image.fromarray(stretched, "RGB"), mask, (left, up, left + width, up + height))


def soft_seam(mask: np.ndarray, blur: int) -> np.ndarray:
    """The outpaint blend weight: 0 on the original, rising across the new area over ``2 × blur`` pixels.

    Ramping from the old edge outward (rather than blurring the mask's step, which puts half the
    generated picture right against the old edge) hides the seam while the original stays exact.
    """
    feather = 2 * max(0, blur) + 1
    distance = cv2.distanceTransform((mask > 0).astype(np.uint8), cv2.DIST_L2, 3)  # pixels to the nearest original pixel
    return np.clip(np.round(distance / feather * 255), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class InpaintCanvas:
    """What inpainting works on: the picture to start from, the one to blend back onto, and the masks (255 = repaint)."""

    image: Image.Image
    backdrop: Image.Image
    hard_mask: np.ndarray
    soft_mask: np.ndarray


def inpaint_canvas(image: Image.Image, mask: Image.Image | None, invert: bool, blur: int,
                   outpaint: tuple[int, int, int, int] = (0, 0, 0, 0), seed: int = 0) -> InpaintCanvas:
    """The canvas and masks for an inpaint or outpaint request; the engine and the UI's mask preview both use it.

    ``outpaint`` is (left, right, up, down) pixels of new canvas. A painted ``mask`` (of the original
    image) may come with it; without outpainting a mask is required.
    """
    image = image.convert("RGB")
    if not any(outpaint):
        if mask is None:
            raise ValidationError("mask", "paint over the area to repaint, upload a mask, or set an outpainting amount")
        hard, soft = prepare_mask(mask, invert, blur)
        return InpaintCanvas(image, image, hard, soft)
    canvas = extend_canvas(image, *outpaint, seed=seed)
    hard, soft = canvas.mask.copy(), soft_seam(canvas.mask, blur)
    if mask is not None:
        user_hard, _ = prepare_mask(mask, invert, 0)
        left, top, right, bottom = canvas.original_box
        hard[top:bottom, left:right] = np.maximum(hard[top:bottom, left:right], user_hard)
        painted = np.where(hard > 0, blur_mask(hard, blur), 0)
        painted[canvas.mask > 0] = 0  # the new area keeps its ramp from the old edge
        soft = np.maximum(soft, painted).astype(np.uint8)
    return InpaintCanvas(canvas.image, canvas.backdrop, hard, soft)


def masked_region(mask: np.ndarray, padding: int, target_aspect: float) -> tuple[int, int, int, int]:
    """Bounding box of the mask, grown by padding and to the target aspect, clipped to the image."""
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    x0, x1 = max(0, xs.min() - padding), min(width, xs.max() + 1 + padding)
    y0, y1 = max(0, ys.min() - padding), min(height, ys.max() + 1 + padding)
    box_w, box_h = x1 - x0, y1 - y0
    if box_w / box_h < target_aspect:
        box_w = min(width, round(box_h * target_aspect))
    else:
        box_h = min(height, round(box_w / target_aspect))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    x0 = int(min(max(0, round(cx - box_w / 2)), width - box_w))
    y0 = int(min(max(0, round(cy - box_h / 2)), height - box_h))
    return x0, y0, x0 + box_w, y0 + box_h


def composite(original: Image.Image, generated: Image.Image, soft_mask: np.ndarray) -> Image.Image:
    """Blend generated over original by the soft mask; pixels with mask 0 are the original, bit for bit."""
    base = np.asarray(original.convert("RGB"))
    new = np.asarray(generated.convert("RGB").resize(original.size, RESAMPLE) if generated.size != original.size else generated.convert("RGB"))
    weight = soft_mask.astype(np.float32)[..., None] / 255.0
    blended = (base.astype(np.float32) * (1 - weight) + new.astype(np.float32) * weight).round().astype(np.uint8)
    return Image.fromarray(np.where(soft_mask[..., None] == 0, base, blended), "RGB")


def pad_to_multiple(image: Image.Image, multiple: int = 8) -> tuple[Image.Image, tuple[int, int]]:
    """Pad right/bottom by edge replication to a size the VAE accepts; returns the original size too."""
    width, height = image.size
    pad_w, pad_h = (-width) % multiple, (-height) % multiple
    if not (pad_w or pad_h):
        return image, (width, height)
    array = cv2.copyMakeBorder(np.asarray(image.convert("RGB")), 0, pad_h, 0, pad_w, cv2.BORDER_REPLICATE)
    return Image.fromarray(array, "RGB"), (width, height)
