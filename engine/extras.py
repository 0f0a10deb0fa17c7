"""A1111's Extras tab, upscaling part: enlarge one image or a batch, by a factor or to a size, with one upscaler
and optionally a second blended over it.

Facts from A1111 1.10 (``scripts/postprocessing_upscale.py``, ``modules/postprocessing.py``, ``modules/upscaler.py``):
- "Scale by" f gives ``(⌊w·f / 8⌋·8, ⌊h·f / 8⌋·8)``; "Scale to" W×H uses f = max(W/w, H/h), the same rounding,
  and with "Crop to fit" pastes that centred on a black W×H canvas (so the result is exactly W×H);
- upscaler 1 "None" leaves the image as it is and writes nothing; upscaler 2 runs only when it is not "None" and
  its visibility is above 0, and the two are mixed as ``Image.blend(first, second, visibility)``;
- the image is converted to RGB first;
- the record is a ``Postprocess …`` infotext (``Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos``),
  stored in the PNG's ``postprocessing`` text chunk beside the source's own chunks, its ``parameters`` (or
  JPEG/WebP EXIF infotext) kept as it was; a saved file has it once more in an ``extras`` chunk (A1111's
  ``save_image`` section), an API answer does not.

The request's field names are A1111's API names, so an error names the field an API client sent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

from PIL import Image

from .errors import ValidationError
from .image_metadata import read_generation_info
from .infotext import parse_infotext, quote
from .untrusted_images import MAX_PIXELS, read_untrusted_image
from .upscalers.library import NONE, UpscalerLibrary

SCALE_BY, SCALE_TO = 0, 1  # A1111's resize_mode
MAX_FACTOR = 8.0  # A1111's "Resize" slider and API limit
MAX_SIDE = 8192  # A1111's "Scale to" sliders
SIZE_MULTIPLE = 8  # A1111 rounds the upscaled size down to a multiple of 8
POSTPROCESSING_CHUNK, EXTRAS_CHUNK = "postprocessing", "extras"  # the PNG text chunks A1111 writes the record to
OUTPUT_MODE = "extras"  # the outputs folder's {mode} (A1111's extras-images)


@dataclass(frozen=True)
class ExtrasRequest:
    resize_mode: int = SCALE_BY
    upscaling_resize: float = 2.0  # "Scale by" factor
    upscaling_resize_w: int = 512  # "Scale to" size
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True  # "Crop to fit"
    upscaler_1: str = NONE
    upscaler_2: str = NONE
    extras_upscaler_2_visibility: float = 0.0

    def validate(self) -> None:
        if self.resize_mode not in (SCALE_BY, SCALE_TO):
            raise ValidationError("resize_mode", f"must be {SCALE_BY} (scale by) or {SCALE_TO} (scale to), got {self.resize_mode!r}")
        factor = self.upscaling_resize
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or not 1 <= factor <= MAX_FACTOR:
            raise ValidationError("upscaling_resize", f"must be a number from 1 to {MAX_FACTOR:g}, got {factor!r}")
        for name in ("upscaling_resize_w", "upscaling_resize_h"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIDE:
                raise ValidationError(name, f"must be a whole number of pixels from 1 to {MAX_SIDE}, got {value!r}")
        visibility = self.extras_upscaler_2_visibility
        if isinstance(visibility, bool) or not isinstance(visibility, (int, float)) or not 0 <= visibility <= 1:
            raise ValidationError("extras_upscaler_2_visibility", f"must be from 0 to 1, got {visibility!r}")
        for name in ("upscaler_1", "upscaler_2"):
            if not isinstance(getattr(self, name), str):
                raise ValidationError(name, f"must be an upscaler's name, got {getattr(self, name)!r}")


@dataclass
class ExtrasSource:
    """One picture to work on: its file's bytes or path (its text chunks are kept) and, for a batch, its name."""

    data: bytes | str | PathLike
    name: str = ""
    field: str = "image"  # what an error about it names


@dataclass
class ExtrasResult:
    image: Image.Image
    infotext: str  # the ``Postprocess …`` record ("" when nothing was done)
    chunks: dict[str, str] = field(default_factory=dict)  # every PNG text chunk the result carries
    name: str = ""
    path: str | None = None

    @property
    def source_infotext(self) -> str | None:
        return self.chunks.get("parameters")


