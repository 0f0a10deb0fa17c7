"""Placeholder schedules (the `schedules` branch replaces this file)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import ValidationError


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def uniform(table, steps: int) -> torch.Tensor:
    """k-diffusion's ``get_sigmas``: t evenly from the last training step to 0."""
    t = torch.linspace(len(table.sigmas) - 1, 0, steps)
    return _append_zero(table.t_to_sigma(t))


def karras(table, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5."""
    ramp = torch.linspace(0, 1, steps)
    lo, hi = float(table.sigma_min) ** (1 / rho), float(table.sigma_max) ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(table, steps: int) -> torch.Tensor:
    return _append_zero(torch.linspace(math.log(float(table.sigma_max)), math.log(float(table.sigma_min)), steps).exp())


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    function: Callable
    a1111_name: str
    aliases: tuple[str, ...] = ()


SCHEDULES = (
    ScheduleSpec("Uniform", uniform, "uniform"),
    ScheduleSpec("Karras", karras, "karras"),
    ScheduleSpec("Exponential", exponential, "exponential"),
)


def _key(name: str) -> str:
    return name.strip().lower().replace("_", " ")


def find_schedule(name: str) -> ScheduleSpec:
    for spec in SCHEDULES:
        if _key(name) in {_key(alias) for alias in (spec.name, spec.a1111_name, *spec.aliases)}:
            return spec
    raise ValidationError("schedule", f"unknown schedule type {name!r}; choose one of: {', '.join(s.name for s in SCHEDULES)}")
