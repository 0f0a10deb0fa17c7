"""The extra-networks browser under each tab's prompt: Lora, Textual Inversion and Checkpoints cards, as in A1111.

A card shows the file's preview picture (or a placeholder), its name, and for a LoRA the base model and trigger
words of its training metadata. Clicking a LoRA card inserts ``<lora:name:weight>`` (and the sidecar's activation
text) at the prompt's cursor, an embedding card its name; a checkpoint card loads that checkpoint. The ✎ on a card
edits its sidecar ``name.json`` (preferred weight, activation text, notes). The card data is ``engine.networks.cards``.

The insertion happens in the browser (``_CARDS_JS``), where the cursor is: it writes the textarea and sends it an
``input`` event, as typing would, so Gradio takes the new prompt as the artist's own. Pictures travel inside the
page as small data URLs, so the models folder is never served over HTTP.
"""
from __future__ import annotations

import base64
import functools
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gradio as gr

from engine.errors import SfumatoError
from engine.networks import cards as C
from engine.untrusted_images import read_untrusted_image

from .tool_buttons import REFRESH_MODELS, tool_button

TAB_LABELS = {C.LORA: "Lora", C.EMBEDDING: "Textual Inversion", C.CHECKPOINT: "Checkpoints"}
THUMBNAIL_PX = 192
SEARCH_DELAY_S = 0.3

# One listener per card grid. ``MODE`` is the tab's name; 'edit' and 'pick' are the events Python listens to.
_CARDS_JS = """
const insertText = (selector, text, atCursor) => {
  const box = document.querySelector(selector);
  if (!box || !text) return;
  const value = box.value;
  const start = atCursor && box.selectionStart != null ? box.selectionStart : value.length;
  const end = atCursor && box.selectionEnd != null ? box.selectionEnd : value.length;
  const before = value.slice(0, start), after = value.slice(end);
  const lead = before && !/\\s$/.test(before) ? ' ' : '';
  const trail = after && !/^\\s/.test(after) ? ' ' : '';
  box.value = before + lead + text + trail + after;
  const cursor = (before + lead + text).length;
  box.setSelectionRange(cursor, cursor);
  box.dispatchEvent(new Event('input', {bubbles: true}));
};
element.addEventListener('click', (event) => {
  const card = event.target.closest('.sfumato-card');
  if (!card) return;
  if (event.target.closest('.sfumato-card-edit')) { trigger('edit', {key: card.dataset.key}); return; }
  if (card.dataset.kind === 'checkpoint') { trigger('pick', {key: card.dataset.key}); return; }
  insertText('#MODE_prompt textarea', card.dataset.insert, true);
  insertText('#MODE_negative textarea', card.dataset.negative, false);
});
"""


@dataclass
class ExtraNetworksPanel:
    """The controls other parts of the app wire to: ``grids[CHECKPOINT]``'s ``pick`` event loads a checkpoint."""

    grids: dict[str, gr.HTML]
    search: gr.Textbox
    refresh: gr.Button


def cards_of(studio, kind: str) -> list[C.Card]:
    if kind == C.LORA:
        return C.lora_cards(studio.engine.networks)
    if kind == C.EMBEDDING:
        return C.embedding_cards(studio.registry.embeddings)
    return C.checkpoint_cards(studio.registry)


def card_by_key(studio, key: str | None) -> C.Card | None:
    kind = (key or "").partition(":")[0]
    if kind not in C.KINDS:
        return None
    return next((card for card in cards_of(studio, kind) if card.key == key), None)


@functools.lru_cache(maxsize=1024)
def _thumbnail(path: str, size: int, mtime_ns: int) -> str | None:
    """A preview picture as a small data URL (one version of the file per key), None when it does not open."""
    try:
        image = read_untrusted_image(Path(path), "preview")
    except (SfumatoError, OSError):
        return None
    image = image.convert("RGB")
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnail_url(preview: Path | None) -> str | None:
    if preview is None:
        return None
    try:
        stat = preview.stat()
    except OSError:
        return None
    return _thumbnail(str(preview), stat.st_size, stat.st_mtime_ns)


