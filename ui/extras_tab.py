"""The Extras tab: upscale one image or a batch with the upscalers ``engine.upscalers`` knows (A1111's layout:
single image or batch, upscaler 1 and 2 with visibility, scale by or scale to). The work is ``engine.extras``;
this file only lays out the controls and turns their values into an ``ExtrasRequest``."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr

from engine.errors import SfumatoError
from engine.extras import MAX_FACTOR, MAX_SIDE, SCALE_BY, SCALE_TO, ExtrasRequest, ExtrasSource
from engine.upscalers.library import NONE

from .errors import ui_error
from .image_formats import LOSSLESS
from .image_inputs import UploadImage, reject_bad_uploads
from .tool_buttons import REFRESH_MODELS, tool_button

SINGLE, BATCH = "single", "batch"


def extras_sources(mode: str, single: str | None, batch: list | None) -> list[ExtrasSource]:
    """The pictures the chosen mode works on: the single upload, or every file of the batch."""
    if mode == BATCH:
        paths = [getattr(item, "name", item) for item in batch or []]
        return [ExtrasSource(path, name=Path(path).name, field="Batch") for path in paths]
    return [ExtrasSource(single, field="Source")] if single else []


def run_extras_tab(studio, mode: str, single: str | None, batch: list | None, scale_mode: int, factor: float,
                   width: float, height: float, crop: bool, upscaler_1: str, upscaler_2: str, visibility: float):
    """(gallery items, the Postprocess record as HTML) for the tab's values; saved as the settings say."""
    sources = extras_sources(mode, single, batch)
    if not sources:
        raise gr.Error("Upload an image first" if mode == SINGLE else "Add images to the batch first", print_exception=False)
    request = ExtrasRequest(resize_mode=int(scale_mode), upscaling_resize=float(factor), upscaling_resize_w=int(width),
                            upscaling_resize_h=int(height), upscaling_crop=bool(crop), upscaler_1=upscaler_1 or NONE,
                            upscaler_2=upscaler_2 or NONE, extras_upscaler_2_visibility=float(visibility))
    try:
        results = studio.extras(sources, request, save=studio.settings.save_outputs)
    except SfumatoError as error:
        raise ui_error(error, title="Cannot upscale") from None
    items = [(result.path, result.name or None) if result.path else (result.image, result.name or None) for result in results]
    record = results[-1].infotext if results else ""
    saved = [result.path for result in results if result.path]
    text = html.escape(record) + ("".join(f"<br>saved: {html.escape(path)}" for path in saved))
    return items, f"<p>{text}</p>"


def build_extras_tab(studio) -> dict[str, Any]:
    """Lay out the tab (inside the current gr.Tab); returns its components by role."""
    library = studio.registry.upscalers
    mode = gr.State(SINGLE)
    scale_mode = gr.State(SCALE_BY)
    with gr.Row():
        with gr.Column(scale=1):
            with gr.Tabs(elem_id="extras_source_tabs"):
                with gr.Tab("Single Image", elem_id="extras_single_tab") as single_tab:
                    single = UploadImage(label="Source", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                         format=LOSSLESS, height=360, elem_id="extras_image")
                    reject_bad_uploads(single)
                with gr.Tab("Batch Process", elem_id="extras_batch_tab") as batch_tab:
                    batch = gr.File(label="Batch", file_count="multiple", file_types=["image"], elem_id="extras_batch")
            with gr.Row(equal_height=True):
                upscaler_1 = gr.Dropdown(library.names(), value=NONE, label="Upscaler 1", elem_id="extras_upscaler_1", scale=4)
                refresh = tool_button(REFRESH_MODELS, "extras_upscalers_refresh")
            with gr.Row():
                upscaler_2 = gr.Dropdown(library.names(), value=NONE, label="Upscaler 2", elem_id="extras_upscaler_2")
                visibility = gr.Slider(0.0, 1.0, value=0.0, step=0.001, label="Upscaler 2 visibility",
                                       elem_id="extras_upscaler_2_visibility")
            with gr.Tabs(elem_id="extras_resize_mode"):
                with gr.Tab("Scale by", elem_id="extras_scale_by_tab") as by_tab:
                    factor = gr.Slider(1.0, MAX_FACTOR, value=4, step=0.05, label="Resize", elem_id="extras_upscaling_resize")
                with gr.Tab("Scale to", elem_id="extras_scale_to_tab") as to_tab:
                    with gr.Row():
                        width = gr.Slider(64, MAX_SIDE, value=512, step=8, label="Width", elem_id="extras_upscaling_resize_w")
                        height = gr.Slider(64, MAX_SIDE, value=512, step=8, label="Height", elem_id="extras_upscaling_resize_h")
                    crop = gr.Checkbox(True, label="Crop to fit", elem_id="extras_upscaling_crop")
            run = gr.Button("Generate", variant="primary", elem_id="extras_generate")
        with gr.Column(scale=1):
            gallery = gr.Gallery(label="Results", format=LOSSLESS, columns=2, height=460, object_fit="contain",
                                 elem_id="extras_gallery", elem_classes=["sfumato-results"], buttons=["download", "fullscreen"],
                                 interactive=False)
            info = gr.HTML("", elem_id="extras_info")

    private = {"api_visibility": "private"}
    single_tab.select(lambda: SINGLE, None, mode, **private)
    batch_tab.select(lambda: BATCH, None, mode, **private)
    by_tab.select(lambda: SCALE_BY, None, scale_mode, **private)
    to_tab.select(lambda: SCALE_TO, None, scale_mode, **private)

    def refresh_upscalers(first: str, second: str):
        library.refresh()
        names = library.names()
        return (gr.update(choices=names, value=first if first in names else NONE),
                gr.update(choices=names, value=second if second in names else NONE))

    refresh.click(refresh_upscalers, [upscaler_1, upscaler_2], [upscaler_1, upscaler_2], **private)
    run.click(lambda *values: run_extras_tab(studio, *values),
              [mode, single, batch, scale_mode, factor, width, height, crop, upscaler_1, upscaler_2, visibility],
              [gallery, info], **private)
    return {"image": single, "batch": batch, "upscaler_1": upscaler_1, "upscaler_2": upscaler_2, "gallery": gallery,
            "info": info, "run": run}
