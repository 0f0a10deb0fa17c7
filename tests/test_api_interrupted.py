"""Over the HTTP API: an interrupted image is flagged per image in ``info`` and in its infotext, and A1111's
``save_incomplete_images`` option switches saving such images on and off."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import requests

from _api_fixtures import build_models, make_studio, running_server


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    return make_studio(tmp_path_factory.mktemp("api-interrupted-studio"), build_models(tmp_path_factory.mktemp("api-interrupted-models")))


@pytest.fixture(scope="module")
def server(studio):
    with running_server(studio, api=True) as handle:
        yield handle


def _interrupted_txt2img(server) -> dict:
    outcome: dict = {}

    def long_job():
        outcome["response"] = requests.post(server.url + "/sdapi/v1/txt2img", timeout=120, json={
            "prompt": "x", "steps": 150, "width": 64, "height": 64, "seed": 5, "save_images": True})

    worker = threading.Thread(target=long_job)
    worker.start()
    started = time.monotonic()
    while time.monotonic() - started < 60:
        if requests.get(server.url + "/sdapi/v1/progress", timeout=10).json()["state"]["sampling_step"] > 0:
            break
        time.sleep(0.02)
    assert requests.post(server.url + "/sdapi/v1/interrupt", timeout=10).status_code == 200
    worker.join(60)
    assert outcome["response"].status_code == 200, outcome["response"].text
    return json.loads(outcome["response"].json()["info"])


def _saved(studio) -> list[Path]:
    return sorted(Path(studio.config.outputs_dir).rglob("*.png"))


def test_an_interrupted_image_is_flagged_and_not_saved_unless_the_option_says_so(server, studio):
    options = requests.get(server.url + "/sdapi/v1/options", timeout=10).json()
    assert options["save_incomplete_images"] is False

    info = _interrupted_txt2img(server)
    [stop] = info["stopped_early"]
    assert info["interrupted"] and stop["reason"] == "interrupted" and 0 < stop["step"] < stop["total_steps"] == 150
    assert f"Interrupted at step: {stop['step']}/150" in info["infotexts"][0] and "Steps: 150," in info["infotexts"][0]
    assert _saved(studio) == []

    assert requests.post(server.url + "/sdapi/v1/options", json={"save_incomplete_images": True}, timeout=10).status_code == 200
    assert requests.get(server.url + "/sdapi/v1/options", timeout=10).json()["save_incomplete_images"] is True
    _interrupted_txt2img(server)
    assert len(_saved(studio)) == 1

    bad = requests.post(server.url + "/sdapi/v1/options", json={"save_incomplete_images": "yes"}, timeout=10)
    assert bad.status_code == 422 and "save_incomplete_images" in bad.text


def test_a_finished_image_has_no_stop_flag(server):
    response = requests.post(server.url + "/sdapi/v1/txt2img", timeout=120, json={
        "prompt": "x", "steps": 3, "width": 64, "height": 64})
    info = json.loads(response.json()["info"])
    assert info["stopped_early"] == [None] and not info["interrupted"]
