"""The presets row of every generation tab: load, apply as style, save, delete, export, import, import styles.csv.

One dropdown, two ways to use what it holds, labelled so the artist knows which:
"Load preset" restores every setting the preset saved, its prompt replacing the
typed one (``engine.presets.load_preset``); "Apply style" only adds its prompt and
negative prompt to the typed ones, as A1111's styles do (``apply_style``).
Deleting asks for a second click that names the preset. Every import is validated
in full by the store, and its problems are shown by field name with nothing
half-applied.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from engine.errors import SfumatoError
from engine.fields import CORE, FIELDS
from engine.presets import FIELD_TYPES, PROMPT_FIELDS, PresetError, apply_style, has_style_text, load_preset, preset_filename

from .errors import message_for
from .fields import describe_error, sampling_note
from .model_info import installed_name

if TYPE_CHECKING:
    from .generation_tab import GenerationTab

# A value that means "nothing chosen" is left out of a saved preset: no prompt, a random seed, a box left unticked.
_UNSET = ("", -1, False, None)


def _problems_text(error: SfumatoError) -> str:
    if isinstance(error, PresetError):
        return "; ".join(describe_error(name, message) for name, message in error.problems)
    return message_for(error)


def preset_names(studio) -> list[str]:
    try:
        return [preset.name for preset in studio.presets.list()]
    except (SfumatoError, OSError):
        return []


def preset_fields_for(tab: "GenerationTab") -> list[str]:
    return [name for name in FIELD_TYPES if name in tab.fields]


def saved_fields(tab_mode: str, values: dict[str, Any], model: str | None, include_model: bool) -> dict[str, Any]:
    """What a new preset stores from the current controls: each field declared preset-saveable that this tab holds."""
    fields: dict[str, Any] = {}
    for declared in FIELDS.saved_in_presets():
        name = declared.name
        if declared.owner != CORE or name == "model" or name not in values or tab_mode not in declared.modes:
            continue  # the model only when asked (below); extensions' settings are theirs to fill in
        value = values[name]
        if value is None or (value == declared.default and declared.default in _UNSET and type(value) is type(declared.default)):
            continue
        fields[name] = value
    if include_model and model:
        fields["model"] = model
    return fields


USE_HELP = ("**Load preset** restores every setting it saved; its prompt replaces yours. "
            "**Apply style** only adds its prompt and negative prompt to yours, as A1111 styles do; each click adds them again.")


@dataclass
class PresetControls:
    dropdown: gr.Dropdown
    load: gr.Button
    apply_style: gr.Button
    description: gr.Markdown
    name: gr.Textbox
    text: gr.Textbox
    include_model: gr.Checkbox
    save: gr.Button
    delete: gr.Button
    delete_confirm_row: gr.Row
    delete_question: gr.Markdown
    delete_confirm: gr.Button
    delete_cancel: gr.Button
    pending_delete: gr.State
    export: gr.Button
    export_file: gr.File
    import_preset: gr.UploadButton
    import_styles: gr.UploadButton
    status: gr.Markdown


def build_presets_controls(studio, mode: str) -> PresetControls:
    """The presets row's controls, laid out where this is called (the top of a generation tab)."""
    with gr.Row(elem_classes=["sfumato-presets"]):
        dropdown = gr.Dropdown(preset_names(studio), value=None, label="Preset or style", elem_id=f"{mode}_preset", scale=3)
        with gr.Column(scale=1, min_width=140):
            load_button = gr.Button("Load preset", elem_id=f"{mode}_preset_load", size="md")
            style_button = gr.Button("Apply style", elem_id=f"{mode}_style_apply", size="md")
        with gr.Column(scale=4):
            gr.Markdown(USE_HELP, elem_id=f"{mode}_preset_help")
            description = gr.Markdown("", elem_id=f"{mode}_preset_description")
            status = gr.Markdown("", elem_id=f"{mode}_preset_status")
    with gr.Accordion("Manage presets: save, delete, export, import", open=False, elem_id=f"{mode}_preset_manage"):
        with gr.Row(equal_height=True):
            name = gr.Textbox(label="New preset name", elem_id=f"{mode}_preset_name", scale=2)
            text = gr.Textbox(label="Description", elem_id=f"{mode}_preset_text", scale=3)
            include_model = gr.Checkbox(False, label="Include the model", elem_id=f"{mode}_preset_include_model", scale=1)
        with gr.Row():
            save_button = gr.Button("Save current as preset", elem_id=f"{mode}_preset_save", size="sm", variant="primary")
            delete_button = gr.Button("Delete selected", elem_id=f"{mode}_preset_delete", size="sm", variant="stop")
            export_button = gr.Button("Export selected", elem_id=f"{mode}_preset_export", size="sm")
            import_button = gr.UploadButton("Import preset (.json)", file_types=[".json"], type="binary", size="sm",
                                            elem_id=f"{mode}_preset_import")
            styles_button = gr.UploadButton("Import styles.csv", file_types=[".csv"], type="binary", size="sm",
                                            elem_id=f"{mode}_preset_import_styles")
        with gr.Row(visible=False, elem_id=f"{mode}_preset_delete_confirm_row") as confirm_row:
            question = gr.Markdown("", elem_id=f"{mode}_preset_delete_question")
            confirm_button = gr.Button("Yes, delete it", elem_id=f"{mode}_preset_delete_confirm", size="sm", variant="stop")
            cancel_button = gr.Button("Cancel", elem_id=f"{mode}_preset_delete_cancel", size="sm")
        export_file = gr.File(label="Exported preset", visible=False, interactive=False, elem_id=f"{mode}_preset_file")
    return PresetControls(
        dropdown=dropdown, load=load_button, apply_style=style_button, description=description, name=name, text=text,
        include_model=include_model, save=save_button, delete=delete_button, delete_confirm_row=confirm_row,
        delete_question=question, delete_confirm=confirm_button, delete_cancel=cancel_button, pending_delete=gr.State(None),
        export=export_button, export_file=export_file, import_preset=import_button, import_styles=styles_button, status=status,
    )


