"""From a unit's image to the control map the ControlNet sees, at the generation size.

Follows sd-webui-controlnet: the preprocessor runs at a processing resolution
(``processor_res``, or with "pixel perfect" the one that matches the output,
``pixel_perfect_resolution``), then the map is fitted to the output size by the
unit's resize mode (``detectmap_proc``) with a resize that keeps binary maps
binary and label maps crisp (a simplified ``high_quality_resize``: no
one-pixel-edge thinning).
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image

from . import preprocessors
from .units import ControlNetUnit


def pixel_perfect_resolution(image_size: tuple[int, int], width: int, height: int, resize_mode: str) -> int:
    """sd-webui-controlnet ``pixel_perfect_resolution``: the processing resolution at which the map lands 1:1 on the output.

    Crop and Resize / Just Resize scale by the larger ratio, Resize and Fill by the smaller one.
    """
    raw_width, raw_height = image_size
    ratio_h, ratio_w = height / raw_height, width / raw_width
    ratio = min(ratio_h, ratio_w) if resize_mode == "Resize and Fill" else max(ratio_h, ratio_w)
    return int(np.round(ratio * min(raw_width, raw_height)))


def processing_resolution(unit: ControlNetUnit, image_size: tuple[int, int], width: int, height: int) -> int:
    if unit.pixel_perfect:
        low, high = preprocessors.RESOLUTION_RANGE
        return int(np.clip(pixel_perfect_resolution(image_size, width, height, unit.resize_mode), low, high))
    return unit.processor_res if unit.processor_res != -1 else preprocessors.DEFAULT_RESOLUTION


def high_quality_resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a control map: binary maps stay binary (Otsu after resizing), few-colour maps use nearest."""
    if image.shape[1] == width and image.shape[0] == height:
        return image
    packed = (image[:, :, 0].astype(np.uint32) << 16) | (image[:, :, 1].astype(np.uint32) << 8) | image[:, :, 2]
    colours = len(np.unique(packed))
    shrinking = width * height < image.shape[0] * image.shape[1]
    if 2 < colours < 200:
        interpolation = cv2.INTER_NEAREST  # segmentation-like maps: never invent in-between labels
    elif shrinking:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_CUBIC
    resized = cv2.resize(image, (width, height), interpolation=interpolation)
    if colours == 2 and image.min() < 16 and image.max() > 240:
        gray = resized.astype(np.float32).mean(axis=2).clip(0, 255).astype(np.uint8)
        _, gray = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
        resized = np.repeat(gray[:, :, None], 3, axis=2)
    return resized


def fit_map(image: np.ndarray, width: int, height: int, resize_mode: str) -> np.ndarray:
    """sd-webui-controlnet ``detectmap_proc``: stretch, cover-and-crop, or fit-and-pad with the border's median colour."""
    if resize_mode == "Just Resize":
        return high_quality_resize(image, width, height)
    old_height, old_width = image.shape[:2]
    ratio_h, ratio_w = height / old_height, width / old_width
    if resize_mode == "Resize and Fill":
        ratio = min(ratio_h, ratio_w)
        borders = np.concatenate([image[0, :, :], image[-1, :, :], image[:, 0, :], image[:, -1, :]], axis=0)
        background = np.median(borders, axis=0).astype(np.uint8)
        inner_w, inner_h = max(1, round(old_width * ratio)), max(1, round(old_height * ratio))
        inner = high_quality_resize(image, min(inner_w, width), min(inner_h, height))
        canvas = np.empty((height, width, 3), dtype=np.uint8)
        canvas[:] = background
        top, left = (height - inner.shape[0]) // 2, (width - inner.shape[1]) // 2
        canvas[top:top + inner.shape[0], left:left + inner.shape[1]] = inner
        return canvas
    ratio = max(ratio_h, ratio_w)  # Crop and Resize
    outer_w, outer_h = max(width, round(old_width * ratio)), max(height, round(old_height * ratio))
    outer = high_quality_resize(image, outer_w, outer_h)
    top, left = (outer_h - height) // 2, (outer_w - width) // 2
    return outer[top:top + height, left:left + width]


def crop_to_region(image: Image.Image, full_size: tuple[int, int], box: tuple[int, int, int, int], resize_mode: str) -> Image.Image:
    """A control image made for the whole picture, fitted to it and cut to ``box`` (left, top, right, bottom),
    as sd-webui-controlnet does for "Only masked" inpainting."""
    fitted = fit_map(np.asarray(image.convert("RGB")), full_size[0], full_size[1], resize_mode)
    return Image.fromarray(fitted, "RGB").crop(box)


def control_map(unit: ControlNetUnit, image: Image.Image, width: int, height: int, models_dir=None) -> Image.Image:
    """The unit's preprocessed map at ``width``×``height``."""
    resolution = processing_resolution(unit, image.size, width, height)
    raw = preprocessors.preprocess(unit.module, image, resolution, unit.threshold_a, unit.threshold_b, models_dir)
    return Image.fromarray(fit_map(np.asarray(raw), width, height, unit.resize_mode), "RGB")


def map_tensor(control: Image.Image, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1], as diffusers' ControlNet image processor gives (no normalisation to [-1, 1])."""
    array = np.asarray(control.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].to(device=device, dtype=dtype)
