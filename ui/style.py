"""Page styling, tool-button labels and the Ctrl+Enter shortcut, installed by a page-load event.

Gradio 6 takes ``css``/``js`` at ``launch()``/``mount_gradio_app()``; putting
them in a load event instead keeps them working however the Blocks is served.
"""
from __future__ import annotations

import json

from .tool_buttons import labels_js

CSS = """
.sfumato-generate button, button.sfumato-generate { min-height: 5.2em; font-size: 1.15em; }
.sfumato-tool, button.sfumato-tool { max-width: 3em; min-width: 2.6em !important; padding: 0 !important; font-size: 1.2em; align-self: end; margin-bottom: 0.4em; }
.sfumato-progress { font-variant-numeric: tabular-nums; min-height: 1.6em; }
.sfumato-untrained { border: 2px solid #d97706; border-radius: 8px; padding: 0.4em 0.8em; background: rgba(217, 119, 6, 0.12); }
.sfumato-warning { color: #b45309; }
#model_row { align-items: end; }
/* small models make small images: show previews large and crisp rather than as a thumbnail */
#txt2img_preview img, #img2img_preview img, #img2img_image img, #inpaint_preview img, #inpaint_mask_preview img, #pnginfo_image img {
  width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;
}
/* Result galleries show whole pictures at any count and aspect. Gradio makes each tile a square as wide as its
   column, so one result was a 635-px tile in a 300-px box showing its top half. Here the rows share the box's
   height (a tile is never taller than the box; past a minimum size the box scrolls) and each picture is
   contained in its tile. */
.sfumato-results .grid-wrap .grid-container {
  height: 100%; box-sizing: border-box; grid-template-rows: none; grid-auto-rows: minmax(96px, 1fr);
}
.sfumato-results .grid-wrap .thumbnail-item { aspect-ratio: auto; }
/* The extra-networks browser: cards as in A1111, a picture above the name and what the file's notes say. */
.sfumato-cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(9.5em, 1fr)); gap: 0.6em; padding: 0.3em; }
.sfumato-card { position: relative; cursor: pointer; border: 1px solid var(--border-color-primary); border-radius: 8px;
  padding: 0.3em; font-size: 0.85em; overflow-wrap: anywhere; background: var(--block-background-fill); }
.sfumato-card:hover { border-color: var(--color-accent); }
.sfumato-card-picture img, .sfumato-card-placeholder { width: 100%; aspect-ratio: 1; object-fit: cover; border-radius: 6px; display: block; }
.sfumato-card-placeholder { display: flex; align-items: center; justify-content: center; font-size: 2em; opacity: 0.5;
  background: var(--background-fill-secondary); }
.sfumato-card-name { font-weight: 600; margin-top: 0.2em; }
.sfumato-card-line { opacity: 0.8; }
.sfumato-card-problem { color: #b91c1c; }
.sfumato-card-edit { position: absolute; top: 0.4em; right: 0.4em; padding: 0 0.35em; border-radius: 4px;
  background: var(--background-fill-primary); opacity: 0.85; }
/* A narrow screen (a phone): the preview and results come right under Generate, the settings after them. */
@media (max-width: 767px) {
  .sfumato-workspace { flex-direction: column; flex-wrap: nowrap; }
  .sfumato-workspace > .sfumato-outputs { order: -1; }
  #model_row { flex-wrap: wrap; }
  #model_status { flex-basis: 100%; }  /* its own line, not a sliver that breaks the model name letter by letter */
}
"""

# Gradio's footer links, less its "Settings": that would be a second Settings beside our tab (A1111 keeps the tab).
FOOTER_LINKS = ["api", "gradio"]

# Ctrl+Enter (or Cmd+Enter) clicks the Generate button of the visible tab, as in AUTOMATIC1111.
_KEYBINDING = """
if (!window.__sfumatoKeys) {
  window.__sfumatoKeys = true;
  document.addEventListener('keydown', (event) => {
    if (event.key !== 'Enter' || !(event.ctrlKey || event.metaKey)) return;
    for (const id of ['txt2img_generate', 'img2img_generate', 'inpaint_generate']) {
      const button = document.getElementById(id);
      if (button && button.offsetParent !== null) {
        event.preventDefault();
        button.click();
        return;
      }
    }
  }, true);
}
"""

# The inpaint editor's trash button ("Clear canvas") would throw the picture away with the mask: it clears
# the mask only (it clicks "Clear mask"); "Remove image" lets one click through to remove the picture.
_TRASH_CLEARS_MASK = """
if (!window.__sfumatoTrash) {
  window.__sfumatoTrash = true;
  const trashOf = (event) => event.target.closest && event.target.closest('#inpaint_editor button[aria-label="Clear canvas"]');
  document.addEventListener('click', (event) => {
    const trash = trashOf(event);
    if (!trash || window.__sfumatoRemovingImage) return;
    event.preventDefault();
    event.stopImmediatePropagation();
    document.getElementById('inpaint_clear_mask')?.click();
  }, true);
  document.addEventListener('pointerover', (event) => {
    const trash = trashOf(event);
    if (trash) trash.title = 'Clear mask (keeps the picture)';
  }, true);
}
"""
REMOVE_IMAGE_JS = """() => {
  window.__sfumatoRemovingImage = true;
  try { document.querySelector('#inpaint_editor button[aria-label="Clear canvas"]')?.click(); }
  finally { window.__sfumatoRemovingImage = false; }
  return null;
}"""


def load_js() -> str:
    """The page-load JavaScript: add the stylesheet once, label the tool buttons, install the shortcut once."""
    style = f"""
if (!document.getElementById('sfumato-style')) {{
  const style = document.createElement('style');
  style.id = 'sfumato-style';
  style.textContent = {json.dumps(CSS)};
  document.head.appendChild(style);
}}
"""
    return "() => {" + style + labels_js() + _KEYBINDING + _TRASH_CLEARS_MASK + "}"