def card_html(card: C.Card) -> str:
    e = functools.partial(html.escape, quote=True)
    url = thumbnail_url(card.preview)
    picture = (f'<img src="{url}" alt="" loading="lazy">' if url
               else f'<div class="sfumato-card-placeholder">{e(card.name[:2].upper())}</div>')
    lines = [f'<div class="sfumato-card-name">{e(card.name)}</div>']
    if card.alias:
        lines.append(f'<div class="sfumato-card-line">alias {e(card.alias)}</div>')
    if card.base_model:
        lines.append(f'<div class="sfumato-card-line">base: {e(card.base_model)}</div>')
    if card.trigger_words:
        lines.append(f'<div class="sfumato-card-line">trigger: {e(", ".join(card.trigger_words))}</div>')
    if card.sidecar.activation_text:
        lines.append(f'<div class="sfumato-card-line">adds: {e(card.sidecar.activation_text)}</div>')
    if card.memory:
        lines.append(f'<div class="sfumato-card-line" title="{e(card.memory)}">memory: {e(card.memory.split(" at ")[0].removeprefix("needs "))}</div>')
    if card.problem:
        lines.append(f'<div class="sfumato-card-problem">⚠ {e(card.problem)}</div>')
    title = "\n".join(part for part in (str(card.path), card.memory, card.sidecar.description, card.sidecar.notes) if part)
    return (f'<div class="sfumato-card" data-kind="{e(card.kind)}" data-key="{e(card.key)}" data-insert="{e(card.prompt_text)}" '
            f'data-negative="{e(card.negative_text)}" title="{e(title)}">'
            f'<div class="sfumato-card-picture">{picture}</div>{"".join(lines)}'
            f'<button class="sfumato-card-edit" title="Edit the notes kept beside the file">✎</button></div>')


def grid_html(cards: list[C.Card], kind: str) -> str:
    if not cards:
        where = {C.LORA: "models/Lora or models/LyCORIS", C.EMBEDDING: "models/embeddings",
                 C.CHECKPOINT: "models/Stable-diffusion"}[kind]
        return f'<div class="sfumato-cards-empty">No {TAB_LABELS[kind]} files match (they live in {where}).</div>'
    return '<div class="sfumato-cards">' + "".join(card_html(card) for card in cards) + "</div>"


def render(studio, kind: str, search: str = "", folder: str = C.ALL_FOLDERS) -> str:
    return grid_html(C.filter_cards(cards_of(studio, kind), search, folder), kind)


def build_extra_networks_panel(studio, mode: str) -> ExtraNetworksPanel:
    """The browser, closed, in an accordion at the current place of the layout. Opening it lists the cards as they
    are now (nothing is read while it stays closed); the refresh button rescans the folders."""
    with gr.Accordion("Extra networks: Lora, Textual Inversion, Checkpoints", open=False,
                      elem_id=f"{mode}_extra_networks") as accordion:
        with gr.Row(equal_height=True):
            search = gr.Textbox(label="Search", placeholder="Search names, folders, trigger words and notes", scale=6,
                                elem_id=f"{mode}_extra_search")
            refresh = tool_button(REFRESH_MODELS, f"{mode}_extra_refresh")
        grids, folder_pickers, editor_parts = _panel_body(mode)
    _wire_panel(studio, accordion, search, refresh, grids, folder_pickers, *editor_parts)
    return ExtraNetworksPanel(grids=grids, search=search, refresh=refresh)


def _panel_body(mode: str):
    grids: dict[str, gr.HTML] = {}
    folder_pickers: dict[str, gr.Dropdown] = {}
    with gr.Tabs(elem_id=f"{mode}_extra_tabs"):
        for kind in C.KINDS:
            with gr.Tab(TAB_LABELS[kind], id=f"{mode}_extra_{kind}", elem_id=f"{mode}_extra_tab_{kind}"):
                folder_pickers[kind] = gr.Dropdown([C.ALL_FOLDERS], value=C.ALL_FOLDERS, label="Folder",
                                                   elem_id=f"{mode}_extra_folder_{kind}")
                grids[kind] = gr.HTML("", elem_id=f"{mode}_extra_cards_{kind}", js_on_load=_CARDS_JS.replace("MODE", mode),
                                      max_height=520)
    with gr.Group(visible=False, elem_id=f"{mode}_extra_editor") as editor:
        editing = gr.State(None)
        editor_title = gr.Markdown()
        with gr.Row():
            weight = gr.Number(label="Preferred weight (0: the default, 1)", value=0, step=0.05, elem_id=f"{mode}_extra_weight")
            activation = gr.Textbox(label="Activation text (added after the tag)", scale=3, elem_id=f"{mode}_extra_activation")
        notes = gr.Textbox(label="Notes", lines=2, elem_id=f"{mode}_extra_notes")
        with gr.Row():
            save = gr.Button("Save", variant="primary", size="sm", elem_id=f"{mode}_extra_save")
            cancel = gr.Button("Cancel", size="sm", elem_id=f"{mode}_extra_cancel")
    return grids, folder_pickers, (editor, editing, editor_title, weight, activation, notes, save, cancel)


