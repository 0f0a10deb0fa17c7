"""Generation info in PNG, JPEG and WebP files, written like A1111 and read from A1111 and ComfyUI files."""
from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from engine.errors import ValidationError
from engine.image_metadata import (
    decode_user_comment,
    jpeg_with_infotext,
    png_with_infotext,
    read_generation_info,
    save_png,
    webp_with_infotext,
)

IMAGE = Image.new("RGB", (16, 12), "orange")
INFOTEXT = 'a "red" cat, 猫 ☃\nNegative prompt: blur\nSteps: 20, Sampler: Euler a, Model: "a, b"'


def test_png_keeps_infotext_in_parameters_chunk():
    data = png_with_infotext(IMAGE, INFOTEXT)
    with Image.open(io.BytesIO(data)) as image:
        assert image.text["parameters"] == INFOTEXT
    info = read_generation_info(data)
    assert info.infotext == INFOTEXT and info.format == "PNG" and info.size == (16, 12)


def test_latin1_infotext_goes_in_plain_text_chunk():
    data = png_with_infotext(IMAGE, "Steps: 20")
    assert b"tEXtparameters\x00Steps: 20" in data


def test_save_png_writes_readable_file(tmp_path):
    path = save_png(IMAGE, tmp_path / "out.png", INFOTEXT)
    assert read_generation_info(path).infotext == INFOTEXT
    assert read_generation_info(str(path)).infotext == INFOTEXT


def test_jpeg_user_comment_uses_a1111_unicode_encoding():
    data = jpeg_with_infotext(IMAGE, INFOTEXT)
    with Image.open(io.BytesIO(data)) as image:
        raw = image.getexif().get_ifd(0x8769)[0x9286]
    assert raw == b"UNICODE\x00" + INFOTEXT.encode("utf-16-be")
    assert read_generation_info(data).infotext == INFOTEXT


def test_webp_infotext_read_from_exif():
    info = read_generation_info(webp_with_infotext(IMAGE, INFOTEXT))
    assert info.infotext == INFOTEXT and info.format == "WEBP"


def test_user_comment_decodes_other_encodings():
    assert decode_user_comment(b"UNICODE\x00" + "Steps: 1".encode("utf-16-le")) == "Steps: 1"
    assert decode_user_comment(b"ASCII\x00\x00\x00Steps: 1") == "Steps: 1"
    assert decode_user_comment(b"\x00" * 8 + "Stüps".encode()) == "Stüps"
    assert decode_user_comment(b"raw bytes") == "raw bytes"


def test_too_long_infotext_for_jpeg_is_a_clear_error():
    with pytest.raises(ValidationError) as error:
        jpeg_with_infotext(IMAGE, "x" * 40_000)
    assert error.value.field == "infotext" and "PNG" in error.value.message


def test_comfyui_chunks_come_back_as_pretty_json():
    prompt = {"3": {"class_type": "KSampler", "inputs": {"seed": 1}}}
    workflow = {"nodes": [{"id": 3}], "links": []}
    info = PngInfo()
    info.add_text("prompt", json.dumps(prompt))
    info.add_text("workflow", json.dumps(workflow))
    info.add_text("Software", "ComfyUI")
    buffer = io.BytesIO()
    IMAGE.save(buffer, format="PNG", pnginfo=info)
    result = read_generation_info(buffer.getvalue())
    assert result.infotext is None
    assert json.loads(result.comfy_prompt) == prompt and "\n  " in result.comfy_prompt
    assert json.loads(result.comfy_workflow) == workflow
    assert result.other_chunks == {"Software": "ComfyUI"}


def test_text_chunk_after_pixel_data_is_found():
    data = png_with_infotext(IMAGE, None)
    chunk_body = b"parameters\x00Steps: 3"
    chunk = struct.pack(">I", len(chunk_body)) + b"tEXt" + chunk_body + struct.pack(">I", zlib.crc32(b"tEXt" + chunk_body))
    iend = data.rindex(b"IEND") - 4
    assert read_generation_info(data[:iend] + chunk + data[iend:]).infotext == "Steps: 3"


def test_image_without_info_reads_as_empty():
    buffer = io.BytesIO()
    IMAGE.save(buffer, format="JPEG")
    info = read_generation_info(buffer.getvalue())
    assert info.infotext is None and info.comfy_prompt is None and info.comfy_workflow is None


@pytest.mark.parametrize("data", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_non_image_bytes_are_a_clear_validation_error(data):
    with pytest.raises(ValidationError) as error:
        read_generation_info(data)
    assert error.value.field == "image"


def test_truncated_png_is_a_clear_validation_error():
    data = png_with_infotext(Image.effect_noise((64, 64), 50), "Steps: 1")
    with pytest.raises(ValidationError) as error:
        read_generation_info(data[: len(data) // 2])
    assert "damaged" in error.value.message


def test_missing_file_and_wrong_type_are_validation_errors(tmp_path):
    with pytest.raises(ValidationError):
        read_generation_info(tmp_path / "missing.png")
    with pytest.raises(ValidationError):
        read_generation_info(12345)  # type: ignore[arg-type]


def test_unencodable_infotext_is_refused():
    with pytest.raises(ValidationError):
        png_with_infotext(IMAGE, "lone \ud800 surrogate")


def test_images_in_unusual_modes_still_save_as_png():
    cmyk = Image.new("CMYK", (4, 4))
    assert read_generation_info(png_with_infotext(cmyk, "Steps: 1")).infotext == "Steps: 1"


@settings(deadline=None, max_examples=100)
@given(data=st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda tail: b"\x89PNG\r\n\x1a\n" + tail),
    st.binary(max_size=200).map(lambda tail: b"\xff\xd8\xff\xe1" + tail),
    st.integers(0, 400).map(lambda cut: png_with_infotext(IMAGE, "Steps: 1")[:cut]),
))
def test_reading_hostile_bytes_gives_info_or_validation_error(data):
    try:
        info = read_generation_info(data)
    except ValidationError as error:
        assert error.field == "image"
    else:
        assert info.infotext is None or isinstance(info.infotext, str)
