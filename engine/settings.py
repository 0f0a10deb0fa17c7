"""User settings persisted to a JSON file that survives restarts."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import ValidationError
from .request import PREVIEW_METHODS


@dataclass
class Settings:
    preview_every: int = 1
    preview_method: str = "cheap"
    output_pattern: str = "{mode}/{date}/{index:05d}-{seed}"
    default_model: str = ""
    device: str = "auto"
    dtype: str = "auto"
    controlnet_units: int = 3
    save_outputs: bool = True
    # Off, as A1111's "Save incomplete images": an interrupted or skipped image is shown but not saved.
    save_interrupted_images: bool = False

    def validate(self) -> "Settings":
        if not isinstance(self.preview_every, int) or isinstance(self.preview_every, bool) or not 0 <= self.preview_every <= 150:
            raise ValidationError("preview_every", "must be an integer from 0 (off) to 150")
        if self.preview_method not in PREVIEW_METHODS:
            raise ValidationError("preview_method", f"must be one of {', '.join(PREVIEW_METHODS)}")
        if not isinstance(self.controlnet_units, int) or not 1 <= self.controlnet_units <= 8:
            raise ValidationError("controlnet_units", "must be an integer from 1 to 8")
        if not isinstance(self.save_interrupted_images, bool):
            raise ValidationError("save_interrupted_images", "must be true or false")
        return self


class SettingsStore:
    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> Settings:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return Settings()
        known = {f.name for f in fields(Settings)}
        try:
            return Settings(**{k: v for k, v in data.items() if k in known}).validate()
        except (TypeError, ValidationError):
            return Settings()

    def save(self, settings: Settings) -> None:
        settings.validate()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=self.path.parent, prefix=".settings-")
        with os.fdopen(handle, "w") as out:
            json.dump(asdict(settings), out, indent=2)
        os.replace(temp, self.path)
