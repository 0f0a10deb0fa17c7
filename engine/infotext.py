"""A1111 "generation parameters" text (infotext): write it, read it back, map it to a request.

The shape, as A1111's ``processing.create_infotext`` writes it and its
``infotext_utils.parse_generation_parameters`` reads it::

    <prompt, may span lines>
    Negative prompt: <negative, may span lines>     (only when non-empty)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, ...

The last line is ``key: value`` pairs joined by ", ". Keys with an empty value
are left out. A value holding a comma, colon, newline or quote is written as a
JSON string (A1111's ``quote()``) and read back with ``json.loads``.

Known ambiguity of the format itself: a prompt line that starts with
``Negative prompt:`` reads back as the start of the negative prompt.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Callable, Mapping

from . import samplers
from .errors import ValidationError
from .request import INPAINT_AREAS, LIMITS, MASKED_CONTENT, RESIZE_MODES, EarlyStop, GenerationRequest

VERSION = "sfumato-0.1"
NEGATIVE_PREFIX = "Negative prompt:"
MASK_MODES = ("Inpaint masked", "Inpaint not masked")
# An image whose sampling stopped early keeps ``Steps`` as requested and says where it stopped,
# as done/total of its own sampling steps: "Interrupted at step: 2/20".
LORA_HASHES_KEY = "Lora hashes"  # A1111's: the networks of the prompt's <lora:…> tags, "name: <12 hex>, name2: <12 hex>"
STOPPED_EARLY_KEYS = {"interrupted": "Interrupted at step", "skipped": "Skipped at step"}

# A1111's key pattern: a word character, then word characters, spaces, hyphens or slashes.
_KEY = re.compile(r"\s*(\w[\w \-/]+):\s*")
_KEY_RUN = re.compile(r"\s*\w[\w \-/]*")
_QUOTED_VALUE = re.compile(r'"(?:\\.|[^\\"])+"(?=,|$)')
_PLAIN_VALUE = re.compile(r"[^,]*")
_IMAGE_SIZE = re.compile(r"(\d+)x(\d+)")
_VALID_KEY = re.compile(r"\w[\w \-/]*\w")


# --- writing -----------------------------------------------------------------

def format_number(value: float | int) -> str:
    """Numbers as A1111 shows them: ``7`` rather than ``7.0``, ``7.5`` as is."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def quote(value: str) -> str:
    """A1111's ``quote()``: JSON-quote values that would break the ``k: v, k: v`` line.

    Besides A1111's comma, colon and newline we also quote quotes and
    surrounding whitespace, so every value reads back exactly.
    """
    if any(char in value for char in ',:\n"') or value != value.strip():
        return json.dumps(value, ensure_ascii=False)
    return value


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return format_number(value)
    return str(value)


def build_infotext(
    request: GenerationRequest,
    seed: int,
    model_name: str | None,
    model_hash: str | None,
    extra: Mapping[str, str] | None = None,
    subseed: int | None = None,
    *,
    size: tuple[int, int] | None = None,
    stopped_early: EarlyStop | None = None,
) -> str:
    """The infotext for one generated image.

    ``seed``/``subseed`` are the resolved seeds of this image (never -1).
    ``size`` is the size actually produced; it defaults to the request's
    width/height, and ``Size`` is left out when neither is known.
    ``extra`` holds extension entries with values already formatted
    (``{"ControlNet 0": "Module: canny, Model: x, Weight: 1"}``).
    ``stopped_early`` marks an unfinished image (see ``STOPPED_EARLY_KEYS``).
    """
    if size is None and request.width is not None and request.height is not None:
        size = (request.width, request.height)
    mode = request.mode
    params: dict[str, Any] = {
        "Steps": request.steps,
        "Sampler": request.sampler,
        "Schedule type": request.schedule,
        "CFG scale": request.cfg_scale,
        "Seed": seed,
        "Size": f"{size[0]}x{size[1]}" if size else None,
        "Model hash": model_hash,
        "Model": model_name,
    }
    if request.subseed_strength > 0:
        params["Variation seed"] = request.subseed if subseed is None else subseed
        params["Variation seed strength"] = request.subseed_strength
    if mode in ("img2img", "inpaint"):
        params["Denoising strength"] = request.denoising_strength
        params["Resize mode"] = request.resize_mode
    if mode == "inpaint":
        params["Mask blur"] = request.mask_blur
        params["Mask mode"] = MASK_MODES[1] if request.invert_mask else MASK_MODES[0]
        params["Masked content"] = request.masked_content
        params["Inpaint area"] = request.inpaint_area
        if request.inpaint_area == "Only masked":
            params["Masked area padding"] = request.inpaint_padding
        if any(request.outpaint):
            params["Outpaint"] = ",".join(str(pixels) for pixels in request.outpaint)
    if request.zero_terminal_snr:
        params["Zero terminal SNR"] = True
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not _VALID_KEY.fullmatch(key):
            raise ValidationError("extra", f"infotext key {key!r} must be letters, digits, spaces, '-' or '/'")
        if key in params or key == "Version" or key in STOPPED_EARLY_KEYS.values():
            raise ValidationError("extra", f"infotext key {key!r} is already written by the engine")
        params[key] = value
    if stopped_early is not None:
        params[STOPPED_EARLY_KEYS[stopped_early.reason]] = f"{stopped_early.step}/{stopped_early.total_steps}"
    params["Version"] = VERSION

    line = ", ".join(f"{key}: {quote(_value_text(value))}" for key, value in params.items() if value is not None and _value_text(value) != "")
    lines = [request.prompt] if request.prompt else []
    if request.negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {request.negative_prompt}")
    lines.append(line)
    return "\n".join(lines)


