"""Every field is declared once (engine/fields.py), and every surface it declares is really there.

For each declared field this walks each surface the declaration names and checks it from the outside:
- the request accepts its default and refuses a value outside its limits, naming the field;
- the generation tabs build its control with the declared label, range, step and default;
- its CLI flag parses into the field;
- its A1111 API name (payload name or ``override_settings`` key) reaches the field, and errors name it;
- its infotext key round-trips (written, parsed, mapped back);
- presets take it if and only if it is declared preset-saveable.

Each check is a function returning a problem (or None), so the tests at the end can show that a broken
declaration makes it fail.
"""
from __future__ import annotations

import _ui_fixtures as fx  # noqa: E402  (sets the offline / thread environment first)

import base64
import io
import math
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from engine.sampling import table as samplers
from engine.errors import ValidationError
from engine.fields import CORE, DEFAULT_TRAITS, FIELDS, MASK_MODES, TRAITS, Field, Names
from engine.request import GenerationRequest

pytestmark = pytest.mark.timeout(600)

INIT = Image.new("RGB", (64, 64), (40, 90, 160))
MASK = Image.new("L", (64, 64), 255)


@pytest.fixture(scope="module", autouse=True)
def extensions_loaded(tmp_path_factory):
    """The shipped extensions loaded, so their declared fields are in the registry, as in the app."""
    from engine.extensions import ExtensionManager

    return ExtensionManager(fx.REPO / "extensions", tmp_path_factory.mktemp("extensions") / "state.json")


def core_names(predicate=lambda field: True) -> list[str]:
    return [field.name for field in FIELDS.core() if predicate(field)]


# --- sample values, chosen from the declaration alone -------------------------------------------

def sample_value(field: Field) -> Any:
    """A valid value of the field that is not its default, so a surface that ignores it shows."""
    if field.name == "schedule":
        return next(name for name in samplers.schedules_for(samplers.DEFAULT_SAMPLER) if name != field.default)
    if field.name == "model":
        return "some-model"
    if field.type is bool:
        return not field.default
    if field.type is tuple:
        return (8, 0, 16, 0)
    if field.type is dict:
        return {"someext": {"on": True}}
    if field.type is list:
        return [{}]
    if field.type is Names:
        return ("clip_l", "ae")  # as Forge writes them in its infotext; a file name or path names them too
    if field.type is Image.Image:
        return MASK if field.name == "mask" else INIT
    if field.type in (int, float) and field.range is not None:
        low, high = field.range
        if field.type is float:
            return (low + high) / 2 if (low + high) / 2 != field.default else low
        candidate = low + (field.multiple_of or 1) * (2 if low < 0 else 1)
        return candidate if candidate != field.default else candidate + (field.multiple_of or 1)
    choices = field.choice_list()
    if choices is not None:
        return next(choice for choice in choices if choice != field.default)
    if field.type is str:
        return "a lighthouse at dusk"
    raise AssertionError(f"no sample value for {field.name}")


def invalid_values(field: Field) -> list[Any]:
    """Values just outside the declared limits (or of the wrong type)."""
    if field.type is bool:
        return ["yes", 1]
    if field.type is tuple:
        return [(0, 0, 0, field.range[1] + 8), (0, 0, 0)]
    if field.type is Image.Image:
        return ["not an image"]
    if field.type is dict:
        return ["not a mapping"]
    if field.type is Names:
        return ["clip_l.safetensors", [7], ["x" * (field.max_length + 1)]]
    if field.type in (int, float):
        low, high = field.range
        values = [high + 1, low - 1, "7", True]
        if field.type is int:
            values.append(low + 0.5)
        if field.multiple_of:
            values.append(low + 1)
        return values
    if field.choice_list() is not None:
        return ["Not one of them", 7]
    values: list[Any] = [7]
    if field.max_length:
        values.append("x" * (field.max_length + 1))
    return values


