"""Presets: validated in full, stored safely, applied like A1111 styles, imported from styles.csv."""
from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.sampling import table as samplers
from engine.errors import SfumatoError, ValidationError
from engine.presets import (
    FIELD_TYPES,
    Preset,
    PresetError,
    PresetStore,
    apply_preset,
    merge_prompt,
    preset_filename,
    validate_preset,
)
from engine.request import GenerationRequest

SHIPPED = Path(__file__).resolve().parent.parent / "presets"


@pytest.fixture(autouse=True, scope="module")
def extension_fields(tmp_path_factory):
    """The shipped extensions loaded, so their preset fields (ControlNet's units) are declared, as in the app."""
    from engine.extensions import ExtensionManager

    ExtensionManager(SHIPPED.parent / "extensions", tmp_path_factory.mktemp("extensions") / "state.json")


@pytest.fixture
def store(tmp_path):
    builtin = tmp_path / "builtin"
    builtin.mkdir()
    (builtin / "draft.json").write_text(json.dumps({"name": "Draft", "description": "quick", "fields": {"steps": 8}}))
    return PresetStore(builtin, tmp_path / "user")


def test_valid_preset_is_accepted_and_sampler_names_made_canonical():
    preset = validate_preset({"name": "Mine", "description": "d", "fields": {"sampler": "dpm++ 2m karras", "steps": 30, "cfg_scale": 6.5}})
    assert preset == Preset("Mine", "d", {"sampler": "DPM++ 2M", "schedule": "Karras", "steps": 30, "cfg_scale": 6.5})


def test_all_problems_are_reported_by_name_in_one_error():
    with pytest.raises(PresetError) as error:
        validate_preset({"name": "", "colour": "red", "fields": {"steps": "20", "bogus": 1, "cfg_scale": 99, "zero_terminal_snr": 1, "controlnet": [1]}})
    named = {field for field, _ in error.value.problems}
    assert named == {"name", "colour", "fields.steps", "fields.bogus", "fields.cfg_scale", "fields.zero_terminal_snr", "fields.controlnet"}
    assert isinstance(error.value, ValidationError)
    for name in ("fields.steps", "fields.bogus", "fields.cfg_scale"):
        assert name in str(error.value)


def test_range_errors_come_from_the_request_rules():
    with pytest.raises(ValidationError) as error:
        validate_preset({"name": "x", "fields": {"width": 100}})
    assert error.value.field == "fields.width" and "multiple of 8" in error.value.message


def test_sampler_and_schedule_are_checked_together(monkeypatch):
    assert validate_preset({"name": "x", "fields": {"sampler": "Euler a", "schedule": "Karras"}})  # A1111 offers it
    real = samplers.unsupported_reason
    monkeypatch.setattr(samplers, "unsupported_reason", lambda sampler, schedule, zero_snr=False: (
        "not available in this build" if (sampler, schedule) == ("Euler a", "Karras") else real(sampler, schedule, zero_snr)))
    with pytest.raises(ValidationError) as error:
        validate_preset({"name": "x", "fields": {"sampler": "Euler a", "schedule": "Karras"}})
    assert error.value.field == "fields.schedule"


def test_booleans_are_not_numbers():
    with pytest.raises(ValidationError):
        validate_preset({"name": "x", "fields": {"steps": True}})


def test_every_request_field_a_preset_sets_is_a_real_request_field():
    assert set(FIELD_TYPES) - {"controlnet"} <= set(GenerationRequest.field_names())


def test_prompt_template_merges_like_a1111_styles():
    assert merge_prompt("{prompt}, oil painting", "a cat") == "a cat, oil painting"
    assert merge_prompt("oil painting", "a cat ") == "a cat, oil painting"
    assert merge_prompt("oil painting", "") == "oil painting"


def test_apply_merges_prompts_and_replaces_other_fields_without_touching_current():
    preset = validate_preset({"name": "P", "fields": {"prompt": "masterpiece, {prompt}", "negative_prompt": "blurry", "steps": 30, "controlnet": [{"module": "canny"}]}})
    current = {"prompt": "a cat", "negative_prompt": "lowres", "steps": 20, "seed": 5}
    result = apply_preset(preset, current)
    assert result == {"prompt": "masterpiece, a cat", "negative_prompt": "lowres, blurry", "steps": 30, "seed": 5, "controlnet": [{"module": "canny"}]}
    assert current == {"prompt": "a cat", "negative_prompt": "lowres", "steps": 20, "seed": 5}


