"""The controls that follow the model's family: which are shown, and the settings a family draws best with.

A field that only some families use names their trait in ``engine.fields`` (``Field.only_for``): Clip skip is a
UNet's, Shift a flow model's, Distilled CFG a guidance-distilled model's (Flux.1 dev), and the "VAE / Text
Encoder" picker is for flow models kept as split files. The UI asks the field and the model's family
(``Family.traits``); it never tests a family's name.

When the artist picks a model whose family draws with other settings than the previous model's, those settings
are applied, as Forge's UI presets (sd / xl / flux) set them: the family's ``defaults`` over the fields' declared
ones (SD 1.x's, as A1111 has them). Picking another model of the same kind keeps the artist's own values. The size
follows the native size in ``ui.app.switch_model``, where the artist has not changed it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from engine.families import Family
from engine.family_settings import APPLIED, family_settings
from engine.fields import DEFAULT_TRAITS, FIELDS


def traits_of(family: Family | None) -> frozenset[str]:
    """A family's traits; an unknown model's are SD 1.x's (the fields' defaults are SD 1.x's too)."""
    return family.traits if family is not None else DEFAULT_TRAITS


def family_fields() -> list[str]:
    """The request fields shown only for some families (those declaring ``only_for``)."""
    return [declared.name for declared in FIELDS if declared.only_for is not None]


def shown(name: str, family: Family | None) -> bool:
    """Whether the control of request field ``name`` is shown for a model of ``family``."""
    declared = FIELDS.get(name)
    return declared is None or declared.used_by(traits_of(family))


def settings_differ(previous: Family | None, new: Family | None) -> bool:
    """Whether moving from a model of ``previous`` to one of ``new`` changes the settings to draw with (an unknown
    previous model: always)."""
    return previous is None or family_settings(previous) != family_settings(new)


def _with_visibility(update: Any, visible: bool) -> dict:
    """A control's update (a value, ``gr.update(...)`` or ``gr.skip()``) that also shows or hides it."""
    if isinstance(update, dict) and update.get("__type__") == "update":
        return {**update, "visible": visible}
    return gr.update(value=update, visible=visible)


@dataclass
class FamilyControls:
    """What follows the model's family: each tab's field map, the pickers above the tabs that only some families
    use (request field name → control), and the label that names the model's family."""

    tabs: list = field(default_factory=list)  # GenerationTab
    pickers: dict[str, Any] = field(default_factory=dict)

    def outputs(self) -> list:
        """The controls ``updates`` fills, in its order."""
        names = self.tab_names()
        return [component for tab in self.tabs for component in tab.fields.components(names[tab.mode])] + list(self.pickers.values())

    def tab_names(self) -> dict[str, list[str]]:
        """Per tab, the fields it holds that follow the family: the applied settings, the controls that follow
        one of them (the schedule and the zero-SNR box follow the sampler) and the family-only fields."""
        result = {}
        for tab in self.tabs:
            followers = [name for name, binding in tab.fields.bindings.items() if binding.follows in APPLIED]
            wanted = dict.fromkeys([*APPLIED, *followers, *family_fields()])
            result[tab.mode] = [name for name in wanted if name in tab.fields]
        return result

    def skips(self) -> list:
        return [gr.skip()] * len(self.outputs())

    def updates(self, family: Family | None, apply_settings: bool) -> list:
        """Show the fields ``family`` uses and hide the others; with ``apply_settings``, set its settings too."""
        values = family_settings(family) if apply_settings else {}
        names = self.tab_names()
        result: list = []
        for tab in self.tabs:
            chosen = names[tab.mode]
            for name, update in zip(_component_names(tab, chosen), tab.fields.updates(values, chosen)):
                result.append(_with_visibility(update, shown(name, family)) if name in family_fields() else update)
        result += [gr.update(visible=shown(name, family)) for name in self.pickers]
        return result


def _component_names(tab, names: list[str]) -> list[str]:
    """The field name of each control ``tab.fields.components(names)`` lists (a field may hold several)."""
    return [name for name in names for _ in tab.fields.bindings[name].components]
