"""Presets: small JSON files holding a name, a description and any subset of the request fields.

    {"name": "Fast draft", "description": "...", "fields": {"steps": 10, "sampler": "DPM++ 2M"}}

A preset is used as a style (its prompt and negative prompt merge into what the
artist typed, as A1111 styles do) or loaded as saved settings (every field it
holds is restored); see "applying" below. In a preset's ``prompt`` and
``negative_prompt``, ``{prompt}`` stands for what the artist typed. Built-in
presets ship in ``presets/``; the artist's own live in a user folder and
override built-ins of the same name. A1111 ``styles.csv`` files import as presets.

Every way in (``validate_preset``, ``import_bytes``, ``import_styles_csv``)
checks everything first and reports all problems by name in one
ValidationError; nothing is saved unless everything is valid.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from . import atomic_write
from .sampling import table as samplers
from .errors import ValidationError
from .fields import CORE, FIELDS
from .outputs import OutputError
from .request import GenerationRequest

PROMPT_PLACEHOLDER = "{prompt}"
MAX_NAME_LENGTH = 100
MAX_DESCRIPTION_LENGTH = 2_000
MAX_IMPORT_BYTES = 1_000_000



class _PresetFieldTypes(Mapping[str, tuple[type, ...]]):
    """Preset field → the Python types it accepts: every field declared preset-saveable (``engine.fields``),
    the loaded extensions' included, read when asked. Numbers accept ints too; bools are never numbers."""

    def __getitem__(self, name: str) -> tuple[type, ...]:
        field = FIELDS.get(name)
        if field is None or not field.preset:
            raise KeyError(name)
        return field.preset_types

    def __iter__(self) -> Iterator[str]:
        return iter([field.name for field in FIELDS.saved_in_presets()])

    def __len__(self) -> int:
        return len(FIELDS.saved_in_presets())


FIELD_TYPES: Mapping[str, tuple[type, ...]] = _PresetFieldTypes()
_TOP_LEVEL_KEYS = ("name", "description", "fields")
_UNSAFE_FILENAME_CHARS = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]')


class PresetError(ValidationError):
    """One or more problems with a preset; ``problems`` lists them as (field, message)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        field_name = problems[0][0] if len(problems) == 1 else "preset"
        message = problems[0][1] if len(problems) == 1 else "; ".join(f"{name}: {text}" for name, text in problems)
        super().__init__(field_name, message)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str = ""
    fields: Mapping[str, Any] = field(default_factory=dict)
    builtin: bool = field(default=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "fields": dict(self.fields)}


# --- validation --------------------------------------------------------------

def _name_problem(name: Any) -> str | None:
    if not isinstance(name, str) or not name.strip():
        return "must be a non-empty text"
    if len(name) > MAX_NAME_LENGTH:
        return f"is {len(name)} characters; at most {MAX_NAME_LENGTH} are allowed"
    if name != name.strip():
        return "must not start or end with spaces"
    if ".." in name or "/" in name or "\\" in name:
        return "must not contain '..', '/' or '\\'"
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        return "must not contain NUL or other control characters"
    if not _is_unicode(name):
        return "must be valid Unicode text"
    return None


def _is_unicode(text: str) -> bool:
    """False for text holding lone surrogates, which no file can store."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_type(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


def _request_problem(name: str, value: Any) -> str | None:
    """What GenerationRequest says about this one value, or None when it accepts it."""
    try:
        GenerationRequest(**{name: value})
    except ValidationError as error:
        return error.message
    return None


def _is_extension_field(name: str) -> bool:
    field = FIELDS.get(name)
    return field is not None and field.owner != CORE


