"""Outside images are opened only in the formats a studio needs, and their declared size is checked before decoding.

Two hostile files, sent to every place images enter:
- a tiny EPS, which Pillow would hand to Ghostscript when its pixels are read;
- a valid PNG whose header claims 12000x12000 (432 MB of RGB once decoded) over a few bytes of data.
The EPS must be refused by its format name without Pillow's EPS parser ever running,
and the PNG by its size without any pixel decoding.
"""
from __future__ import annotations

import base64
import io
import struct
import zlib
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from gradio.data_classes import FileData
from PIL import EpsImagePlugin, Image, ImageFile

from engine.errors import ValidationError
from engine.image_metadata import read_generation_info
from engine.settings import Settings
from engine.untrusted_images import read_untrusted_image

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
       b"newpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(width: int = 12000, height: int = 12000) -> bytes:
    """A well-formed PNG header claiming width x height RGB, with one compressed row of data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _chunk(b"IEND", b""))


def small_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


HOSTILE = {"eps": (EPS, "EPS files are not accepted"), "huge": (huge_png(), "12000x12000")}


@pytest.fixture(autouse=True)
def parsers_that_must_not_run(monkeypatch):
    """Record any use of Pillow's EPS parser, of Ghostscript, and of pixel decoding."""
    calls: list[str] = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: calls.append("EPS parser") or (_ for _ in ()).throw(SyntaxError))
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append("Ghostscript") or (_ for _ in ()).throw(OSError))
    original_load = ImageFile.ImageFile.load

    def load(self):
        if self.size[0] * self.size[1] > 4096 * 4096:
            calls.append(f"decoded {self.size}")
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    yield calls
    assert calls == [], f"ran on hostile input: {calls}"


def refused(call, field: str, expected: str) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        call()
    assert caught.value.field == field and expected in caught.value.message, caught.value
    return caught.value


# --- the one module -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_images_are_refused_before_any_parser_or_decoder_runs(kind):
    data, expected = HOSTILE[kind]
    refused(lambda: read_untrusted_image(data, "init_images.0"), "init_images.0", expected)


@pytest.mark.parametrize("kind", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_the_formats_a_studio_needs_still_open(kind):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (0, 120, 240)).save(buffer, format=kind)
    image = read_untrusted_image(buffer.getvalue(), "image")
    assert image.size == (8, 6) and image.format == kind


def test_a_refusal_names_neither_a_path_nor_an_exception_class(tmp_path):
    for data in (EPS, b"\x89PNG\r\n\x1a\n broken", b"plain text, not an image"):
        path = tmp_path / "upload.png"
        path.write_bytes(data)
        with pytest.raises(ValidationError) as caught:
            read_untrusted_image(path, "image")
        assert str(tmp_path) not in caught.value.message and "Error" not in caught.value.message


# --- HTTP API ------------------------------------------------------------------------------------

def _stub_studio():
    return SimpleNamespace(default_model=lambda: "model-a", registry=SimpleNamespace(get=lambda name: SimpleNamespace(name=name)),
                           presets=SimpleNamespace(list=lambda: []), settings=Settings(), extensions=None)


@pytest.fixture(scope="module")
def client():
    from extensions.controlnet.api import add_routes
    from ui.api import install_api

    app = FastAPI()
    install_api(app, _stub_studio())
    add_routes(app)
    return TestClient(app)


@pytest.mark.parametrize("kind", HOSTILE)
@pytest.mark.parametrize("path, body, field", [
    ("/sdapi/v1/img2img", lambda image: {"init_images": [image]}, "init_images.0"),
    ("/sdapi/v1/img2img", lambda image: {"init_images": [b64(small_png())], "mask": image}, "mask"),
    ("/sdapi/v1/png-info", lambda image: {"image": image}, "image"),
    ("/controlnet/detect", lambda image: {"controlnet_module": "canny", "controlnet_input_images": [image]}, "controlnet_input_images[0]"),
])
def test_api_refuses_hostile_images_with_a_422_naming_the_field_and_the_problem(client, kind, path, body, field):
    data, expected = HOSTILE[kind]
    response = client.post(path, json=body(b64(data)))
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field and expected in response.json()["detail"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_controlnet_unit_images_from_api_clients_and_presets_are_checked(kind):
    from extensions.controlnet.units import validate_unit

    data, expected = HOSTILE[kind]
    refused(lambda: validate_unit({"image": b64(data), "module": "canny"}), "units[0].image", expected)
    refused(lambda: validate_unit({"image": {"image": "data:image/png;base64," + b64(data)}}, "units[1]"), "units[1].image", expected)


# --- command line ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", HOSTILE)
def test_cli_images_are_checked(kind, tmp_path):
    from extensions.controlnet.cli import _open_image
    from ui.cli import CliError, open_image

    data, expected = HOSTILE[kind]
    path = tmp_path / "picture.png"  # the name says PNG; the content decides
    path.write_bytes(data)
    for flag in ("--init-image", "--mask"):
        with pytest.raises(CliError, match=expected):
            open_image(str(path), flag)
    refused(lambda: _open_image(str(path), "control"), "control", expected)


# --- the browser's uploads, as the UI's handlers receive them ----------------------------------

@pytest.mark.parametrize("kind", HOSTILE)
def test_ui_uploads_are_checked_by_the_image_components(kind, tmp_path):
    import gradio as gr

    from ui.image_inputs import UploadImage, UploadImageEditor, upload_problem
    from ui.masks import uploaded_mask
    from ui.png_info import read_image_info

    data, expected = HOSTILE[kind]
    path = tmp_path / "upload.png"
    path.write_bytes(data)
    upload = FileData(path=str(path), orig_name="upload.png")
    with gr.Blocks():
        image = UploadImage(label="Image for img2img", type="pil")
        editor = UploadImageEditor(label="Image to inpaint", type="pil")
    for decode in (lambda: image.preprocess(upload), lambda: editor.convert_and_format_image(upload)):
        with pytest.raises(gr.Error, match=expected) as caught:
            decode()
        assert str(tmp_path) not in str(caught.value)
    assert expected in upload_problem(upload.model_dump(), "Mask")
    refused(lambda: uploaded_mask(str(path), (8, 8)), "mask", expected)
    assert expected in read_image_info(str(path))[-1]  # PNG Info's summary line


def test_ui_uploads_of_good_images_decode_as_before(tmp_path):
    import gradio as gr

    from ui.image_inputs import UploadImage, upload_problem

    path = tmp_path / "good.png"
    path.write_bytes(small_png())
    with gr.Blocks():
        image = UploadImage(type="pil", image_mode="RGB")
        as_path = UploadImage(type="filepath")
    upload = FileData(path=str(path), orig_name="good.png")
    assert image.preprocess(upload).size == (8, 6)
    assert as_path.preprocess(upload) == str(path)
    assert upload_problem(upload.model_dump(), "Image") is None


def test_png_info_reads_infotext_through_the_same_checks():
    from engine.image_metadata import png_with_infotext

    info = read_generation_info(png_with_infotext(Image.new("RGB", (4, 4)), "a cat\nSteps: 5"))
    assert info.infotext == "a cat\nSteps: 5" and info.format == "PNG"
    refused(lambda: read_generation_info(EPS), "image", "EPS files are not accepted")
