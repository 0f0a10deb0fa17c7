"""'Send to txt2img / img2img / inpaint': an image and its infotext restored into another tab.

The infotext is parsed with ``engine.infotext`` and mapped onto request fields,
so every field the target tab has is restored the same way for results, the
session gallery and PNG Info. Like A1111, sending a result carries its prompt
and main settings; PNG Info restores everything it understands.
"""
from __future__ import annotations

from typing import Any

import gradio as gr
from PIL import Image

from engine.errors import ValidationError
from engine.fields import FIELDS
from engine.infotext import loading_notes, parse_infotext, request_fields_from_infotext
from engine.untrusted_images import read_untrusted_image

from .extension_ui import all_components
from .generation_tab import GenerationTab, ResultRecord
from .model_info import installed_name

# What "send to" from a result carries (A1111: prompt, negative, steps, seed and size, plus our sampling settings).
RESULT_FIELDS = ("prompt", "negative_prompt", "sampler", "schedule", "zero_terminal_snr", "steps", "cfg_scale",
                 "distilled_cfg_scale", "seed", "width", "height")

# PNG Info restores everything: a field an infotext leaves out because it was off (its declaration writes it only
# when set) goes back to its default. Not the RNG: A1111 leaves out its default, GPU noise, which the note explains.
FULL_RESTORE_DEFAULTS = {field.name: field.default for field in FIELDS.core()
                         if field.infotext_when is not None and field.name != "rng"}


# Fields whose pickers sit above the tabs: the model is sent with the tab's fields, the VAE and the VAE / Text
# Encoder files to their own pickers.
_ABOVE_THE_TABS = ("model", "vae", "modules")


