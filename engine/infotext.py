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
from pathlib import PureWindowsPath
from typing import Any, Callable, Mapping

from .sampling import schedules
from .sampling import table as samplers
from .errors import ValidationError
from .fields import CORE, DEFAULT_TRAITS, FIELDS, MASK_MODES, Field
from .hires import second_pass_sampler, second_pass_schedule
from .refiner import checkpoint_name
from .networks.embeddings import TI_HASHES_KEY
from .networks.vae_files import VAE_HASH_KEY
from .request import EarlyStop, GenerationRequest, check_declared

VERSION = "sfumato-0.1"
NEGATIVE_PREFIX = "Negative prompt:"
# Keys written beside the fields' own (declared in engine/fields.py): facts about the image, not request settings.
MODEL_HASH_KEY = "Model hash"
SIZE_KEY = "Size"  # "WxH"; read back as Size-1 (width) and Size-2 (height), the fields' declared keys
HIRES_RESIZE_KEY = "Hires resize"  # "WxH" of hr_resize_x and hr_resize_y, read back as its -1 and -2 halves
VERSION_KEY = "Version"
# Written by the engine from the job's networks (engine/networks/job.py), not a request field: the <lora:…> tags
# stay in the prompt, so loading an infotext applies the LoRAs by name. A1111's form: "name: <12 hex>, name2: <12 hex>".
LORA_HASHES_KEY = "Lora hashes"
# An image whose sampling stopped early keeps ``Steps`` as requested and says where it stopped,
# as done/total of its own sampling steps: "Interrupted at step: 2/20".
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
    vae_hash: str | None = None,
    refiner_hash: str | None = None,
    traits: frozenset[str] = DEFAULT_TRAITS,
) -> str:
    """The infotext for one generated image.

    ``seed``/``subseed`` are the resolved seeds of this image (never -1).
    ``size`` is the size actually produced; it defaults to the request's
    width/height, and ``Size`` is left out when neither is known.
    ``extra`` holds extension entries with values already formatted
    (``{"<Extension key> 0": "Module: x, Weight: 1"}``).
    ``stopped_early`` marks an unfinished image (see ``STOPPED_EARLY_KEYS``).
    ``vae_hash`` is the short hash of the VAE file the request's ``vae`` names, when a file decoded the image.
    ``refiner_hash``: the refiner checkpoint's short hash, written after its name as A1111 writes a checkpoint's title.
    ``traits``: those of the family of the model that drew it (``Family.traits``); a field only some families use
    (``Field.only_for``: Flux.1 dev's distilled CFG scale, a flow model's shift, a UNet's clip skip) is written only
    for their pictures, since other models ignored its value.
    """
    if size is None and request.width is not None and request.height is not None:
        size = (request.width, request.height)
    resolved = {"seed": seed, "subseed": request.subseed if subseed is None else subseed, "model": model_name,
                # "Automatic" written resolved, as A1111 does; None for samplers that ignore the schedule type
                "schedule": samplers.infotext_schedule(request.sampler, request.schedule),
                "hr_scheduler": samplers.infotext_schedule(second_pass_sampler(request), second_pass_schedule(request)),
                "refiner_checkpoint": f"{request.refiner_checkpoint} [{refiner_hash}]" if refiner_hash else request.refiner_checkpoint}
    params: dict[str, Any] = {}
    for field in FIELDS.with_infotext():
        if field.owner != CORE or field.name in _BODY_FIELDS or not field.written_for(request, traits):
            continue  # extensions write their own entries (``extra``); prompts are the text above the line
        if field.name in _SIZE_FIELDS:
            if size is not None:
                params[SIZE_KEY] = f"{size[0]}x{size[1]}"
            continue
        if field.name in _HIRES_RESIZE_FIELDS:
            params[HIRES_RESIZE_KEY] = f"{request.hr_resize_x}x{request.hr_resize_y}"
            continue
        if field.name in _NUMBERED_FIELDS:
            params.update(_numbered_entries(field, getattr(request, field.name)))
            continue
        if field.name == "model":
            params[MODEL_HASH_KEY] = model_hash
        if field.name == "vae":
            params[VAE_HASH_KEY] = vae_hash
        value = resolved.get(field.name, getattr(request, field.name))
        params[_written_key(field, request)] = None if value is None else _WRITERS.get(field.name, _value_text)(value)
    params.update(_schedule_extras(request))
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not _VALID_KEY.fullmatch(key):
            raise ValidationError("extra", f"infotext key {key!r} must be letters, digits, spaces, '-' or '/'")
        if key in params or key == VERSION_KEY or key in STOPPED_EARLY_KEYS.values() or _is_core_key(key):
            raise ValidationError("extra", f"infotext key {key!r} is already written by the engine")
        params[key] = value
    if stopped_early is not None:
        params[STOPPED_EARLY_KEYS[stopped_early.reason]] = f"{stopped_early.step}/{stopped_early.total_steps}"
    params[VERSION_KEY] = VERSION

    line = ", ".join(f"{key}: {quote(_value_text(value))}" for key, value in params.items() if value is not None and _value_text(value) != "")
    lines = [request.prompt] if request.prompt else []
    if request.negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {request.negative_prompt}")
    lines.append(line)
    return "\n".join(lines)


