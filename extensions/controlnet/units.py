"""A ControlNet unit: what it is, how raw settings become one, and its infotext line.

Field names, defaults, choices and integer codes follow sd-webui-controlnet's
``ControlNetUnit`` (``internal_controlnet/external_code.py``), so API payloads
and infotext written by A1111 read back unchanged. ``-1`` in
``processor_res``/``threshold_a``/``threshold_b`` means "the preprocessor's
default", as there.
"""
from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np
from PIL import Image

from engine.errors import ValidationError
from engine.untrusted_images import check_size, read_untrusted_image

from . import preprocessors

DEFAULT_UNIT_COUNT = 3
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
# Older sd-webui-controlnet names for the resize modes.
RESIZE_MODE_ALIASES = {
    "inner fit (scale to fit)": "Crop and Resize",
    "scale to fit (inner fit)": "Crop and Resize",
    "outer fit (shrink to fit)": "Resize and Fill",
    "envelope (outer fit)": "Resize and Fill",
}
WEIGHT_RANGE = (0.0, 2.0)
NO_MODEL = ("", "none")


@dataclass(frozen=True)
class ControlNetUnit:
    """One ControlNet unit. ``image`` None means "use the img2img/inpaint source image"."""

    enabled: bool = True
    image: Image.Image | None = None
    module: str = "none"
    model: str | None = None
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = "Balanced"
    resize_mode: str = "Crop and Resize"
    pixel_perfect: bool = False
    processor_res: int = -1
    threshold_a: float = -1
    threshold_b: float = -1
    mask: Image.Image | None = None  # accepted from A1111 clients; not used by these preprocessors

    @property
    def active(self) -> bool:
        """Whether the unit can change anything at all (enabled, weight above 0)."""
        return self.enabled and self.weight > 0

    @property
    def soft_injection(self) -> bool:
        """sd-webui-controlnet: both non-Balanced modes scale the residuals by depth (0.825 ** (12 - i))."""
        return self.control_mode != "Balanced"

    @property
    def cfg_injection(self) -> bool:
        """sd-webui-controlnet: "ControlNet is more important" controls only the conditional half of the CFG batch."""
        return self.control_mode == "ControlNet is more important"


FIELD_NAMES = tuple(f.name for f in fields(ControlNetUnit))


def default_units(count: int = DEFAULT_UNIT_COUNT) -> list[ControlNetUnit]:
    """What the UI shows at first: ``count`` units, all off."""
    return [ControlNetUnit(enabled=False) for _ in range(count)]


# --- coercion of single fields ----------------------------------------------------------

