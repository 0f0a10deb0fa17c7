"""An axis's values text → its list of values, with A1111's X/Y/Z plot syntax (1.10, scripts/xyz_grid.py).

The text is one CSV row: values are separated by commas, a value holding a comma is written in double
quotes (``"a, b", c``), and each value is stripped of surrounding spaces. On a number axis a value may be
a range, which expands in place:

- ``1-5`` → 1, 2, 3, 4, 5 (both ends included, step 1);
- ``1-10 (+3)`` → 1, 4, 7, 10: a signed step in round brackets. As in A1111 the values are
  ``range(start, end + 1, step)``, so counting down stops early: ``5-1 (-1)`` is 5, 4, 3;
- ``1-10 [4]`` → 4 values spread evenly from 1 to 10 (numpy ``linspace``; a whole-number axis truncates
  them: 1, 4, 7, 10);
- on a decimal axis ``0.5-1.5 (+0.25)`` steps with numpy ``arange(start, end + step, step)``, so, as in
  A1111, rounding may add one value past the end; ``[n]`` spreads n values.

A value that is neither a number nor a range is an error that names the axis.
"""
from __future__ import annotations

import csv
import io
import re
from itertools import chain

import numpy as np

from ..errors import ValidationError

# The four patterns A1111 tries, as regular expressions over one stripped value. As in A1111, the decimal
# point of a float is written "." unescaped, so it matches any one character there.
_INT = r"[+-]?\s*\d+"
_FLOAT = r"[+-]?\s*\d+(?:.\d*)?"
_INT_STEP = re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\(([+-]\d+)\s*\))?\s*")
_FLOAT_STEP = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\(([+-]\d+(?:.\d*)?)\s*\))?\s*")
_INT_COUNT = re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\[(\d+)\s*])?\s*")
_FLOAT_COUNT = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\[(\d+(?:.\d*)?)\s*])?\s*")


def split_values(text: str) -> list[str]:
    """One CSV row of values, each stripped; quotes keep commas inside a value."""
    rows = csv.reader(io.StringIO(text), skipinitialspace=True)
    return [value.strip() for value in chain.from_iterable(rows)]


def join_values(values: list[str]) -> str:
    """The CSV row ``split_values`` reads back as ``values`` (quotes where a value needs them)."""
    with io.StringIO() as out:
        csv.writer(out).writerow(values)
        return out.getvalue().strip()


def _number(text: str, kind: type, axis: str) -> int | float:
    try:
        return kind(text.replace(" ", ""))
    except ValueError:
        noun = "a whole number" if kind is int else "a number"
        raise ValidationError(axis, f"{text!r} is not {noun} or a range such as 1-5, 1-9 (+2) or 1-9 [5]") from None


def _int_values(value: str, axis: str) -> list[int]:
    if (match := _INT_STEP.fullmatch(value)) is not None:
        start, end = _number(match[1], int, axis), _number(match[2], int, axis)
        step = int(match[3]) if match[3] is not None else 1
        if step == 0:
            raise ValidationError(axis, f"{value!r}: the step must not be 0")
        return list(range(start, end + 1, step))
    if (match := _INT_COUNT.fullmatch(value)) is not None:
        start, end = _number(match[1], int, axis), _number(match[2], int, axis)
        count = int(match[3]) if match[3] is not None else 1
        return [int(number) for number in np.linspace(start, end, count).tolist()]
    return [_number(value, int, axis)]


def _float_values(value: str, axis: str) -> list[float]:
    if (match := _FLOAT_STEP.fullmatch(value)) is not None:
        start, end = _number(match[1], float, axis), _number(match[2], float, axis)
        step = _number(match[3], float, axis) if match[3] is not None else 1.0
        if step == 0:
            raise ValidationError(axis, f"{value!r}: the step must not be 0")
        return np.arange(start, end + step, step).tolist()
    if (match := _FLOAT_COUNT.fullmatch(value)) is not None:
        start, end = _number(match[1], float, axis), _number(match[2], float, axis)
        count = int(_number(match[3], float, axis)) if match[3] is not None else 1
        return np.linspace(start, end, count).tolist()
    return [_number(value, float, axis)]


def parse_values(text: str, kind: type, axis: str) -> list:
    """The values of one axis: ``kind`` is int or float (ranges expand) or str (values as written).

    ``axis`` names the axis in errors ("X axis (Steps)"). An axis with no values is an error too.
    """
    if not isinstance(text, str):
        raise ValidationError(axis, f"values must be text, got {type(text).__name__}")
    values = split_values(text)
    if not any(values):  # nothing typed, or only spaces and commas
        values = []
    if kind is int:
        parsed: list = [number for value in values for number in _int_values(value, axis)]
    elif kind is float:
        parsed = [number for value in values for number in _float_values(value, axis)]
    else:
        parsed = values
    if not parsed:
        raise ValidationError(axis, "has no values; write them separated by commas")
    return parsed
