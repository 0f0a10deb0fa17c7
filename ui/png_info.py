"""The PNG Info tab: read how an image was made and send it back to a generation tab.

Reads Sfumato's and A1111's ``parameters`` chunk, A1111 JPEG/WebP EXIF
UserComment and ComfyUI's ``prompt``/``workflow`` chunks through
``engine.image_metadata.read_generation_info``.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from engine.errors import SfumatoError
from engine.image_metadata import read_generation_info
from engine.infotext import loading_notes, parse_infotext, request_fields_from_infotext

from .errors import message_for
from .image_formats import LOSSLESS
from .image_inputs import UploadImage, reject_bad_uploads


def read_image_info(path: str | None) -> tuple[str, dict[str, Any], str, str, str]:
    """(infotext, parsed parameters, ComfyUI prompt JSON, ComfyUI workflow JSON, summary line)."""
    if not path:
        return "", {}, "", "", ""
    try:
        info = read_generation_info(path)
    except SfumatoError as error:
        return "", {}, "", "", f"⚠️ {message_for(error)}"
    parsed: dict[str, Any] = {}
    notes: list[str] = []
    if info.infotext:
        parameters = parse_infotext(info.infotext)
        understood = request_fields_from_infotext(parameters)
        notes = loading_notes(parameters, understood)
        parsed = {"parameters": parameters, "restores": {key: list(value) if isinstance(value, tuple) else value
                                                         for key, value in understood.items()}}
        if notes:
            parsed["notes"] = notes
    if info.other_chunks:
        parsed["other chunks"] = info.other_chunks
    found = [label for label, value in (("generation parameters", info.infotext), ("ComfyUI prompt", info.comfy_prompt),
                                         ("ComfyUI workflow", info.comfy_workflow)) if value]
    size = f"{info.size[0]}×{info.size[1]}" if info.size else "?"
    summary = f"{info.format or 'image'} {size}: " + (", ".join(found) if found else "no generation info found")
    summary += "".join(f"\n\n⚠️ {note}" for note in notes)
    return info.infotext or "", parsed, info.comfy_prompt or "", info.comfy_workflow or "", summary


def build_png_info_tab() -> dict[str, Any]:
    """Lay out the tab (inside the current gr.Tab); returns its components by role."""
    with gr.Row():
        with gr.Column(scale=1):
            image = UploadImage(label="Drop an image here", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                format=LOSSLESS, height=400, elem_id="pnginfo_image")
            reject_bad_uploads(image)
            summary = gr.Markdown("", elem_id="pnginfo_summary")
            with gr.Row():
                send = {target: gr.Button(f"Send to {target}", elem_id=f"pnginfo_send_to_{target}", size="sm")
                        for target in ("txt2img", "img2img", "inpaint")}
        with gr.Column(scale=1):
            infotext = gr.Textbox(label="Generation parameters", lines=6, interactive=False, elem_id="pnginfo_infotext",
                                  buttons=["copy"])
            parsed = gr.JSON(label="Parsed parameters", elem_id="pnginfo_parsed")
            with gr.Accordion("ComfyUI prompt", open=False):
                comfy_prompt = gr.Code(label="prompt (JSON)", language="json", interactive=False, elem_id="pnginfo_comfy_prompt")
            with gr.Accordion("ComfyUI workflow", open=False):
                comfy_workflow = gr.Code(label="workflow (JSON)", language="json", interactive=False, elem_id="pnginfo_comfy_workflow")

    image.change(read_image_info, image, [infotext, parsed, comfy_prompt, comfy_workflow, summary], api_name="png_info")
    return {"image": image, "infotext": infotext, "send": send}
