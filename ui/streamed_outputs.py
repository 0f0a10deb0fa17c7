"""Output components, and their postprocessing, for a generator event that yields once per step.

A generation yields once per step: a new preview and progress line, and ``gr.skip()``
for the results gallery and the rest. Gradio answers each skip by rebuilding the
component from its constructor arguments and describing it again, and the description
holds the component's API schema, which pydantic regenerates for every new instance:
8 ms for an Image or a Gallery on a 2-core CPU. That was about 10 ms of web-server
work per step, beside the sampling and on the same cores. The schema depends only on
the component's data model, so these subclasses compute it once per model.
``is_template`` makes Gradio draw them with their parent's front-end component.
"""
from __future__ import annotations

from typing import Any, Sequence

import gradio as gr
from gradio.data_classes import GradioModel, GradioRootModel
from gradio.utils import is_prop_update

_SCHEMAS: dict[type, dict[str, Any]] = {}


def _schema_once(component: gr.components.Component, describe) -> dict[str, Any]:
    """``describe(component)``, computed for the first component of each data model and reused after."""
    schema = _SCHEMAS.get(component.data_model)
    if schema is None:
        schema = _SCHEMAS[component.data_model] = describe(component)
    return schema


class LivePreview(gr.Image):
    """The step-by-step preview image."""

    is_template = True  # drawn by the parent class's front-end component

    def api_info(self) -> dict[str, Any]:
        return _schema_once(self, gr.Image.api_info)


class ResultGallery(gr.Gallery):
    """The finished images, left as they are while the next generation runs."""

    is_template = True

    def api_info(self) -> dict[str, Any]:
        return _schema_once(self, gr.Gallery.api_info)


def postprocess_values(components: Sequence[Any], values: Sequence[Any]) -> tuple:
    """``values`` as Gradio would send them for ``components``, for an event declared with ``postprocess=False``.

    Gradio postprocesses each output of each yield on a worker thread of its own and back through
    the event loop; while the sampler holds the GIL between its torch calls, each of those round
    trips waits its turn, and a step's preview took 3 to 20 ms to leave the server. Here each
    component's own ``postprocess`` runs on the generator's thread, in one pass. ``gr.skip()`` and
    State values pass through, as Gradio handles those itself.
    """
    processed = []
    for component, value in zip(components, values, strict=True):
        if component.stateful or is_prop_update(value):
            processed.append(value)
            continue
        value = component.postprocess(value)
        processed.append(value.model_dump() if isinstance(value, (GradioModel, GradioRootModel)) else value)
    return tuple(processed)
