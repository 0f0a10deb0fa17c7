"""Image components for pictures the artist uploads: decoded only through ``engine.untrusted_images``.

Gradio's own ``gr.Image`` and ``gr.ImageEditor`` hand an upload to Pillow's
``Image.open`` with every format enabled (an EPS reaches Ghostscript) and decode
whatever size the header declares. These subclasses decode through
``read_untrusted_image`` instead, and ``reject_bad_uploads`` checks a file the
moment it is dropped: a bad one is cleared at once with a sentence saying why
(never a temp path or an exception name), so the problem does not wait for Generate.
"""
from __future__ import annotations

import base64
import binascii
import io
from typing import Any, Mapping

import gradio as gr
import numpy as np
from gradio import processing_utils
from gradio.data_classes import FileData
from PIL import Image, ImageOps

from engine.errors import ValidationError
from engine.untrusted_images import read_untrusted_image


def _payload_source(payload: Any) -> bytes | str | None:
    """The bytes or server-side file an upload payload (a FileData model or its JSON) points to."""
    if payload is None:
        return None
    if isinstance(payload, Mapping):
        path, url = payload.get("path"), payload.get("url")
    else:
        path, url = getattr(payload, "path", None), getattr(payload, "url", None)
    if isinstance(url, str) and url.startswith("data:"):
        try:
            return base64.b64decode(url.rsplit(",", 1)[-1], validate=False)
        except (binascii.Error, ValueError):
            return b""  # decoded as "not a readable image"
    return path if isinstance(path, str) else None


def upload_problem(payload: Any, label: str) -> str | None:
    """A sentence for the artist when the uploaded file cannot be used, else None."""
    source = _payload_source(payload)
    if source is None:
        return None
    try:
        read_untrusted_image(source, label)
    except ValidationError as error:
        return f"{label}: {error.message}."
    return None


def _refuse(label: str, error: ValidationError) -> gr.Error:
    return gr.Error(f"{label}: {error.message}.", title="This image cannot be used", print_exception=False)


class UploadImage(gr.Image):
    """``gr.Image`` whose uploads are decoded by ``read_untrusted_image`` (format and size checked first)."""

    is_template = True  # drawn by gr.Image's front-end component

    def preprocess(self, payload) -> np.ndarray | Image.Image | str | None:
        source = _payload_source(payload)
        if source is None:
            return None
        if self.type == "filepath" and isinstance(source, str):
            return source  # not decoded here: whoever reads the file opens it with read_untrusted_image
        label = self.label or "Image"
        try:
            image = read_untrusted_image(source, label)
        except ValidationError as error:
            raise _refuse(label, error) from None
        if self.type == "filepath":  # a pasted data: URL, kept as a PNG of the checked pixels
            return processing_utils.save_pil_to_cache(image, self.GRADIO_CACHE, format="png")
        image = ImageOps.exif_transpose(image)  # as Gradio does: a phone photo stands the way it was taken
        if self.image_mode is not None and image.mode != self.image_mode:
            image = image.convert(self.image_mode)
        return np.asarray(image) if self.type == "numpy" else image


class UploadImageEditor(gr.ImageEditor):
    """``gr.ImageEditor`` whose background, layers and composite are decoded by ``read_untrusted_image``."""

    is_template = True

    def convert_and_format_image(self, file: FileData | None | bytes, flatten_on_white: bool = False):
        if file is None:
            return None
        source = bytes(file) if isinstance(file, (bytes, bytearray, memoryview)) else _payload_source(file)
        label = self.label or "Image"
        try:
            image = read_untrusted_image(source if source is not None else b"", label)
        except ValidationError as error:
            raise _refuse(label, error) from None
        # Gradio's own conversion (flattening, mode, type) runs on a PNG of the checked pixels,
        # so its Image.open only ever sees a PNG written here.
        if image.mode not in ("1", "L", "LA", "I", "P", "RGB", "RGBA"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        return super().convert_and_format_image(buffer.getvalue(), flatten_on_white)


def _uploaded_files(payload: Any) -> list[Any]:
    """The files in an upload payload: an image's one file, or an editor's background, layers and composite."""
    if isinstance(payload, Mapping) and {"background", "layers", "composite"} & payload.keys():
        return [payload.get("background"), *(payload.get("layers") or []), payload.get("composite")]
    return [payload]


def reject_bad_uploads(*components: gr.components.Component) -> list:
    """On upload, check the file at once; a bad one is cleared with a warning that says why.

    Returns the check events, one per component, so that what should follow a good
    upload can run ``.then`` (the value it reads is then None when the file was refused).
    """
    checks = []
    for component in components:
        label = component.label or "Image"

        def check(payload, label=label):
            problem = next((found for file in _uploaded_files(payload) if (found := upload_problem(file, label))), None)
            if problem is None:
                return gr.skip()
            gr.Warning(problem, title="This image cannot be used")
            return None

        # Queued, as gr.Warning reaches the browser only through the queue; no limit, so a running generation never delays it.
        checks.append(component.upload(check, component, component, preprocess=False, concurrency_limit=None,
                                       api_visibility="private"))
    return checks
