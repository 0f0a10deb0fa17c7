"""The Settings tab: persisted through ``studio.update_settings``; each change checked before anything is written."""
from __future__ import annotations

import logging
from dataclasses import asdict, fields as dataclass_fields
from typing import Any

import gradio as gr

from engine.devices import DEVICE_CHOICES, DTYPE_CHOICES
from engine.errors import SfumatoError, ValidationError
from engine.outputs import PATTERN_FIELDS, OutputWriter
from engine.fields import FIELDS, Field
from engine.request import check_declared
from engine.settings import Settings

from .errors import message_for

# Read once at start: these take effect after a restart (extensions read their own settings when they load, too).
RESTART_FIELDS = ("device", "dtype")
log = logging.getLogger("sfumato.ui")
AUTOMATIC_MODEL = "(automatic)"


def checked_settings(studio, values: dict[str, Any]) -> Settings:
    """A validated Settings from the form; raises ValidationError naming the field. Nothing is saved here."""
    settings = Settings(**values).validate()
    OutputWriter(studio.config.outputs_dir, settings.output_pattern)  # rejects a bad pattern before it is persisted
    return settings


def extension_settings(studio) -> list[Field]:
    """Each loaded extension's declared settings; a manager that cannot say gives none (the tab still builds)."""
    try:
        loaded = studio.extensions.loaded
        return [declared for extension in loaded.values() for declared in getattr(extension, "settings", ())]
    except Exception:  # noqa: BLE001 - a broken extension must not take the Settings tab with it
        log.exception("could not read the extensions' settings")
        return []


def _setting_control(declared: Field, value: Any):
    """A Settings control built from an extension setting's declaration."""
    elem_id = f"settings_{declared.owner}_{declared.name}"
    common = {"label": declared.label or declared.name, "info": declared.help or None, "elem_id": elem_id}
    if declared.type is bool:
        return gr.Checkbox(bool(value), **common)
    if declared.choices is not None:
        return gr.Dropdown(declared.choice_list(), value=value, **common)
    if declared.range is not None and declared.type in (int, float):
        return gr.Slider(*declared.limits, value=value, step=declared.step or (1 if declared.type is int else 0.01),
                         precision=0 if declared.type is int else None, **common)
    return gr.Textbox("" if value is None else str(value), **common)


def _extension_value(declared: Field, value: Any) -> Any:
    """A control's value as the setting's type, checked against its declared limits (ValidationError naming it)."""
    if declared.type is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        return check_declared(declared, value)
    except ValidationError as error:
        raise ValidationError(declared.label or f"{declared.owner}.{declared.name}", error.message) from None


def build_settings_tab(studio) -> dict[str, Any]:
    current = studio.settings
    models = [AUTOMATIC_MODEL, *studio.registry.names()]
    with gr.Column():
        gr.Markdown("Settings are saved to `settings.json` in your user folder and survive restarts.")
        with gr.Row():
            preview_every = gr.Slider(*FIELDS["preview_every"].range, value=current.preview_every, step=1, precision=0,
                                      label="Live preview every N steps (0 = off)", elem_id="settings_preview_every")
            preview_method = gr.Radio(FIELDS["preview_method"].choice_list(), value=current.preview_method, label="Live preview method",
                                      info="cheap: instant colour approximation; full: the model's VAE (slower); taesd: tiny VAE if installed",
                                      elem_id="settings_preview_method")
        output_pattern = gr.Textbox(current.output_pattern, label="Output file pattern",
                                    info="Fields: " + ", ".join("{" + name + "}" for name in PATTERN_FIELDS) + "; '/' makes folders",
                                    elem_id="settings_output_pattern")
        save_outputs = gr.Checkbox(current.save_outputs, label="Save every generated image to the outputs folder", elem_id="settings_save_outputs")
        save_interrupted = gr.Checkbox(current.save_interrupted_images, label="Save images when interrupted",
                                       info="Also save an image stopped by Interrupt or Skip before its last step; its infotext then "
                                            "says where it stopped (\"Interrupted at step: 2/20\"). Such images are always shown.",
                                       elem_id="settings_save_interrupted")
        memory_check = gr.Checkbox(current.memory_check, label="Refuse a model that would not fit in free memory",
                                   info="Before loading, a model's memory estimate (shown on its checkpoint card) is compared "
                                        "with the free RAM and GPU memory; off: load it anyway (it may run out of memory)",
                                   elem_id="settings_memory_check")
        default_model = gr.Dropdown(models, value=current.default_model or AUTOMATIC_MODEL, label="Default model at start",
                                    allow_custom_value=True, elem_id="settings_default_model")
        with gr.Row():
            device = gr.Dropdown(list(DEVICE_CHOICES), value=current.device, label="Device (after restart)", elem_id="settings_device")
            dtype = gr.Dropdown(list(DTYPE_CHOICES), value=current.dtype, label="Precision (after restart)", elem_id="settings_dtype")
        extension_controls = {}
        for declared in extension_settings(studio):
            saved = current.extensions.get(declared.owner, {}).get(declared.name, declared.default)
            extension_controls[(declared.owner, declared.name)] = (declared, _setting_control(declared, saved))
        apply = gr.Button("Apply settings", variant="primary", elem_id="settings_apply")
        # Values settings.json held that could not be used were put back to their defaults at start: say which.
        status = gr.Markdown("\n\n".join(f"⚠️ {warning}" for warning in studio.settings_store.warnings), elem_id="settings_status")

    components = {"preview_every": preview_every, "preview_method": preview_method, "output_pattern": output_pattern,
                  "default_model": default_model, "device": device, "dtype": dtype,
                  "save_outputs": save_outputs, "save_interrupted_images": save_interrupted, "memory_check": memory_check}
    order = [f.name for f in dataclass_fields(Settings) if f.name in components]
    extension_keys = list(extension_controls)

    def save(*values):
        form = {**asdict(studio.settings), **dict(zip(order, values))}  # settings this tab has no control for are kept
        form["default_model"] = "" if form["default_model"] in (None, AUTOMATIC_MODEL) else form["default_model"]
        form["preview_every"] = int(form["preview_every"])
        extensions = {name: dict(saved) for name, saved in form["extensions"].items()}
        try:
            for (owner, name), value in zip(extension_keys, values[len(order):]):
                extensions.setdefault(owner, {})[name] = _extension_value(extension_controls[(owner, name)][0], value)
            form["extensions"] = extensions
            settings = checked_settings(studio, form)
            before = asdict(studio.settings)
            studio.update_settings(settings)
        except SfumatoError as error:
            gr.Warning(message_for(error), title="Settings not saved")
            return f"⚠️ Not saved: {message_for(error)}"
        later = [name for name in RESTART_FIELDS if before.get(name) != form[name]]
        later += [f"{owner}.{name}" for owner, name in extension_keys
                  if before["extensions"].get(owner, {}).get(name) != form["extensions"][owner][name]]
        note = f" Restart Sfumato for {', '.join(later)} to take effect." if later else ""
        return f"Saved.{note}"

    apply.click(save, [*[components[name] for name in order], *[control for _, control in extension_controls.values()]], status,
                api_visibility="private")
    return {**components, **{f"{owner}.{name}": control for (owner, name), (_, control) in extension_controls.items()}}
