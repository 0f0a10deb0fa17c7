"""A1111's upscaler lists and Extras endpoints, on a studio whose models folder holds two tiny upscaler files."""
from __future__ import annotations

import base64
import io

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from _api_fixtures import check_against_schema, response_schema
from _upscaler_files import write_upscalers

torch.set_num_threads(1)
V1 = "/sdapi/v1"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from engine.studio import Studio, StudioConfig
    from ui.api import install_api

    root = tmp_path_factory.mktemp("extras-api")
    paths = write_upscalers(root / "models")
    (root / "models" / "ESRGAN" / "broken.pth").write_bytes(b"not a pickle")
    studio = Studio(StudioConfig(models_dir=root / "models", outputs_dir=root / "outputs", user_dir=root / "user",
                                 extensions_dir=root / "no-extensions", device="cpu", dtype="float32"))
    app = FastAPI()
    install_api(app, studio)
    client = TestClient(app, raise_server_exceptions=False)
    client.paths, client.outputs = paths, root / "outputs"
    return client


def _b64_png(size=(24, 16), infotext: str | None = None) -> str:
    info = PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    buffer = io.BytesIO()
    Image.new("RGB", size, (180, 60, 20)).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _image(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def test_upscalers_are_listed_in_a1111s_shape(client):
    listed = client.get(f"{V1}/upscalers").json()
    check_against_schema(listed, response_schema(client.get("/openapi.json").json(), f"{V1}/upscalers", "get", 200))
    assert [item["name"] for item in listed] == ["None", "Lanczos", "Nearest", "4x-tiny-esrgan",
                                                     "2x-legacy-esrgan", "2x-tiny-compact"]
    assert listed[0] == {"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": None}
    assert listed[3] == {"name": "4x-tiny-esrgan", "model_name": "4x-tiny-esrgan",
                         "model_path": str(client.paths["4x-tiny-esrgan"]), "model_url": None, "scale": 4.0}
    assert listed[4]["scale"] == listed[5]["scale"] == 2.0


def test_latent_upscale_modes_are_a1111s(client):
    assert [item["name"] for item in client.get(f"{V1}/latent-upscale-modes").json()] == [
        "Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)",
        "Latent (nearest-exact)"]


def test_single_image_round_trip_keeps_the_infotext_and_adds_the_record(client):
    source = "a red field\nSteps: 4, Seed: 77, Size: 24x16"
    response = client.post(f"{V1}/extra-single-image", json={
        "image": _b64_png(infotext=source), "upscaler_1": "4x-tiny-esrgan", "upscaling_resize": 2,
        "upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 0.5})
    assert response.status_code == 200, response.text
    body = response.json()
    check_against_schema(body, response_schema(client.get("/openapi.json").json(), f"{V1}/extra-single-image", "post", 200))
    record = "Postprocess upscale by: 2.0, Postprocess upscaler: 4x-tiny-esrgan, Postprocess upscaler 2: Lanczos"
    assert body["html_info"] == f"<p>{record}</p>"
    image = _image(body["image"])
    assert image.size == (48, 32)
    assert image.text == {"parameters": source, "postprocessing": record}
    assert not client.outputs.exists()  # A1111's API does not save


def test_batch_scales_each_image_to_the_size(client):
    response = client.post(f"{V1}/extra-batch-images", json={
        "imageList": [{"data": _b64_png((24, 16)), "name": "a.png"}, {"data": _b64_png((16, 24)), "name": "b.png"}],
        "resize_mode": 1, "upscaling_resize_w": 40, "upscaling_resize_h": 40, "upscaler_1": "2x-tiny-compact"})
    assert response.status_code == 200, response.text
    assert [_image(text).size for text in response.json()["images"]] == [(40, 40), (40, 40)]


@pytest.mark.parametrize("body, field, says", [
    ({"upscaler_1": "4x-tiny-esrgn"}, "upscaler_1", "did you mean 4x-tiny-esrgan"),
    ({"upscaler_1": "Lanczos", "upscaler_2": "broken"}, "upscaler_2", "broken.pth cannot be read"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 9}, "upscaling_resize", "from 1 to 8"),
    ({"upscaler_1": "Lanczos", "extras_upscaler_2_visibility": 1.5}, "extras_upscaler_2_visibility", "from 0 to 1"),
    ({"upscaler_1": "Lanczos", "resize_mode": 2}, "resize_mode", "scale by"),
    ({"upscaler_1": "Lanczos", "gfpgan_visibility": 0.5}, "gfpgan_visibility", "no face restorers"),
    ({"upscaler_1": "Lanczos", "image": "!!!"}, "image", "base64"),
])
def test_bad_requests_are_422s_naming_the_field(client, body, field, says):
    response = client.post(f"{V1}/extra-single-image", json={"image": _b64_png(), **body})
    assert response.status_code == 422, response.text
    check_against_schema(response.json(), response_schema(client.get("/openapi.json").json(), f"{V1}/extra-single-image", "post", 422))
    assert response.json()["field"] == field and says in response.json()["detail"]