def context_for(field: Field) -> dict[str, Any]:
    """Other request values the field needs to apply: an init image (and mask) for its modes."""
    values: dict[str, Any] = {}
    if "txt2img" not in field.modes:
        values["init_image"] = INIT
    if field.modes == ("inpaint",) and field.name != "mask":
        values["mask"] = MASK
    if field.name == "mask":
        values["init_image"] = INIT
    values.pop(field.name, None)
    return values


def same(a: Any, b: Any) -> bool:
    if isinstance(a, Image.Image) or isinstance(b, Image.Image):
        return isinstance(a, Image.Image) and isinstance(b, Image.Image) and a.size == b.size and a.tobytes() == b.tobytes()
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


# --- the request ----------------------------------------------------------------------------------

def request_problem(field: Field) -> str | None:
    try:
        GenerationRequest(**{field.name: field.default})
    except ValidationError as error:
        return f"the default {field.default!r} is refused: {error}"
    try:
        request = GenerationRequest(**context_for(field), **{field.name: sample_value(field)})
    except ValidationError as error:
        return f"a valid value is refused: {error}"
    if not same(getattr(request, field.name), sample_value(field)):
        return f"the request holds {getattr(request, field.name)!r}, not {sample_value(field)!r}"
    for value in invalid_values(field):
        try:
            GenerationRequest(**context_for(field), **{field.name: value})
        except ValidationError as error:
            if error.field.split(".")[0] != field.name:
                return f"{value!r} is refused naming {error.field!r}, not {field.name!r}"
            continue
        return f"{value!r} is accepted though it is outside the declared limits"
    return None


@pytest.mark.parametrize("name", core_names())
def test_request_takes_the_default_and_refuses_values_outside_the_limits(name):
    assert request_problem(FIELDS[name]) is None


def test_every_request_field_is_declared_and_every_core_declaration_is_a_request_field():
    assert set(GenerationRequest.field_names()) == set(core_names())


def test_extension_fields_are_declared_by_their_extension(extensions_loaded):
    owned = FIELDS.owned_by_extensions()
    assert owned, "the shipped extensions declare their fields"
    for field in owned:
        assert field.owner in extensions_loaded.loaded
        assert field in extensions_loaded.loaded[field.owner].request_fields


# --- the UI ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    return fx.make_studio(tmp_path_factory.mktemp("fields-studio"), extensions_dir=fx.REPO / "extensions")


@pytest.fixture(scope="module")
def tabs(studio):
    import gradio as gr

    from ui.generation_tab import build_generation_tab

    built = {}
    with gr.Blocks():
        model = gr.Dropdown(["m"], value="m")
        gallery = gr.State([])
        for mode in ("txt2img", "img2img", "inpaint"):
            built[mode] = build_generation_tab(studio, mode, model, gallery, (fx.SIZE, fx.SIZE))
    return built


def _choices(component) -> list:
    return [choice[1] if isinstance(choice, (tuple, list)) else choice for choice in component.choices]


