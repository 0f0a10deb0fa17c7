"""Each model's family decides which fields it uses and what it draws with: the declarations (engine.fields'
``only_for`` and each family's traits), the infotext (Forge's names; a value the model ignored is not written),
the UI (ui/family_fields.py: shown controls and applied settings on a model pick) and the API's model list."""
from __future__ import annotations

import _ui_fixtures as fx  # noqa: E402  (sets the offline / thread environment first)

import pytest
import requests

from engine.families import FAMILIES, FLUX2, FLUX_DEV, FLUX_SCHNELL, SD1, SD2, SD3, SDXL, ZIMAGE
from engine.fields import DISTILLED_GUIDANCE, FIELDS, FLOW, TRAITS, UNET
from engine.infotext import build_infotext, loading_notes, parse_infotext, request_fields_from_infotext
from engine.request import GenerationRequest
from tests._flux_fixture import SIZE as FLUX_SIZE, build_folder

pytestmark = pytest.mark.timeout(300)

FLUX_MODEL = "tiny-flux"
UNET_FAMILIES = (SD1, SD2, SDXL)
FLOW_FAMILIES = (SD3, FLUX_DEV, FLUX_SCHNELL, ZIMAGE, FLUX2)
# Forge's infotext of a Flux.1 dev picture made from split files.
FORGE_FLUX = ("a lighthouse\nSteps: 20, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, "
              "Seed: 1, Size: 896x1152, Model hash: 0123456789, Model: flux1-dev, Shift: 2.5, "
              "Module 1: ae, Module 2: clip_l, Module 3: t5xxl_fp16, Version: f2.0.1v1.10.1-previous")


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """The tiny SD 1.x model (the default) beside a tiny Flux.1 dev folder."""
    from engine.studio import Studio

    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("family-studio")
    build_folder(root / "models" / "Stable-diffusion" / FLUX_MODEL, "dev")
    for folder, name in (("VAE", "ae.safetensors"), ("text_encoder", "clip_l.safetensors")):  # two of Forge's modules
        (root / "models" / folder).mkdir(parents=True, exist_ok=True)
        save_file({"weight": torch.zeros(1)}, str(root / "models" / folder / name))
    return Studio(fx.make_studio(root).config)


# --- the declarations ------------------------------------------------------------------------------------------

def test_each_trait_a_field_names_is_one_some_family_has():
    had = set().union(*(family.traits for family in FAMILIES))
    assert had == set(TRAITS)
    for declared in FIELDS:
        assert declared.only_for is None or declared.only_for in TRAITS, declared.name


def test_clip_skip_is_a_unets_shift_a_flow_models_and_distilled_cfg_flux_devs_alone():
    clip_skip, shift, distilled, modules = (FIELDS[name] for name in ("clip_skip", "shift", "distilled_cfg_scale", "modules"))
    for family in UNET_FAMILIES:
        assert UNET in family.traits and FLOW not in family.traits
        assert clip_skip.used_by(family.traits) and not shift.used_by(family.traits) and not modules.used_by(family.traits)
    for family in FLOW_FAMILIES:
        assert FLOW in family.traits and not clip_skip.used_by(family.traits)
        assert shift.used_by(family.traits) and modules.used_by(family.traits)
    assert [family for family in FAMILIES if distilled.used_by(family.traits)] == [FLUX_DEV]
    assert FLUX_DEV.request_inputs() == ("distilled_cfg_scale",) and FLUX_SCHNELL.request_inputs() == SD1.request_inputs() == ()


# --- the infotext ------------------------------------------------------------------------------------------------

def _written(family, **values) -> dict[str, str]:
    request = GenerationRequest(prompt="p", seed=1, **values)
    return parse_infotext(build_infotext(request, 1, "m", None, traits=family.traits))


def test_the_infotext_writes_forges_names_only_for_the_models_that_use_them():
    values = dict(distilled_cfg_scale=2.5, shift=3.0, clip_skip=2, modules=("ae.safetensors", "C:\\models\\clip_l.safetensors"))
    dev = _written(FLUX_DEV, **values)
    assert (dev["Distilled CFG Scale"], dev["Shift"], dev["Module 1"], dev["Module 2"]) == ("2.5", "3", "ae", "clip_l")
    assert "Clip skip" not in dev  # Flux's text encoders read fixed layers
    schnell = _written(FLUX_SCHNELL, **values)
    assert "Distilled CFG Scale" not in schnell and schnell["Shift"] == "3"
    sd1 = _written(SD1, **values)
    assert sd1["Clip skip"] == "2" and not {"Distilled CFG Scale", "Shift", "Module 1"} & set(sd1)