def _bool(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValidationError(field, f"must be true or false, got {value!r}")


def _number(value: Any, field: str, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValidationError(field, f"must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValidationError(field, f"must be a number, got {value!r}")
    if low is not None and high is not None and not low <= value <= high:
        raise ValidationError(field, f"must be between {low:g} and {high:g}, got {value!r}")
    return float(value)


def _choice(value: Any, field: str, choices: tuple[str, ...], aliases: Mapping[str, str] | None = None) -> str:
    """A choice by name (any case) or by its index, as sd-webui-controlnet's enums accept both."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer() and 0 <= value < len(choices):
        return choices[int(value)]
    if isinstance(value, str):
        text = value.strip().casefold()
        for choice in choices:
            if choice.casefold() == text:
                return choice
        if aliases and text in aliases:
            return aliases[text]
        if text.isdigit() and int(text) < len(choices):
            return choices[int(text)]
    raise ValidationError(field, f"must be one of {', '.join(choices)} (or 0..{len(choices) - 1}); got {value!r}")


_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


def decode_image(value: Any, field: str) -> Image.Image | None:
    """An image from what clients send: PIL, a NumPy array, base64 (optionally a data URL), or an editor dict."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, np.ndarray):
        image = Image.fromarray(preprocessors.to_rgb_array(value))
    elif isinstance(value, Mapping):
        # {"image": b64, "mask": b64} from sd-webui-controlnet clients; Gradio editor values.
        for key in ("image", "composite", "background"):
            if value.get(key) is not None:
                return decode_image(value[key], field)
        return None
    elif isinstance(value, (str, bytes)):
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        text = _DATA_URL.sub("", text.strip())
        try:
            data = base64.b64decode(text, validate=False)
        except (binascii.Error, ValueError):
            raise ValidationError(field, "is not valid base64") from None
        return read_untrusted_image(data, field)  # format and declared size are checked before decoding
    else:
        raise ValidationError(field, f"must be an image, got {type(value).__name__}")
    check_size(*image.size, field)
    return image


def _model_name(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or "\x00" in value:
        raise ValidationError(field, f"must be a ControlNet model name, got {value!r}")
    value = value.strip()
    return None if value.casefold() in NO_MODEL else value


# --- whole units ----------------------------------------------------------------------------

def validate_unit(raw: Any, where: str = "units[0]") -> ControlNetUnit:
    """A validated unit from a unit, or a dict with this module's field names (unknown keys are refused)."""
    if isinstance(raw, ControlNetUnit) or (not isinstance(raw, Mapping) and all(hasattr(raw, name) for name in FIELD_NAMES)):
        raw = {name: getattr(raw, name) for name in FIELD_NAMES}  # a unit, also one made by another copy of this module
    if not isinstance(raw, Mapping):
        raise ValidationError(where, f"a ControlNet unit must be an object with {', '.join(FIELD_NAMES)}; got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(FIELD_NAMES))
    if unknown:
        raise ValidationError(f"{where}.{unknown[0]}", f"is not a ControlNet unit field; fields are {', '.join(FIELD_NAMES)}")
    values = dict(raw)
    module = preprocessors.canonical_name(values.get("module", "none"), f"{where}.module")
    spec = preprocessors.PREPROCESSORS[module]
    unit = ControlNetUnit(
        enabled=_bool(values.get("enabled", True), f"{where}.enabled"),
        image=decode_image(values.get("image"), f"{where}.image"),
        module=module,
        model=_model_name(values.get("model"), f"{where}.model"),
        weight=_number(values.get("weight", 1.0), f"{where}.weight", *WEIGHT_RANGE),
        guidance_start=_number(values.get("guidance_start", 0.0), f"{where}.guidance_start", 0.0, 1.0),
        guidance_end=_number(values.get("guidance_end", 1.0), f"{where}.guidance_end", 0.0, 1.0),
        control_mode=_choice(values.get("control_mode", CONTROL_MODES[0]), f"{where}.control_mode", CONTROL_MODES),
        resize_mode=_choice(values.get("resize_mode", "Crop and Resize"), f"{where}.resize_mode", RESIZE_MODES, RESIZE_MODE_ALIASES),
        pixel_perfect=_bool(values.get("pixel_perfect", False), f"{where}.pixel_perfect"),
        processor_res=parse_resolution(values.get("processor_res", -1), f"{where}.processor_res"),
        threshold_a=parse_threshold(values.get("threshold_a", -1), f"{where}.threshold_a", spec.threshold_a),
        threshold_b=parse_threshold(values.get("threshold_b", -1), f"{where}.threshold_b", spec.threshold_b),
        mask=decode_image(values.get("mask"), f"{where}.mask"),
    )
    if unit.guidance_start > unit.guidance_end:
        raise ValidationError(f"{where}.guidance_start",
                              f"the starting control step ({unit.guidance_start:g}) is after the ending one ({unit.guidance_end:g})")
    return unit


def parse_resolution(value: Any, field: str) -> int:
    number = _number(value, field)
    low, high = preprocessors.RESOLUTION_RANGE
    if number == -1:
        return -1
    if not number.is_integer() or not low <= number <= high:
        raise ValidationError(field, f"must be -1 (the default, {preprocessors.DEFAULT_RESOLUTION}) or a whole number of pixels "
                                     f"between {low} and {high}; got {value!r}")
    return int(number)


def parse_threshold(value: Any, field: str, param: preprocessors.Param | None) -> float:
    number = _number(value, field)
    if number == -1 or param is None:
        return number  # -1: the preprocessor's default; preprocessors without this slider ignore it
    if not param.minimum <= number <= param.maximum:
        raise ValidationError(field, f"{param.label} must be between {param.minimum:g} and {param.maximum:g}, got {value!r}")
    return number


def validate_units(raw: Any) -> list[ControlNetUnit]:
    """The extension's ``validate``: a list of units (a single unit or None are accepted too)."""
    if raw is None:
        return []
    if isinstance(raw, (ControlNetUnit, Mapping)):
        raw = [raw]
    if not isinstance(raw, (list, tuple)):
        raise ValidationError("units", f"must be a list of ControlNet units, got {type(raw).__name__}")
    return [validate_unit(item, f"units[{index}]") for index, item in enumerate(raw)]


# --- the A1111 API ------------------------------------------------------------------------------

# sd-webui-controlnet request keys that mean one of our fields.
API_KEY_ALIASES = {"input_image": "image"}


def api_unit(raw: Any, where: str) -> ControlNetUnit:
    """One sd-webui-controlnet API unit dict → a validated unit. Unknown keys are ignored, as A1111 does."""
    if not isinstance(raw, Mapping):
        raise ValidationError(where, f"must be a ControlNet unit object (image, module, model, weight, ...), got {type(raw).__name__}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        key = API_KEY_ALIASES.get(key, key)
        if key in FIELD_NAMES and key != "mask":
            values[key] = value
    image = raw.get("image", raw.get("input_image"))
    if isinstance(image, Mapping) and image.get("mask") is not None:
        values["mask"] = image["mask"]
    elif raw.get("mask") is not None:
        values["mask"] = raw["mask"]
    if raw.get("guessmode") is True or raw.get("guess_mode") is True:
        values.setdefault("control_mode", "ControlNet is more important")  # the pre-1.1 name of that mode
    for key in ("processor_res", "threshold_a", "threshold_b"):
        if values.get(key) is None:
            values.pop(key, None)
    return validate_unit(values, where)


def api_units(args: Any) -> list[ControlNetUnit]:
    """The extension's ``api_args``: ``alwayson_scripts.controlnet.args`` → units."""
    if isinstance(args, Mapping):
        args = args.get("args", [args]) if "args" in args else [args]
    if args is None:
        return []
    if not isinstance(args, (list, tuple)):
        raise ValidationError("args", f"must be a list of ControlNet units, got {type(args).__name__}")
    return [api_unit(item, f"args[{index}]") for index, item in enumerate(args) if item is not None]


# --- infotext --------------------------------------------------------------------------------------

def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def unit_infotext(unit: ControlNetUnit) -> str:
    """sd-webui-controlnet's serialisation: ``Module: canny, Model: name, Weight: 1, ...``.

    Processor Res and the thresholds are added only where the preprocessor
    has them, as A1111 leaves hidden sliders (-1) out.
    """
    spec = preprocessors.PREPROCESSORS[unit.module]
    items = [
        ("Module", unit.module), ("Model", unit.model or "None"), ("Weight", unit.weight), ("Resize Mode", unit.resize_mode),
        ("Guidance Start", unit.guidance_start), ("Guidance End", unit.guidance_end), ("Pixel Perfect", unit.pixel_perfect),
        ("Control Mode", unit.control_mode),
    ]
    if spec.resolution:
        items.append(("Processor Res", unit.processor_res if unit.processor_res != -1 else preprocessors.DEFAULT_RESOLUTION))
    for label, param, value in (("Threshold A", spec.threshold_a, unit.threshold_a), ("Threshold B", spec.threshold_b, unit.threshold_b)):
        if param is not None:
            items.append((label, preprocessors.param_value(param, value)))
    return ", ".join(f"{key}: {_text(value)}" for key, value in items)


def infotext_fields(units: list[ControlNetUnit]) -> dict[str, str]:
    """``ControlNet <i>`` for every enabled unit, numbered by its slot as A1111 does."""
    return {f"ControlNet {index}": unit_infotext(unit) for index, unit in enumerate(units) if unit.enabled}


_INFOTEXT_KEY = re.compile(r"ControlNet (\d+)$")


def _parse_value(text: str) -> Any:
    """sd-webui-controlnet ``parse_value``: True/False, int, float, else the text."""
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_unit_infotext(text: str) -> dict[str, Any]:
    """``Module: canny, Model: x, Weight: 1, ...`` → unit fields (``Guidance Start`` → ``guidance_start``)."""
    values: dict[str, Any] = {"enabled": True}
    for item in text.split(","):
        if ": " not in item:
            continue
        key, value = item.strip().split(": ", 1)
        name = "_".join(word.lower() for word in key.split(" "))
        if name in FIELD_NAMES and name not in ("image", "mask", "enabled"):
            values[name] = _parse_value(value.strip())
    return values


def parse_infotext(params: Mapping[str, str]) -> list[ControlNetUnit] | None:
    """Units from ``ControlNet <i>`` infotext entries, in their slots; None when there are none.

    Slots not mentioned are disabled units, so "ControlNet 1" stays the second unit.
    """
    found: dict[int, ControlNetUnit] = {}
    for key, text in params.items():
        match = _INFOTEXT_KEY.match(str(key))
        if match and isinstance(text, str):
            try:
                found[int(match.group(1))] = validate_unit(parse_unit_infotext(text), f"ControlNet {match.group(1)}")
            except ValidationError:
                continue  # e.g. a preprocessor this build does not have: leave that slot off, keep the others
    if not found:
        return None
    count = max(DEFAULT_UNIT_COUNT, max(found) + 1)
    return [found.get(index, ControlNetUnit(enabled=False)) for index in range(count)]


def unit_to_dict(unit: ControlNetUnit) -> dict[str, Any]:
    """A plain dict of a unit (images left as PIL), e.g. for presets or the UI."""
    return {name: getattr(unit, name) for name in FIELD_NAMES}