def upscaled_size(width: int, height: int, factor: float) -> tuple[int, int]:
    return (int(width * factor // SIZE_MULTIPLE * SIZE_MULTIPLE), int(height * factor // SIZE_MULTIPLE * SIZE_MULTIPLE))


def _upscale(image: Image.Image, upscaler, request: ExtrasRequest, info: dict[str, object]) -> Image.Image:
    if request.resize_mode == SCALE_TO:
        factor = max(request.upscaling_resize_w / image.width, request.upscaling_resize_h / image.height)
        info["Postprocess upscale to"] = f"{request.upscaling_resize_w}x{request.upscaling_resize_h}"
    else:
        factor = float(request.upscaling_resize)
        info["Postprocess upscale by"] = factor
    width, height = upscaled_size(image.width, image.height, factor)
    field = "upscaling_resize_w" if request.resize_mode == SCALE_TO else "upscaling_resize"
    if width < 1 or height < 1 or width * height > MAX_PIXELS:
        raise ValidationError(field, f"would make the {image.width}×{image.height} picture {width}×{height}; the result "
                                     f"may have 1 to {MAX_PIXELS:,} pixels")
    result = upscaler.upscale(image, width, height)
    if request.resize_mode == SCALE_TO and request.upscaling_crop:
        canvas = Image.new("RGB", (request.upscaling_resize_w, request.upscaling_resize_h))
        canvas.paste(result, (request.upscaling_resize_w // 2 - result.width // 2, request.upscaling_resize_h // 2 - result.height // 2))
        result = canvas
        info["Postprocess crop to"] = f"{result.width}x{result.height}"
    return result


def upscale_image(image: Image.Image, request: ExtrasRequest, library: UpscalerLibrary) -> tuple[Image.Image, str]:
    """The image upscaled as the request says, and the ``Postprocess …`` infotext that records it."""
    request.validate()
    first = library.find(request.upscaler_1, "upscaler_1")
    second = library.find(request.upscaler_2, "upscaler_2")
    image = image.convert("RGB")
    if request.upscaler_1 == NONE:
        return image, ""
    info: dict[str, object] = {}
    result = _upscale(image, first, request, info)
    info["Postprocess upscaler"] = first.name
    if request.upscaler_2 != NONE and request.extras_upscaler_2_visibility > 0:
        other = _upscale(image, second, request, info)
        result = Image.blend(result, other.convert(result.mode), request.extras_upscaler_2_visibility)
        info["Postprocess upscaler 2"] = second.name
    return result, ", ".join(f"{key}: {quote(str(value))}" for key, value in info.items())


def run_extras(sources: list[ExtrasSource], request: ExtrasRequest, library: UpscalerLibrary) -> list[ExtrasResult]:
    """Every source upscaled; the result keeps the source's text chunks and adds A1111's record of the upscale."""
    request.validate()
    results = []
    for source in sources:
        image = read_untrusted_image(source.data, source.field)
        # A PNG's text chunks as they are (ComfyUI's JSON included); a JPEG's or WebP's infotext from its EXIF
        chunks = {key: str(value) for key, value in image.info.items() if isinstance(key, str) and isinstance(value, str)}
        if "parameters" not in chunks and image.format != "PNG":
            infotext = read_generation_info(source.data).infotext
            if infotext:
                chunks["parameters"] = infotext
        chunks.pop(POSTPROCESSING_CHUNK, None), chunks.pop(EXTRAS_CHUNK, None)  # an earlier pass's record is replaced
        upscaled, infotext = upscale_image(image, request, library)
        if infotext:
            chunks[POSTPROCESSING_CHUNK] = infotext
        results.append(ExtrasResult(upscaled, infotext, chunks, name=source.name))
    return results


def source_seed(result: ExtrasResult) -> int:
    """The seed the source's infotext names (for the output file's name), else 0."""
    seed = parse_infotext(result.source_infotext).get("Seed", "") if result.source_infotext else ""
    return int(seed) if seed.lstrip("-").isdigit() else 0


def save_extras(writer, result: ExtrasResult) -> Path:
    """Write a result to the outputs folder (``{mode}`` = extras) with its text chunks and, as A1111's saved
    files have it, the record once more in an ``extras`` chunk."""
    chunks = {key: value for key, value in result.chunks.items() if key != "parameters"}
    if result.infotext:
        chunks[EXTRAS_CHUNK] = result.infotext
    path = writer.save(result.image, result.source_infotext, OUTPUT_MODE, source_seed(result), extra_chunks=chunks)
    result.path = str(path)
    return path