def _numbered_entries(field: Field, names: tuple[str, ...]) -> dict[str, str]:
    """Forge's form of a list of files: "Module 1: ae, Module 2: clip_l", each file's name without folder or extension
    (the model-file resolver takes a stem as it takes a file name; Windows paths, as Forge's API sends them, too)."""
    return {f"{field.infotext} {index}": PureWindowsPath(name).stem for index, name in enumerate(names, start=1)}


def _numbered_values(field: Field, params: Mapping[str, str]) -> tuple[str, ...] | None:
    """The names of "<key> 1", "<key> 2"... in their numbers' order; None when there are none."""
    pattern = re.compile(rf"{re.escape(field.infotext)} (\d+)")
    numbered = sorted((int(match.group(1)), text.strip()) for key, text in params.items()
                      if isinstance(text, str) and (match := pattern.fullmatch(key)))
    return tuple(text for _, text in numbered if text) or None


def _noise_params(request: GenerationRequest) -> dict[str, Any]:
    """Eta, ENSD and RNG, each only when it differs from what A1111 assumes when the key is missing."""
    spec = samplers.find_sampler(request.sampler)
    params: dict[str, Any] = {}
    if request.eta is not None and spec.eta_default is not None and request.eta != spec.eta_default:
        params[spec.eta_key] = request.eta
    if request.eta_noise_seed_delta and spec.noise != samplers.NO_NOISE:
        params["ENSD"] = request.eta_noise_seed_delta
    if request.rng != "GPU":  # A1111 writes RNG unless it is its GPU default: a missing key means GPU noise
        params["RNG"] = request.rng
    return params


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


# A1111's "Noise schedule" setting (sd_noise_schedule) and its infotext values; "Zero terminal SNR: True" is how
# Sfumato wrote it before, still read.
ZERO_TERMINAL_SNR = "Zero Terminal SNR"


