"""Models are named as A1111 names them, any older spelling still finds them, and a broken model is
marked with its reason and never becomes the default."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest
import torch

from engine import Engine, GenerationRequest, ModelError, ModelRegistry
from engine.settings import Settings
from engine.studio import Studio, StudioConfig
from engine.tiny_models import build_sd1
from tests._checkpoints import copy_model, edit_json, write_single_file

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return build_sd1(tmp_path_factory.mktemp("source") / "sd1", seed=0)


def _registry(models: Path) -> ModelRegistry:
    return ModelRegistry(models, builtin_dir=None, device="cpu")


# -- names ---------------------------------------------------------------------------------------------------
def test_a_folder_with_a_dot_in_its_name_is_picked_by_that_name(tmp_path, source):
    models = tmp_path / "models"
    copy_model(source, models / "Stable-diffusion" / "probe-fused-0.6")
    copy_model(source, models / "Stable-diffusion" / "probe-fused-0.7")
    registry = _registry(models)
    assert sorted(registry.names()) == ["probe-fused-0.6", "probe-fused-0.7"]
    assert registry.get("probe-fused-0.6").path.name == "probe-fused-0.6"
    assert registry.get("probe-fused-0.7 [0123456789]").path.name == "probe-fused-0.7"
    assert registry.load("probe-fused-0.6").entry.name == "probe-fused-0.6"


def test_checkpoints_are_named_by_their_stem_and_folders_by_their_name_and_old_spellings_still_work(tmp_path, source):
    models = tmp_path / "models"
    write_single_file(source, models / "Stable-diffusion" / "sub" / "my.model-v1.5.safetensors")
    copy_model(source, models / "Stable-diffusion" / "folder-model")
    copy_model(source, models / "elsewhere" / "outside")
    registry = _registry(models)
    assert sorted(registry.names()) == ["folder-model", "my.model-v1.5", "outside"]
    assert registry.get("my.model-v1.5").title == "sub/my.model-v1.5.safetensors"  # A1111's title, before the hash
    for spelling, name in [("sub/my.model-v1.5.safetensors [abcdef0123]", "my.model-v1.5"),
                           ("Stable-diffusion/sub/my.model-v1.5.safetensors", "my.model-v1.5"),
                           ("sub_my.model-v1.5", "my.model-v1.5"), ("Stable-diffusion/folder-model", "folder-model"),
                           ("elsewhere/outside", "outside")]:
        assert registry.get(spelling).name == name, spelling


def test_two_models_with_one_name_are_each_named_by_their_path_and_the_short_name_is_refused(tmp_path, source):
    models = tmp_path / "models"
    (models / "Stable-diffusion" / "a").mkdir(parents=True)
    (models / "Stable-diffusion" / "a" / "twin.ckpt").write_bytes(b"never opened")
    copy_model(source, models / "Stable-diffusion" / "b" / "twin")
    copy_model(source, models / "Stable-diffusion" / "single")
    registry = _registry(models)
    assert sorted(registry.names()) == ["Stable-diffusion/a/twin.ckpt", "Stable-diffusion/b/twin", "single"]
    assert registry.get("a/twin.ckpt").name == "Stable-diffusion/a/twin.ckpt"
    assert registry.get("Stable-diffusion/b/twin").path == models / "Stable-diffusion" / "b" / "twin"
    with pytest.raises(ModelError, match="could mean 'Stable-diffusion/a/twin.ckpt' or 'Stable-diffusion/b/twin'"):
        registry.get("twin")


def test_the_infotext_names_the_model_as_a1111_does_however_the_request_spelled_it(tmp_path, source):
    models = tmp_path / "models"
    copy_model(source, models / "Stable-diffusion" / "probe-fused-0.6")
    engine = Engine(_registry(models))
    result = engine.generate(GenerationRequest(prompt="x", model="Stable-diffusion/probe-fused-0.6", steps=2, width=64,
                                               height=64, seed=1, preview_every=0))
    assert "Model: probe-fused-0.6," in result.images[0].infotext
    assert result.request.model == "probe-fused-0.6"


# -- broken models ------------------------------------------------------------------------------------------
def _broken_tree(models: Path, source: Path) -> None:
    """Broken folders that sort before the one good model, so a name-order default would pick them."""
    checkpoints = models / "Stable-diffusion"
    (copy_model(source, checkpoints / "a-corrupt-index") / "model_index.json").write_text("{ not json")
    edit_json(copy_model(source, checkpoints / "b-class-list") / "model_index.json", _class_name=["StableDiffusionPipeline"])
    weights = copy_model(source, checkpoints / "c-truncated-weights") / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    (checkpoints / "d-garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    copy_model(source, checkpoints / "z-good")


def test_broken_models_are_marked_with_their_reason_and_the_default_is_one_that_loads(tmp_path, source):
    models = tmp_path / "models"
    _broken_tree(models, source)
    registry = _registry(models)
    problems = {entry.name: entry.problem for entry in registry.list()}
    assert "not readable JSON" in problems["a-corrupt-index"]
    assert "b-class-list/model_index.json" in problems["b-class-list"] and "_class_name" in problems["b-class-list"]
    assert "corrupt or truncated" in problems["c-truncated-weights"]
    assert "corrupt or truncated" in problems["d-garbage"]
    assert problems["z-good"] is None
    assert registry.default_name() == "z-good"
    result = Engine(registry).generate(GenerationRequest(prompt="x", steps=2, width=64, height=64, seed=1, preview_every=0))
    assert result.request.model == "z-good"


def test_a_class_name_that_is_a_list_is_a_clear_error_naming_the_file_and_key(tmp_path, source):
    models = tmp_path / "models"
    edit_json(copy_model(source, models / "Stable-diffusion" / "listed") / "model_index.json", _class_name=["A", "B"])
    edit_json(copy_model(source, models / "Stable-diffusion" / "listed-unet") / "model_index.json", unet=[["diffusers"], "x"])
    registry = _registry(models)
    with pytest.raises(ModelError, match=r"listed/model_index\.json: the key _class_name must be .* not a list"):
        registry.load("listed")
    with pytest.raises(ModelError, match=r"listed-unet/model_index\.json: the key unet must be \[library, class name\]"):
        registry.load("listed-unet")


def test_a_model_that_fails_to_load_stops_being_the_default(tmp_path, source, monkeypatch):
    models = tmp_path / "models"
    copy_model(source, models / "Stable-diffusion" / "a-fails-late")
    copy_model(source, models / "Stable-diffusion" / "b-good")
    registry = _registry(models)
    assert registry.default_name() == "a-fails-late"  # its files pass every check made without loading
    edit_json(models / "Stable-diffusion" / "a-fails-late" / "unet" / "config.json", block_out_channels=[32, 64])
    with pytest.raises(ModelError):
        registry.load(None)
    assert registry.get("a-fails-late").problem and registry.default_name() == "b-good"
    assert registry.load(None).entry.name == "b-good"


def test_a_broken_default_model_in_settings_is_passed_over(tmp_path, source):
    models = tmp_path / "models"
    _broken_tree(models, source)
    config = StudioConfig(models_dir=models, outputs_dir=tmp_path / "outputs", user_dir=tmp_path / "user", builtin_models_dir=None)
    studio = Studio(config)
    studio.update_settings(Settings(default_model="a-corrupt-index"))
    assert studio.default_model() == "z-good"
    studio.update_settings(Settings(default_model="Stable-diffusion/z-good"))  # an older spelling in settings.json
    assert studio.default_model() == "z-good"


def test_with_only_broken_models_the_studio_still_starts_on_a_placeholder(tmp_path, source):
    models = tmp_path / "models"
    (copy_model(source, models / "Stable-diffusion" / "only-broken") / "model_index.json").write_text("[]")
    studio = Studio(StudioConfig(models_dir=models, outputs_dir=tmp_path / "o", user_dir=tmp_path / "u", builtin_models_dir=None))
    assert studio.registry.get(studio.default_model()).untrained
    assert "must be a JSON object" in studio.registry.get("only-broken").problem


def test_the_dropdown_labels_a_broken_model_and_its_note_says_why(tmp_path, source):
    from types import SimpleNamespace

    from ui.model_info import model_choices, model_note

    models = tmp_path / "models"
    _broken_tree(models, source)
    studio = SimpleNamespace(registry=_registry(models))
    labels = dict((value, label) for label, value in model_choices(studio))
    assert labels["z-good"] == "z-good" and "broken" in labels["b-class-list"]
    assert "_class_name" in model_note(studio.registry.get("b-class-list")) and model_note(studio.registry.get("z-good")) == ""
