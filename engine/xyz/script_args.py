"""A1111's X/Y/Z plot ``script_args``: the positional list its API clients send, read into a plan.

A1111 1.10 passes the script's controls to it in this order (``Script.ui``'s return, which its API
fills from ``script_args`` position by position):

    x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type, z_values, z_values_dropdown,
    draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, vary_seeds_x, vary_seeds_y, vary_seeds_z,
    margin_size, csv_mode

An axis type is an index into that tab's axis list (``axes.a1111_labels``); a label is accepted too. For an
axis with a dropdown, A1111 reads the dropdown list unless ``csv_mode`` is on; here the list is read when it
is not empty and ``csv_mode`` is off, and the values text otherwise. A short list takes A1111's defaults
for the rest (X: Seed, Y and Z: Nothing, legend on).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..errors import ValidationError
from ..request import GenerationRequest
from .axes import a1111_axis
from .plot import PlotOptions, XyzPlot

SCRIPT_NAME = "x/y/z plot"  # A1111 matches script_name to the script's title in lower case
ARG_NAMES = ("x_type", "x_values", "x_values_dropdown", "y_type", "y_values", "y_values_dropdown", "z_type", "z_values",
             "z_values_dropdown", "draw_legend", "include_lone_images", "include_sub_grids", "no_fixed_seeds",
             "vary_seeds_x", "vary_seeds_y", "vary_seeds_z", "margin_size", "csv_mode")
DEFAULTS: dict[str, Any] = {"x_type": 1, "x_values": "", "x_values_dropdown": [], "y_type": 0, "y_values": "",
                            "y_values_dropdown": [], "z_type": 0, "z_values": "", "z_values_dropdown": [],
                            "draw_legend": True, "include_lone_images": False, "include_sub_grids": False,
                            "no_fixed_seeds": False, "vary_seeds_x": False, "vary_seeds_y": False, "vary_seeds_z": False,
                            "margin_size": 0, "csv_mode": False}


@dataclass(frozen=True)
class ScriptPlot:
    """A plot read from ``script_args``, with A1111's choice of which images the response returns."""

    plot: XyzPlot
    include_lone_images: bool  # the cells after the grids
    include_sub_grids: bool  # with 2+ Z values, each Z's grid after the grid of grids


def is_xyz_script(name: str | None) -> bool:
    return bool(name) and name.strip().lower() == SCRIPT_NAME


def _flag(args: dict[str, Any], name: str) -> bool:
    value = args[name]
    if value in (0, 1) or isinstance(value, bool):
        return bool(value)
    raise ValidationError(f"script_args.{name}", f"must be true or false, got {value!r}")


def read_script_args(base: GenerationRequest, tab: str, script_args: Sequence[Any],
                     known: Callable[[str, str], str | None] | None = None) -> ScriptPlot:
    """The plot ``script_args`` describe on ``tab`` ("txt2img" or "img2img"); ValidationError names the argument or axis."""
    if not isinstance(script_args, (list, tuple)):
        raise ValidationError("script_args", "must be a list, in the order of A1111's X/Y/Z plot controls")
    if len(script_args) > len(ARG_NAMES):
        raise ValidationError("script_args", f"has {len(script_args)} values; A1111's X/Y/Z plot takes at most {len(ARG_NAMES)}")
    args = {**DEFAULTS, **dict(zip(ARG_NAMES, script_args))}
    csv_mode = _flag(args, "csv_mode")
    axes = []
    for which in ("x", "y", "z"):
        axis_type = a1111_axis(args[f"{which}_type"], tab, which)
        listed = args[f"{which}_values_dropdown"]
        text = args[f"{which}_values"]
        if isinstance(listed, (list, tuple)) and listed and not csv_mode:
            values: Any = [str(value) for value in listed]
        elif isinstance(text, (int, float)) and not isinstance(text, bool):
            values = str(text)
        elif isinstance(text, str):
            values = text
        else:
            raise ValidationError(f"script_args.{which}_values", f"must be text, got {text!r}")
        axes.append((axis_type, values))
    margin = args["margin_size"]
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin <= 500:
        raise ValidationError("script_args.margin_size", f"must be a number of pixels from 0 to 500, got {margin!r}")
    options = PlotOptions(draw_legend=_flag(args, "draw_legend"), keep_random_seeds=_flag(args, "no_fixed_seeds"),
                          vary_seeds=(_flag(args, "vary_seeds_x"), _flag(args, "vary_seeds_y"), _flag(args, "vary_seeds_z")),
                          margin=int(margin))
    plot = XyzPlot.plan(base, axes, options, known)
    return ScriptPlot(plot, _flag(args, "include_lone_images"), _flag(args, "include_sub_grids"))


def response_images(script: ScriptPlot, result) -> list:
    """The images A1111's API returns for a plot: the first grid, then the Z grids and cells asked for."""
    grids = result.grids
    first, z_grids = (grids[:1], grids[1:]) if result.z_grid_count > 1 else (grids[:1], [])
    cells = [image for image in result.images if not image.grid] if script.include_lone_images else []
    return [*first, *(z_grids if script.include_sub_grids else []), *cells]