# --- reading -----------------------------------------------------------------

def format_name_hashes(hashes: Mapping[str, str]) -> str:
    """A1111's ``name: hash, name2: hash`` list (``Lora hashes``, ``TI hashes``); ':' and ',' leave the names, as in A1111."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {digest}" for name, digest in hashes.items())


def parse_name_hashes(value: str) -> dict[str, str]:
    """The names and hashes of a ``Lora hashes`` / ``TI hashes`` value (already unquoted); malformed entries are skipped."""
    pairs = {}
    for entry in value.split(","):
        name, colon, digest = entry.rpartition(":")
        if colon and name.strip() and digest.strip():
            pairs[name.strip()] = digest.strip()
    return pairs


def unquote(value: str) -> str:
    """A1111's ``unquote()``: undo ``quote()``; anything that is not valid JSON stays as is."""
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        result = json.loads(value)
    except ValueError:
        return value
    return result if isinstance(result, str) else value


def _parameter_pairs(line: str) -> list[tuple[str, str]]:
    """``key: value`` pairs of a parameters line, as A1111's ``re_param.findall`` finds them.

    A hand-rolled scan instead of ``findall`` so that a long garbage line takes
    linear time: when no key starts at a position, no key can start anywhere in
    the run of key characters that follows it either, so we skip the whole run.
    """
    pairs: list[tuple[str, str]] = []
    position = 0
    while position < len(line):
        key = _KEY.match(line, position)
        if key is None:
            run = _KEY_RUN.match(line, position)
            position = (run.end() if run else position) + 1
            continue
        value = _QUOTED_VALUE.match(line, key.end()) or _PLAIN_VALUE.match(line, key.end())
        pairs.append((key.group(1), value.group(0)))
        position = value.end() + 1  # past the comma
    return pairs


