"""ControlNet's controls for a generation tab (Gradio; imported only by the UI).

The builder follows the contract in ``ui/extension_ui.py``: it creates its
controls in the caller's Blocks and returns ``(components, to_settings,
from_settings)``. Each unit has the controls artists know from
sd-webui-controlnet: enable, image, preprocessor, model, weight, starting and
ending control step, control mode, resize mode, pixel perfect, preprocessor
resolution and sliders, and a preview of the preprocessed map.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from engine.errors import SfumatoError
from ui.image_formats import LOSSLESS
from ui.image_inputs import UploadImage, reject_bad_uploads

from . import preprocessors, units
from .hook import ControlNetRuntime

UNIT_FIELDS = ("enabled", "image", "module", "model", "weight", "guidance_start", "guidance_end", "control_mode", "resize_mode",
               "pixel_perfect", "processor_res", "threshold_a", "threshold_b")
NO_MODEL = "None"


def _model_choices(runtime: ControlNetRuntime) -> list[str]:
    return [NO_MODEL, *runtime.controlnets()]


def module_choices(models_dir: Path | None) -> list[tuple[str, str]]:
    """The Preprocessor dropdown's ``(label, name)`` pairs: checked now (packages and files), so an artist sees
    which ones cannot run before choosing one; the value stays sd-webui-controlnet's name."""
    choices = []
    for name in preprocessors.PREPROCESSORS:
        problem = preprocessors.availability(name, models_dir)
        if problem is None:
            choices.append((name, name))
        else:
            choices.append((f"{name} ({'needs weights' if problem.missing_weights else 'unavailable'})", name))
    return choices


def _slider_update(param: preprocessors.Param | None, value: float | None = None) -> dict:
    if param is None:
        return gr.update(visible=False, value=-1, minimum=-1)
    return gr.update(visible=True, label=param.label, minimum=param.minimum, maximum=param.maximum, step=param.step,
                     value=preprocessors.param_value(param, value))


def _unavailable_note(runtime: ControlNetRuntime, module: str) -> dict:
    reason = preprocessors.why_unavailable(module, runtime.models_dir)
    return gr.update(value=reason or "", visible=bool(reason))


def _module_changed(runtime: ControlNetRuntime):
    def changed(module: str):
        spec = preprocessors.get(module)
        return (gr.update(visible=spec.resolution), _slider_update(spec.threshold_a), _slider_update(spec.threshold_b),
                _unavailable_note(runtime, spec.name))

    return changed


def _preview(runtime: ControlNetRuntime):
    def preview(image, module: str, resolution: float, threshold_a: float, threshold_b: float):
        problem = preprocessors.availability(module, runtime.models_dir)
        if problem is not None:
            raise gr.Error(problem.sentence)
        if image is None:
            raise gr.Error("Upload a control image to preview its map.")
        try:
            return preprocessors.preprocess(module, image, int(resolution), threshold_a, threshold_b, runtime.models_dir)
        except SfumatoError as error:
            raise gr.Error(str(error)) from None

    return preview