def test_apply_resets_a_schedule_the_new_sampler_cannot_use(monkeypatch):
    preset = validate_preset({"name": "E", "fields": {"sampler": "Euler a"}})
    real = samplers.unsupported_reason
    monkeypatch.setattr(samplers, "unsupported_reason", lambda sampler, schedule, zero_snr=False: (
        "not available in this build" if (sampler, schedule) == ("Euler a", "Karras") else real(sampler, schedule, zero_snr)))
    assert apply_preset(preset, {"sampler": "DPM++ 2M", "schedule": "Karras"})["schedule"] == "Automatic"
    assert apply_preset(preset, {"sampler": "DPM++ 2M", "schedule": "Uniform"})["schedule"] == "Uniform"


def test_user_presets_override_builtins_and_builtins_cannot_be_deleted(store):
    assert [preset.name for preset in store.list()] == ["Draft"] and store.get("Draft").builtin
    store.save(Preset("Draft", "my own", {"steps": 12}))
    assert store.get("Draft").fields == {"steps": 12} and not store.get("Draft").builtin
    store.delete("Draft")  # removes the override; the built-in comes back
    assert store.get("Draft").fields == {"steps": 8}
    with pytest.raises(ValidationError):
        store.delete("Draft")
    with pytest.raises(ValidationError):
        store.get("Nope")


def test_export_then_import_round_trips(store, tmp_path):
    store.save(Preset("Portrait ☃", "tall", {"width": 512, "height": 768, "prompt": "{prompt}, portrait"}))
    data = store.export("Portrait ☃")
    other = PresetStore(tmp_path / "none", tmp_path / "other")
    assert other.import_bytes(data) == store.get("Portrait ☃")
    assert other.get("Portrait ☃").fields["height"] == 768


def test_preset_names_map_to_safe_distinct_file_names():
    assert preset_filename("Fast draft") == "Fast draft.json"
    assert preset_filename("a:b") != preset_filename("a*b")
    for bad in ("..", "a/b", "a\\b", "/abs", "nul\x00", "", " padded "):
        with pytest.raises(ValidationError):
            preset_filename(bad)


def test_broken_user_file_is_reported_and_skipped(store):
    store.user_dir.mkdir()
    (store.user_dir / "broken.json").write_text("{not json")
    assert [preset.name for preset in store.list()] == ["Draft"]
    assert store.problems and "broken.json" in store.problems[0]


def test_hand_named_user_file_is_found_for_save_and_delete(store):
    store.user_dir.mkdir()
    (store.user_dir / "whatever.json").write_text(json.dumps({"name": "Mine", "fields": {"steps": 3}}))
    store.save(Preset("Mine", "", {"steps": 4}))
    assert [path.name for path in store.user_dir.iterdir()] == ["whatever.json"]
    store.delete("Mine")
    assert list(store.user_dir.iterdir()) == []


def test_styles_csv_imports_with_placeholders_kept(store):
    text = 'name,prompt,negative_prompt\nNone,,\nOil,"{prompt}, oil painting, thick",blurry\nNeg only,,"lowres, bad"\n'
    presets = store.import_styles_csv(text)
    assert [preset.name for preset in presets] == ["Oil", "Neg only"]
    assert store.get("Oil").fields == {"prompt": "{prompt}, oil painting, thick", "negative_prompt": "blurry"}
    assert store.get("Neg only").fields == {"negative_prompt": "lowres, bad"}


def test_styles_csv_problems_name_rows_and_nothing_is_saved(store):
    text = "name,prompt,negative_prompt\nGood,nice,\n,no name,\nGood,again,\nEmpty,,\nbad/name,x,\n"
    with pytest.raises(PresetError) as error:
        store.import_styles_csv(text)
    rows = {field.split()[1] for field, _ in error.value.problems}
    assert rows == {"3", "4", "5", "6"}
    assert not store.user_dir.exists() or list(store.user_dir.iterdir()) == []


def test_styles_csv_without_header_is_refused(store):
    with pytest.raises(ValidationError) as error:
        store.import_styles_csv("just,some,values\n")
    assert error.value.field == "styles_csv"


def test_shipped_presets_are_valid_and_described():
    store = PresetStore(SHIPPED, SHIPPED / "no-such-user-dir")
    presets = store.list()
    assert store.problems == []
    names = {preset.name for preset in presets}
    assert {"Fast draft", "Quality", "Square", "Portrait", "Landscape", "Demo square 64", "Demo portrait 64x96",
            "Demo landscape 96x64", "Euler a", "DPM++ 2M Karras", "DPM++ SDE Karras", "UniPC", "DDIM zero-SNR"} <= names
    assert all(len(preset.description) > 20 for preset in presets)
    assert store.get("DDIM zero-SNR").fields["zero_terminal_snr"] is True
    assert (store.get("Demo portrait 64x96").fields["width"], store.get("Demo portrait 64x96").fields["height"]) == (64, 96)
    for preset in presets:  # each one makes a valid request on its own
        GenerationRequest(**{key: value for key, value in preset.fields.items() if key != "controlnet"})


