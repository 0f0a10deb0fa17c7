"""The "Script" dropdown of the txt2img and img2img tabs and A1111's X/Y/Z plot controls under it.

Each axis is a type dropdown and a values textbox, as in A1111 with "Use text inputs instead of dropdowns"
on: values are typed in A1111's syntax (``1-5``, ``10-30 (+10)``, ``1-9 [3]``, quoted commas), and an axis
with choices lists them under its box; ☰ (A1111's 📒) fills the box with all of them. The options kept are the ones that
change what Sfumato does: Draw legend, Keep -1 for seeds, Vary seeds (X, Y, Z) and Grid margins.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from engine.request import GenerationRequest
from engine.xyz import PlotOptions, XyzPlot, axis_types, find_axis
from engine.xyz.axes import installed_in
from engine.xyz.ranges import join_values

from .tool_buttons import FILL_AXIS, tool_button

NO_SCRIPT = "None"
XYZ_SCRIPT = "X/Y/Z plot"
SCRIPTS = (NO_SCRIPT, XYZ_SCRIPT)
_DEFAULT_TYPES = ("Seed", "Nothing", "Nothing")  # A1111's: X on Seed, Y and Z on Nothing


def tab_of(mode: str) -> str:
    return "txt2img" if mode == "txt2img" else "img2img"


@dataclass
class XyzControls:
    script: gr.Dropdown
    types: list[gr.Dropdown]
    values: list[gr.Textbox]
    draw_legend: gr.Checkbox
    keep_random_seeds: gr.Checkbox
    vary_seeds: list[gr.Checkbox]
    margin: gr.Slider

    def keyed(self) -> dict[str, Any]:
        """The controls as keyword inputs of the Generate event."""
        keyed: dict[str, Any] = {"script": self.script, "xyz_draw_legend": self.draw_legend,
                                 "xyz_keep_random_seeds": self.keep_random_seeds, "xyz_margin": self.margin}
        for letter, axis_type, values, vary in zip("xyz", self.types, self.values, self.vary_seeds):
            keyed.update({f"xyz_{letter}_type": axis_type, f"xyz_{letter}_values": values, f"xyz_vary_{letter}": vary})
        return keyed


def _choices_info(label: str | None, tab: str) -> str:
    try:
        axis = find_axis(label or "Nothing", tab)
    except Exception:  # noqa: BLE001 - an unknown label only loses the hint
        return ""
    choices = axis.choices() if axis.choices is not None else None
    return f"Choices: {join_values(choices)}" if choices else ""


def build_xyz_controls(mode: str) -> XyzControls:
    """Lay out the Script dropdown and, shown while "X/Y/Z plot" is picked, the plot's controls."""
    tab = tab_of(mode)
    labels = [axis.label for axis in axis_types(tab)]
    script = gr.Dropdown(list(SCRIPTS), value=NO_SCRIPT, label="Script", elem_id=f"{mode}_script")
    types, values, fills = [], [], []
    with gr.Column(visible=False, elem_id=f"{mode}_xyz") as box:
        for letter, default in zip("XYZ", _DEFAULT_TYPES):
            with gr.Row(equal_height=True):
                types.append(gr.Dropdown(labels, value=default, label=f"{letter} type", scale=2,
                                         elem_id=f"{mode}_xyz_{letter.lower()}_type"))
                values.append(gr.Textbox(label=f"{letter} values", lines=1, scale=5, info=_choices_info(default, tab),
                                         elem_id=f"{mode}_xyz_{letter.lower()}_values"))
                fills.append(tool_button(FILL_AXIS, f"{mode}_xyz_fill_{letter.lower()}"))
        with gr.Row():
            draw_legend = gr.Checkbox(True, label="Draw legend", elem_id=f"{mode}_xyz_draw_legend")
            keep_random = gr.Checkbox(False, label="Keep -1 for seeds", elem_id=f"{mode}_xyz_keep_random_seeds")
            vary = [gr.Checkbox(False, label=f"Vary seeds for {letter}", elem_id=f"{mode}_xyz_vary_{letter.lower()}")
                    for letter in "XYZ"]
        margin = gr.Slider(0, 500, value=0, step=2, label="Grid margins (px)", elem_id=f"{mode}_xyz_margin")
    script.change(lambda name: gr.update(visible=name == XYZ_SCRIPT), script, box, api_visibility="private", queue=False)
    for axis_type, box_values, fill in zip(types, values, fills):
        axis_type.change(lambda label: gr.update(info=_choices_info(label, tab)), axis_type, box_values,
                         api_visibility="private", queue=False)
        fill.click(lambda label: _fill(label, tab), axis_type, box_values, api_visibility="private", queue=False)
    return XyzControls(script, types, values, draw_legend, keep_random, vary, margin)


def _fill(label: str | None, tab: str):
    axis = find_axis(label or "Nothing", tab)
    if axis.choices is None:
        gr.Info(f"{axis.label} has no list of choices: type its values.")
        return gr.skip()
    return join_values(axis.choices())


def read_plot(studio, mode: str, values: dict[str, Any], base: GenerationRequest) -> XyzPlot | None:
    """The plot the controls describe, or None when no script is picked; ValidationError names the axis."""
    if values.get("script") != XYZ_SCRIPT:
        return None
    tab = tab_of(mode)
    axes = []
    for letter in "xyz":
        axis = find_axis(values.get(f"xyz_{letter}_type") or "Nothing", tab)
        axes.append((axis, values.get(f"xyz_{letter}_values") or ""))
    options = PlotOptions(draw_legend=bool(values.get("xyz_draw_legend", True)),
                          keep_random_seeds=bool(values.get("xyz_keep_random_seeds")),
                          vary_seeds=tuple(bool(values.get(f"xyz_vary_{letter}")) for letter in "xyz"),  # type: ignore[arg-type]
                          margin=int(values.get("xyz_margin") or 0))
    return XyzPlot.plan(base, axes, options, installed_in(studio.registry))
