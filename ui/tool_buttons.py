"""The small square buttons beside a control: refresh the model list, random seed, reuse seed, swap sizes, fill an
X/Y/Z axis with its choices.

Each shows a text symbol that the fonts every desktop ships carry (DejaVu Sans, Segoe UI
Symbol, Apple Symbols), never an emoji: an emoji draws as an empty box on a machine
without an emoji font. A symbol alone tells a newcomer or a screen reader nothing, so
each button also gets a name and a tooltip (``aria-label`` and ``title``). Gradio's
Button takes neither, so the page script sets them (``labels_js``), keyed by a CSS class
that each kind of button carries.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import gradio as gr

TEXT_PRESENTATION = "\ufe0e"  # variation selector 15: draw the symbol as text even where an emoji font exists


@dataclass(frozen=True, kw_only=True)
class ToolIcon:
    """One kind of tool button: the symbol it shows and what it does, in words."""

    name: str
    symbol: str
    label: str

    @property
    def css_class(self) -> str:
        return f"sfumato-icon-{self.name}"


REFRESH_MODELS = ToolIcon(name="refresh-models", symbol="↻", label="Refresh the model list")
RANDOM_SEED = ToolIcon(name="random-seed", symbol="⚄", label="Random seed: set the seed to -1, a new one each time")
REUSE_SEED = ToolIcon(name="reuse-seed", symbol="♻" + TEXT_PRESENTATION, label="Reuse the seed of the selected result")
RANDOM_SUBSEED = ToolIcon(name="random-subseed", symbol="⚄", label="Random variation seed: set it to -1")
REUSE_SUBSEED = ToolIcon(name="reuse-subseed", symbol="♻" + TEXT_PRESENTATION,
                         label="Reuse the variation seed of the selected result")
SWAP_SIZE = ToolIcon(name="swap-size", symbol="⇅", label="Swap width and height")
# A1111 shows 📒 here; an emoji, so a list symbol instead.
FILL_AXIS = ToolIcon(name="fill-axis", symbol="☰", label="Fill in every choice of this axis")
TOOL_ICONS = (REFRESH_MODELS, RANDOM_SEED, REUSE_SEED, RANDOM_SUBSEED, REUSE_SUBSEED, SWAP_SIZE, FILL_AXIS)


def tool_button(icon: ToolIcon, elem_id: str) -> gr.Button:
    """A square button showing ``icon``'s symbol, named and explained by ``labels_js``."""
    return gr.Button(icon.symbol, elem_id=elem_id, elem_classes=["sfumato-tool", icon.css_class], scale=0, min_width=40)


def labels_js() -> str:
    """Page script: give every tool button its name and tooltip, now and whenever Gradio draws one later."""
    labels = {icon.css_class: icon.label for icon in TOOL_ICONS}
    return f"""
if (!window.__sfumatoLabels) {{
  window.__sfumatoLabels = true;
  const labels = {json.dumps(labels, ensure_ascii=False)};
  const label = () => {{
    for (const [cls, text] of Object.entries(labels)) {{
      for (const button of document.querySelectorAll('button.' + cls)) {{
        if (button.title !== text) {{ button.title = text; button.setAttribute('aria-label', text); }}
      }}
    }}
  }};
  label();
  new MutationObserver(label).observe(document.body, {{childList: true, subtree: true}});
}}
"""