# --- hostile input -------------------------------------------------------------

hostile_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**80), 2**80), st.floats(), st.text(max_size=30),
    st.sampled_from(["..", "../../etc/passwd", "/abs", "a\\b", "nul\x00", "C:\\x", "{prompt}", "\ud800", "Euler a", "Karras", "x" * 25_000]),
)
hostile_json = st.recursive(hostile_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)
field_names = st.one_of(st.sampled_from(sorted(FIELD_TYPES)), st.text(max_size=10))
plausible_values = {
    "prompt": st.text(max_size=30), "negative_prompt": st.text(max_size=30), "model": st.text(max_size=10),
    "sampler": st.sampled_from(samplers.sampler_names() + ["DPM++ 2M Karras", "Warp"]),
    "schedule": st.sampled_from(samplers.schedule_names() + ["Wobbly"]),
    "steps": st.integers(-5, 200), "cfg_scale": st.floats(-1, 40), "width": st.integers(0, 5000), "height": st.integers(0, 5000),
    "seed": st.integers(-3, 2**33), "batch_size": st.integers(0, 10), "batch_count": st.integers(0, 120),
    "denoising_strength": st.floats(-0.5, 1.5), "zero_terminal_snr": st.booleans(),
    "controlnet": st.lists(st.dictionaries(st.text(max_size=5), st.integers()), max_size=2),
}
plausible_fields = st.lists(st.sampled_from(sorted(plausible_values)), unique=True, max_size=6).flatmap(
    lambda keys: st.fixed_dictionaries({key: st.one_of(plausible_values[key], plausible_values[key], plausible_values[key], hostile_scalar) for key in keys})
)
presetish = st.one_of(
    st.fixed_dictionaries(
        {"name": hostile_scalar, "fields": st.dictionaries(field_names, hostile_json, max_size=6)},
        optional={"description": hostile_scalar, "extra": hostile_json},
    ),
    st.fixed_dictionaries({"name": st.one_of(st.text(min_size=1, max_size=20), hostile_scalar), "fields": plausible_fields}, optional={"description": st.text(max_size=20)}),
    st.fixed_dictionaries({
        "name": st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zs")), min_size=1, max_size=20),
        "fields": st.lists(st.sampled_from(sorted(plausible_values)), unique=True, max_size=4).flatmap(
            lambda keys: st.fixed_dictionaries({key: plausible_values[key] for key in keys})
        ),
    }),
)


def _assert_nothing_outside(base: Path, allowed: Path) -> None:
    for path in base.rglob("*"):
        if path.is_file():
            assert path.resolve().is_relative_to(allowed.resolve()), path
            assert not path.name.endswith(".tmp")


@settings(deadline=None, max_examples=100)
@given(data=st.one_of(presetish, hostile_json))
def test_hostile_presets_validate_or_raise_validation_error(data):
    try:
        preset = validate_preset(data)
    except ValidationError:
        return
    assert isinstance(preset, Preset)
    json.dumps(preset.to_json(), ensure_ascii=False).encode("utf-8")


@settings(deadline=None, max_examples=100)
@given(data=st.one_of(
    presetish.map(lambda value: json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    hostile_json.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=100),
    st.just(b"[" * 100_000),
))
def test_hostile_imports_save_a_valid_preset_or_raise_and_stay_in_user_dir(data):
    with tempfile.TemporaryDirectory() as temp:
        base = Path(temp)
        store = PresetStore(base / "builtin", base / "user")
        try:
            preset = store.import_bytes(data)
        except SfumatoError:
            pass
        else:
            assert store.get(preset.name) == preset
        _assert_nothing_outside(base, base / "user")


def _styles_csv(rows: list[tuple[str, str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["name", "prompt", "negative_prompt"])
    writer.writerows(rows)
    return buffer.getvalue()


csv_cell = st.one_of(st.text(max_size=20), st.sampled_from(["..", "../x", "/etc/passwd", "a\\b", "\x00", '"', "{prompt}", "None", "", "x" * 25_000]))


@settings(deadline=None, max_examples=100)
@given(text=st.one_of(
    st.text(max_size=200),
    st.lists(st.tuples(csv_cell, csv_cell, csv_cell), max_size=5).map(_styles_csv),
))
def test_hostile_styles_csv_imports_or_raises_and_stays_in_user_dir(text):
    with tempfile.TemporaryDirectory() as temp:
        base = Path(temp)
        store = PresetStore(base / "builtin", base / "user")
        try:
            presets = store.import_styles_csv(text)
        except SfumatoError:
            pass
        else:
            assert [store.get(preset.name) for preset in presets] == presets
        _assert_nothing_outside(base, base / "user")
