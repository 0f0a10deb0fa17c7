"""``build_app(studio)``: the Sfumato studio as one ``gr.Blocks``.

Layout, as an AUTOMATIC1111 user expects it: the checkpoint picker on top,
then tabs — txt2img, img2img, Inpaint, Extras, PNG Info, Gallery, Extensions,
Settings. The UI talks to the engine only through GenerationRequest /
GenerationResult and the shared job queue (``studio.jobs``).
"""
from __future__ import annotations

import logging
from typing import Iterator

import gradio as gr

from engine.errors import SfumatoError
from engine.fields import FIELDS
from engine.networks.vae_files import AUTOMATIC as AUTOMATIC_VAE

from .demo_hint import build_demo_hint, wire_demo_hint
from .errors import message_for
from .extensions_tab import build_extensions_tab
from .extra_networks import wire_checkpoint_cards
from .extras_tab import build_extras_tab
from .family_fields import FamilyControls, settings_differ, shown
from .gallery_tab import build_gallery_tab
from .generation_tab import GenerationTab, build_generation_tab
from .model_info import default_model_name, entry_or_none, model_choices, model_family, model_note, native_size_of
from .png_info import build_png_info_tab
from .presets_ui import wire_presets
from .send_to import wire_infotext_send, wire_result_send
from .settings_tab import build_settings_tab
from .style import load_js
from .tool_buttons import REFRESH_MODELS, tool_button

log = logging.getLogger("sfumato.ui")

GENERATION_TABS = (("txt2img", "txt2img"), ("img2img", "img2img"), ("inpaint", "Inpaint"))


def build_app(studio) -> gr.Blocks:
    """The whole UI for one Studio. Serve it with ``ui.server`` (or ``demo.queue().launch()``)."""
    model = default_model_name(studio)
    family = model_family(studio, model)
    size = native_size_of(family)
    with gr.Blocks(title="Sfumato", analytics_enabled=False) as demo:
        session_gallery = gr.State([])
        current_model = gr.State(model)
        with gr.Row(elem_id="model_row", equal_height=True):
            model_dropdown = gr.Dropdown(model_choices(studio), value=model, label="Stable Diffusion checkpoint",
                                         elem_id="model_dropdown", scale=4)
            refresh = tool_button(REFRESH_MODELS, "model_refresh")
            vae_dropdown = gr.Dropdown(studio.registry.vaes.choices(), value=AUTOMATIC_VAE, label=FIELDS["vae"].label,
                                       elem_id="vae_dropdown", scale=2)
            modules_dropdown = gr.Dropdown(_module_choices(studio), value=remembered_modules(studio, model), multiselect=True, label=FIELDS["modules"].label,
                                           info="for a model kept as split files; none: the one set that fits",
                                           elem_id="modules_dropdown", scale=3, visible=shown("modules", family))
            model_status = gr.Markdown(_loaded_text(studio, model), elem_id="model_status")
        untrained = gr.Markdown(model_note(entry_or_none(studio, model)), elem_id="model_untrained",
                                elem_classes=["sfumato-untrained"], visible=bool(model_note(entry_or_none(studio, model))))
        demo_hint = build_demo_hint(studio, model)

        tabs_by_mode: dict[str, GenerationTab] = {}
        with gr.Tabs(elem_id="tabs", overflow_behavior="wrap") as tabs:  # a narrow screen shows every tab, on two lines
            for mode, label in GENERATION_TABS:
                with gr.Tab(label, id=mode, elem_id=f"tab_{mode}"):
                    tabs_by_mode[mode] = build_generation_tab(studio, mode, model_dropdown, session_gallery, size,
                                                                vae_dropdown=vae_dropdown, modules_dropdown=modules_dropdown,
                                                                family=family)
            with gr.Tab("Extras", id="extras", elem_id="tab_extras"):
                build_extras_tab(studio)
            with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo"):
                png_info = build_png_info_tab()
            with gr.Tab("Gallery", id="gallery", elem_id="tab_gallery") as gallery_tab_item:
                gallery = build_gallery_tab(studio, session_gallery)
            with gr.Tab("Extensions", id="extensions", elem_id="tab_extensions"):
                build_extensions_tab(studio)
            with gr.Tab("Settings", id="settings", elem_id="tab_settings"):
                build_settings_tab(studio)

        model_setters = []  # events that may set the model picker in code, so its .input never fires
        for tab in tabs_by_mode.values():
            model_setters.append(wire_presets(studio, tab.presets, tab, model_dropdown))
            for target_mode, button in tab.send_buttons.items():
                wire_result_send(studio, button, tabs, tabs_by_mode[target_mode], model_dropdown, tab.results, tab.selected)
        for target_mode, button in png_info["send"].items():
            model_setters.append(wire_infotext_send(studio, button, tabs, tabs_by_mode[target_mode], model_dropdown,
                                                    png_info["infotext"], png_info["image"], vae_dropdown=vae_dropdown,
                                                    modules_dropdown=modules_dropdown))
        for target_mode, button in gallery["send"].items():
            wire_result_send(studio, button, tabs, tabs_by_mode[target_mode], model_dropdown, gallery["records"], gallery["selected"])
        gallery_tab_item.select(gallery["show_session"], session_gallery, gallery["outputs"], api_visibility="private")

        family_controls = FamilyControls(tabs=list(tabs_by_mode.values()), pickers={"modules": modules_dropdown})
        _wire_model_bar(studio, model_dropdown, refresh, model_status, untrained, current_model, list(tabs_by_mode.values()),
                        family_controls)
        for event in model_setters:  # a pasted or loaded model's family shows its fields; the pasted values stay
            event.then(lambda name: family_controls.updates(model_family(studio, name), apply_settings=False), model_dropdown,
                       family_controls.outputs(), api_visibility="private")
        refresh.click(lambda value: gr.update(choices=studio.registry.vaes.choices(),  # the VAE list is rescanned with the models
                                              value=value if value in studio.registry.vaes.choices() else AUTOMATIC_VAE),
                      vae_dropdown, vae_dropdown, api_visibility="private")
        refresh.click(lambda picked: gr.update(choices=_module_choices(studio),  # and the text encoder / VAE files
                                               value=[name for name in picked or [] if name in _module_choices(studio)]),
                      modules_dropdown, modules_dropdown, api_visibility="private")
        # The model's own picks come back when the artist picks it (.input: a .change here, beside the model bar's own
        # handlers, made Gradio render the demo hint twice).
        model_dropdown.input(lambda name: gr.update(value=remembered_modules(studio, name)), model_dropdown,
                             modules_dropdown, api_visibility="private")
        modules_dropdown.input(lambda name, picked: remember_modules(studio, name, picked), [model_dropdown, modules_dropdown],
                               None, api_visibility="private", queue=False)
        wire_demo_hint(studio, demo_hint, model_dropdown, tabs, tabs_by_mode["txt2img"].fields.components(["prompt"])[0])
        demo.load(None, js=load_js())
    return demo


