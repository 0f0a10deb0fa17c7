"""The settings a model's family draws best with, for a front end to set where the artist has not.

Every family's ``defaults`` (its card's ``recommended_*`` included) name some of the applied settings, and the rest
go back to their declared default (Shift: empty, the model's own σ shift). The UI applies them when a model is picked
(``ui.family_fields``), the command line for each flag not given (``ui.cli``); the engine never overrides a request.
"""
from __future__ import annotations

from typing import Any, Mapping

from .families import FAMILIES, Family
from .fields import FIELDS

APPLIED = tuple(dict.fromkeys(("sampler", "schedule", "steps", "cfg_scale", "distilled_cfg_scale", "shift",
                               *(name for family in FAMILIES for name in family.defaults))))


def family_settings(family: Family | None) -> dict[str, Any]:
    """The values a model of ``family`` draws with: its defaults, and the declared default of each other applied
    field (Flux.1 dev: CFG 1, Distilled CFG 3.5, Euler, Simple, 20 steps; SD 1.x: CFG 7, DPM++ 2M...)."""
    own: Mapping[str, Any] = family.defaults if family is not None else {}
    return {name: own.get(name, FIELDS[name].default) for name in APPLIED}