def ui_problem(field: Field, tabs: dict) -> str | None:
    for mode, tab in tabs.items():
        if mode not in field.modes:
            if field.name in tab.fields:
                return f"{mode} has a control for it, but it does not apply to {mode}"
            continue
        if field.name not in tab.fields:
            return f"{mode} has no control for it"
        components = tab.fields.bindings[field.name].components
        if field.name == "outpaint":
            bounds = {(component.minimum, component.maximum, component.step, component.value) for component in components}
            if bounds != {(*field.limits, field.step, 0)} or len(components) != 4:
                return f"{mode}: outpainting sliders span {bounds}"
            continue
        component = components[0]
        if component.label != field.label:
            return f"{mode}: labelled {component.label!r}, declared {field.label!r}"
        if field.control == "slider":
            if (component.minimum, component.maximum, component.step) != (*field.limits, field.step):
                return f"{mode}: slider {component.minimum}..{component.maximum} step {component.step}, declared {field.limits} step {field.step}"
        if field.control == "number" and field.range is not None and (component.minimum, component.maximum) != field.range:
            return f"{mode}: number box {component.minimum}..{component.maximum}, declared {field.range}"
        if field.control in ("dropdown", "radio"):
            declared = list(MASK_MODES) if field.name == "invert_mask" else field.choice_list()
            if declared is None:  # choices found when the tab is built (hr_upscaler: the upscalers available)
                if not _choices(component) or field.default not in _choices(component):
                    return f"{mode}: offers {_choices(component)}, without its default {field.default!r}"
            elif not set(_choices(component)) <= set(declared) or (field.name != "schedule" and _choices(component) != declared):
                return f"{mode}: offers {_choices(component)}, declared {declared}"
        shown = component.value
        expected = (MASK_MODES[1] if field.default else MASK_MODES[0]) if field.name == "invert_mask" else field.default
        if field.default is not None and not same(shown, expected):
            return f"{mode}: starts at {shown!r}, declared default {expected!r}"
    return None


@pytest.mark.parametrize("name", core_names(lambda field: field.control is not None))
def test_each_tab_builds_the_declared_control(name, tabs):
    assert ui_problem(FIELDS[name], tabs) is None


def test_fields_without_a_plain_control_are_built_by_the_tab_itself(tabs):
    # images come from upload widgets, the model, VAE and modules from the pickers above the tabs; previews are Settings
    assert {field.name for field in FIELDS.core() if field.control is None} == {
        "model", "vae", "modules", "init_image", "mask", "preview_every", "preview_method", "extensions"}


def test_extension_settings_get_a_settings_control_and_are_kept_under_the_extension(studio):
    import json

    import gradio as gr

    from ui.settings_tab import build_settings_tab

    declared = [setting for extension in studio.extensions.loaded.values() for setting in extension.settings]
    assert declared, "the shipped extensions declare a setting"
    with gr.Blocks() as demo:
        controls = build_settings_tab(studio)
    save = next(iter(demo.fns.values()))
    for setting in declared:
        control = controls[f"{setting.owner}.{setting.name}"]
        assert (control.label, control.minimum, control.maximum, control.value) == (setting.label, *setting.range, setting.default)
        values = [block.value for block in save.inputs]
        values[save.inputs.index(control)] = sample_value(setting)
        assert save.fn(*values).startswith("Saved.")
        saved = json.loads(studio.settings_store.path.read_text())["extensions"]
        assert saved[setting.owner][setting.name] == sample_value(setting)
        values[save.inputs.index(control)] = setting.range[1] + 1
        assert setting.label in save.fn(*values)


def test_error_messages_name_the_declared_label():
    from ui.fields import describe_error

    for field in FIELDS:
        if field.label:
            assert describe_error(field.name, "bad").startswith(f"{field.label} ({field.name})")


# --- the CLI --------------------------------------------------------------------------------------

def _flag_text(field: Field, value: Any, tmp_path) -> list[str]:
    if field.type is bool:
        return [field.cli] if value else []
    if field.type is Image.Image:
        path = tmp_path / f"{field.name}.png"
        value.save(path)
        return [field.cli, str(path)]
    if field.type is tuple:
        return [field.cli, ",".join(str(part) for part in value)]
    if field.type is Names:  # the flag once per name
        return [text for name in value for text in (field.cli, name)]
    names = field.cli_choices()
    if names is not None and not callable(field.choices):
        return [field.cli, next(flag for flag, choice in names.items() if choice == value)]
    return [field.cli, str(value)]


def cli_problem(field: Field, tmp_path) -> str | None:
    from ui.cli import build_parser, build_request

    value = sample_value(field)
    argv = ["generate", "--out", str(tmp_path / "out")]
    if field.name != "prompt":
        argv += ["--prompt", "p"]
    for name, extra in context_for(field).items():
        if name != field.name:
            argv += _flag_text(FIELDS[name], extra, tmp_path)
    argv += _flag_text(field, value, tmp_path)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        return f"{argv} does not parse"
    request = build_request(args, args.prompt)
    if not same(getattr(request, field.name), value):
        return f"{' '.join(argv[-2:])} gave {field.name}={getattr(request, field.name)!r}, not {value!r}"
    return None