def build(tab: str, runtime: ControlNetRuntime, unit_count: int = units.DEFAULT_UNIT_COUNT):
    """Create the ControlNet accordion for ``tab``; returns ``(components, to_settings, from_settings)``."""
    components: list = []
    image_label = "Control image" if tab == "txt2img" else "Control image (empty: use the source image)"
    initial = preprocessors.get("none")
    model_dropdowns = []
    module_dropdowns = []
    unavailable_notes = []
    with gr.Accordion("ControlNet", open=False, elem_id=f"{tab}_controlnet"):
        refresh = gr.Button("↻ Refresh ControlNet models", size="sm", elem_id=f"{tab}_controlnet_refresh")
        with gr.Tabs():
            for index in range(unit_count):
                prefix = f"{tab}_controlnet_{index}"
                with gr.Tab(f"Unit {index}", elem_id=prefix):
                    with gr.Row():
                        image = UploadImage(label=image_label, type="pil", sources=["upload", "clipboard"], format=LOSSLESS, height=220,
                                            elem_id=f"{prefix}_image")
                        checked_upload, = reject_bad_uploads(image)
                        preview = gr.Image(label="Preprocessor preview", interactive=False, format=LOSSLESS, height=220,
                                           elem_id=f"{prefix}_preview")
                    with gr.Row():
                        enabled = gr.Checkbox(False, label="Enable", elem_id=f"{prefix}_enabled")
                        pixel_perfect = gr.Checkbox(False, label="Pixel Perfect", elem_id=f"{prefix}_pixel_perfect")
                    with gr.Row(equal_height=True):
                        module = gr.Dropdown(module_choices(runtime.models_dir), value="none", label="Preprocessor", elem_id=f"{prefix}_module")
                        model = gr.Dropdown(_model_choices(runtime), value=NO_MODEL, label="Model", elem_id=f"{prefix}_model")
                        run_preview = gr.Button("Preview", scale=0, min_width=90, elem_id=f"{prefix}_run_preview")
                    unavailable = gr.Markdown("", visible=False, elem_id=f"{prefix}_unavailable")
                    weight = gr.Slider(*units.WEIGHT_RANGE, value=1.0, step=0.05, label="Control Weight", elem_id=f"{prefix}_weight")
                    with gr.Row():
                        start = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Starting Control Step", elem_id=f"{prefix}_start")
                        end = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="Ending Control Step", elem_id=f"{prefix}_end")
                    low, high = preprocessors.RESOLUTION_RANGE
                    resolution = gr.Slider(low, high, value=preprocessors.DEFAULT_RESOLUTION, step=8, label="Preprocessor Resolution",
                                           visible=initial.resolution, elem_id=f"{prefix}_processor_res")
                    with gr.Row():
                        threshold_a = gr.Slider(-1, 255, value=-1, label="Threshold A", visible=False, elem_id=f"{prefix}_threshold_a")
                        threshold_b = gr.Slider(-1, 255, value=-1, label="Threshold B", visible=False, elem_id=f"{prefix}_threshold_b")
                    control_mode = gr.Radio(list(units.CONTROL_MODES), value=units.CONTROL_MODES[0], label="Control Mode",
                                            elem_id=f"{prefix}_control_mode")
                    resize_mode = gr.Radio(list(units.RESIZE_MODES), value="Crop and Resize", label="Resize Mode",
                                           elem_id=f"{prefix}_resize_mode")

                module.change(_module_changed(runtime), module, [resolution, threshold_a, threshold_b, unavailable],
                              api_visibility="private", queue=False)
                # As A1111, an upload turns the unit on; one that the check refused (and cleared) leaves it as it was.
                checked_upload.then(lambda payload: gr.skip() if payload is None else True, image, enabled,
                                    preprocess=False, api_visibility="private", queue=False)
                run_preview.click(_preview(runtime), [image, module, resolution, threshold_a, threshold_b], preview,
                                  api_visibility="private")
                model_dropdowns.append(model)
                module_dropdowns.append(module)
                unavailable_notes.append(unavailable)
                components.extend([enabled, image, module, model, weight, start, end, control_mode, resize_mode, pixel_perfect,
                                   resolution, threshold_a, threshold_b])

    def refresh_lists(*chosen_modules: str):
        """Models and preprocessors again: weights put in models/annotators since the page loaded count now."""
        models, modules = _model_choices(runtime), module_choices(runtime.models_dir)
        return [*(gr.update(choices=models) for _ in model_dropdowns), *(gr.update(choices=modules) for _ in module_dropdowns),
                *(_unavailable_note(runtime, module) for module in chosen_modules)]

    refresh.click(refresh_lists, module_dropdowns, [*model_dropdowns, *module_dropdowns, *unavailable_notes], api_visibility="private",
                  queue=False)

    def to_settings(values: list) -> list[units.ControlNetUnit] | None:
        raw = [dict(zip(UNIT_FIELDS, values[i:i + len(UNIT_FIELDS)])) for i in range(0, len(values), len(UNIT_FIELDS))]
        for unit in raw:
            unit["processor_res"] = int(unit["processor_res"]) if unit["processor_res"] is not None else -1
        validated = units.validate_units(raw)
        return validated if any(unit.enabled for unit in validated) else None

    def from_settings(settings: Any) -> list:
        given = units.validate_units(settings)
        given = (given + units.default_units(unit_count))[:unit_count]
        values: list = []
        for unit in given:
            spec = preprocessors.PREPROCESSORS[unit.module]
            values.extend([
                unit.enabled, unit.image, unit.module, unit.model or NO_MODEL, unit.weight, unit.guidance_start, unit.guidance_end,
                unit.control_mode, unit.resize_mode, unit.pixel_perfect,
                unit.processor_res if unit.processor_res != -1 else preprocessors.DEFAULT_RESOLUTION,
                preprocessors.param_value(spec.threshold_a, unit.threshold_a) if spec.threshold_a else -1,
                preprocessors.param_value(spec.threshold_b, unit.threshold_b) if spec.threshold_b else -1,
            ])
        return values

    return components, to_settings, from_settings