def test_forges_flux_infotext_pastes_its_distilled_cfg_shift_and_modules():
    params = parse_infotext(FORGE_FLUX)
    fields = request_fields_from_infotext(params)
    assert fields["distilled_cfg_scale"] == 3.5 and fields["shift"] == 2.5 and fields["cfg_scale"] == 1.0
    assert fields["modules"] == ("ae", "clip_l", "t5xxl_fp16")
    assert not any("Module" in note or "Distilled" in note for note in loading_notes(params, fields))
    shuffled = request_fields_from_infotext({"Module 2": "clip_l", "Module 10": "t5", "Module 1": "ae"})
    assert shuffled["modules"] == ("ae", "clip_l", "t5")  # by number, not by the order of the line


def test_a_forge_infotexts_modules_go_to_the_picker_as_the_files_here(studio):
    from ui.send_to import modules_choice

    assert modules_choice(studio, FORGE_FLUX) == ["ae.safetensors", "clip_l.safetensors"]  # no t5xxl_fp16 here
    assert modules_choice(studio, "p\nSteps: 20, Seed: 1") is None  # nothing named: the picker is left alone


# --- the UI's logic ------------------------------------------------------------------------------------------------

def test_a_familys_settings_are_its_defaults_over_the_declared_ones():
    from engine.family_settings import family_settings
    from ui.family_fields import settings_differ

    dev = family_settings(FLUX_DEV)
    assert {key: dev[key] for key in ("cfg_scale", "distilled_cfg_scale", "sampler", "schedule", "steps", "shift")} == {
        "cfg_scale": 1.0, "distilled_cfg_scale": 3.5, "sampler": "Euler", "schedule": "Simple", "steps": 20, "shift": None}
    sd1 = family_settings(SD1)
    assert sd1["cfg_scale"] == FIELDS["cfg_scale"].default == 7.0 and sd1["sampler"] == FIELDS["sampler"].default
    assert family_settings(FLUX_SCHNELL)["steps"] == 4
    assert settings_differ(SD1, FLUX_DEV) and settings_differ(FLUX_DEV, FLUX_SCHNELL) and settings_differ(None, SD1)
    assert not settings_differ(SD1, SDXL)  # the same settings: the artist's own values stay


def test_a_model_cards_recommended_settings_are_what_choosing_the_model_sets(tmp_path):
    """``sfumato.json``'s recommended sampler, schedule, steps and CFG (the flow demo's card: Euler, Simple, 20, 5)
    replace its family's (SD 3.5: 28 steps, CFG 4.5) when the model is chosen; a card without them keeps the family's."""
    import json

    from engine.family_settings import family_settings

    card = tmp_path / "sfumato.json"
    card.write_text(json.dumps({"family": "my-flow", "recommended_cfg": 5, "recommended_sampler": "Euler",
                                "recommended_schedule": "Simple", "recommended_steps": 20}))
    chosen = family_settings(SD3.with_overrides(card))
    assert {key: chosen[key] for key in ("sampler", "schedule", "steps", "cfg_scale")} == {
        "sampler": "Euler", "schedule": "Simple", "steps": 20, "cfg_scale": 5.0}
    assert isinstance(chosen["cfg_scale"], float) and family_settings(SD3)["steps"] == 28
    card.write_text(json.dumps({"family": "my-flow", "native_width": 512, "native_height": 512}))
    assert family_settings(SD3.with_overrides(card)) == family_settings(SD3)


@pytest.fixture(scope="module")
def controls(studio):
    import gradio as gr

    from ui.family_fields import FamilyControls
    from ui.generation_tab import build_generation_tab

    with gr.Blocks():
        model = gr.Dropdown([fx.MODEL_NAME], value=fx.MODEL_NAME)
        modules = gr.Dropdown([], multiselect=True, elem_id="modules_dropdown")
        tabs = [build_generation_tab(studio, mode, model, gr.State([]), (fx.SIZE, fx.SIZE), family=SD1)
                for mode in ("txt2img", "img2img")]
    return FamilyControls(tabs=tabs, pickers={"modules": modules})


def _by_elem(controls, updates: list) -> dict[str, dict]:
    assert len(updates) == len(controls.outputs())
    return {component.elem_id: update for component, update in zip(controls.outputs(), updates)}


def test_the_tabs_start_with_the_start_models_fields(controls):
    tab = controls.tabs[0]
    visible = {name: tab.fields.bindings[name].components[0].visible for name in ("clip_skip", "shift", "distilled_cfg_scale")}
    assert visible == {"clip_skip": True, "shift": False, "distilled_cfg_scale": False}


