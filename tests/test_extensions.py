"""Extension discovery, state and the engine-facing host, with dummy extensions in a temporary folder."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine import GenerationError, GenerationRequest, ValidationError
from engine.extensions import ExtensionManager

GOOD = '''
from engine.errors import ValidationError
from engine.extensions import Extension, ExtensionField

calls = []


class Hook:
    def __init__(self, settings):
        self.settings = settings

    def unet_kwargs(self, point, latent_model_input, encoder_hidden_states, added_cond_kwargs):
        return {}


def validate(raw):
    if not isinstance(raw, dict) or not isinstance(raw.get("level", 0), int):
        raise ValidationError("level", "must be a whole number")
    return {"level": raw.get("level", 0)}


def setup(env):
    calls.append(env)


def step_hooks(context, settings):
    if settings["level"] == 13:
        raise RuntimeError("unlucky")
    return [Hook(settings)]


EXTENSION = Extension(
    name="{name}", title="Good", description="a dummy",
    fields=(ExtensionField("level", 0, "how much"),),
    validate=validate, step_hooks=step_hooks, setup=setup,
    infotext_fields=lambda settings: {"Good level": str(settings["level"])},
    parse_infotext=lambda params: {"level": int(params["Good level"])} if "Good level" in params else None,
    ui={"txt2img": lambda tab: ([], lambda values: None)},
)
'''


def good_source(name: str) -> str:
    return GOOD.replace("{name}", name)


def write_extension(root: Path, name: str, source: str, extra: dict[str, str] | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(textwrap.dedent(source))
    for filename, text in (extra or {}).items():
        (folder / filename).write_text(text)
    return folder


@pytest.fixture
def ext_root(tmp_path) -> Path:
    root = tmp_path / "extensions"
    write_extension(root, "good", good_source("good"))
    write_extension(root, "broken", "raise RuntimeError('boom at import')\n")
    write_extension(root, "undeclared", "X = 1\n")
    write_extension(root, "misnamed", good_source("something-else"))
    write_extension(root, "setup-fails", good_source("setup-fails").replace("calls.append(env)", "raise OSError('no disk')"))
    (root / "no-init").mkdir()
    (root / "README.md").write_text("not an extension")
    return root


def manager_for(root: Path, tmp_path: Path) -> ExtensionManager:
    return ExtensionManager(root, tmp_path / "state" / "extensions.json", models_dir=tmp_path / "models", builtin_dir=None)


def test_broken_extensions_are_listed_with_the_reason_and_the_good_one_loads(ext_root, tmp_path):
    manager = manager_for(ext_root, tmp_path)
    assert list(manager.loaded) == ["good"]
    failed = manager.failed
    assert set(failed) == {"broken", "undeclared", "misnamed", "setup-fails", "no-init"}
    assert "RuntimeError: boom at import" in failed["broken"]
    assert "EXTENSION" in failed["undeclared"]
    assert "something-else" in failed["misnamed"]
    assert "OSError: no disk" in failed["setup-fails"]
    assert "__init__.py" in failed["no-init"]
    states = {row.name: row.state for row in manager.statuses()}
    assert states["good"] == "enabled" and states["broken"] == "failed"


def test_setup_receives_the_folders(ext_root, tmp_path):
    manager = manager_for(ext_root, tmp_path)
    env = manager.module("good").calls[0]
    assert env.name == "good" and env.folder == ext_root / "good"
    assert env.models_dir == tmp_path / "models" and env.user_dir == tmp_path / "state"


def test_disabling_persists_across_managers_and_a_disabled_extension_is_not_imported(ext_root, tmp_path):
    manager = manager_for(ext_root, tmp_path)
    manager.set_enabled("good", False)
    assert "good" not in manager.loaded and manager.disabled == ["good"]
    assert json.loads((tmp_path / "state" / "extensions.json").read_text()) == {"disabled": ["good"]}

    again = manager_for(ext_root, tmp_path)
    assert "good" not in again.loaded and again.disabled == ["good"]
    with pytest.raises(ValidationError):
        again.module("good")
    again.set_enabled("good", True)  # imports it now
    assert "good" in again.loaded
    assert "good" in manager_for(ext_root, tmp_path).loaded


def test_disabling_a_broken_extension_hides_its_failure(ext_root, tmp_path):
    manager = manager_for(ext_root, tmp_path)
    manager.set_enabled("broken", False)
    assert "broken" not in manager_for(ext_root, tmp_path).failed


@pytest.mark.parametrize("name", ["../good", "good/../../x", ".hidden", "/etc", "", "nope"])
def test_names_that_escape_or_do_not_exist_are_refused(ext_root, tmp_path, name):
    manager = manager_for(ext_root, tmp_path)
    with pytest.raises(ValidationError) as error:
        manager.set_enabled(name, False)
    assert error.value.field == "extension"


def test_state_file_names_that_escape_are_ignored(ext_root, tmp_path):
    state = tmp_path / "state" / "extensions.json"
    state.parent.mkdir()
    state.write_text(json.dumps({"disabled": ["../../etc", "good", 7]}))
    manager = manager_for(ext_root, tmp_path)
    assert manager.disabled == ["good"]


def test_unreadable_state_file_means_everything_enabled(ext_root, tmp_path):
    state = tmp_path / "state" / "extensions.json"
    state.parent.mkdir()
    state.write_text("{not json")
    assert "good" in manager_for(ext_root, tmp_path).loaded


def test_a_folder_linking_outside_is_not_imported(ext_root, tmp_path):
    outside = write_extension(tmp_path / "elsewhere", "linked", good_source("linked"))
    (ext_root / "linked").symlink_to(outside, target_is_directory=True)
    manager = manager_for(ext_root, tmp_path)
    assert "linked" not in manager.loaded and "outside" in manager.failed["linked"]


def test_missing_extensions_folder_is_fine(tmp_path):
    manager = manager_for(tmp_path / "none-here", tmp_path)
    assert manager.loaded == {} and manager.failed == {}


def test_two_managers_keep_their_own_module_state(ext_root, tmp_path):
    first, second = manager_for(ext_root, tmp_path), manager_for(ext_root, tmp_path)
    assert first.module("good") is not second.module("good")
    assert len(first.module("good").calls) == 1 and len(second.module("good").calls) == 1


def context_for(**extensions):
    return SimpleNamespace(request=GenerationRequest(extensions=extensions))


def test_host_validates_raw_settings_and_names_the_field(ext_root, tmp_path):
    manager = manager_for(ext_root, tmp_path)
    hooks = manager.step_hooks(context_for(good={"level": 3}))
    assert [hook.settings for hook in hooks] == [{"level": 3}]
    with pytest.raises(ValidationError) as error:
        manager.step_hooks(context_for(good={"level": "high"}))
    assert error.value.field == "extensions.good.level"
    assert manager.validate("good", {"level": 2}) == {"level": 2}


def test_requests_without_settings_or_for_disabled_extensions_get_no_hooks(ext_root, tmp_path):
    manager = manager_for(ext_root, tmp_path)
    assert manager.step_hooks(context_for()) == []
    manager.set_enabled("good", False)
    assert manager.step_hooks(context_for(good={"level": 3})) == []
    assert manager.infotext_fields(GenerationRequest(extensions={"good": {"level": 3}})) == {}


def test_an_extension_crashing_at_generation_reports_a_generation_error(ext_root, tmp_path):
    manager = manager_for(ext_root, tmp_path)
    with pytest.raises(GenerationError, match="extension good failed: RuntimeError: unlucky"):
        manager.step_hooks(context_for(good={"level": 13}))


def test_infotext_api_args_and_ui_builders_go_through_the_declaration(ext_root, tmp_path):
    manager = manager_for(ext_root, tmp_path)
    assert manager.infotext_fields(GenerationRequest(extensions={"good": {"level": 4}})) == {"Good level": "4"}
    assert manager.parse_infotext({"Good level": "4", "Steps": "20"}) == {"good": {"level": 4}}
    assert manager.api_args("good", {"level": 5}) == {"level": 5}  # no api_args declared: validate
    assert [name for name, _ in manager.ui_builders("txt2img")] == ["good"]
    assert manager.ui_builders("img2img") == []
    assert manager.names() == ["good"]


def test_unknown_extension_name_in_validate_is_a_validation_error(ext_root, tmp_path):
    with pytest.raises(ValidationError, match="no enabled extension named 'nope'"):
        manager_for(ext_root, tmp_path).validate("nope", {})


def test_the_shipped_extensions_all_load(tmp_path):
    repo = Path(__file__).resolve().parent.parent
    manager = ExtensionManager(repo / "extensions", tmp_path / "ext.json", models_dir=tmp_path, builtin_dir=None)
    assert manager.failed == {}
    assert "controlnet" in manager.loaded
