"""The API's JSON layer on its own: hostile bodies give a 422 naming a field or a valid request, never a crash."""
from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.errors import ModelError, ValidationError
from engine.request import GenerationRequest
from engine.settings import Settings
from ui.api import ApiError, decode_image, img2img_request, resolve_sampler, txt2img_request
from ui.api_models import Img2ImgRequest, Txt2ImgRequest


def _get_model(name: str):
    if name.split(" [")[0] != "model-a":
        raise ModelError(f"model {name!r} not found")
    return SimpleNamespace(name="model-a")


def _no_preset(name: str):
    raise ValidationError("preset", f"no preset named {name!r}")


STUDIO = SimpleNamespace(
    default_model=lambda: "model-a",
    registry=SimpleNamespace(get=_get_model),
    presets=SimpleNamespace(get=_no_preset, list=lambda: []),
    settings=Settings(),
    extensions=None,
)


def _png(size=(16, 16)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=6,
)
FIELDS = ["prompt", "negative_prompt", "styles", "seed", "subseed", "subseed_strength", "sampler_name", "sampler_index", "scheduler",
          "batch_size", "n_iter", "steps", "cfg_scale", "width", "height", "override_settings", "alwayson_scripts", "send_images",
          "init_images", "mask", "resize_mode", "inpainting_fill", "inpaint_full_res", "inpainting_mask_invert", "mask_blur",
          "denoising_strength", "inpaint_full_res_padding", "unknown_field"]
bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)


def build(model, builder, body: dict):
    """What the endpoint does before queueing: parse, then translate; returns the request or the HTTP error status."""
    try:
        parsed = model.model_validate(body)
    except pydantic.ValidationError:
        return 422
    try:
        return builder(STUDIO, parsed)
    except ApiError as error:
        assert error.status == 422 and error.field and error.field.split(".")[0].split("[")[0] in FIELDS + ["override_settings"]
        return 422
    except ValidationError as error:  # the API's error handler maps these to 422 too
        assert error.field
        return 422


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_hostile_txt2img_bodies_give_a_clear_422_or_a_valid_request(body):
    result = build(Txt2ImgRequest, txt2img_request, body)
    assert result == 422 or isinstance(result, GenerationRequest)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies, st.booleans())
def test_hostile_img2img_bodies_give_a_clear_422_or_a_valid_request(body, with_image):
    if with_image:
        body = {**body, "init_images": [_png()]}
    result = build(Img2ImgRequest, img2img_request, body)
    assert result == 422 or isinstance(result, GenerationRequest)


def test_null_fields_mean_the_default():
    request = txt2img_request(STUDIO, Txt2ImgRequest.model_validate({"prompt": None, "negative_prompt": None, "seed": None, "steps": None, "styles": None}))
    assert (request.prompt, request.negative_prompt, request.seed, request.steps) == ("", "", -1, 50)


@pytest.mark.parametrize("text", [_png(), "data:image/png;base64," + _png(), _png()[:40] + "\n" + _png()[40:]])
def test_base64_images_decode_with_data_url_prefix_and_line_breaks(text):
    assert decode_image(text, "init_images.0").size == (16, 16)


@pytest.mark.parametrize("text, message", [
    ("http://example.com/a.png", "URLs are not fetched"),
    ("***", "not valid base64"),
    (base64.b64encode(b"GIF89a-truncated").decode(), "not a readable image"),
    ("", "must be a base64-encoded image"),
])
def test_bad_images_are_refused_naming_the_field(text, message):
    with pytest.raises(ValidationError, match=message) as caught:
        decode_image(text, "mask")
    assert caught.value.field == "mask"


def test_an_explicit_scheduler_beats_the_one_in_a_legacy_sampler_name():
    assert resolve_sampler(Txt2ImgRequest(sampler_name="DPM++ 2M Karras", scheduler="Exponential")) == ("DPM++ 2M", "Exponential")
    assert resolve_sampler(Txt2ImgRequest(sampler_name="DPM++ 2M Karras", scheduler="Automatic")) == ("DPM++ 2M", "Karras")
    assert resolve_sampler(Txt2ImgRequest()) == ("Euler", "Automatic")  # A1111's sampler_index default
