"""Samplers and schedules as data.

A sampler is an A1111 display name mapped to a diffusers scheduler class plus
config overrides. A schedule type is a set of further overrides. Which schedule
a sampler can honour is read from the scheduler class's own ``__init__``
signature, because ``from_config`` silently drops options a class lacks, and we
refuse rather than silently ignore.
"""
from __future__ import annotations

import copy
import inspect
import json
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import diffusers

from .errors import ValidationError


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    scheduler_class: str
    options: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    options: dict[str, Any]
    aliases: tuple[str, ...] = ()


SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, ("k_dpmpp_2m",)),
    SamplerSpec("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, ("k_dpmpp_2m_sde",)),
    SamplerSpec("DPM++ SDE", "DPMSolverSDEScheduler", {}, ("k_dpmpp_sde",)),
    SamplerSpec(
        "DPM++ 2S a", "DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, ("k_dpmpp_2s_a",),
        note="closest diffusers equivalent: second-order single-step DPM-Solver++, without the ancestral noise",
    ),
    SamplerSpec("Euler a", "EulerAncestralDiscreteScheduler", {}, ("k_euler_a", "euler_ancestral")),
    SamplerSpec("Euler", "EulerDiscreteScheduler", {}, ("k_euler",)),
    SamplerSpec("LMS", "LMSDiscreteScheduler", {}, ("k_lms",)),
    SamplerSpec("Heun", "HeunDiscreteScheduler", {}, ("k_heun",)),
    SamplerSpec("DPM2", "KDPM2DiscreteScheduler", {}, ("k_dpm_2",)),
    SamplerSpec("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, ("k_dpm_2_a",)),
    SamplerSpec("DDIM", "DDIMScheduler", {}, ("ddim",)),
    SamplerSpec("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, ("plms",)),
    SamplerSpec("UniPC", "UniPCMultistepScheduler", {}, ("unipc",)),
    SamplerSpec("DEIS", "DEISMultistepScheduler", {}, ("deis",)),
    SamplerSpec("DDPM", "DDPMScheduler", {}, ("ddpm",)),
    SamplerSpec("LCM", "LCMScheduler", {}, ("lcm",), note="meant for LCM-distilled weights"),
)

SCHEDULES: tuple[ScheduleSpec, ...] = (
    ScheduleSpec("Automatic", {}, ("automatic", "auto")),
    ScheduleSpec("Uniform", {"timestep_spacing": "linspace"}, ("uniform",)),
    ScheduleSpec("Karras", {"use_karras_sigmas": True}, ("karras",)),
    ScheduleSpec("Exponential", {"use_exponential_sigmas": True}, ("exponential",)),
    ScheduleSpec("Beta", {"use_beta_sigmas": True}, ("beta",)),
    ScheduleSpec("SGM Uniform", {"timestep_spacing": "trailing"}, ("sgm_uniform",)),
)

ZERO_TERMINAL_SNR_OPTION = "rescale_betas_zero_snr"
DEFAULT_SAMPLER = "DPM++ 2M"
DEFAULT_SCHEDULE = "Automatic"


def _key(name: str) -> str:
    return name.strip().lower().replace("_", " ")


_SAMPLER_BY_KEY = {_key(alias): spec for spec in SAMPLERS for alias in (spec.name, *spec.aliases)}
_SCHEDULE_BY_KEY = {_key(alias): spec for spec in SCHEDULES for alias in (spec.name, *spec.aliases)}


@lru_cache(maxsize=None)
def _accepted_options(scheduler_class: str) -> frozenset[str]:
    cls = getattr(diffusers, scheduler_class)
    return frozenset(inspect.signature(cls.__init__).parameters)


def sampler_names() -> list[str]:
    return [spec.name for spec in SAMPLERS]


def schedule_names() -> list[str]:
    return [spec.name for spec in SCHEDULES]


def find_sampler(name: str) -> SamplerSpec:
    spec = _SAMPLER_BY_KEY.get(_key(name))
    if spec is None:
        raise ValidationError("sampler", f"unknown sampler {name!r}; choose one of: {', '.join(sampler_names())}")
    return spec


def find_schedule(name: str) -> ScheduleSpec:
    spec = _SCHEDULE_BY_KEY.get(_key(name))
    if spec is None:
        raise ValidationError("schedule", f"unknown schedule type {name!r}; choose one of: {', '.join(schedule_names())}")
    return spec


def split_legacy_name(name: str) -> tuple[str, str | None]:
    """Split an old-style combined name ("DPM++ 2M Karras") into sampler and schedule.

    Returns the canonical sampler name and the schedule name, or None when the
    name carries no schedule.
    """
    key = _key(name)
    if key in _SAMPLER_BY_KEY:
        return _SAMPLER_BY_KEY[key].name, None
    for schedule in SCHEDULES:
        for alias in (schedule.name, *schedule.aliases):
            suffix = " " + _key(alias)
            if key.endswith(suffix) and key[: -len(suffix)] in _SAMPLER_BY_KEY:
                return _SAMPLER_BY_KEY[key[: -len(suffix)]].name, schedule.name
    find_sampler(name)  # raises the standard unknown-sampler message
    raise AssertionError("unreachable")


def unsupported_reason(sampler: str, schedule: str, zero_terminal_snr: bool = False) -> str | None:
    """Why this combination cannot run, or None when it can."""
    sampler_spec, schedule_spec = find_sampler(sampler), find_schedule(schedule)
    accepted = _accepted_options(sampler_spec.scheduler_class)
    missing = [option for option in schedule_spec.options if option not in accepted]
    if missing:
        return f"sampler {sampler_spec.name!r} does not support the {schedule_spec.name!r} schedule ({sampler_spec.scheduler_class} has no {missing[0]!r} option)"
    if zero_terminal_snr and ZERO_TERMINAL_SNR_OPTION not in accepted:
        return f"sampler {sampler_spec.name!r} does not support zero terminal SNR ({sampler_spec.scheduler_class} cannot rescale its betas)"
    return None


# These solvers divide by sqrt(alpha_bar) at the final timestep; with zero terminal SNR that is 0
# for an epsilon-prediction model (Lin et al. 2023 pair zero SNR with v-prediction).
ZERO_SNR_NEEDS_V_PREDICTION = frozenset({"DDIMScheduler", "DDPMScheduler", "LCMScheduler"})


def check_zero_snr_for_model(sampler: str, zero_terminal_snr: bool, prediction_type: str) -> None:
    spec = find_sampler(sampler)
    if zero_terminal_snr and prediction_type == "epsilon" and spec.scheduler_class in ZERO_SNR_NEEDS_V_PREDICTION:
        raise ValidationError(
            "zero_terminal_snr",
            f"{spec.name} with zero terminal SNR needs a v-prediction model; this model predicts epsilon. "
            "Use Euler, DPM++ 2M or UniPC, or turn zero terminal SNR off",
        )


def schedules_for(sampler: str) -> list[str]:
    """The schedule types the UI should offer for a sampler."""
    return [spec.name for spec in SCHEDULES if unsupported_reason(sampler, spec.name) is None]


def supports_zero_terminal_snr(sampler: str) -> bool:
    return ZERO_TERMINAL_SNR_OPTION in _accepted_options(find_sampler(sampler).scheduler_class)


@dataclass(frozen=True)
class SamplerFit:
    """The schedule and zero-SNR setting that go with a sampler, and what had to change to get them."""

    schedule: str
    zero_terminal_snr: bool
    changes: tuple[str, ...] = ()  # one sentence per setting that was changed: the old value, the new one, and why


def fit_to_sampler(sampler: str, schedule: str | None, zero_terminal_snr: bool = False) -> SamplerFit:
    """Keep ``schedule`` and ``zero_terminal_snr`` when ``sampler`` honours them; otherwise fall back and say why.

    This is what switching samplers does: an artist on "DPM++ 2M" + "Karras" who picks
    "Euler" keeps Karras; one who picks a sampler that cannot use Karras gets Automatic
    and a sentence naming both schedules and the reason. Unknown names raise ValidationError.
    """
    sampler_name = find_sampler(sampler).name
    kept_schedule = find_schedule(schedule or DEFAULT_SCHEDULE).name
    changes: list[str] = []
    reason = unsupported_reason(sampler_name, kept_schedule)
    if reason:
        changes.append(f"Schedule type changed from {kept_schedule} to {DEFAULT_SCHEDULE}: {reason}.")
        kept_schedule = DEFAULT_SCHEDULE
    zero_snr = bool(zero_terminal_snr)
    if zero_snr and not supports_zero_terminal_snr(sampler_name):
        changes.append(f"Zero terminal SNR turned off: {unsupported_reason(sampler_name, kept_schedule, True)}.")
        zero_snr = False
    return SamplerFit(schedule=kept_schedule, zero_terminal_snr=zero_snr, changes=tuple(changes))


def check_combination(sampler: str, schedule: str, zero_terminal_snr: bool = False) -> None:
    reason = unsupported_reason(sampler, schedule, zero_terminal_snr)
    if reason:
        raise ValidationError("schedule", reason)


def build_scheduler(base_config: dict, sampler: str, schedule: str, zero_terminal_snr: bool = False):
    """A fresh scheduler for one generation, built from the model's own scheduler config.

    ``from_config`` validates and rebuilds the whole noise table each time; a copy of a
    remembered prototype gives the same object for a fraction of that.
    """
    check_combination(sampler, schedule, zero_terminal_snr)
    sampler_spec, schedule_spec = find_sampler(sampler), find_schedule(schedule)
    key = (json.dumps(dict(base_config), sort_keys=True, default=str), sampler_spec.name, schedule_spec.name, zero_terminal_snr)
    with _PROTOTYPES_LOCK:
        prototype = _PROTOTYPES.get(key)
    if prototype is None:
        prototype = _new_scheduler(base_config, sampler_spec, schedule_spec, zero_terminal_snr)
        with _PROTOTYPES_LOCK:
            _PROTOTYPES[key] = prototype
            while len(_PROTOTYPES) > _MAX_PROTOTYPES:
                _PROTOTYPES.pop(next(iter(_PROTOTYPES)))
    return copy.deepcopy(prototype)


_PROTOTYPES: dict[tuple, Any] = {}
_PROTOTYPES_LOCK = threading.Lock()
_MAX_PROTOTYPES = 64


def _new_scheduler(base_config: dict, sampler_spec: SamplerSpec, schedule_spec: ScheduleSpec, zero_terminal_snr: bool):
    options: dict[str, Any] = {**sampler_spec.options, **schedule_spec.options}
    if zero_terminal_snr:
        # Zero terminal SNR needs the last timestep included (Lin et al. 2023, "Common Diffusion
        # Noise Schedules and Sample Steps are Flawed", section 3.3).
        options[ZERO_TERMINAL_SNR_OPTION] = True
        options.setdefault("timestep_spacing", "trailing")
    config = {key: value for key, value in dict(base_config).items() if key not in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")}
    cls = getattr(diffusers, sampler_spec.scheduler_class)
    return cls.from_config(config, **options)
