"""The Settings tab: persisted through ``studio.update_settings``; each change checked before anything is written."""
from __future__ import annotations

from dataclasses import asdict, fields as dataclass_fields
from typing import Any

import gradio as gr

from engine.devices import DEVICE_CHOICES, DTYPE_CHOICES
from engine.errors import SfumatoError
from engine.outputs import PATTERN_FIELDS, OutputWriter
from engine.request import PREVIEW_METHODS
from engine.settings import Settings

from .errors import message_for

RESTART_FIELDS = ("device", "dtype", "controlnet_units")
AUTOMATIC_MODEL = "(automatic)"


def checked_settings(studio, values: dict[str, Any]) -> Settings:
    """A validated Settings from the form; raises ValidationError naming the field. Nothing is saved here."""
    settings = Settings(**values).validate()
    OutputWriter(studio.config.outputs_dir, settings.output_pattern)  # rejects a bad pattern before it is persisted
    return settings


def build_settings_tab(studio) -> dict[str, Any]:
    current = studio.settings
    models = [AUTOMATIC_MODEL, *studio.registry.names()]
    with gr.Column():
        gr.Markdown("Settings are saved to `settings.json` in your user folder and survive restarts.")
        with gr.Row():
            preview_every = gr.Slider(0, 150, value=current.preview_every, step=1, precision=0,
                                      label="Live preview every N steps (0 = off)", elem_id="settings_preview_every")
            preview_method = gr.Radio(list(PREVIEW_METHODS), value=current.preview_method, label="Live preview method",
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
        default_model = gr.Dropdown(models, value=current.default_model or AUTOMATIC_MODEL, label="Default model at start",
                                    allow_custom_value=True, elem_id="settings_default_model")
        with gr.Row():
            device = gr.Dropdown(list(DEVICE_CHOICES), value=current.device, label="Device (after restart)", elem_id="settings_device")
            dtype = gr.Dropdown(list(DTYPE_CHOICES), value=current.dtype, label="Precision (after restart)", elem_id="settings_dtype")
            units = gr.Slider(1, 8, value=current.controlnet_units, step=1, precision=0, label="ControlNet units (after restart)",
                              elem_id="settings_controlnet_units")
        apply = gr.Button("Apply settings", variant="primary", elem_id="settings_apply")
        # Values settings.json held that could not be used were put back to their defaults at start: say which.
        status = gr.Markdown("\n\n".join(f"⚠️ {warning}" for warning in studio.settings_store.warnings), elem_id="settings_status")

    components = {"preview_every": preview_every, "preview_method": preview_method, "output_pattern": output_pattern,
                  "default_model": default_model, "device": device, "dtype": dtype, "controlnet_units": units,
                  "save_outputs": save_outputs, "save_interrupted_images": save_interrupted}
    order = [f.name for f in dataclass_fields(Settings) if f.name in components]

    def save(*values):
        form = {**asdict(studio.settings), **dict(zip(order, values))}  # settings this tab has no control for are kept
        form["default_model"] = "" if form["default_model"] in (None, AUTOMATIC_MODEL) else form["default_model"]
        form["preview_every"], form["controlnet_units"] = int(form["preview_every"]), int(form["controlnet_units"])
        try:
            settings = checked_settings(studio, form)
            before = asdict(studio.settings)
            studio.update_settings(settings)
        except SfumatoError as error:
            gr.Warning(message_for(error), title="Settings not saved")
            return f"⚠️ Not saved: {message_for(error)}"
        later = [name for name in RESTART_FIELDS if before.get(name) != form[name]]
        note = f" Restart Sfumato for {', '.join(later)} to take effect." if later else ""
        return f"Saved.{note}"

    apply.click(save, [components[name] for name in order], status, api_visibility="private")
    return components
