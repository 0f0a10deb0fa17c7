"""POST /sdapi/v1/options says which keys it did not apply, and A1111 clients still get their 200."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from engine.settings import Settings
from ui.api import install_api


@pytest.fixture()
def studio():
    studio = SimpleNamespace(settings=Settings(), config=SimpleNamespace(outputs_dir=Path("outputs")), extensions=None,
                             default_model=lambda: "model-a",
                             registry=SimpleNamespace(get=lambda name: SimpleNamespace(name=name, title=name), loaded_names=lambda: [],
                                                     load=lambda name: None))
    studio.update_settings = lambda settings: setattr(studio, "settings", settings)
    return studio


@pytest.fixture()
def client(studio):
    app = FastAPI()
    install_api(app, studio)
    return TestClient(app)


def test_keys_sfumato_has_no_setting_for_are_named_as_not_applied(client, studio):
    before = studio.settings
    response = client.post("/sdapi/v1/options", json={"outdir_samples": "/elsewhere", "samples_filename_pattern": "[seed]"})
    assert response.status_code == 200
    body = response.json()
    assert body["ignored"] == ["outdir_samples", "samples_filename_pattern"] and body["applied"] == []
    assert "not applied: outdir_samples, samples_filename_pattern" in body["detail"]
    assert studio.settings == before


def test_applied_keys_still_apply_beside_ignored_ones(client, studio):
    body = client.post("/sdapi/v1/options", json={"show_progress_every_n_steps": 3, "samples_filename_pattern": "[seed]"}).json()
    assert body["applied"] == ["show_progress_every_n_steps"] and body["ignored"] == ["samples_filename_pattern"]
    assert studio.settings.preview_every == 3


def test_nothing_is_reported_ignored_when_everything_applied(client, studio):
    body = client.post("/sdapi/v1/options", json={"samples_save": False}).json()
    assert body == {"applied": ["samples_save"], "ignored": []}
    assert studio.settings.save_outputs is False


def test_posting_back_what_get_returned_ignores_nothing(client, studio):
    studio.settings = replace(studio.settings, preview_every=2)
    options = client.get("/sdapi/v1/options").json()
    body = client.post("/sdapi/v1/options", json=options).json()
    assert body["ignored"] == [] and "detail" not in body
    changed = client.post("/sdapi/v1/options", json={**options, "samples_format": "jpg"}).json()
    assert changed["ignored"] == ["samples_format"]
