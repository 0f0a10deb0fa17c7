"""Studio start-up: works with no models at all, and persists settings."""
from __future__ import annotations

from engine.settings import Settings
from engine.studio import Studio, StudioConfig


def config(tmp_path, builtin=None):
    return StudioConfig(models_dir=tmp_path / "models", outputs_dir=tmp_path / "outputs", user_dir=tmp_path / "user",
                        builtin_models_dir=builtin)


def test_with_no_model_anywhere_an_untrained_placeholder_is_built_and_labelled(tmp_path):
    studio = Studio(config(tmp_path))
    entry = studio.registry.get(studio.default_model())
    assert entry.untrained and "untrained" in entry.name
    from engine import GenerationRequest

    result = studio.engine.generate(GenerationRequest(prompt="x", steps=2, width=64, height=64))
    assert result.images[0].image.size == (64, 64)


def test_settings_survive_a_restart(tmp_path, tiny_models_dir):
    cfg = config(tmp_path)
    cfg.models_dir = tiny_models_dir
    first = Studio(cfg)
    first.update_settings(Settings(preview_every=3, preview_method="full", output_pattern="{mode}/{seed}",
                                   extensions={"controlnet": {"units": 2}}))
    second = Studio(cfg)
    assert (second.settings.preview_every, second.settings.preview_method, second.settings.extensions) == (3, "full", {"controlnet": {"units": 2}})
    assert second.settings.output_pattern == "{mode}/{seed}"
