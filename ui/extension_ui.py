"""Extension controls inside the generation tabs, guarded so a broken extension never breaks the app.

The contract with ``engine.extensions``: ``studio.extensions.ui_builders(tab)``
gives each extension's builder for that tab. A builder creates its controls in
the current Blocks context and returns ``(components, to_settings)``, where
``to_settings(values)`` turns the controls' values into the extension's entry
of ``GenerationRequest.extensions``. An optional third item,
``from_settings(settings) -> values``, lets presets and "send to" fill the
controls back in.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from engine.errors import SfumatoError, ValidationError

log = logging.getLogger("sfumato.ui")


@dataclass
class ExtensionControls:
    name: str
    components: list
    to_settings: Callable[[list], Any]
    from_settings: Callable[[Any], list] | None = None


def _pairs(builders: Any) -> Iterable[tuple[str, Callable]]:
    if builders is None:
        return []
    if isinstance(builders, dict):
        return list(builders.items())
    pairs = []
    for item in builders:
        if isinstance(item, tuple) and len(item) == 2:
            pairs.append(item)
        else:
            pairs.append((getattr(item, "name", repr(item)), getattr(item, "build", item)))
    return pairs


def _call_builder(builder: Callable, tab: str):
    try:
        parameters = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        parameters = {}
    return builder(tab) if parameters else builder()


def build_extension_controls(studio, tab: str) -> tuple[list[ExtensionControls], list[str]]:
    """Build every extension's controls for ``tab``; returns them and the problems met (one line each)."""
    import gradio as gr

    controls: list[ExtensionControls] = []
    problems: list[str] = []
    manager = getattr(studio, "extensions", None)
    if manager is None or not hasattr(manager, "ui_builders"):
        return controls, problems
    try:
        builders = _pairs(manager.ui_builders(tab))
    except Exception as error:  # noqa: BLE001 - an extension must never take the app down
        log.exception("extension UI builders for %s failed", tab)
        return controls, [f"extensions: {type(error).__name__}: {error}"]
    for name, builder in builders:
        try:
            with gr.Column(elem_classes=["sfumato-extension"]):
                built = _call_builder(builder, tab)
            components, to_settings, *rest = built
            components = list(components)
            if not callable(to_settings):
                raise TypeError("the builder must return (components, to_settings[, from_settings])")
            controls.append(ExtensionControls(str(name), components, to_settings, rest[0] if rest else None))
        except Exception as error:  # noqa: BLE001
            log.exception("extension %s failed to build its %s controls", name, tab)
            problems.append(f"{name}: {type(error).__name__}: {error}")
    if problems:
        gr.Markdown("⚠️ Some extension controls could not be shown: " + "; ".join(problems), elem_classes=["sfumato-warning"])
    return controls, problems


def all_components(controls: list[ExtensionControls]) -> list:
    return [component for control in controls for component in control.components]


def read_settings(controls: list[ExtensionControls], values: list) -> dict[str, Any]:
    """The request's ``extensions`` mapping from the controls' values.

    An extension whose settings are invalid raises ValidationError naming the
    extension; one that crashes is reported the same way, never as a traceback.
    """
    settings: dict[str, Any] = {}
    position = 0
    for control in controls:
        count = len(control.components)
        chunk = list(values[position:position + count])
        position += count
        try:
            value = control.to_settings(chunk)
        except ValidationError as error:
            raise ValidationError(f"extensions.{control.name}.{error.field}", error.message) from None
        except SfumatoError as error:
            raise ValidationError(f"extensions.{control.name}", str(error)) from None
        except Exception as error:  # noqa: BLE001
            log.exception("extension %s could not read its controls", control.name)
            raise ValidationError(f"extensions.{control.name}", f"its controls could not be read ({type(error).__name__}: {error})") from None
        if value is not None:
            settings[control.name] = value
    return settings
