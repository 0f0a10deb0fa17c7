"""Opening an image that came from outside: an upload, a base64 field, a file named on the command line.

Pillow's ``Image.open`` tries every format it knows, and some of those hand the
bytes to other programs or to rarely used parsers: an EPS goes to Ghostscript
when its pixels are read. And it decodes whatever size a header declares: a
12000×12000 PNG of a few hundred bytes becomes 432 MB of pixels. So every entry
point opens outside images here, which

1. names the format and refuses it unless it is one a studio needs
   (``ACCEPTED_FORMATS``), looking only at the first bytes;
2. opens it with ``Image.open(fp, formats=ACCEPTED_FORMATS)``, which reads the
   header only, and checks the declared width × height against the pixel limit;
3. only then decodes the pixels (the first frame of a GIF, WebP or TIFF).

Errors are ``ValidationError(field, sentence)``: a sentence for a person, with
no file path and no exception class in it.
"""
from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import BinaryIO, Iterator, Union

from PIL import Image, UnidentifiedImageError

from .errors import ValidationError
from .request import LIMITS

# Pillow's format names, in the order they are tried.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
ACCEPTED_NAMES = "PNG, JPEG, WebP, BMP, GIF or TIFF"
MAX_PIXELS = LIMITS["image_pixels"]
# Formats Pillow cannot open but people still send, recognised by their first bytes so the refusal can name them.
_OTHER_SIGNATURES = ((b"%PDF", "PDF"), (b"<svg", "SVG"), (b"<?xml", "SVG"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"))
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1")
_PREFIX_BYTES = 16  # as many as Pillow's own format checks look at

ImageSource = Union[bytes, bytearray, memoryview, str, PathLike, BinaryIO]


def format_of(prefix: bytes) -> str | None:
    """The name of the image format these first bytes belong to, by signature only (nothing is parsed)."""
    Image.init()
    for name in (*ACCEPTED_FORMATS, *Image.ID):
        accept = Image.OPEN.get(name, (None, None))[1]
        try:
            if accept is not None and accept(prefix[:_PREFIX_BYTES]):
                return name
        except Exception:  # noqa: BLE001 - a format check that trips over odd bytes just does not match
            continue
    if prefix[4:8] == b"ftyp" and prefix[8:12] in _HEIF_BRANDS:
        return "HEIC"
    stripped = prefix.lstrip()
    return next((name for signature, name in _OTHER_SIGNATURES if stripped.startswith(signature)), None)


def _readable(source: ImageSource, field: str) -> BinaryIO:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source))
    if isinstance(source, (str, PathLike)):
        try:
            return open(Path(source), "rb")  # noqa: SIM115 - closed by open_untrusted_image
        except OSError:
            raise ValidationError(field, "the image file could not be read") from None
    if hasattr(source, "read") and hasattr(source, "seek"):
        return source
    raise ValidationError(field, f"must be an image, got {type(source).__name__}")


def check_size(width: int, height: int, field: str, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse an empty image or one larger than ``max_pixels`` (read from its header, before any decoding)."""
    if width < 1 or height < 1:
        raise ValidationError(field, f"the image is empty ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise ValidationError(field, f"the image is {width}x{height} ({width * height:,} pixels); at most {max_pixels:,} pixels "
                                     f"(e.g. {int(max_pixels ** 0.5)}x{int(max_pixels ** 0.5)}) are accepted")


@contextmanager
def open_untrusted_image(source: ImageSource, field: str, max_pixels: int = MAX_PIXELS) -> Iterator[Image.Image]:
    """The image with its format and declared size checked, its pixels not yet decoded.

    Inside the ``with`` block, ``image.load()`` decodes the pixels; errors while
    decoding become a ValidationError too.
    """
    handle = _readable(source, field)
    try:
        start = handle.tell()
        prefix = handle.read(_PREFIX_BYTES)
        handle.seek(start)
        if not prefix:
            raise ValidationError(field, "this is not a readable image: the file is empty")
        found = format_of(prefix)
        if found is not None and found not in ACCEPTED_FORMATS:
            raise ValidationError(field, f"{found} files are not accepted; send a {ACCEPTED_NAMES} image")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is the stricter one
                image = Image.open(handle, formats=ACCEPTED_FORMATS)
        except UnidentifiedImageError:
            if found is None:
                raise ValidationError(field, f"this is not a readable image; send a {ACCEPTED_NAMES} image") from None
            raise ValidationError(field, f"this is not a readable image: the {found} data is damaged or cut short") from None
        except Image.DecompressionBombError:
            raise ValidationError(field, f"the image declares more than {max_pixels:,} pixels") from None
        except Exception:  # noqa: BLE001 - Pillow raises many kinds for a damaged header
            raise ValidationError(field, f"this is not a readable image: its {found or 'image'} header is damaged") from None
        with image:
            check_size(*image.size, field, max_pixels)
            try:
                yield image
            except ValidationError:
                raise
            except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, MemoryError):
                # Pillow's decoders raise these for damaged or cut-short data; anything else is our bug and propagates.
                raise ValidationError(field, f"this is not a readable image: the {image.format or found or 'image'} data is "
                                             "damaged or cut short") from None
    finally:
        if handle is not source:
            handle.close()


def read_untrusted_image(source: ImageSource, field: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The decoded image (its first frame), independent of the source; ValidationError(field, sentence) otherwise."""
    with open_untrusted_image(source, field, max_pixels) as image:
        image.load()
        decoded = image.copy()  # a frame of its own: a GIF or TIFF keeps its file open otherwise
        decoded.format = image.format
        return decoded
