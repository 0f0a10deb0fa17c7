"""Sfumato's generation engine. No UI code lives here: callers build a
``GenerationRequest``, call ``Engine.generate`` and get a ``GenerationResult``."""
from .engine import Engine, HookContext
from .errors import GenerationError, ModelError, SfumatoError, UnsafeModelError, ValidationError
from .models import ModelRegistry
from .request import CancelToken, GeneratedImage, GenerationRequest, GenerationResult, Progress

__all__ = [
    "CancelToken", "Engine", "GeneratedImage", "GenerationError", "GenerationRequest", "GenerationResult",
    "HookContext", "ModelError", "ModelRegistry", "Progress", "SfumatoError", "UnsafeModelError", "ValidationError",
]