def wire_presets(studio, controls: PresetControls, tab: "GenerationTab", model_dropdown):
    """Connect a tab's presets row to its field controls and the model picker. Returns the Load button's event, for
    what follows the model a preset may set."""
    mode = tab.mode
    names = preset_fields_for(tab)
    # Extensions whose settings a preset may hold and that can fill their controls back in.
    preset_extensions = [control for control in tab.extensions if control.name in FIELD_TYPES and control.from_settings]
    field_components = tab.fields.components(names)
    prompt_components = tab.fields.components(list(PROMPT_FIELDS))
    extension_components = [component for control in preset_extensions for component in control.components]
    dropdown, status = controls.dropdown, controls.status

    def extension_values(preset) -> list:
        values: list = []
        for control in preset_extensions:
            filled = None
            if control.name in preset.fields:
                try:
                    filled = list(control.from_settings(preset.fields[control.name]))
                except Exception as error:  # noqa: BLE001 - report it, apply the rest
                    gr.Warning(f"The preset's {control.name} settings could not be applied: {error}")
            values.extend(filled if filled and len(filled) == len(control.components) else [gr.skip()] * len(control.components))
        return values

    def refreshed(value=None):
        choices = preset_names(studio)
        return gr.update(choices=choices, value=value if value in choices else None)

    def describe(preset_name):
        if not preset_name:
            return ""
        try:
            preset = studio.presets.get(preset_name)
        except SfumatoError:
            return ""
        settings = ", ".join(f"{key}: {value}" for key, value in preset.fields.items()
                             if key not in FIELDS or FIELDS[key].owner == CORE)  # an extension's nested settings would swamp the line
        return f"{preset.description}\n\n`{settings}`" if preset.description else f"`{settings}`"

    def chosen(preset_name, action: str):
        """The preset named in the dropdown, or None after telling the artist what is wrong."""
        if not preset_name:
            gr.Warning(f"Choose a preset to {action}.")
            return None
        try:
            return studio.presets.get(preset_name)
        except SfumatoError as error:
            gr.Warning(message_for(error))
            return None

    def load(preset_name, model, *values):
        preset = chosen(preset_name, "load")
        if preset is None:
            return [gr.skip()] * (3 + len(field_components) + len(extension_components))
        current = tab.fields.read(list(values), names)
        current["model"] = model
        applied = load_preset(preset, current)
        changed = {key: value for key, value in applied.fields.items() if key in preset.fields or current.get(key) != value}
        model_update = gr.skip()
        if "model" in changed:
            if (installed := installed_name(studio, changed["model"])) is not None:
                model_update = installed
            else:
                gr.Warning(f"The preset's model {changed['model']!r} is not installed; keeping {model!r}.")
        missing = [name for name in preset.fields if name not in names and name != "model"
                   and not any(control.name == name for control in preset_extensions)]
        note = f" (not available here: {', '.join(missing)})" if missing else ""
        status_text = " ".join([f"Loaded preset **{preset.name}**{note}.", *applied.notes])
        return (model_update, *tab.fields.updates(changed, names), *extension_values(preset), status_text,
                sampling_note(applied.notes))

    def apply_as_style(preset_name, *typed):
        preset = chosen(preset_name, "apply as a style")
        if preset is None:
            return gr.skip(), gr.skip(), gr.skip()
        if not has_style_text(preset):
            gr.Warning(f"{preset.name!r} has no prompt or negative prompt to add. Use Load preset for its settings.")
            return gr.skip(), gr.skip(), gr.skip()
        styled = apply_style(preset, dict(zip(PROMPT_FIELDS, typed)))
        return styled["prompt"], styled["negative_prompt"], f"Applied style **{preset.name}**: its prompt text was added to yours."

    def save(preset_name, description_text, with_model, model, *values):
        current = tab.fields.read(list(values), names)
        data = {"name": (preset_name or "").strip(), "description": description_text or "",
                "fields": saved_fields(mode, current, model, with_model)}
        existed = data["name"] in preset_names(studio)
        try:
            studio.presets.save(data)
        except SfumatoError as error:
            gr.Warning(_problems_text(error), title="Preset not saved")
            return gr.skip(), gr.skip()
        verb = "Replaced" if existed else "Saved"
        return refreshed(data["name"]), f"{verb} preset **{data['name']}**."

    def hidden_question():
        return gr.update(visible=False), None

    def ask_delete(preset_name):
        """The first click: name what would be deleted and wait for the second."""
        preset = chosen(preset_name, "delete")
        if preset is None:
            return gr.skip(), gr.skip(), gr.skip()
        if preset.builtin:
            gr.Warning(f"{preset.name!r} is a built-in preset and can't be deleted.")
            return gr.skip(), gr.skip(), gr.skip()
        return gr.update(visible=True), f"Delete preset **{preset.name}**? This can't be undone.", preset.name

    def delete(pending_name):
        if not pending_name:
            return gr.skip(), gr.skip(), *hidden_question()
        try:
            studio.presets.delete(pending_name)
        except SfumatoError as error:
            gr.Warning(message_for(error))
            return gr.skip(), gr.skip(), *hidden_question()
        return refreshed(), f"Deleted preset **{pending_name}**.", *hidden_question()

    def export(preset_name):
        if not preset_name:
            gr.Warning("Choose a preset to export.")
            return gr.skip()
        try:
            data = studio.presets.export(preset_name)
            path = Path(tempfile.mkdtemp(prefix="sfumato-preset-")) / preset_filename(preset_name)
        except SfumatoError as error:
            gr.Warning(message_for(error))
            return gr.skip()
        path.write_bytes(data)
        return gr.update(value=str(path), visible=True)

    def import_preset(data: bytes | None):
        if not data:
            return gr.skip(), gr.skip()
        try:
            preset = studio.presets.import_bytes(data)
        except SfumatoError as error:
            gr.Warning(_problems_text(error), title="Preset not imported")
            return gr.skip(), f"Not imported: {_problems_text(error)}"
        return refreshed(preset.name), f"Imported preset **{preset.name}**."

    def import_styles(data: bytes | None):
        if not data:
            return gr.skip(), gr.skip()
        try:
            presets = studio.presets.import_styles_csv(data)
        except SfumatoError as error:
            gr.Warning(_problems_text(error), title="styles.csv not imported")
            return gr.skip(), f"Not imported: {_problems_text(error)}"
        return refreshed(), f"Imported {len(presets)} style(s) as presets: " + ", ".join(p.name for p in presets)

    private = {"api_visibility": "private"}
    c = controls
    # Presets saved from another tab show up when the list is opened. Only the choices are sent: the reply may land
    # after the artist has picked one, and sending the value seen at focus would undo that pick.
    dropdown.focus(lambda: gr.update(choices=preset_names(studio)), None, dropdown, queue=False, **private)
    dropdown.change(describe, dropdown, c.description, queue=False, **private)
    dropdown.change(hidden_question, None, [c.delete_confirm_row, c.pending_delete], queue=False, **private)
    loaded = c.load.click(load, [dropdown, model_dropdown, *field_components],
                          [model_dropdown, *field_components, *extension_components, status, tab.sampling_note], **private)
    c.apply_style.click(apply_as_style, [dropdown, *prompt_components], [*prompt_components, status], **private)
    c.save.click(save, [c.name, c.text, c.include_model, model_dropdown, *field_components], [dropdown, status], **private)
    c.delete.click(ask_delete, dropdown, [c.delete_confirm_row, c.delete_question, c.pending_delete], **private)
    c.delete_confirm.click(delete, c.pending_delete, [dropdown, status, c.delete_confirm_row, c.pending_delete], **private)
    c.delete_cancel.click(hidden_question, None, [c.delete_confirm_row, c.pending_delete], queue=False, **private)
    c.export.click(export, dropdown, c.export_file, **private)
    c.import_preset.upload(import_preset, c.import_preset, [dropdown, status], **private)
    c.import_styles.upload(import_styles, c.import_styles, [dropdown, status], **private)
    return loaded