def _extension_settings_problem(settings: Any) -> str | None:
    """An extension's saved settings must be plain JSON (its own checks run when they are used); a list holds objects."""
    if isinstance(settings, list) and not all(isinstance(item, dict) for item in settings):
        return "must be a list of settings (JSON objects)"
    try:
        json.dumps(settings, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as error:
        return f"must hold plain JSON values only ({error})"
    return None


def _check_fields(fields: Mapping[Any, Any], problems: list[tuple[str, str]], set_aside: list[str] | None = None) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for name, value in fields.items():
        if name not in FIELD_TYPES and set_aside is not None and isinstance(name, str) and name not in FIELDS:
            set_aside.append(name)
            continue
        if name not in FIELD_TYPES:
            problems.append((f"fields.{name}", f"unknown field; presets may set {', '.join(FIELD_TYPES)}"))
            continue
        types = FIELD_TYPES[name]
        if not _is_type(value, types):
            wanted = " or ".join("true/false" if kind is bool else kind.__name__ for kind in types)
            problems.append((f"fields.{name}", f"must be {wanted}, got {type(value).__name__}"))
            continue
        problem = _extension_settings_problem(value) if _is_extension_field(name) else _request_problem(name, value)
        if problem:
            problems.append((f"fields.{name}", problem))
            continue
        clean[name] = value
    if not any(name.startswith("fields.") and name[7:] in ("sampler", "schedule", "zero_terminal_snr") for name, _ in problems):
        _canonical_sampler(clean, problems)
    return clean


def _canonical_sampler(clean: dict[str, Any], problems: list[tuple[str, str]]) -> None:
    """Sampler and schedule under their canonical names ("DPM++ 2M Karras" → "DPM++ 2M" + "Karras"), checked together."""
    if not any(key in clean for key in ("sampler", "schedule", "zero_terminal_snr")):
        return
    try:
        request = GenerationRequest(
            sampler=clean.get("sampler", samplers.DEFAULT_SAMPLER),
            schedule=clean.get("schedule", samplers.DEFAULT_SCHEDULE),
            zero_terminal_snr=clean.get("zero_terminal_snr", False),
        )
    except ValidationError as error:
        problems.append((f"fields.{error.field}", error.message))
        return
    if "sampler" in clean:
        clean["sampler"] = request.sampler
        if request.schedule != samplers.DEFAULT_SCHEDULE or "schedule" in clean:
            clean["schedule"] = request.schedule
    elif "schedule" in clean:
        clean["schedule"] = request.schedule


def validate_preset(data: Any, set_aside: list[str] | None = None) -> Preset:
    """A checked Preset from parsed JSON; raises PresetError (a ValidationError) listing every problem.

    With a ``set_aside`` list, fields nobody declares (those of an extension that is not loaded) are named
    there and left out instead of refused: a stored preset still loads while its extension is disabled.
    """
    if not isinstance(data, Mapping):
        raise PresetError([("preset", f"must be a JSON object with name, description and fields, got {type(data).__name__}")])
    problems: list[tuple[str, str]] = []
    for key in data:
        if key not in _TOP_LEVEL_KEYS:
            problems.append((str(key), f"unknown key; a preset has only {', '.join(_TOP_LEVEL_KEYS)}"))
    name = data.get("name")
    name_problem = _name_problem(name)
    if name_problem:
        problems.append(("name", name_problem))
    description = data.get("description", "")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_LENGTH or "\x00" in description:
        problems.append(("description", f"must be text without NUL, at most {MAX_DESCRIPTION_LENGTH} characters"))
    fields = data.get("fields", {})
    clean: dict[str, Any] = {}
    if isinstance(fields, Mapping):
        clean = _check_fields(fields, problems, set_aside)
    else:
        problems.append(("fields", f"must be a JSON object of request fields, got {type(fields).__name__}"))
    if not problems and not _is_unicode(json.dumps(clean, ensure_ascii=False) + description):
        problems.append(("fields", "hold text that is not valid Unicode (a lone surrogate)"))
    if problems:
        raise PresetError(problems)
    return Preset(name=name, description=description, fields=clean)


# --- applying ----------------------------------------------------------------
#
# A preset can be used two ways, and the UI labels them so:
# - "Apply style" (A1111's styles.csv): only its prompt and negative prompt, merged into what
#   was typed; applying it twice merges it twice, as A1111 does.
# - "Load preset" (saved settings): every field it holds is restored, prompts included, so
#   loading it twice gives what loading it once gave.
# The API's ``styles`` does both at once (``apply_preset``): prompts merge, other fields restore.

PROMPT_FIELDS = ("prompt", "negative_prompt")
SAMPLING_FIELDS = ("sampler", "schedule", "zero_terminal_snr")


@dataclass(frozen=True)
class Applied:
    """Field values after a preset was applied, and sentences on what had to change beyond what it says."""

    fields: dict[str, Any]
    notes: tuple[str, ...] = ()


def merge_prompt(template: str, typed: str) -> str:
    """A1111's style merge: fill ``{prompt}``, or append the template after a comma."""
    if PROMPT_PLACEHOLDER in template:
        return template.replace(PROMPT_PLACEHOLDER, typed)
    return ", ".join(part for part in (typed.strip(), template.strip()) if part)


def unmerge_prompt(template: str, text: str) -> str:
    """``text`` with an earlier ``merge_prompt(template, ...)`` around it undone, when it is there.

    Only a template with one ``{prompt}`` can be undone: its text before and after the
    placeholder is stripped from the ends of ``text``.
    """
    if template.count(PROMPT_PLACEHOLDER) != 1:
        return text
    before, after = template.split(PROMPT_PLACEHOLDER)
    if len(text) >= len(before) + len(after) and text.startswith(before) and text.endswith(after):
        return text[len(before):len(text) - len(after)]
    return text


def _typed(current: Mapping[str, Any], name: str) -> str:
    value = current.get(name) or ""
    return value if isinstance(value, str) else str(value)


def has_style_text(preset: Preset) -> bool:
    return any(preset.fields.get(name) for name in PROMPT_FIELDS)


def apply_style(preset: Preset, current: Mapping[str, Any]) -> dict[str, Any]:
    """``current`` with the preset's prompt and negative prompt merged in as an A1111 style; nothing else changes."""
    result = dict(current)
    for name in PROMPT_FIELDS:
        if preset.fields.get(name):
            result[name] = merge_prompt(preset.fields[name], _typed(current, name))
    return result


def load_preset(preset: Preset, current: Mapping[str, Any]) -> Applied:
    """Every field the preset holds restored over ``current`` (which is left untouched).

    Its prompt and negative prompt replace what was typed. A ``{prompt}`` in them is
    filled with what was typed, after undoing an earlier load of the same preset, so that
    loading twice gives the same text as loading once. A preset that picks a sampler without
    zero terminal SNR turns it off (presets save it only when on). Fields it does not hold keep
    their current values; the schedule and zero-SNR box are then fitted to the sampler.
    """
    result = _restore_settings(preset, current)
    if "sampler" in preset.fields and "zero_terminal_snr" not in preset.fields:
        result["zero_terminal_snr"] = False  # presets save the box only when it is ticked
    for name in PROMPT_FIELDS:
        if name in preset.fields:
            template = preset.fields[name]
            result[name] = template.replace(PROMPT_PLACEHOLDER, unmerge_prompt(template, _typed(current, name)))
    return _fit_sampling(preset, result)


def apply_preset(preset: Preset, current: Mapping[str, Any]) -> dict[str, Any]:
    """The API's ``styles``: prompts merge as A1111 styles, every other field the preset sets is restored.

    When the preset picks a sampler that cannot use the current schedule, the schedule
    goes back to Automatic (and zero terminal SNR off, if the sampler lacks it).
    """
    result = apply_style(preset, _restore_settings(preset, current))
    return _fit_sampling(preset, result).fields


def _restore_settings(preset: Preset, current: Mapping[str, Any]) -> dict[str, Any]:
    result = dict(current)
    for name, value in preset.fields.items():
        if name in PROMPT_FIELDS:
            continue
        # an extension's settings are nested: a copy the caller may change freely
        result[name] = json.loads(json.dumps(value)) if _is_extension_field(name) else value
    return result


def _fit_sampling(preset: Preset, result: dict[str, Any]) -> Applied:
    """The schedule and zero-SNR box made valid for the sampler, with a note for each value the preset did not set."""
    if not any(name in preset.fields for name in SAMPLING_FIELDS):
        return Applied(result)
    try:
        fit = samplers.fit_to_sampler(result.get("sampler") or samplers.DEFAULT_SAMPLER, result.get("schedule"),
                                      bool(result.get("zero_terminal_snr")))
    except ValidationError:  # the current values are unknown names: the preset's choices stand alone
        result["schedule"] = preset.fields.get("schedule", samplers.DEFAULT_SCHEDULE)
        return Applied(result)
    result["schedule"], result["zero_terminal_snr"] = fit.schedule, fit.zero_terminal_snr
    return Applied(result, fit.changes)


# --- storage -----------------------------------------------------------------

def preset_filename(name: str) -> str:
    """A safe file name for a preset name; a short hash keeps names that clean up alike apart."""
    problem = _name_problem(name)
    if problem:
        raise ValidationError("name", problem)
    cleaned = _UNSAFE_FILENAME_CHARS.sub("_", name).strip(" .") or "preset"
    if cleaned != name:
        cleaned = f"{cleaned}-{hashlib.sha1(name.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    return f"{cleaned}.json"


def _decode_text(data: bytes | str, what: str) -> str:
    if isinstance(data, str):
        return data.removeprefix("\ufeff")
    if not isinstance(data, (bytes, bytearray)):
        raise ValidationError(what, f"expected file contents, got {type(data).__name__}")
    try:
        return bytes(data).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValidationError(what, "is not UTF-8 text") from None


class PresetStore:
    """Built-in presets (read-only) plus the artist's own, which override built-ins by name."""

    def __init__(self, builtin_dir: str | os.PathLike, user_dir: str | os.PathLike):
        self.builtin_dir = Path(builtin_dir)
        self.user_dir = Path(user_dir)
        self.problems: list[str] = []  # broken preset files found by the last list(), for the UI to show

    def _load_dir(self, folder: Path, builtin: bool) -> dict[str, Preset]:
        presets: dict[str, Preset] = {}
        if not folder.is_dir():
            return presets
        for path in sorted(folder.glob("*.json")):
            set_aside: list[str] = []
            try:
                preset = validate_preset(json.loads(path.read_text(encoding="utf-8-sig")), set_aside)
            except (OSError, ValueError, RecursionError) as error:
                self.problems.append(f"{path}: {error}")
                continue
            if set_aside:
                self.problems.append(f"{path}: {', '.join(set_aside)} left out: no loaded extension declares "
                                     f"{'it' if len(set_aside) == 1 else 'them'} (is its extension disabled?)")
            presets[preset.name] = Preset(preset.name, preset.description, preset.fields, builtin=builtin)
        return presets

    def list(self) -> list[Preset]:
        self.problems = []
        presets = {**self._load_dir(self.builtin_dir, True), **self._load_dir(self.user_dir, False)}
        return sorted(presets.values(), key=lambda preset: preset.name.casefold())

    def get(self, name: str) -> Preset:
        for preset in self.list():
            if preset.name == name:
                return preset
        raise ValidationError("preset", f"no preset named {name!r}")

    def _user_file(self, name: str) -> Path | None:
        """The user file holding the preset called ``name``, if any (file names may have been chosen by hand)."""
        path = self.user_dir / preset_filename(name)
        if path.is_file():
            return path
        for candidate in sorted(self.user_dir.glob("*.json")) if self.user_dir.is_dir() else []:
            try:
                if json.loads(candidate.read_text(encoding="utf-8-sig")).get("name") == name:
                    return candidate
            except (OSError, ValueError, RecursionError, AttributeError):
                continue
        return None

    def save(self, preset: Preset | Mapping[str, Any]) -> Path:
        """Write (or overwrite) a user preset (a Preset, or its JSON form); returns its file."""
        checked = validate_preset(preset.to_json() if isinstance(preset, Preset) else preset)
        path = self._user_file(checked.name) or self.user_dir / preset_filename(checked.name)
        data = json.dumps(checked.to_json(), indent=2, ensure_ascii=False).encode("utf-8") + b"\n"
        try:
            self.user_dir.mkdir(parents=True, exist_ok=True)
            atomic_write.write_file(path, data)
        except OSError as error:
            raise OutputError(f"cannot save preset {checked.name!r} in {self.user_dir}: {error.strerror or error}; check that folder's permissions and free space") from error
        return path

    def delete(self, name: str) -> None:
        """Delete a user preset. A built-in can't be deleted; deleting a user override brings it back."""
        path = self._user_file(name)
        if path is None:
            if any(preset.name == name and preset.builtin for preset in self.list()):
                raise ValidationError("preset", f"{name!r} is a built-in preset and can't be deleted")
            raise ValidationError("preset", f"no preset named {name!r}")
        try:
            path.unlink()
        except OSError as error:
            raise OutputError(f"cannot delete preset {name!r}: {error.strerror or error}") from error

    def export(self, name: str) -> bytes:
        return json.dumps(self.get(name).to_json(), indent=2, ensure_ascii=False).encode("utf-8") + b"\n"

    def import_bytes(self, data: bytes) -> Preset:
        """Import one exported preset file: validated in full, then saved as a user preset."""
        if isinstance(data, (bytes, bytearray)) and len(data) > MAX_IMPORT_BYTES:
            raise ValidationError("preset", f"file is {len(data)} bytes; a preset file is at most {MAX_IMPORT_BYTES}")
        text = _decode_text(data, "preset")
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError) as error:
            raise ValidationError("preset", f"is not valid JSON ({error})") from None
        preset = validate_preset(parsed)
        self.save(preset)
        return preset

    def import_styles_csv(self, text: str | bytes) -> list[Preset]:
        """Import an A1111 ``styles.csv`` (columns name, prompt, negative_prompt) as user presets.

        All rows are checked first; any problem (reported by row number) means nothing is saved.
        """
        rows = _read_styles_csv(_decode_text(text, "styles_csv"))
        problems: list[tuple[str, str]] = []
        presets: list[Preset] = []
        first_row_of: dict[str, int] = {}
        for row_number, row in rows:
            name = (row.get("name") or "").strip()
            prompt, negative = row.get("prompt") or "", row.get("negative_prompt") or ""
            if name == "None" and not prompt and not negative:
                continue  # old A1111 files carry an empty "None" style
            fields = {key: value for key, value in (("prompt", prompt), ("negative_prompt", negative)) if value}
            if not fields:
                problems.append((f"row {row_number}", f"style {name!r} has neither a prompt nor a negative prompt"))
                continue
            if name in first_row_of:
                problems.append((f"row {row_number}", f"style name {name!r} already used in row {first_row_of[name]}"))
                continue
            first_row_of[name] = row_number
            try:
                presets.append(validate_preset({"name": name, "description": "Imported from styles.csv", "fields": fields}))
            except PresetError as error:
                problems.extend((f"row {row_number} {field_name}", message) for field_name, message in error.problems)
        if problems:
            raise PresetError(problems)
        for preset in presets:
            self.save(preset)
        return presets


def _read_styles_csv(text: str) -> list[tuple[int, dict[str, str]]]:
    """Rows of a styles.csv as (line number in the file, columns); the header is line 1."""
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), skipinitialspace=True)
        header = [column.strip() for column in reader.fieldnames or []]
        if "name" not in header or "prompt" not in header:
            raise ValidationError("styles_csv", "needs a header line with at least the columns name,prompt (and optionally negative_prompt)")
        reader.fieldnames = header
        rows = []
        for row in reader:
            if any(isinstance(value, str) and value for value in row.values()):
                rows.append((reader.line_num, {key: value for key, value in row.items() if isinstance(key, str) and isinstance(value, str)}))
        return rows
    except csv.Error as error:
        raise ValidationError("styles_csv", f"is not a readable CSV file ({error})") from None