def fields_from_infotext(infotext: str | None, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    if not infotext:
        return {}
    fields = request_fields_from_infotext(parse_infotext(infotext))
    return {key: value for key, value in fields.items() if only is None or key in only or key == "model"}


def network_notes(studio, infotext: str) -> list[str]:
    """What PNG Info cannot reproduce from the picture's extra networks: LoRAs, embeddings and the VAE missing
    here, or here under their names with other contents (their hashes differ)."""
    from engine.networks import embeddings, library, vae_files

    params = parse_infotext(infotext)
    registry = studio.registry
    engine = getattr(studio, "engine", None)
    loras = library.infotext_problems(params, engine.networks) if engine is not None else []
    return loras + embeddings.infotext_problems(params, registry.embeddings) + vae_files.infotext_problems(params, registry.vaes)


def vae_choice(studio, infotext: str) -> str | None:
    """The SD VAE picker's value for the VAE file an infotext names ("VAE: name.safetensors"), None when it names
    none or that file is not here (``network_notes`` says so)."""
    name = parse_infotext(infotext).get(FIELDS["vae"].infotext)
    if not isinstance(name, str) or not name.strip():
        return None
    vaes = studio.registry.vaes
    if name in vaes.choices():
        return name
    try:
        found = vaes.find(name).name
    except ValidationError:
        return None
    return found if found in vaes.choices() else None


def modules_choice(studio, infotext: str) -> list[str] | None:
    """The VAE / Text Encoder picker's value for Forge's "Module 1: ae, Module 2: clip_l..." (file names without
    their extension): the files here that those names find, None when the infotext names none. A name found
    nowhere is left out (the model then loads the one set of files that fits)."""
    from engine.model_files.folders import find_module, module_files

    names = request_fields_from_infotext(parse_infotext(infotext)).get("modules")
    if not names:
        return None
    models_dir = studio.registry.models_dir
    files = module_files(models_dir)
    found = [find_module(name, files, models_dir) for name in names]
    return list(dict.fromkeys(path.name for path in found if path is not None))


def infotext_notes(infotext: str, target: GenerationTab) -> list[str]:
    """What sending this infotext to ``target`` cannot reproduce: shown to the artist, never dropped silently."""
    parameters = parse_infotext(infotext)
    applied = request_fields_from_infotext(parameters)
    notes = loading_notes(parameters, applied)
    unused = [FIELDS[name].infotext or name for name in applied if name not in target.fields and name not in _ABOVE_THE_TABS and name in FIELDS]
    if unused:
        notes.append(f"Not used by {target.mode}: " + ", ".join(unused) + ".")
    return notes


def target_outputs(tabs: gr.Tabs, target: GenerationTab, model_dropdown) -> list:
    extra = [component for component in (target.image, target.own_size) if component is not None]
    return [tabs, model_dropdown, *target.fields.components(), *extra, *all_components(target.extensions)]


def extension_updates(target: GenerationTab, settings: dict[str, Any]) -> list:
    """Control values for each extension whose settings are given (and that can fill its controls back in)."""
    updates: list = []
    for control in target.extensions:
        values = None
        if control.name in settings and control.from_settings is not None:
            try:
                values = list(control.from_settings(settings[control.name]))
            except Exception as error:  # noqa: BLE001 - a settings mismatch must not stop the rest from being restored
                gr.Warning(f"Could not restore the {control.name} settings: {error}")
        if values is None or len(values) != len(control.components):
            values = [gr.skip()] * len(control.components)
        updates.extend(values)
    return updates


def target_updates(studio, target: GenerationTab, fields: dict[str, Any], image: Image.Image | None,
                   extension_settings: dict[str, Any] | None = None) -> list:
    model_update: Any = gr.skip()
    model = fields.pop("model", None)
    if model is not None:
        if (installed := installed_name(studio, model)) is not None:
            model_update = installed  # an A1111 infotext names the file's stem; older Sfumato ones its path
        else:
            gr.Warning(f"The image was made with model {model!r}, which is not installed; keeping the current model.")
    updates = [gr.Tabs(selected=target.mode), model_update, *target.fields.updates(fields)]
    if target.image is not None:
        if image is None:
            updates.append(gr.skip())
        elif target.mode == "inpaint":
            rgb = image.convert("RGB")
            updates.append({"background": rgb, "layers": [], "composite": rgb})
        else:
            updates.append(image.convert("RGB"))
    if target.own_size is not None:
        updates.append(True if image is not None else gr.skip())
    return updates + extension_updates(target, extension_settings or {})


def extension_settings_from_infotext(studio, infotext: str) -> dict[str, Any]:
    manager = getattr(studio, "extensions", None)
    if manager is None or not hasattr(manager, "parse_infotext"):
        return {}
    try:
        return dict(manager.parse_infotext(parse_infotext(infotext)))
    except Exception:  # noqa: BLE001 - PNG Info must work whatever an extension does
        return {}


def selected_record(records: list[ResultRecord] | None, index: int | None) -> ResultRecord | None:
    if not records:
        return None
    return records[min(max(index or 0, 0), len(records) - 1)]


def wire_result_send(studio, button: gr.Button, tabs: gr.Tabs, target: GenerationTab, model_dropdown, records: gr.State,
                     selected: gr.State) -> None:
    """A results 'send to' button: the selected result's image and main settings."""
    def send(record_list, index):
        record = selected_record(record_list, index)
        if record is None:
            gr.Warning("Generate or select an image first.")
            return [gr.skip()] * len(target_outputs(tabs, target, model_dropdown))
        fields = fields_from_infotext(record.infotext, RESULT_FIELDS)
        fields.pop("model", None)  # the model stays as chosen at the top
        return target_updates(studio, target, fields, record.image)

    button.click(send, [records, selected], target_outputs(tabs, target, model_dropdown), api_visibility="private")


def wire_infotext_send(studio, button: gr.Button, tabs: gr.Tabs, target: GenerationTab, model_dropdown, infotext, image_path,
                       vae_dropdown=None, modules_dropdown=None):
    """PNG Info's 'send to': every field the infotext holds, plus the image for img2img/inpaint, the VAE it names and
    the text encoder / VAE files a Forge infotext names ("Module 1: ae..."). Returns the click event, for what follows
    the model it may set."""
    outputs = target_outputs(tabs, target, model_dropdown) + [picker for picker in (vae_dropdown, modules_dropdown)
                                                               if picker is not None]

    def send(text, path):
        if not text:
            gr.Warning("This image has no generation parameters to send.")
            return [gr.skip()] * len(outputs)
        image = None
        if path and target.image is not None:
            try:
                image = read_untrusted_image(path, "image").convert("RGB")
            except ValidationError as error:
                gr.Warning(f"The image cannot be sent: {error.message}.")
                return [gr.skip()] * len(outputs)
        fields = {**FULL_RESTORE_DEFAULTS, **fields_from_infotext(text)}
        for note in infotext_notes(text, target):
            gr.Warning(note, title="Not everything in this infotext can be applied")
        problems = "; ".join(network_notes(studio, text))
        if problems:  # one note listing them all
            gr.Warning(problems[:1].upper() + problems[1:] + ".", title="Extra networks differ from the picture's")
        updates = target_updates(studio, target, fields, image, extension_settings_from_infotext(studio, text))
        if vae_dropdown is not None:
            updates.append(vae_choice(studio, text) or gr.skip())
        if modules_dropdown is not None:
            picks = modules_choice(studio, text)
            updates.append(gr.skip() if picks is None else picks)
        return updates

    return button.click(send, [infotext, image_path], outputs, api_visibility="private")