@pytest.mark.parametrize("name", core_names(lambda field: field.cli is not None))
def test_cli_flag_parses_into_the_field(name, tmp_path):
    assert cli_problem(FIELDS[name], tmp_path) is None


def test_extension_cli_flags_are_offered_and_collected():
    from ui.cli import build_parser

    for field in FIELDS.owned_by_extensions():
        if field.cli:
            args = build_parser().parse_args(["generate", "--out", "o", "--prompt", "p", field.cli, "a", field.cli, "b"])
            assert getattr(args, field.name) == ["a", "b"]


# --- the A1111 API --------------------------------------------------------------------------------

def _png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# How an A1111 client spells a value (A1111 1.10's API: indices for radios, 0/1 for flags, base64 images).
_A1111_SPELLING = {
    "resize_mode": lambda value: ["Just resize", "Crop and resize", "Resize and fill"].index(value),
    "masked_content": lambda value: ["fill", "original", "latent noise", "latent nothing"].index(value),
    "inpaint_area": lambda value: value == "Only masked",
    "invert_mask": lambda value: int(value),
    "init_image": lambda image: [_png_b64(image)],
    "mask": _png_b64,
}


def _fake_studio():
    return SimpleNamespace(
        default_model=lambda: "default-model",
        registry=SimpleNamespace(get=lambda name: SimpleNamespace(name=name)),
        settings=SimpleNamespace(preview_every=1, preview_method="cheap"),
        extensions=None, presets=None,
    )


def _api_request(field: Field, value: Any):
    from ui.api import img2img_request, txt2img_request
    from ui.api_models import Img2ImgRequest, Txt2ImgRequest

    body: dict[str, Any] = {}
    if "txt2img" not in field.modes or field.name == "mask":
        body["init_images"] = [_png_b64(INIT)]
    if field.modes == ("inpaint",) and field.name != "mask":
        body["mask"] = _png_b64(MASK)
    spelled = _A1111_SPELLING.get(field.name, lambda v: list(v) if isinstance(v, tuple) else v)(value)
    if field.api:
        body[field.api] = spelled
    else:
        body["override_settings"] = {field.override: spelled}
    image_mode = "init_images" in body
    build = img2img_request if image_mode else txt2img_request
    return build(_fake_studio(), (Img2ImgRequest if image_mode else Txt2ImgRequest)(**body))


def api_problem(field: Field) -> str | None:
    from ui.api import ApiError, api_field_names

    sent_as = field.api or f"override_settings.{field.override}"
    if api_field_names().get(field.name) != sent_as:
        return f"errors would name {api_field_names().get(field.name)!r}, not {sent_as!r}"
    value = sample_value(field)
    try:
        request = _api_request(field, value)
    except ApiError as error:
        return f"a valid value is refused: {error.detail}"
    if not same(getattr(request, field.name), value):
        return f"{sent_as}={value!r} gave {field.name}={getattr(request, field.name)!r}"
    if field.range is not None and field.type in (int, float):
        try:
            _api_request(field, field.range[1] + 1)
        except ApiError as error:
            if error.field != sent_as:
                return f"an out-of-range value is refused naming {error.field!r}, not {sent_as!r}"
        else:
            return "an out-of-range value is accepted"
    return None


@pytest.mark.parametrize("name", core_names(lambda field: (field.api or field.override) and field.name != "extensions"))
def test_api_name_maps_to_the_field(name):
    assert api_problem(FIELDS[name]) is None


def test_api_extension_settings_arrive_under_the_declared_name():
    from ui.api import api_field_names

    assert api_field_names()["extensions"] == FIELDS["extensions"].api == "alwayson_scripts"