def _wire_panel(studio, accordion, search, refresh, grids, folder_pickers, editor, editing, editor_title, weight, activation,
                notes, save, cancel) -> None:
    kinds = list(C.KINDS)
    grid_outputs = [grids[kind] for kind in kinds]
    picker_inputs = [folder_pickers[kind] for kind in kinds]

    def render_all(text, *chosen_folders):
        return [render(studio, kind, text, folder) for kind, folder in zip(kinds, chosen_folders)]

    def listed(text, *chosen_folders):
        pickers = []
        for kind, folder in zip(kinds, chosen_folders):
            choices = C.folders(cards_of(studio, kind))
            pickers.append(gr.update(choices=choices, value=folder if folder in choices else C.ALL_FOLDERS))
        return [*render_all(text, *chosen_folders), *pickers]

    def rescan(text, *chosen_folders):
        studio.engine.networks.refresh()
        studio.registry.embeddings.refresh()
        studio.registry.refresh()
        return listed(text, *chosen_folders)

    search.change(render_all, [search, *picker_inputs], grid_outputs, api_visibility="private", trigger_mode="always_last",
                  show_progress="hidden")
    for kind in kinds:
        folder_pickers[kind].change(functools.partial(render, studio, kind), [search, folder_pickers[kind]], grids[kind],
                                    api_visibility="private", show_progress="hidden")
    refresh.click(rescan, [search, *picker_inputs], [*grid_outputs, *picker_inputs], api_visibility="private")
    accordion.expand(listed, [search, *picker_inputs], [*grid_outputs, *picker_inputs], api_visibility="private",
                     show_progress="hidden")

    def open_editor(event: gr.EventData):
        card = card_by_key(studio, getattr(event, "key", None))
        if card is None:
            gr.Warning("That file is gone; refresh the list.")
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        side = card.sidecar
        return (gr.update(visible=True), f"**{card.name}** · notes kept in `{C.sidecar_path(card.path).name}`",
                gr.update(value=side.preferred_weight, visible=card.kind == C.LORA), side.activation_text, side.notes, card.key)

    def save_notes(key, new_weight, new_activation, new_notes, text, *chosen_folders):
        card = card_by_key(studio, key)
        if card is None:
            raise gr.Error("That file is gone; refresh the list.", print_exception=False)
        try:
            C.write_sidecar(card.path, C.edited(card.sidecar, new_weight, new_activation, new_notes))
        except OSError as error:
            raise gr.Error(f"Could not write {C.sidecar_path(card.path).name}: {error.strerror or error}",
                           print_exception=False) from None
        gr.Info(f"Saved the notes of {card.name}.")
        return [gr.update(visible=False), None, *render_all(text, *chosen_folders)]

    for grid in grids.values():
        grid.edit(open_editor, None, [editor, editor_title, weight, activation, notes, editing], api_visibility="private")
    save.click(save_notes, [editing, weight, activation, notes, search, *picker_inputs], [editor, editing, *grid_outputs],
               api_visibility="private")
    cancel.click(lambda: (gr.update(visible=False), None), None, [editor, editing], api_visibility="private", queue=False)


def wire_checkpoint_cards(panel: ExtraNetworksPanel, switch: Callable, inputs: list, outputs: list) -> None:
    """A checkpoint card's click runs ``switch(name, *inputs)``, the model bar's own loader (a generator)."""
    def picked(event: gr.EventData, *values):  # Gradio hands the event data to the parameter annotated so
        name = str(getattr(event, "key", "")).partition(":")[2]
        yield from switch(name, *values)

    panel.grids[C.CHECKPOINT].pick(picked, inputs, outputs, api_visibility="private", show_progress="minimal")
