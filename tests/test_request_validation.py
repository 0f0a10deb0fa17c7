"""Requests are validated at construction with messages that name the field and the range."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from engine import GenerationRequest, ValidationError


@pytest.mark.parametrize("field,value,needle", [
    ("steps", 0, "between 1 and 150"),
    ("steps", 151, "between 1 and 150"),
    ("steps", 2.5, "integer"),
    ("cfg_scale", 31, "between 0.0 and 30.0"),
    ("cfg_scale", float("nan"), "finite"),
    ("width", 100, "multiple of 8"),
    ("height", 8, "between 64 and 4096"),
    ("batch_size", 9, "between 1 and 8"),
    ("batch_count", 0, "between 1 and 100"),
    ("seed", -2, "between -1"),
    ("denoising_strength", 1.5, "between 0.0 and 1.0"),
    ("masked_content", "blue", "one of"),
    ("prompt", 42, "text"),
])
def test_bad_fields_are_named(field, value, needle):
    with pytest.raises(ValidationError) as raised:
        GenerationRequest(**{field: value})
    assert raised.value.field == field
    assert needle in raised.value.message


def test_mask_must_match_init_image():
    with pytest.raises(ValidationError) as raised:
        GenerationRequest(init_image=Image.new("RGB", (64, 64)), mask=Image.new("L", (32, 32)))
    assert raised.value.field == "mask" and "32x32" in raised.value.message


def test_mask_without_image_is_refused():
    with pytest.raises(ValidationError, match="init image"):
        GenerationRequest(mask=Image.new("L", (64, 64)))


def test_request_is_immutable():
    request = GenerationRequest(prompt="a")
    with pytest.raises(Exception):
        request.prompt = "b"  # type: ignore[misc]
    with pytest.raises(TypeError):
        request.extensions["x"] = 1  # type: ignore[index]


hostile = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=50), st.binary(max_size=20), st.lists(st.integers(), max_size=5), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
FIELDS = ["prompt", "negative_prompt", "model", "sampler", "schedule", "zero_terminal_snr", "steps", "cfg_scale", "width",
          "height", "seed", "subseed", "subseed_strength", "batch_size", "batch_count", "init_image", "denoising_strength",
          "resize_mode", "mask", "mask_blur", "invert_mask", "masked_content", "inpaint_area", "inpaint_padding", "outpaint",
          "preview_every", "preview_method", "extensions"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), hostile, max_size=6))
def test_hostile_values_give_a_clear_error_or_a_valid_request(values):
    try:
        request = GenerationRequest(**values)
    except ValidationError as error:
        assert error.field and error.message
    else:
        assert 1 <= request.steps <= 150
