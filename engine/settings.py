"""User settings persisted to a JSON file that survives restarts.

A settings file edited by hand (or written by an older version) never stops the studio from
starting: each unusable value is put back to its default, with a warning that names it, and the
other settings are kept.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from . import atomic_write
from .devices import DEVICE_CHOICES, DTYPE_CHOICES
from .errors import SfumatoError, ValidationError
from .outputs import DEFAULT_PATTERN, pattern_problem
from .fields import FIELDS

log = logging.getLogger("sfumato")


@dataclass
class Settings:
    preview_every: int = 1
    preview_method: str = "cheap"
    output_pattern: str = DEFAULT_PATTERN
    default_model: str = ""
    device: str = "auto"
    dtype: str = "auto"
    # Each extension's own settings, by extension name (declared by the extension; the Settings tab shows them).
    extensions: dict[str, dict[str, Any]] = field(default_factory=dict)
    save_outputs: bool = True
    # Off, as A1111's "Save incomplete images": an interrupted or skipped image is shown but not saved.
    save_interrupted_images: bool = False
    # Refuse to load a model whose memory estimate exceeds what is free (engine.memory); off: try anyway.
    memory_check: bool = True
    # The "VAE / Text Encoder" picks remembered per model (a model kept as split files), as Forge remembers them.
    model_modules: dict[str, list[str]] = field(default_factory=dict)

    def problems(self) -> Iterator[tuple[str, str]]:
        """(field, what is wrong with it) for every unusable value."""
        low, high = FIELDS["preview_every"].range
        if not _is_int(self.preview_every) or not low <= self.preview_every <= high:
            yield "preview_every", f"must be an integer from {low} (off) to {high}"
        if self.preview_method not in FIELDS["preview_method"].choice_list():
            yield "preview_method", f"must be one of {', '.join(FIELDS['preview_method'].choice_list())}"
        if (problem := pattern_problem(self.output_pattern)) is not None:
            yield "output_pattern", problem
        if not isinstance(self.default_model, str):
            yield "default_model", "must be a model name (text), or empty for the automatic choice"
        if self.device not in DEVICE_CHOICES:
            yield "device", f"must be one of {', '.join(DEVICE_CHOICES)}"
        if self.dtype not in DTYPE_CHOICES:
            yield "dtype", f"must be one of {', '.join(DTYPE_CHOICES)}"
        if not isinstance(self.extensions, dict) or not all(isinstance(name, str) and isinstance(values, dict)
                                                            for name, values in self.extensions.items()):
            yield "extensions", "must map extension names to their settings (JSON objects)"
        else:
            try:
                json.dumps(self.extensions, allow_nan=False)
            except (TypeError, ValueError) as error:
                yield "extensions", f"must hold plain JSON values only ({error})"
        if not isinstance(self.save_outputs, bool):
            yield "save_outputs", "must be true or false"
        if not isinstance(self.save_interrupted_images, bool):
            yield "save_interrupted_images", "must be true or false"
        if not isinstance(self.memory_check, bool):
            yield "memory_check", "must be true or false"
        if not isinstance(self.model_modules, dict) or not all(
                isinstance(name, str) and isinstance(picks, list) and all(isinstance(pick, str) for pick in picks)
                for name, picks in self.model_modules.items()):
            yield "model_modules", "must map model names to lists of file names"

    def validate(self) -> "Settings":
        for name, problem in self.problems():
            raise ValidationError(name, problem)
        return self


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SettingsStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.warnings: list[str] = []  # what the last load() had to put back to its default, for the UI to show

    def load(self) -> Settings:
        """The saved settings; an unreadable file gives the defaults, an unusable value its default."""
        self.warnings = []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return Settings()
        except (OSError, ValueError) as error:
            self._warn(f"{self.path} could not be read ({error}); using the default settings")
            return Settings()
        if not isinstance(data, dict):
            self._warn(f"{self.path} does not hold a JSON object; using the default settings")
            return Settings()
        known = {f.name for f in fields(Settings)}
        settings = Settings(**{key: value for key, value in data.items() if key in known})
        defaults = Settings()
        for name, problem in list(settings.problems()):
            self._warn(f"{self.path}: {name} {json.dumps(getattr(settings, name))} {problem}; "
                       f"using the default {json.dumps(getattr(defaults, name))} instead")
            setattr(settings, name, getattr(defaults, name))
        return settings

    def _warn(self, message: str) -> None:
        log.warning(message)
        self.warnings.append(message)

    def save(self, settings: Settings) -> None:
        settings.validate()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write.write_file(self.path, json.dumps(asdict(settings), indent=2) + "\n")
        except OSError as error:
            raise SfumatoError(f"cannot save the settings to {self.path}: {error.strerror or error}; "
                               "check that folder's permissions and free space") from error