def parse_infotext(text: str) -> dict[str, str]:
    """Infotext → ``{"Prompt": ..., "Negative prompt": ..., "Steps": "20", ...}``, all values text.

    Like A1111: the last line holds the parameters when it has at least three
    ``key: value`` pairs; ``WxH`` values also appear split as ``Key-1``/``Key-2``.
    Tolerant of anything: garbage gives a dict with just the prompt.
    """
    if not isinstance(text, str):
        raise ValidationError("infotext", f"must be text, got {type(text).__name__}")
    *lines, last_line = text.rstrip("\r\n").split("\n")
    pairs = _parameter_pairs(last_line.strip())
    if len(pairs) < 3:
        lines.append(last_line)
        pairs = []

    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if not negative and line.startswith(NEGATIVE_PREFIX):
            line = line[len(NEGATIVE_PREFIX):]
            negative.append(line[1:] if line.startswith(" ") else line)
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)

    result: dict[str, str] = {}
    for key, value in pairs:
        value = unquote(value)
        result[key] = value
        size = _IMAGE_SIZE.fullmatch(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
    result["Prompt"] = "\n".join(prompt)
    result["Negative prompt"] = "\n".join(negative)
    return result


# --- mapping onto request fields ---------------------------------------------

def _to_int(text: str) -> int:
    return int(text.strip())


def _to_float(text: str) -> float:
    value = float(text.strip())
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _to_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ("true", "false"):
        raise ValueError(text)
    return lowered == "true"


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if text not in choices:
            raise ValueError(text)
        return text
    return convert


def _mask_mode(text: str) -> bool:
    return _one_of(MASK_MODES)(text) == MASK_MODES[1]


def _outpaint(text: str) -> tuple[int, int, int, int]:
    values = tuple(int(part) for part in text.split(","))
    low, high = LIMITS["outpaint"]
    if len(values) != 4 or not all(low <= value <= high for value in values):
        raise ValueError(text)
    return values  # type: ignore[return-value]


# infotext key → (request field, converter). Each value is also checked by the
# request's own validation, so an out-of-range value is skipped like a garbled one.
_FIELDS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "Prompt": ("prompt", str),
    "Negative prompt": ("negative_prompt", str),
    "Steps": ("steps", _to_int),
    "CFG scale": ("cfg_scale", _to_float),
    "Seed": ("seed", _to_int),
    "Size-1": ("width", _to_int),
    "Size-2": ("height", _to_int),
    "Denoising strength": ("denoising_strength", _to_float),
    "Resize mode": ("resize_mode", _one_of(RESIZE_MODES)),
    "Mask blur": ("mask_blur", _to_int),
    "Mask mode": ("invert_mask", _mask_mode),
    "Masked content": ("masked_content", _one_of(MASKED_CONTENT)),
    "Inpaint area": ("inpaint_area", _one_of(INPAINT_AREAS)),
    "Masked area padding": ("inpaint_padding", _to_int),
    "Variation seed": ("subseed", _to_int),
    "Variation seed strength": ("subseed_strength", _to_float),
    "Zero terminal SNR": ("zero_terminal_snr", _to_bool),
    "Model": ("model", str),
}


def _accepted_by_request(field: str, value: Any) -> bool:
    try:
        GenerationRequest(**{field: value})
    except (ValidationError, ValueError, TypeError):
        return False
    return True


def _sampler_fields(params: Mapping[str, str]) -> dict[str, str]:
    """Sampler and schedule, splitting a legacy "DPM++ 2M Karras" when no "Schedule type" is given."""
    result: dict[str, str] = {}
    sampler_text, schedule_text = params.get("Sampler"), params.get("Schedule type")
    legacy_schedule = None
    if isinstance(sampler_text, str):
        try:
            result["sampler"], legacy_schedule = samplers.split_legacy_name(sampler_text)
        except ValidationError:
            pass
    if isinstance(schedule_text, str):
        try:
            result["schedule"] = samplers.find_schedule(schedule_text).name
        except ValidationError:
            pass
    if "schedule" not in result and legacy_schedule:
        result["schedule"] = legacy_schedule
    if "sampler" in result and "schedule" in result:
        if samplers.unsupported_reason(result["sampler"], result["schedule"]) is not None:
            del result["schedule"]
    return result


def request_fields_from_infotext(params: Mapping[str, str]) -> dict[str, Any]:
    """Parsed infotext → GenerationRequest field values, correctly typed.

    Unknown keys and values that don't convert or are out of range are skipped;
    this never raises. The model name comes back under ``"model"``.
    """
    if not isinstance(params, Mapping):
        return {}
    if "Size-1" not in params and isinstance(params.get("Size"), str):
        size = _IMAGE_SIZE.fullmatch(params["Size"].strip())
        if size:
            params = {**params, "Size-1": size.group(1), "Size-2": size.group(2)}

    result: dict[str, Any] = {}
    for key, (field, convert) in _FIELDS.items():
        text = params.get(key)
        if not isinstance(text, str):
            continue
        try:
            value = convert(text)
        except (ValueError, TypeError, OverflowError):
            continue
        if _accepted_by_request(field, value):
            result[field] = value
    outpaint = params.get("Outpaint")
    if isinstance(outpaint, str):
        try:
            result["outpaint"] = _outpaint(outpaint)
        except ValueError:
            pass
    result.update(_sampler_fields(params))
    if result.get("zero_terminal_snr") and "sampler" in result and not samplers.supports_zero_terminal_snr(result["sampler"]):
        del result["zero_terminal_snr"]
    return result