def _module_choices(studio) -> list[str]:
    """Forge's "VAE / Text Encoder" list: the files in the text encoder and VAE folders, by name."""
    from engine.model_files.folders import module_files

    return list(dict.fromkeys(path.name for path in module_files(studio.registry.models_dir)))


def remembered_modules(studio, model: str | None) -> list[str]:
    """The picks last made for this model (in the settings file), those still in the folders."""
    choices = _module_choices(studio)
    return [name for name in studio.settings.model_modules.get(model or "", []) if name in choices]


def remember_modules(studio, model: str | None, picked: list[str] | None) -> None:
    """Keep the model's picks in the settings file, so the model comes back with them."""
    from dataclasses import replace

    if not model:
        return
    remembered = dict(studio.settings.model_modules)
    if picked:
        remembered[model] = list(picked)
    else:
        remembered.pop(model, None)
    studio.update_settings(replace(studio.settings, model_modules=remembered))


def _loaded_text(studio, name: str | None) -> str:
    """The line beside the picker: the model, its family ("Flux.1") and its native size."""
    if name is None:
        return "No model found."
    family = model_family(studio, name)
    width, height = native_size_of(family)
    kind = f" · {family.title}" if family is not None else ""
    return f"Model **{name}**{kind} · native size {width}×{height}"


def switch_model(studio, name: str | None, previous: str | None, current_sizes: list[int],
                 family_controls: FamilyControls | None = None) -> Iterator[tuple]:
    """Load the chosen model with visible progress; yields (status, dropdown, current model, untrained note, *sizes,
    *family updates).

    A failed load shows why and puts the previous model back. Width/height
    follow the new model's native size in each tab where they were at the old
    model's native size (the artist's own sizes are left alone). With
    ``family_controls``, the fields the new model's family uses are shown and
    the others hidden, and when it draws with other settings than the previous
    model's family, those settings are applied (``ui.family_fields``).
    """
    skips = [gr.skip()] * len(current_sizes)
    family_skips = family_controls.skips() if family_controls is not None else []
    if not name or name == previous:
        yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), *skips, *family_skips
        return
    yield f"⏳ Loading **{name}**…", gr.skip(), gr.skip(), gr.skip(), *skips, *family_skips
    previous_family = model_family(studio, previous) if previous else None  # before the load may evict it
    try:
        loaded = studio.registry.load(name)
    except SfumatoError as error:
        gr.Warning(f"Could not load {name}: {message_for(error)} Keeping {previous}.", title="Model not loaded")
        yield f"⚠️ Could not load **{name}**; still using **{previous}**.", previous, previous, gr.skip(), *skips, *family_skips
        return
    old = tuple(native_size_of(previous_family)) if previous else None
    new = tuple(loaded.family.native_size)
    updates: list = []
    for width, height in zip(current_sizes[0::2], current_sizes[1::2]):
        at_old_native = old is not None and (int(width), int(height)) == old
        updates += [new[0], new[1]] if at_old_native else [gr.skip(), gr.skip()]
    if family_controls is not None:
        updates += family_controls.updates(loaded.family, settings_differ(previous_family, loaded.family))
    note = model_note(loaded.entry)
    yield _loaded_text(studio, name), name, name, gr.update(value=note, visible=bool(note)), *updates


def _wire_model_bar(studio, dropdown, refresh, status, untrained, current_model, tabs: list[GenerationTab],
                    family_controls: FamilyControls) -> None:
    sizes = [component for tab in tabs for component in tab.fields.components(["width", "height"])]
    followers = family_controls.outputs()

    def switch(name, previous, *current_sizes):
        yield from switch_model(studio, name, previous, list(current_sizes), family_controls)

    # The family's fields follow on this same .input chain: a .change beside it made Gradio render the demo hint twice.
    dropdown.input(switch, [dropdown, current_model, *sizes], [status, dropdown, current_model, untrained, *sizes, *followers],
                   api_visibility="private", show_progress="minimal")
    for tab in tabs:  # a checkpoint card in the extra-networks browser loads its model as the picker does
        if tab.extra_networks is not None:
            wire_checkpoint_cards(tab.extra_networks, switch, [current_model, *sizes],
                                  [status, dropdown, current_model, untrained, *sizes, *followers])

    def refreshed(value):
        names = [entry.name for entry in studio.registry.refresh()]
        return gr.update(choices=model_choices(studio), value=value if value in names else default_model_name(studio))

    refresh.click(refreshed, dropdown, dropdown, api_visibility="private")
