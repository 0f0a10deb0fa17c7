"""A hand-edited settings.json never stops the studio from starting: a bad value goes back to its default, with a warning."""
from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from engine.outputs import DEFAULT_PATTERN
from engine.settings import SettingsStore
from engine.studio import Studio, StudioConfig


def _config(tmp_path, models_dir) -> StudioConfig:
    return StudioConfig(models_dir=models_dir, outputs_dir=tmp_path / "outputs", user_dir=tmp_path / "user", builtin_models_dir=None)


@pytest.mark.parametrize("pattern", ["../escape/{index}", "{seed:/>8}", "{nope}", "{", "", 7])
def test_a_bad_output_pattern_is_reset_with_a_warning_and_the_studio_starts(tmp_path, tiny_models_dir, caplog, pattern):
    config = _config(tmp_path, tiny_models_dir)
    config.user_dir.mkdir()
    (config.user_dir / "settings.json").write_text(json.dumps({"output_pattern": pattern, "preview_every": 5}))
    with caplog.at_level(logging.WARNING, logger="sfumato"):
        studio = Studio(config)
    assert studio.settings.output_pattern == DEFAULT_PATTERN
    assert studio.settings.preview_every == 5  # the good settings are kept
    warnings = [record.getMessage() for record in caplog.records if "output_pattern" in record.getMessage()]
    assert warnings and "default" in warnings[0]
    assert studio.settings_store.warnings == warnings
    saved = studio.writer.save(Image.new("RGB", (8, 8)), None, "txt2img", 3)
    assert saved.resolve().is_relative_to(config.outputs_dir.resolve())


def test_each_bad_value_is_reset_on_its_own(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"preview_every": -4, "preview_method": "full", "device": "quantum", "save_outputs": "no",
                                "output_pattern": "{mode}/{seed}", "unknown_key": 1}))
    store = SettingsStore(path)
    settings = store.load()
    assert (settings.preview_every, settings.device, settings.save_outputs) == (1, "auto", True)
    assert (settings.preview_method, settings.output_pattern) == ("full", "{mode}/{seed}")
    assert [warning.split(": ")[1].split(" ")[0] for warning in store.warnings] == ["preview_every", "device", "save_outputs"]