def test_a_tab_built_for_a_flux_start_model_starts_with_fluxs_settings(studio):
    """When the model shown at start is Flux.1 dev (the only model, or the chosen default), the picker's handler
    never runs, so the tab itself must start with the family's settings, not SD 1.x's CFG 7 and DPM++ 2M."""
    import gradio as gr

    from ui.generation_tab import build_generation_tab

    flux = studio.registry.family(studio.registry.get(FLUX_MODEL))
    with gr.Blocks():
        model = gr.Dropdown([FLUX_MODEL], value=FLUX_MODEL)
        tab = build_generation_tab(studio, "txt2img", model, gr.State([]), (fx.SIZE, fx.SIZE), family=flux)
    start = {name: tab.fields.bindings[name].components[0].value
             for name in ("sampler", "schedule", "steps", "cfg_scale", "distilled_cfg_scale")}
    assert start == {"sampler": "Euler", "schedule": "Simple", "steps": 20, "cfg_scale": 1, "distilled_cfg_scale": 3.5}
    assert tab.fields.bindings["distilled_cfg_scale"].components[0].visible
    assert not tab.fields.bindings["clip_skip"].components[0].visible


def test_picking_flux_dev_shows_its_fields_hides_clip_skip_and_sets_its_settings(controls):
    updates = _by_elem(controls, controls.updates(FLUX_DEV, apply_settings=True))
    for mode in ("txt2img", "img2img"):
        assert updates[f"{mode}_distilled_cfg"]["visible"] and updates[f"{mode}_distilled_cfg"]["value"] == 3.5
        assert updates[f"{mode}_shift"]["visible"] and updates[f"{mode}_clip_skip"]["visible"] is False
        assert updates[f"{mode}_cfg"] == 1.0 and updates[f"{mode}_steps"] == 20 and updates[f"{mode}_sampler"] == "Euler"
        assert updates[f"{mode}_schedule"]["value"] == "Simple"
    assert updates["modules_dropdown"]["visible"] is True


def test_picking_schnell_hides_distilled_cfg_and_sd1_undoes_flux(controls):
    schnell = _by_elem(controls, controls.updates(FLUX_SCHNELL, apply_settings=True))
    assert schnell["txt2img_distilled_cfg"]["visible"] is False and schnell["txt2img_steps"] == 4
    sd1 = _by_elem(controls, controls.updates(SD1, apply_settings=True))
    assert sd1["txt2img_cfg"] == 7.0 and sd1["txt2img_clip_skip"]["visible"] is True
    assert sd1["txt2img_shift"] == {"__type__": "update", "value": None, "visible": False}
    assert sd1["modules_dropdown"]["visible"] is False


def test_without_new_settings_only_visibility_changes(controls):
    updates = _by_elem(controls, controls.updates(SDXL, apply_settings=False))
    assert updates["txt2img_cfg"] == {"__type__": "update"}  # gr.skip(): the artist's CFG stays
    assert updates["txt2img_clip_skip"] == {"__type__": "update", "visible": True}


def test_the_model_switch_applies_the_family_and_says_it(studio, controls):
    from ui.app import switch_model

    *_, loaded = switch_model(studio, FLUX_MODEL, fx.MODEL_NAME, [512, 512, 64, 64], controls)
    status = loaded[0]
    assert "Flux.1" in status and FLUX_MODEL in status
    updates = _by_elem(controls, list(loaded[4 + 4:]))
    assert updates["txt2img_distilled_cfg"]["visible"] and updates["txt2img_cfg"] == 1.0
    assert list(loaded[4:8]) == [FLUX_SIZE, FLUX_SIZE, gr_skip(), gr_skip()]  # 512² was SD 1.x's native size; 64² the artist's


def gr_skip() -> dict:
    import gradio as gr

    return gr.skip()


# --- the model list ------------------------------------------------------------------------------------------------

def test_the_registry_and_the_api_list_each_models_family(studio):
    from _api_fixtures import running_server

    registry = studio.registry
    assert registry.family(registry.get(fx.MODEL_NAME)).title == "SD 1.x"
    assert registry.family(registry.get(FLUX_MODEL)).title == "Flux.1"
    with running_server(studio, api=True) as handle:
        items = {item["model_name"]: item for item in requests.get(handle.url + "/sdapi/v1/sd-models", timeout=10).json()}
    assert items[fx.MODEL_NAME]["family"] == "SD 1.x" and items[FLUX_MODEL]["family"] == "Flux.1"
