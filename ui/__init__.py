"""Sfumato's front-ends: the Gradio studio (``ui.app.build_app``) and, beside it, the HTTP API and server.

``build_app`` is imported lazily so that the API and the command line do not pay for importing Gradio.
"""
from __future__ import annotations

from typing import Any

__all__ = ["build_app"]


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from .app import build_app

        return build_app
    raise AttributeError(f"module 'ui' has no attribute {name!r}")