# --- infotext -------------------------------------------------------------------------------------

# Values that make a conditionally written key apply (a variation seed is written only with a strength, ...).
_ENABLING = {"subseed_strength": 0.5, "inpaint_area": "Only masked", "sampler": "Euler a", "enable_hr": True,
              "refiner_checkpoint": "a-refiner"}  # Euler a takes eta and draws noise (ENSD)


def _written_request(field: Field) -> GenerationRequest | None:
    """A request that carries the field in its infotext, with a value other than its default (None if there is none)."""
    candidates = [sample_value(field), *(field.choice_list() or [])]  # A1111 leaves some values out ("RNG: GPU")
    for candidate in candidates:
        values = {**context_for(field), field.name: candidate}
        for name, enabling in _ENABLING.items():
            if name != field.name:
                values.setdefault(name, enabling)
        request = GenerationRequest(**values)
        if field.name in ("width", "height"):
            request = request.with_changes(**{other: sample_value(FIELDS[other]) for other in ("width", "height")})
        if field.written_for(request, _traits(field)) and not same(candidate, field.default):
            return request
    return None


def _traits(field: Field) -> frozenset[str]:
    """A field only some families use is written for a picture of such a family."""
    return frozenset({field.only_for}) if field.only_for else DEFAULT_TRAITS


def infotext_problem(field: Field) -> str | None:
    from engine.infotext import build_infotext, parse_infotext, request_fields_from_infotext

    request = _written_request(field)
    if request is None:
        return f"{field.infotext!r} is never written"
    text = build_infotext(request, seed=request.seed, model_name=request.model, model_hash=None, subseed=request.subseed,
                          traits=_traits(field))
    parsed = parse_infotext(text)
    written_key = f"{field.infotext} 1" if field.type is Names else field.infotext  # Forge's "Module 1", "Module 2"...
    if written_key not in parsed:
        return f"{field.infotext!r} is declared but the infotext has no such key: {text!r}"
    read = request_fields_from_infotext(parsed)
    if field.name not in read or not same(read[field.name], getattr(request, field.name)):
        return f"{field.infotext!r} reads back as {read.get(field.name)!r}, not {getattr(request, field.name)!r}"
    return None


@pytest.mark.parametrize("name", core_names(lambda field: field.infotext is not None))
def test_infotext_key_round_trips(name):
    assert infotext_problem(FIELDS[name]) is None


def test_a1111_infotext_without_rng_says_it_was_gpu_noise_and_names_what_it_cannot_apply():
    from engine.infotext import loading_notes, parse_infotext, request_fields_from_infotext

    text = ("a cat\nSteps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 64x64, Clip skip: 2, "
            "ENSD: 31337, Face restoration: CodeFormer, Version: v1.10.1")
    params = parse_infotext(text)
    applied = request_fields_from_infotext(params)
    assert (applied["clip_skip"], applied["eta_noise_seed_delta"]) == (2, 31337) and "rng" not in applied
    notes = loading_notes(params, applied)
    assert any('"RNG"' in note and "GPU" in note and "different picture" in note for note in notes)
    assert any("Face restoration: CodeFormer" in note for note in notes)
    assert not any('"RNG"' in note for note in loading_notes(parse_infotext(text.replace("Clip skip", "RNG: CPU, Clip skip")),
                                                                 applied))


A1111_IMG2IMG = ("a cat\nSteps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 64x64, "
                 "Denoising strength: 0.5, Resize mode: Just resize, Face restoration: CodeFormer, Version: v1.10.1")


def test_png_info_shows_what_an_infotext_cannot_reproduce(tmp_path):
    from PIL import PngImagePlugin

    from ui.png_info import read_image_info

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_IMG2IMG)
    INIT.save(tmp_path / "a1111.png", pnginfo=info)
    _, parsed, _, _, summary = read_image_info(str(tmp_path / "a1111.png"))
    assert '"RNG"' in summary and "GPU" in summary and "Face restoration: CodeFormer" in summary
    assert parsed["notes"] and parsed["restores"]["denoising_strength"] == 0.5


