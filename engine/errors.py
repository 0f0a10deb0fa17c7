"""Errors the engine raises. Each one carries a message meant for the artist."""
from __future__ import annotations


class SfumatoError(Exception):
    """Base class for every error the engine reports to a caller."""


class ValidationError(SfumatoError, ValueError):
    """A request field is out of range or of the wrong kind.

    ``field`` names the offending field so front-ends can point at it.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class ModelError(SfumatoError):
    """A model could not be found, read or loaded."""


class NotEnoughMemoryError(ModelError):
    """A model would not fit (its estimate exceeds what is free), or ran out of memory while loading; its files are fine."""


class UnsafeModelError(ModelError):
    """A model file would need unsafe unpickling to load."""


class GenerationError(SfumatoError):
    """A generation failed while running (out of memory, a broken model...)."""


class Interrupted(SfumatoError):
    """The job was interrupted outside the sampler's steps; the engine returns what it has so far."""
