"""Saving generated images: numbered, never overwriting, never half-written, never outside the output folder.

Files are written through ``engine.atomic_write.write_new_file``: the image goes
to a temporary file in its destination folder and only gets its numbered name
once it is complete, and that step fails rather than overwrite, so two writers
never share a name. Whatever fails along the way, no partial or empty file is
left behind.
"""
from __future__ import annotations

import errno
import os
import re
import string
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from PIL import Image

from . import atomic_write
from .errors import SfumatoError, ValidationError
from .image_metadata import png_with_infotext

DEFAULT_PATTERN = "{mode}/{date}/{index:05d}-{seed}"
PATTERN_FIELDS = ("mode", "date", "index", "seed", "model", "time")
_SAMPLE_VALUES = {"mode": "txt2img", "date": "2024-01-31", "index": 12345, "seed": 42, "model": "model", "time": "235959"}
_UNSAFE_CHARS = re.compile(r'[/\\:*?"<>|\x01-\x1f\x7f]')
_MAX_ATTEMPTS = 10_000


class OutputError(SfumatoError):
    """An image could not be written to the output folder."""


def pattern_problem(pattern: str) -> str | None:
    """Why this pattern is unusable, or None."""
    if not isinstance(pattern, str) or not pattern.strip():
        return "must be a non-empty pattern such as {mode}/{date}/{index:05d}-{seed}"
    if "\x00" in pattern or "\\" in pattern:
        return "must not contain NUL or backslashes; separate folders with '/'"
    if pattern.startswith("/") or re.match(r"[A-Za-z]:", pattern):
        return "must be relative to the output folder, not an absolute path"
    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError as error:
        return f"is not a valid pattern ({error}); write literal braces as {{{{ and }}}}"
    for _, name, spec, _ in parsed:
        if name is not None and name not in PATTERN_FIELDS:
            return f"unknown field {{{name}}}; use any of {', '.join('{' + f + '}' for f in PATTERN_FIELDS)}"
        if name is not None and "/" in (spec or ""):
            return f"{{{name}:{spec}}} has a '/' in its format; '/' may only separate folders"
        if name == "index" and not _formats_as_digits(spec):
            return "{index} must format as plain digits, like {index} or {index:05d}"
    folder_part, _, _ = pattern.rpartition("/")
    if any(name == "index" for _, name, _, _ in string.Formatter().parse(folder_part)):
        return "{index} may only appear in the file name, not in a folder name"
    try:
        sample = pattern.format(**_SAMPLE_VALUES)
    except (ValueError, TypeError, KeyError, IndexError) as error:
        return f"cannot be filled in ({error})"
    if any(part in ("", ".", "..") for part in sample.split("/")):
        return "must not contain empty, '.' or '..' folder names"
    return None


def _formats_as_digits(spec: str | None) -> bool:
    try:
        return all(format(number, spec or "").isdigit() for number in (7, 12345))
    except (ValueError, TypeError):
        return False


def _safe_value(name: str, value: str) -> str:
    """A text value made safe as part of a file name: separators and odd characters become '_'."""
    if "\x00" in value:
        raise ValidationError(name, "must not contain NUL characters")
    cleaned = _UNSAFE_CHARS.sub("_", value).strip() or "_"
    if cleaned in (".", ".."):
        raise ValidationError(name, f"{value!r} cannot be used in a file name")
    return cleaned


def _os_error(error: OSError, folder: Path) -> OutputError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"the disk holding {folder} is full; free some space or choose another output folder in Settings")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write to {folder}: it is read-only or not yours; fix its permissions or choose another output folder in Settings")
    return OutputError(f"cannot save the image in {folder}: {error.strerror or error}")


class OutputWriter:
    """Saves images as ``root/<pattern>.png`` with the infotext embedded.

    Pattern fields: {mode}, {date} (YYYY-MM-DD), {time} (HHMMSS), {index}
    (next number in the folder), {seed}, {model}.
    """

    def __init__(self, root: str | os.PathLike, pattern: str = DEFAULT_PATTERN):
        problem = pattern_problem(pattern)
        if problem:
            raise ValidationError("output_pattern", problem)
        self.root = Path(root)
        self.pattern = pattern
        self._folder_pattern, _, self._name_pattern = pattern.rpartition("/")

    def _name_regex(self) -> re.Pattern[str]:
        """Matches file names this pattern made in one folder, capturing the index."""
        parts = []
        for literal, name, _, _ in string.Formatter().parse(self._name_pattern):
            parts.append(re.escape(_UNSAFE_CHARS.sub("_", literal)))
            if name == "index":
                parts.append(r"(\d+)")
            elif name is not None:
                parts.append(".*?")
        return re.compile("".join(parts) + r"(?:-\d+)?\.png")

    def _next_index(self, folder: Path) -> int:
        """One past the highest index already used in the folder (0 in a new folder)."""
        regex = self._name_regex()
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return 0
        used = [int(match.group(1)) for name in names if (match := regex.fullmatch(name)) and match.groups()]
        return max(used, default=-1) + 1

    def _inside_root(self, path: Path) -> bool:
        root = self.root.resolve()
        return path.resolve().is_relative_to(root)

    def save(
        self,
        image: Image.Image,
        infotext: str | None,
        mode: str,
        seed: int,
        now: datetime | None = None,
        model: str | None = None,
        extra_chunks: dict[str, str] | None = None,
    ) -> Path:
        """Write the image and return its path; ``extra_chunks`` are PNG text chunks besides ``parameters``."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValidationError("seed", f"must be an integer, got {seed!r}")
        if not isinstance(mode, str):
            raise ValidationError("mode", f"must be text, got {mode!r}")
        if model is not None and not isinstance(model, str):
            raise ValidationError("model", f"must be text, got {model!r}")
        now = now or datetime.now()
        values: dict[str, object] = {
            "mode": _safe_value("mode", mode),
            "date": now.strftime("%Y-%m-%d"),
            "time": now.strftime("%H%M%S"),
            "seed": seed,
            "model": _safe_value("model", model or "no-model"),
        }
        folder = self.root / self._folder_pattern.format(**values) if self._folder_pattern else self.root
        if not self._inside_root(folder):
            raise ValidationError("output_pattern", f"{folder} is outside the output folder {self.root}")
        data = png_with_infotext(image, infotext, extra_chunks)  # encode first: a failure here touches no file

        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise _os_error(error, folder) from error
        try:
            return atomic_write.write_new_file(folder, self._candidate_names(folder, values), data)
        except FileExistsError:
            raise OutputError(f"could not find a free file name in {folder} after {_MAX_ATTEMPTS} tries") from None
        except OSError as error:
            raise _os_error(error, folder) from error

    def _candidate_names(self, folder: Path, values: dict[str, object]) -> Iterator[str]:
        """File names to try in order: the next free index, then the ones after it (or ``-1``, ``-2``, ... without {index})."""
        index = self._next_index(folder)
        has_index = any(name == "index" for _, name, _, _ in string.Formatter().parse(self._name_pattern))
        for attempt in range(_MAX_ATTEMPTS):
            stem = self._name_pattern.format(**values, index=index + attempt)
            if attempt and not has_index:
                stem = f"{stem}-{attempt}"
            yield f"{_safe_value('output_pattern', stem)}.png"