def _noise_schedule(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in (ZERO_TERMINAL_SNR.lower(), "default"):
        return lowered != "default"
    return _to_bool(text)


def _mask_mode(text: str) -> bool:
    if text not in MASK_MODES:
        raise ValueError(text)
    return text == MASK_MODES[1]


def _outpaint(text: str) -> tuple[int, int, int, int]:
    values = tuple(int(part) for part in text.split(","))
    if len(values) != 4:
        raise ValueError(text)
    return values  # type: ignore[return-value]


_BODY_FIELDS = ("prompt", "negative_prompt")  # the text above the parameters line
_SIZE_FIELDS = ("width", "height")  # one "Size: WxH" entry
_HIRES_RESIZE_FIELDS = ("hr_resize_x", "hr_resize_y")  # one "Hires resize: WxH" entry
# A1111's paste rule for its "Hires. fix" box: ticked when the infotext has a denoising strength and a hires key.
_HIRES_EVIDENCE = ("Hires upscale", "Hires upscaler", "Hires resize-1")
_SAMPLING_FIELDS = ("sampler", "schedule")
# Fields written as numbered keys, one per name (Forge's "Module 1", "Module 2"...).
_NUMBERED_FIELDS = ("modules",)
_NEEDS_OTHER_FIELDS = ("outpaint",)  # a request with outpainting needs an init image  # read together: a legacy "DPM++ 2M Karras" holds both
# Fields whose infotext value is not the request value written as text.
_WRITERS: dict[str, Callable[[Any], str]] = {
    "invert_mask": lambda invert: MASK_MODES[1] if invert else MASK_MODES[0],
    "outpaint": lambda pixels: ",".join(str(value) for value in pixels),
    "zero_terminal_snr": lambda on: ZERO_TERMINAL_SNR if on else "Default",
}
_READERS: dict[str, Callable[[str], Any]] = {"invert_mask": _mask_mode, "outpaint": _outpaint,
                                             "zero_terminal_snr": _noise_schedule, "refiner_checkpoint": checkpoint_name}


def _reader(field: Field) -> Callable[[str], Any]:
    """Infotext text -> a value of the field's type; the field's declared limits are checked after."""
    if field.name in _READERS:
        return _READERS[field.name]
    return {int: _to_int, float: _to_float, bool: _to_bool}.get(field.type, str)


# Keys A1111 writes for a field under another name: eta is "Eta DDIM" for the DDIM family of samplers.
_KEY_ALIASES = {"Eta DDIM": "Eta", "Zero terminal SNR": "Noise Schedule"}


def _schedule_extras(request: Any) -> dict[str, object]:
    """What a schedule records beside "Schedule type" (A1111 writes Beta's alpha and beta), at the values we run."""
    resolved = samplers.infotext_schedule(request.sampler, request.schedule)
    return {} if resolved is None else schedules.find_schedule(resolved).infotext_extras()


def _written_key(field: Field, request: GenerationRequest) -> str:
    if field.name == "eta":
        return samplers.find_sampler(request.sampler).eta_key
    return field.infotext


def _is_core_key(key: str) -> bool:
    field = FIELDS.by_infotext_key(_KEY_ALIASES.get(key, key))
    return field is not None and field.owner == CORE


def _accepted(field: Field, value: Any) -> bool:
    """Whether the request takes this value: its declared limits, and the request's own checks where one field alone can pass them."""
    try:
        check_declared(field, value)
        if field.name not in _NEEDS_OTHER_FIELDS:
            GenerationRequest(**{field.name: value})
    except (ValidationError, ValueError, TypeError):
        return False
    return True


def _sampler_fields(params: Mapping[str, str]) -> dict[str, str]:
    """Sampler and schedule, splitting a legacy "DPM++ 2M Karras" when no "Schedule type" is given."""
    result: dict[str, str] = {}
    sampler_text, schedule_text = params.get(FIELDS["sampler"].infotext), params.get(FIELDS["schedule"].infotext)
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
    for key, (first, second) in ((SIZE_KEY, _SIZE_FIELDS), (HIRES_RESIZE_KEY, _HIRES_RESIZE_FIELDS)):
        width_key, height_key = FIELDS[first].infotext, FIELDS[second].infotext
        if width_key not in params and isinstance(params.get(key), str):
            size = _IMAGE_SIZE.fullmatch(params[key].strip())
            if size:
                params = {**params, width_key: size.group(1), height_key: size.group(2)}

    params = {_KEY_ALIASES.get(key, key): value for key, value in params.items()}
    result: dict[str, Any] = {}
    for field in FIELDS.with_infotext():
        if field.owner != CORE or field.name in _SAMPLING_FIELDS:
            continue  # extensions read their own entries (ExtensionManager.parse_infotext)
        if field.name in _NUMBERED_FIELDS:
            names = _numbered_values(field, params)
            if names is not None and _accepted(field, names):
                result[field.name] = names
            continue
        text = params.get(field.infotext)
        if not isinstance(text, str):
            continue
        try:
            value = _reader(field)(text)
        except (ValueError, TypeError, OverflowError):
            continue
        if _accepted(field, value):
            result[field.name] = value
    result.update(_sampler_fields(params))
    if FIELDS["denoising_strength"].infotext in params and any(key in params for key in _HIRES_EVIDENCE):
        result["enable_hr"] = True
    if result.get("zero_terminal_snr") and "sampler" in result and not samplers.supports_zero_terminal_snr(result["sampler"]):
        del result["zero_terminal_snr"]
    return result


# --- what loading an infotext cannot give ------------------------------------

# Keys that describe the image rather than set the request: nothing to apply, nothing to warn about.
# Hashes are checked against the files here by engine.networks (ui.send_to shows what they find); the LoRA tags
# stay in the prompt, so LoRAs are applied by name.
_INFORMATIONAL_KEYS = frozenset({MODEL_HASH_KEY, VAE_HASH_KEY, TI_HASHES_KEY, LORA_HASHES_KEY, SIZE_KEY, HIRES_RESIZE_KEY, VERSION_KEY,
                                 *STOPPED_EARLY_KEYS.values()})


def _to_float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _made_by_us(params: Mapping[str, str]) -> bool:
    return str(params.get(VERSION_KEY, "")).startswith("sfumato")


def _numbered_field(key: str) -> Field | None:
    """The core field a numbered key ("Module 2") belongs to."""
    base, _, number = key.rpartition(" ")
    field = FIELDS.by_infotext_key(base) if number.isdigit() else None
    return field if field is not None and field.name in _NUMBERED_FIELDS else None


def _is_known_key(key: str) -> bool:
    """A key some declared field reads: a core field's own, or an extension's (its key ``K`` also covers ``K 0``, ``K 1``...)."""
    field = FIELDS.by_infotext_key(_KEY_ALIASES.get(key, key))
    if field is not None or _numbered_field(key) is not None:
        return True
    return any(key.startswith(f"{field.infotext} ") for field in FIELDS.owned_by_extensions() if field.infotext)


def loading_notes(params: Mapping[str, str], applied: Mapping[str, Any],
                  local_lora_hash: Callable[[str], str | None] | None = None) -> list[str]:
    """Sentences for the artist about what loading this infotext cannot reproduce: nothing is dropped silently.

    ``applied`` is what ``request_fields_from_infotext`` made of ``params``. The notes say:
    - that an A1111 infotext without "RNG" was made with A1111's default GPU noise, which our
      CPU noise does not reproduce (the "RNG" setting);
    - which keys no field of ours reads, and which values were refused, with their text;
    - with ``local_lora_hash`` (a LoRA name -> the short hash of the local file, None when there is none):
      which LoRAs of "Lora hashes" the local files differ from (the tags apply them by name).
    """
    if not isinstance(params, Mapping):
        return []
    notes: list[str] = []
    rng = FIELDS["rng"]
    steps_key = FIELDS["steps"].infotext
    if rng.infotext not in params and steps_key in params and not _made_by_us(params):
        notes.append(f'This infotext has no "{rng.infotext}" key, so A1111 made it with its default GPU noise. '
                     f'Sfumato draws {rng.default} noise (the "{rng.label}" setting), so the same seed gives a different picture.')
    refused, unknown = [], []
    body = {FIELDS[name].infotext for name in _BODY_FIELDS}
    schedule_extras = {key: str(value) for spec in schedules.SCHEDULES for key, value in spec.infotext_extras().items()}
    for key, text in params.items():
        if key in body or key in _INFORMATIONAL_KEYS:
            continue
        if key in schedule_extras:  # fixed here at A1111's defaults
            if _to_float_or_none(text) != float(schedule_extras[key]):
                refused.append(f"{key}: {text}")
            continue
        field = FIELDS.by_infotext_key(_KEY_ALIASES.get(key, key)) or _numbered_field(key)
        if field is None:
            split_from = key[:-2] if key.endswith(("-1", "-2")) else None  # the parser's copy of a "WxH" value
            if split_from not in params and not _is_known_key(key):
                unknown.append(f"{key}: {text}")
        elif field.owner == CORE and field.name not in applied:
            refused.append(f"{key}: {text}")
    if unknown:
        notes.append("Not applied (Sfumato has no such setting): " + ", ".join(unknown) + ".")
    if refused:
        notes.append("Not applied (a value Sfumato does not accept): " + ", ".join(refused) + ".")
    if local_lora_hash is not None and isinstance(params.get(LORA_HASHES_KEY), str):
        differ = [name for name, digest in parse_name_hashes(params[LORA_HASHES_KEY]).items()
                  if (local := local_lora_hash(name)) is not None and local != digest]
        if differ:
            notes.append("Other LoRA files than the image's (their hashes differ): " + ", ".join(differ) + ".")
    return notes
