"""Engine errors shown as artist-facing messages: the control's name and what to change, never a traceback."""
from __future__ import annotations

import re

import gradio as gr

from engine.errors import SfumatoError, ValidationError

from .fields import LABELS, describe_error

_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*): (.+)$", re.S)


def message_for(error: BaseException) -> str:
    if isinstance(error, ValidationError):
        return describe_error(error.field, error.message)
    return str(error)


def ui_error(error: SfumatoError, title: str = "Cannot generate") -> gr.Error:
    """A gr.Error to raise from an event handler; the server logs no stack trace for it."""
    return gr.Error(message_for(error), title=title, print_exception=False)


def warn(error: BaseException, title: str = "Warning") -> None:
    gr.Warning(message_for(error), title=title)


def job_error_text(text: str) -> str:
    """A failed job's error (a ValidationError flattened to 'field: message') with the control named, as at submit time."""
    match = _FIELD_PREFIX.match(text or "")
    if match and match.group(1).split(".")[0] in LABELS:
        return describe_error(match.group(1), match.group(2))
    return text
