"""A1111's X/Y/Z plot: up to three axes over request fields, one generation per cell, labelled grids.

``ranges`` reads an axis's values text, ``axes`` says which axes exist (read from the field registry),
``plot`` runs the cells through the engine, ``grid`` draws the grids.
"""
from .axes import AxisType, a1111_axis, a1111_labels, axis_types, find_axis
from .plot import SCRIPT_TITLE, Axis, PlotOptions, PlotResult, XyzPlot
from .ranges import parse_values

__all__ = ["Axis", "AxisType", "PlotOptions", "PlotResult", "SCRIPT_TITLE", "XyzPlot", "a1111_axis", "a1111_labels",
           "axis_types", "find_axis", "parse_values"]