def test_sending_an_infotext_names_what_the_target_tab_cannot_use(tabs):
    from ui.send_to import infotext_notes

    assert any("Not used by txt2img: Resize mode" in note for note in infotext_notes(A1111_IMG2IMG, tabs["txt2img"]))
    assert not any("Not used by" in note for note in infotext_notes(A1111_IMG2IMG, tabs["img2img"]))


# --- presets --------------------------------------------------------------------------------------

def _json_value(field: Field) -> Any:
    value = sample_value(field)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Image.Image):
        return "image.png"
    return value


def preset_problem(field: Field) -> str | None:
    from engine.presets import PresetError, validate_preset
    from ui.presets_ui import saved_fields

    value = _json_value(field)
    try:
        preset = validate_preset({"name": "P", "fields": {field.name: value}})
    except PresetError as error:
        if field.preset:
            return f"declared preset-saveable but refused: {error}"
        if not any(name == f"fields.{field.name}" for name, _ in error.problems):
            return f"refused without naming fields.{field.name}: {error}"
    else:
        if not field.preset:
            return "not declared preset-saveable, yet a preset may hold it"
        if not same(preset.fields[field.name], value):
            return f"the preset holds {preset.fields[field.name]!r}, not {value!r}"
    if field.owner == CORE and field.name != "model":  # the model is saved only when asked, extensions' settings by them
        mode = field.modes[0]
        saved = saved_fields(mode, {field.name: sample_value(field)}, None, include_model=False)
        if (field.name in saved) != field.preset:
            return f"'Save current as preset' {'keeps' if field.name in saved else 'leaves out'} it"
    return None


@pytest.mark.parametrize("name", [field.name for field in FIELDS])
def test_presets_save_a_field_iff_it_is_declared_saveable(name):
    assert preset_problem(FIELDS[name]) is None


def test_presets_take_an_extension_field_it_declares_saveable():
    for field in FIELDS.owned_by_extensions():
        from engine.presets import validate_preset

        if field.preset:
            assert validate_preset({"name": "P", "fields": {field.name: [{"module": "canny"}]}}).fields[field.name]


# --- the checks can fail --------------------------------------------------------------------------

@pytest.fixture
def redeclared(monkeypatch):
    """Replace a field's declaration in the registry for one test."""
    def redeclare(name: str, **changes: Any) -> Field:
        broken = replace(FIELDS[name], **changes)
        monkeypatch.setitem(FIELDS._fields, name, broken)
        return broken
    return redeclare


def test_the_infotext_check_fails_for_a_key_the_writer_never_writes(redeclared):
    broken = redeclared("clip_skip", infotext_when=lambda request: False)
    assert "never written" in infotext_problem(broken)


def test_the_infotext_check_fails_for_a_key_the_writer_ignores(redeclared):
    # the writer writes the size as one "Size: WxH" entry, whatever key the width declares
    assert "no such key" in infotext_problem(redeclared("width", infotext="Width"))
    # the prompt is the text above the parameters line: another field declaring its key does not read back
    assert infotext_problem(redeclared("steps", infotext="Prompt")) is not None


def test_the_api_check_fails_for_a_name_the_api_does_not_read(redeclared):
    assert api_problem(redeclared("eta", api="etaa")) is not None


def test_the_request_check_fails_for_a_default_outside_the_limits():
    assert "default" in request_problem(replace(FIELDS["steps"], default=0))


def test_the_preset_check_fails_when_a_saveable_field_is_refused(redeclared):
    assert preset_problem(redeclared("subseed", preset=False)) is None  # as declared today
    assert preset_problem(replace(FIELDS["subseed"], preset=True)) is not None  # declared saveable, but presets refuse it
