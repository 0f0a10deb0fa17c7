"""Over HTTP: models carry A1111's names, either spelling picks them, and a broken model is listed with its
reason and never answers for requests that name no model."""
from __future__ import annotations

import json

import pytest
import requests

from _api_fixtures import running_server

FAST = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 5}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from engine.studio import Studio, StudioConfig
    from engine.tiny_models import build_sd1

    root = tmp_path_factory.mktemp("api-names")
    checkpoints = root / "models" / "Stable-diffusion"
    build_sd1(checkpoints / "probe-fused-0.6", seed=0)
    corrupt = build_sd1(checkpoints / "a-corrupt", seed=0)  # sorts first: a name-order default would pick it
    (corrupt / "model_index.json").write_text("{ truncated")
    listed = build_sd1(checkpoints / "b-class-list", seed=0)
    index = json.loads((listed / "model_index.json").read_text())
    (listed / "model_index.json").write_text(json.dumps({**index, "_class_name": ["StableDiffusionPipeline"]}))
    studio = Studio(StudioConfig(models_dir=root / "models", outputs_dir=root / "outputs", user_dir=root / "user",
                                 extensions_dir=root / "no-extensions", builtin_models_dir=None, device="cpu", dtype="float32"))
    with running_server(studio, api=True) as handle:
        yield handle


def _txt2img(server, **extra) -> requests.Response:
    return requests.post(server.url + "/sdapi/v1/txt2img", json={**FAST, **extra}, timeout=120)


def test_a_request_without_a_model_uses_one_that_loads(server):
    response = _txt2img(server)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["sd_model_name"] == "probe-fused-0.6"
    assert "Model: probe-fused-0.6," in info["infotexts"][0]


def test_the_model_list_uses_a1111_names_and_marks_broken_models_with_their_reason(server):
    items = {item["model_name"]: item for item in requests.get(server.url + "/sdapi/v1/sd-models", timeout=10).json()}
    assert set(items) == {"probe-fused-0.6", "a-corrupt", "b-class-list"}
    assert items["probe-fused-0.6"]["broken"] is None and items["probe-fused-0.6"]["title"].startswith("probe-fused-0.6")
    assert "not readable JSON" in items["a-corrupt"]["broken"]
    assert "b-class-list/model_index.json" in items["b-class-list"]["broken"] and "_class_name" in items["b-class-list"]["broken"]


@pytest.mark.parametrize("spelling", ["probe-fused-0.6", "Stable-diffusion/probe-fused-0.6", "probe-fused-0.6 [0123456789]"])
def test_override_settings_accepts_the_name_in_either_form(server, spelling):
    response = _txt2img(server, override_settings={"sd_model_checkpoint": spelling})
    assert response.status_code == 200, response.text
    assert json.loads(response.json()["info"])["sd_model_name"] == "probe-fused-0.6"


def test_asking_for_a_broken_model_names_the_problem(server):
    response = _txt2img(server, override_settings={"sd_model_checkpoint": "b-class-list"})
    assert response.status_code in (422, 500) and "_class_name" in response.text and "unhashable" not in response.text
