"""The Gallery tab: this session's results, and a listing of the outputs folder."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from engine.errors import ValidationError
from engine.untrusted_images import read_untrusted_image

from .generation_tab import ResultRecord, selected_texts
from .image_formats import LOSSLESS

RECENT_LIMIT = 48
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def recent_outputs(root: Path, limit: int = RECENT_LIMIT) -> list[Path]:
    """The newest image files under the outputs folder, newest first."""
    if not root.is_dir():
        return []
    files = []
    for path in root.rglob("*"):
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file():
            try:
                files.append((path.stat().st_mtime, path))
            except OSError:
                continue
    files.sort(reverse=True)
    return [path for _, path in files[:limit]]


def outputs_listing(root: Path) -> tuple[str, list[list[Any]], list[tuple[Image.Image, str]]]:
    """(heading, table rows, gallery items) for the outputs folder."""
    paths = recent_outputs(root)
    rows, items = [], []
    for path in paths:
        try:
            stat = path.stat()
            image = read_untrusted_image(path, "image")  # the copy keeps the parameters chunk in .info
        except (OSError, ValidationError):  # anything can be dropped into the outputs folder
            continue
        relative = path.relative_to(root).as_posix()
        rows.append([relative, f"{stat.st_size / 1024:.1f} KiB", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stat.st_mtime))])
        items.append((image, relative))
    heading = f"**Outputs folder:** `{root}` — {len(rows)} most recent image(s)" if rows else f"**Outputs folder:** `{root}` — no images yet"
    return heading, rows, items


def build_gallery_tab(studio, session_gallery: gr.State) -> dict[str, Any]:
    with gr.Row():
        with gr.Column(scale=3):
            refresh = gr.Button("Refresh", size="sm", elem_id="session_gallery_refresh")
            gallery = gr.Gallery(label="This session's images", format=LOSSLESS, columns=6, height=460, object_fit="contain",
                                 elem_id="session_gallery", elem_classes=["sfumato-results"], buttons=["download", "fullscreen"],
                                 interactive=False)
        with gr.Column(scale=2):
            infotext = gr.Textbox(label="Generation parameters (selected image)", lines=6, interactive=False,
                                  elem_id="session_gallery_infotext", buttons=["copy"])
            saved = gr.Markdown("", elem_id="session_gallery_saved")
            with gr.Row():
                send = {target: gr.Button(f"Send to {target}", size="sm", elem_id=f"session_gallery_send_to_{target}")
                        for target in ("txt2img", "img2img", "inpaint")}
    selected = gr.State(0)
    with gr.Accordion("Outputs folder", open=False, elem_id="outputs_folder"):
        show_outputs = gr.Button("Show outputs folder", size="sm", elem_id="outputs_show")
        heading = gr.Markdown("", elem_id="outputs_heading")
        table = gr.Dataframe(headers=["file", "size", "modified"], interactive=False, elem_id="outputs_table", wrap=True)
        outputs_gallery = gr.Gallery(label="Recent outputs", format=LOSSLESS, columns=8, height=300, object_fit="contain",
                                     elem_id="outputs_gallery", elem_classes=["sfumato-results"], interactive=False)

    # The gallery shows the newest first; ``selected`` holds the index into the session list itself.
    def show_session(records: list[ResultRecord]):
        records = records or []
        items = [record.gallery_item() for record in reversed(records)]
        newest = len(records) - 1
        if newest < 0:
            return items, "", "", 0
        return items, *selected_texts(records, newest), newest

    def select(records: list[ResultRecord], event: gr.SelectData):
        records = records or []
        shown = event.index if isinstance(event.index, int) else 0
        index = len(records) - 1 - shown
        if not 0 <= index < len(records):
            return gr.skip(), gr.skip(), gr.skip()
        return *selected_texts(records, index), index

    private = {"api_visibility": "private"}
    refresh.click(show_session, session_gallery, [gallery, infotext, saved, selected], **private)
    gallery.select(select, session_gallery, [infotext, saved, selected], **private)
    show_outputs.click(lambda: outputs_listing(Path(studio.config.outputs_dir)), None, [heading, table, outputs_gallery], **private)
    return {"gallery": gallery, "show_session": show_session, "outputs": [gallery, infotext, saved, selected],
            "send": send, "records": session_gallery, "selected": selected}
