"""A generate click's inputs, preprocessed in one pass on the handler's own thread.

Gradio preprocesses an event's inputs one at a time, each on a worker thread and
back through the event loop: about 0.3 ms a round trip on an idle 2-core machine,
more while a generation runs. A generate click has 55 inputs (every sampling
control and every extension control, such as each control unit's), so that came to 15 ms or more
between the click and the job's submission. Declared with ``preprocess=False``,
the handler receives the values as Gradio validated them and calls
``preprocess_values``:

- controls with a data model (images, the inpaint editor) are validated into it
  and preprocessed by the component, as Gradio does;
- numbers and text are preprocessed by the component;
- choice controls and sliders pass their value through. A session can change their
  choices or bounds (refreshing the model list, an extension's control whose
  range depends on another), which the app-level component does not know about; the request's
  own validation checks these values and names the field in its error.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import gradio as gr

from engine.errors import ValidationError

log = logging.getLogger("sfumato.ui")
SESSION_SHAPED = (gr.Dropdown, gr.Radio, gr.CheckboxGroup, gr.Slider)


def preprocess_values(components: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (keyed like ``components``) as each component's ``preprocess`` gives them to a handler."""
    processed: dict[str, Any] = {}
    for key, value in values.items():
        component = components[key]
        if component.stateful or isinstance(component, SESSION_SHAPED):
            processed[key] = value
            continue
        try:
            data_model = getattr(component, "data_model", None)
            if data_model is not None and value is not None:
                value = data_model.model_validate(value, context={"validate_meta": True})
            processed[key] = component.preprocess(value)
        except gr.Error:
            raise
        except Exception:  # noqa: BLE001 - a corrupt upload is the artist's input, reported as such
            # The artist gets a sentence; the exception (which may name a temp file) goes to the log only.
            log.warning("could not read the value of %s", key, exc_info=True)
            label = getattr(component, "label", None) or key
            raise ValidationError(key, f"{label} could not be read; upload or enter it again") from None
    return processed
