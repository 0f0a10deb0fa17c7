"""What the UI needs to know about a model before (or without) loading it."""
from __future__ import annotations

from engine.errors import SfumatoError
from engine.families import SD1, Family
from engine.models import ModelEntry

UNTRAINED_NOTE = (
    "⚠️ **Untrained model:** `{name}` has random weights, so its images are noise. "
    "Train the demo model (`python launch.py train-demo`) or put a checkpoint in `models/Stable-diffusion`."
)


def model_family(studio, name: str | None) -> Family | None:
    """The model's family (the loaded model's, else read from its files without loading it); None when unknown."""
    entry = entry_or_none(studio, name)
    return studio.registry.family(entry) if entry is not None else None


def native_size(studio, name: str | None) -> tuple[int, int]:
    """The model family's native size, read from the loaded model or the model's files (no loading); SD 1.x's when
    the files do not say."""
    return native_size_of(model_family(studio, name))


def native_size_of(family: Family | None) -> tuple[int, int]:
    """A family's native size; SD 1.x's for an unknown one."""
    return family.native_size if family is not None else SD1.native_size


BROKEN_NOTE = "⚠️ **`{name}` cannot be used:** {problem}"
BROKEN_MARK = "⚠️ broken"


def model_note(entry: ModelEntry | None) -> str:
    if entry is None:
        return "No model found: put a checkpoint in `models/Stable-diffusion`."
    if entry.problem:
        return BROKEN_NOTE.format(name=entry.name, problem=entry.problem)
    return UNTRAINED_NOTE.format(name=entry.name) if entry.untrained else ""


def model_choices(studio) -> list[tuple[str, str]]:
    """The model dropdown's (label, name) pairs: a broken model is marked, and its note says why when picked."""
    return [(f"{entry.name} — {BROKEN_MARK}" if entry.problem else entry.name, entry.name) for entry in studio.registry.list()]


def installed_name(studio, name: str | None) -> str | None:
    """The model's name in this studio for any accepted spelling (A1111 title, file name, older path form), or None."""
    entry = entry_or_none(studio, name) if name else None
    return entry.name if entry is not None else None


def entry_or_none(studio, name: str | None) -> ModelEntry | None:
    try:
        return studio.registry.get(name)
    except SfumatoError:
        return None


def default_model_name(studio) -> str | None:
    try:
        return studio.default_model()
    except SfumatoError:
        return None
