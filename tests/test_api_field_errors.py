"""A bad request gives a 422 that names the field the client actually got wrong."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from engine.errors import ValidationError
from engine.request import GenerationRequest
from engine.settings import Settings
from ui.api import install_api, job_error

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def client():
    """The API on a studio whose queue must never be reached: every body here fails validation first."""
    def never(*args, **kwargs):
        raise AssertionError("an invalid request reached the job queue")

    studio = SimpleNamespace(default_model=lambda: "model-a", registry=SimpleNamespace(get=lambda name: SimpleNamespace(name=name)),
                             presets=SimpleNamespace(list=lambda: []), settings=Settings(), extensions=None,
                             jobs=SimpleNamespace(submit=never))
    app = FastAPI()
    install_api(app, studio)
    return TestClient(app, raise_server_exceptions=False)


def refused(response, field: str, says: str) -> None:
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["field"] == field and says in body["detail"], body


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_lone_surrogate_in_a_prompt_is_a_422_naming_the_prompt(client, field):
    body = ('{"%s": "a cat \\ud800 in a hat", "steps": 3}' % field).encode()  # the escape JSON allows, Python decodes to U+D800
    refused(client.post("/sdapi/v1/txt2img", content=body, headers=JSON), field, "surrogate")


def test_paired_surrogates_are_an_ordinary_emoji():
    assert GenerationRequest(prompt=json.loads('"a \\ud83d\\ude00 cat"')).prompt == "a \U0001F600 cat"


@pytest.mark.parametrize("field, value", [("steps", "true"), ("cfg_scale", "false"), ("width", "true"), ("seed", "true"),
                                          ("batch_size", "true"), ("subseed_strength", "true")])
def test_true_and_false_are_not_numbers(client, field, value):
    refused(client.post("/sdapi/v1/txt2img", content=f'{{"{field}": {value}}}'.encode(), headers=JSON), field, "must be a number")


def test_true_and_false_are_not_numbers_for_img2img_fields(client):
    for field in ("denoising_strength", "mask_blur", "inpainting_fill", "resize_mode", "inpaint_full_res_padding"):
        refused(client.post("/sdapi/v1/img2img", content=f'{{"{field}": true}}'.encode(), headers=JSON), field, "must be a number")


def test_a_malformed_json_body_is_reported_against_the_body(client):
    response = client.post("/sdapi/v1/txt2img", content=b'{"prompt": "a cat",', headers=JSON)
    refused(response, "body", "not valid JSON")
    assert all(error["field"] == "body" for error in response.json()["errors"])


def test_a_1x1_init_image_blames_the_image_not_the_size_the_client_never_sent(engine):
    tiny = Image.new("RGB", (1, 1), (200, 30, 30))
    with pytest.raises(ValidationError) as caught:
        engine.generate(GenerationRequest(model="tiny-sd1", init_image=tiny, steps=2, preview_every=0))
    assert caught.value.field == "init_image" and "1x1" in caught.value.message
    error = job_error(SimpleNamespace(exception=caught.value, error=str(caught.value)))
    assert (error.status, error.field) == (422, "init_images")


def test_a_width_the_client_did_send_is_still_the_field_blamed(engine):
    with pytest.raises(ValidationError) as caught:
        engine.generate(GenerationRequest(model="tiny-sd1", init_image=Image.new("RGB", (1, 1)), width=8, height=64, steps=2,
                                          preview_every=0))
    assert caught.value.field == "width"
