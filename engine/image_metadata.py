"""Generation info inside image files: write it the way A1111 does, read it from A1111 and ComfyUI files.

- PNG: a text chunk ``parameters`` holds the infotext (tEXt, or iTXt when it is
  not Latin-1). ComfyUI stores its graph as JSON in the ``prompt`` and
  ``workflow`` chunks.
- JPEG/WebP: EXIF UserComment (tag 0x9286 in the Exif IFD 0x8769), encoded as
  piexif's ``UserComment.dump(..., encoding="unicode")`` does for A1111: the
  8-byte prefix ``UNICODE\\0`` and then UTF-16 big-endian text.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .errors import ValidationError
from .untrusted_images import open_untrusted_image

EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
_UNICODE_PREFIX = b"UNICODE\x00"
_ASCII_PREFIX = b"ASCII\x00\x00\x00"
_JIS_PREFIX = b"JIS\x00\x00\x00\x00\x00"
_UNDEFINED_PREFIX = b"\x00" * 8
_PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")
_KNOWN_CHUNKS = ("parameters", "prompt", "workflow")


@dataclass
class ImageInfo:
    """What an image file says about how it was made."""

    infotext: str | None = None
    comfy_prompt: str | None = None
    comfy_workflow: str | None = None
    other_chunks: dict[str, str] = field(default_factory=dict)
    format: str | None = None
    size: tuple[int, int] | None = None


# --- writing -----------------------------------------------------------------

def _check_text(infotext: str | None) -> None:
    if infotext is None:
        return
    if not isinstance(infotext, str):
        raise ValidationError("infotext", f"must be text, got {type(infotext).__name__}")
    try:
        infotext.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValidationError("infotext", f"contains a character that cannot be stored ({error.reason})") from None


def _check_image(image: Image.Image) -> None:
    if not isinstance(image, Image.Image):
        raise ValidationError("image", f"must be an image, got {type(image).__name__}")


def png_with_infotext(image: Image.Image, infotext: str | None, extra_chunks: dict[str, str] | None = None) -> bytes:
    """The image as PNG bytes with the infotext in its ``parameters`` chunk."""
    _check_image(image)
    _check_text(infotext)
    info = PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    for key, value in (extra_chunks or {}).items():
        _check_text(value)
        info.add_text(key, value)
    if image.mode not in _PNG_MODES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, path: str | PathLike, infotext: str | None) -> Path:
    """Write a PNG with infotext to ``path`` (overwriting it); see OutputWriter for safe, numbered saving."""
    path = Path(path)
    path.write_bytes(png_with_infotext(image, infotext))
    return path


def _exif_with_user_comment(infotext: str | None) -> bytes:
    _check_text(infotext)
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = _UNICODE_PREFIX + (infotext or "").encode("utf-16-be")
    return exif.tobytes()


def jpeg_with_infotext(image: Image.Image, infotext: str | None, quality: int = 95) -> bytes:
    """The image as JPEG bytes with the infotext in EXIF UserComment, as A1111 writes it."""
    _check_image(image)
    exif = _exif_with_user_comment(infotext)
    buffer = io.BytesIO()
    try:
        image.convert("RGB").save(buffer, format="JPEG", quality=quality, exif=exif)
    except ValueError as error:  # Pillow: "EXIF data is too long" (a JPEG segment holds 64 KiB)
        raise ValidationError("infotext", f"is too long to fit in JPEG EXIF ({error}); save as PNG instead") from None
    return buffer.getvalue()


def webp_with_infotext(image: Image.Image, infotext: str | None, quality: int = 95) -> bytes:
    """The image as WebP bytes with the infotext in EXIF UserComment."""
    _check_image(image)
    exif = _exif_with_user_comment(infotext)
    buffer = io.BytesIO()
    image = image if image.mode in ("RGB", "RGBA") else image.convert("RGBA" if "A" in image.getbands() else "RGB")
    image.save(buffer, format="WEBP", quality=quality, exif=exif)
    return buffer.getvalue()


# --- reading -----------------------------------------------------------------

def decode_user_comment(raw: bytes | str) -> str:
    """EXIF UserComment bytes → text, tolerant of the encodings found in the wild."""
    if isinstance(raw, str):
        return raw.rstrip("\x00")
    prefix, body = raw[:8], raw[8:]
    if prefix == _UNICODE_PREFIX:
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return body.decode("utf-16", errors="replace").rstrip("\x00")
        # A1111 (through piexif) writes big-endian; some tools write little-endian.
        # ASCII-heavy text gives away its byte order by where the zero bytes sit.
        zeros_even, zeros_odd = body[0::2].count(0), body[1::2].count(0)
        encoding = "utf-16-le" if zeros_odd > zeros_even else "utf-16-be"
        return body.decode(encoding, errors="replace").rstrip("\x00")
    if prefix == _JIS_PREFIX:
        return body.decode("shift_jis", errors="replace").rstrip("\x00")
    if prefix in (_ASCII_PREFIX, _UNDEFINED_PREFIX):
        return body.decode("utf-8", errors="replace").rstrip("\x00")
    return raw.decode("utf-8", errors="replace").rstrip("\x00")


def _pretty_json(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):
        return text  # not JSON after all: show it as it is


def read_generation_info(data: bytes | str | PathLike) -> ImageInfo:
    """Read infotext and ComfyUI graphs from PNG, JPEG or WebP bytes or a file path.

    Raises ValidationError("image", ...) when the data is not a readable image, is
    in a format that is not accepted, or declares too many pixels (see untrusted_images).
    """
    if not isinstance(data, (bytes, bytearray, memoryview, str, PathLike)):
        raise ValidationError("image", f"expected image bytes or a file path, got {type(data).__name__}")
    with open_untrusted_image(data, "image") as image:
        image.load()  # PNG text chunks after the pixel data are only read here
        text_chunks = dict(getattr(image, "text", {}) or {})
        info = dict(image.info)
        exif = image.getexif()
        image_format, size = image.format, image.size
        user_comment = exif.get_ifd(EXIF_IFD).get(USER_COMMENT)

    for key, value in info.items():
        if isinstance(value, str) and key not in text_chunks:
            text_chunks[key] = value

    infotext = text_chunks.get("parameters")
    if infotext is None and user_comment:
        infotext = decode_user_comment(user_comment) or None
    return ImageInfo(
        infotext=infotext,
        comfy_prompt=_pretty_json(text_chunks.get("prompt")),
        comfy_workflow=_pretty_json(text_chunks.get("workflow")),
        other_chunks={key: value for key, value in text_chunks.items() if key not in _KNOWN_CHUNKS},
        format=image_format,
        size=size,
    )
