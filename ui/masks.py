"""Masks from the browser: painted brush layers or an uploaded black-and-white image.

``gr.ImageEditor`` sends ``{"background", "layers", "composite"}``. The image to
inpaint is the background; the mask is the union of the layers' alpha (whatever
colour the brush had, painted pixels are masked). An uploaded mask follows
A1111: white = repaint.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from PIL import Image

from engine import image_ops
from engine.errors import ValidationError
from engine.untrusted_images import read_untrusted_image


def _as_image(value: Any, field: str = "init_image") -> Image.Image | None:
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    if isinstance(value, str):  # a file Gradio received from the browser
        return read_untrusted_image(value, field)
    raise ValidationError(field, f"unexpected image value of type {type(value).__name__}")


def editor_image(value: Mapping[str, Any] | None) -> Image.Image | None:
    """The picture being inpainted: the editor's background (or its composite when it has none)."""
    if not value:
        return None
    background = _as_image(value.get("background"))
    if background is None:
        background = _as_image(value.get("composite"))
    return background.convert("RGB") if background is not None else None


def layers_mask(value: Mapping[str, Any] | None, size: tuple[int, int]) -> Image.Image | None:
    """The union of the brush layers' alpha as an L image of ``size``; None when nothing is painted."""
    if not value:
        return None
    union: np.ndarray | None = None
    for layer in value.get("layers") or []:
        image = _as_image(layer)
        if image is None:
            continue
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if image.size != size:
            alpha = np.asarray(Image.fromarray(alpha).resize(size, Image.NEAREST))
        union = alpha if union is None else np.maximum(union, alpha)
    if union is None or not union.any():
        return None
    return Image.fromarray(np.where(union > 0, 255, 0).astype(np.uint8), "L")


def uploaded_mask(mask: Any, size: tuple[int, int]) -> Image.Image | None:
    """An uploaded mask as L, resized to the image when it differs."""
    image = _as_image(mask, "mask")
    if image is None:
        return None
    array = image_ops.mask_to_array(image)
    image = Image.fromarray(array, "L")
    return image.resize(size, Image.NEAREST) if image.size != size else image


def inpaint_inputs(editor_value: Mapping[str, Any] | None, mask_upload: Any) -> tuple[Image.Image | None, Image.Image | None]:
    """(image, mask) for an inpaint request: an uploaded mask wins over painted layers."""
    image = editor_image(editor_value)
    if image is None:
        return None, None
    mask = uploaded_mask(mask_upload, image.size) if mask_upload is not None else None
    if mask is None:
        mask = layers_mask(editor_value, image.size)
    return image, mask


def effective_mask(mask: Image.Image, invert: bool, blur: int) -> Image.Image:
    """What the engine will repaint, after inversion and blur (white = repaint)."""
    _, soft = image_ops.prepare_mask(mask, invert, blur)
    return Image.fromarray(soft, "L")


def mask_preview(image: Image.Image, mask: Image.Image | None, invert: bool, blur: int,
                 outpaint: tuple[int, int, int, int] = (0, 0, 0, 0)) -> Image.Image:
    """The picture as the engine will blend onto it (grown when outpainting), with the effective mask as a red overlay.

    Uses the engine's own ``image_ops.inpaint_canvas``, so it shows exactly what Generate repaints;
    with outpainting alone no painted mask is needed.
    """
    canvas = image_ops.inpaint_canvas(image, mask, invert, blur, outpaint)
    soft = canvas.soft_mask.astype(np.float32)[..., None] / 255.0
    base = np.asarray(canvas.backdrop, dtype=np.float32)
    red = np.array([255.0, 40.0, 40.0])
    blended = base * (1 - 0.6 * soft) + red * 0.6 * soft
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8), "RGB")
