"""The sampler table: one row per sampler, saying how the sample pass runs it.

A row names the sampler's function (a plain function over a σ sequence, see ``types``), what A1111 1.10's
"Automatic" schedule resolves to for it, its other names, the noise it draws, its eta default and infotext key,
and its quirks. The facts are A1111 1.10's (``modules/sd_samplers_kdiffusion.py``, ``sd_samplers_timesteps.py``,
``sd_samplers_lcm.py``, ``sd_samplers_extra.py``); the schedule functions live in ``schedules``.

Functions are looked up by name when a row is used, so a row whose function is not in this build is refused
with a reason instead of breaking the import of everything else.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import ValidationError
from . import schedules
from .flow import FLOW_AS_IS, FLOW_STEP, FLOW_VARIANCE_EXPLODING

AUTOMATIC = "Automatic"

# What the sampler draws besides the first noise.
NO_NOISE = "none"
ANCESTRAL_NOISE = "ancestral"  # the per-image generators' next draws (A1111's ImageRNG), reseeded by ENSD
BROWNIAN_NOISE = "brownian"  # a Brownian tree seeded with each image's seed (k-diffusion's BrownianTreeNoiseSampler)


@dataclass(frozen=True)
class SamplerSpec:
    name: str  # A1111's label, written as "Sampler:" in the infotext
    function_name: str
    module: str = "samplers"  # the module under engine.sampling that holds the function
    default_schedule: str = "Uniform"  # what "Automatic" resolves to
    aliases: tuple[str, ...] = ()  # A1111's internal names and the k-diffusion function names
    noise: str = NO_NOISE
    options: dict[str, Any] = field(default_factory=dict)  # fixed keyword options of the function
    eta_default: float | None = None  # None: the sampler takes no eta
    eta_key: str = "Eta"  # the infotext key A1111 writes eta under when it differs from the default
    discard_next_to_last_sigma: bool = False  # builds a steps+1 schedule and drops its next-to-last σ
    own_sigmas: str | None = None  # a σ function in ``module`` used instead of the schedule (A1111's timestep samplers)
    model_sigma_range: bool = False  # txt2img runs over the model's whole σ range (DPM fast / adaptive)
    cfg_scale_factor: float = 1.0  # A1111 scales the CFG scale for DDIM CFG++ (÷ 12.5)
    schedule_timesteps: str | None = None  # a function in ``module`` giving the training timesteps schedules read
    # How it runs on a rectified-flow model (``flow``): as is (an ODE on σ), with its own flow noise step (samplers
    # that add noise while walking a σ schedule: ancestral, DPM fast/adaptive, Restart; ``flow=True``), or on the
    # model's variance-exploding view (everything else).
    on_flow: str = FLOW_VARIANCE_EXPLODING
    note: str = ""

    @property
    def function(self) -> Callable | None:
        """The sampler function, or None when this build lacks it."""
        return _lookup(self.module, self.function_name)

    @property
    def own_sigma_function(self) -> Callable | None:
        return _lookup(self.module, self.own_sigmas) if self.own_sigmas else None

    @property
    def schedule_timestep_function(self) -> Callable | None:
        return _lookup(self.module, self.schedule_timesteps) if self.schedule_timesteps else None

    @property
    def steps_on_alphas(self) -> bool:
        """Whether it steps on the training timesteps' ᾱ (A1111's DDIM, PLMS, UniPC, DDPM; LCM) rather than on σ; on a
        flow model it steps on the ᾱ = 1/(1 + s²) of the variance-exploding view (``flow``)."""
        return self.module in ("timestep_samplers", "lcm")

    @property
    def uses_schedule(self) -> bool:
        return self.own_sigmas is None


def _lookup(module: str, name: str) -> Callable | None:
    try:
        return getattr(importlib.import_module(f"{__package__}.{module}"), name, None)
    except ImportError:
        return None


SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec("DPM++ 2M", "sample_dpmpp_2m", default_schedule="Karras", aliases=("k_dpmpp_2m",), on_flow=FLOW_AS_IS),
    SamplerSpec("DPM++ SDE", "sample_dpmpp_sde", default_schedule="Karras", aliases=("k_dpmpp_sde",), noise=BROWNIAN_NOISE,
                eta_default=1.0),
    SamplerSpec("DPM++ 2M SDE", "sample_dpmpp_2m_sde", default_schedule="Exponential", aliases=("k_dpmpp_2m_sde",),
                noise=BROWNIAN_NOISE, eta_default=1.0),
    SamplerSpec("DPM++ 2M SDE Heun", "sample_dpmpp_2m_sde", default_schedule="Exponential", aliases=("k_dpmpp_2m_sde_heun",),
                noise=BROWNIAN_NOISE, options={"solver_type": "heun"}, eta_default=1.0),
    SamplerSpec("DPM++ 2S a", "sample_dpmpp_2s_ancestral", default_schedule="Karras", aliases=("k_dpmpp_2s_a",),
                noise=ANCESTRAL_NOISE, eta_default=1.0, on_flow=FLOW_STEP),
    SamplerSpec("DPM++ 3M SDE", "sample_dpmpp_3m_sde", default_schedule="Exponential", aliases=("k_dpmpp_3m_sde",),
                noise=BROWNIAN_NOISE, eta_default=1.0, discard_next_to_last_sigma=True),
    SamplerSpec("Euler a", "sample_euler_ancestral", aliases=("k_euler_a", "k_euler_ancestral", "euler_ancestral"),
                noise=ANCESTRAL_NOISE, eta_default=1.0, on_flow=FLOW_STEP),
    SamplerSpec("Euler", "sample_euler", aliases=("k_euler",), on_flow=FLOW_AS_IS),
    SamplerSpec("LMS", "sample_lms", aliases=("k_lms",), on_flow=FLOW_AS_IS),
    SamplerSpec("Heun", "sample_heun", aliases=("k_heun",), on_flow=FLOW_AS_IS),
    SamplerSpec("DPM2", "sample_dpm_2", default_schedule="Karras", aliases=("k_dpm_2",), discard_next_to_last_sigma=True,
                on_flow=FLOW_AS_IS),
    SamplerSpec("DPM2 a", "sample_dpm_2_ancestral", default_schedule="Karras", aliases=("k_dpm_2_a",), noise=ANCESTRAL_NOISE,
                eta_default=1.0, discard_next_to_last_sigma=True, on_flow=FLOW_STEP),
    SamplerSpec("DPM fast", "sample_dpm_fast", aliases=("k_dpm_fast",), noise=ANCESTRAL_NOISE, eta_default=1.0,
                model_sigma_range=True, on_flow=FLOW_STEP,
                note="txt2img runs over the model's own σ range, whatever the schedule"),
    SamplerSpec("DPM adaptive", "sample_dpm_adaptive", aliases=("k_dpm_ad",), noise=ANCESTRAL_NOISE, eta_default=1.0,
                model_sigma_range=True, on_flow=FLOW_STEP, note="adaptive step size: the step count only bounds the σ range in img2img"),
    SamplerSpec("Restart", "sample_restart", module="restart", default_schedule="Karras", aliases=("restart",),
                noise=ANCESTRAL_NOISE, on_flow=FLOW_STEP),
    SamplerSpec("DDIM", "sample_ddim", module="timestep_samplers", aliases=("ddim",), noise=ANCESTRAL_NOISE, eta_default=0.0,
                eta_key="Eta DDIM", own_sigmas="timestep_sigmas", note="A1111's timestep sampler: ignores the schedule type"),
    SamplerSpec("DDIM CFG++", "sample_ddim_cfgpp", module="timestep_samplers", aliases=("ddim_cfgpp",), noise=ANCESTRAL_NOISE,
                eta_default=0.0, eta_key="Eta DDIM", own_sigmas="timestep_sigmas", cfg_scale_factor=1 / 12.5,
                note="A1111's timestep sampler: ignores the schedule type"),
    SamplerSpec("PLMS", "sample_plms", module="timestep_samplers", aliases=("plms",), own_sigmas="timestep_sigmas",
                on_flow=FLOW_AS_IS,
                note="A1111's timestep sampler: ignores the schedule type"),
    SamplerSpec("UniPC", "sample_unipc", module="timestep_samplers", aliases=("unipc",), own_sigmas="unipc_sigmas",
                note="A1111's timestep sampler: ignores the schedule type"),
    SamplerSpec("LCM", "sample_lcm", module="lcm", aliases=("k_lcm", "lcm"), noise=ANCESTRAL_NOISE,
                schedule_timesteps="lcm_timesteps",
                note="meant for LCM-distilled weights; schedules span LCM's 50 timesteps. Unlike A1111, which takes "
                     "every model's output as ε, it honours a v-model's parameterization (README: exceptions)"),
    SamplerSpec("DDPM", "sample_ddpm", module="timestep_samplers", aliases=("ddpm",), noise=ANCESTRAL_NOISE,
                own_sigmas="timestep_sigmas", note="not in A1111: Ho et al.'s ancestral sampler, on A1111's DDIM timesteps"),
)

DEFAULT_SAMPLER = "DPM++ 2M"
DEFAULT_SCHEDULE = AUTOMATIC


def _key(name: str) -> str:
    return name.strip().lower().replace("_", " ")


_SAMPLER_BY_KEY = {_key(alias): spec for spec in SAMPLERS for alias in (spec.name, *spec.aliases, spec.function_name)}


def sampler_names() -> list[str]:
    return [spec.name for spec in SAMPLERS]


def schedule_names() -> list[str]:
    return [AUTOMATIC, *(spec.name for spec in schedules.SCHEDULES)]


def find_sampler(name: str) -> SamplerSpec:
    spec = _SAMPLER_BY_KEY.get(_key(name))
    if spec is None:
        raise ValidationError("sampler", f"unknown sampler {name!r}; choose one of: {', '.join(sampler_names())}")
    return spec


def find_schedule(name: str) -> "schedules.ScheduleSpec | _Automatic":
    """A schedule row by name or alias; "Automatic" gives a row that stands for the sampler's default."""
    if _key(name) in (_key(AUTOMATIC), "auto"):
        return AUTOMATIC_SCHEDULE
    try:
        return schedules.find_schedule(name)
    except ValidationError:
        raise ValidationError("schedule", f"unknown schedule type {name!r}; choose one of: {', '.join(schedule_names())}") from None


@dataclass(frozen=True)
class _Automatic:
    name: str = AUTOMATIC


AUTOMATIC_SCHEDULE = _Automatic()


def resolve_schedule(sampler: str, schedule: str) -> str:
    """The schedule a sampler actually runs: "Automatic" becomes the sampler's A1111 default."""
    name = find_schedule(schedule).name
    return find_sampler(sampler).default_schedule if name == AUTOMATIC else name


def infotext_schedule(sampler: str, schedule: str) -> str | None:
    """What "Schedule type" says: the resolved schedule, or None for samplers that ignore schedules (as A1111 writes)."""
    return resolve_schedule(sampler, schedule) if find_sampler(sampler).uses_schedule else None


def split_legacy_name(name: str) -> tuple[str, str | None]:
    """Split an old-style combined name ("DPM++ 2M Karras") into sampler and schedule.

    Returns the canonical sampler name and the schedule name, or None when the
    name carries no schedule.
    """
    key = _key(name)
    if key in _SAMPLER_BY_KEY:
        return _SAMPLER_BY_KEY[key].name, None
    for schedule in schedule_names()[1:]:
        spec = schedules.find_schedule(schedule)
        for alias in (spec.name, spec.a1111_name, *spec.aliases):
            suffix = " " + _key(alias)
            if key.endswith(suffix) and key[: -len(suffix)] in _SAMPLER_BY_KEY:
                return _SAMPLER_BY_KEY[key[: -len(suffix)]].name, spec.name
    find_sampler(name)  # raises the standard unknown-sampler message
    raise AssertionError("unreachable")


def unsupported_reason(sampler: str, schedule: str, zero_terminal_snr: bool = False) -> str | None:
    """Why this combination cannot run, or None when it can.

    Every sampler runs on every schedule A1111 offers; timestep samplers accept any schedule and ignore it, as
    A1111 does. What remains is a sampler or schedule whose function this build does not have.
    """
    spec = find_sampler(sampler)
    schedule_spec = find_schedule(schedule)
    if spec.function is None or (spec.own_sigmas and spec.own_sigma_function is None):
        return f"sampler {spec.name!r} is not available in this build"
    if spec.uses_schedule and schedule_spec.name != AUTOMATIC and getattr(schedule_spec, "function", None) is None:
        return f"schedule type {schedule_spec.name!r} is not available in this build"
    if spec.uses_schedule and schedule_spec.name == AUTOMATIC:
        default = schedules.find_schedule(spec.default_schedule)
        if getattr(default, "function", None) is None:
            return f"{spec.name}'s default schedule {spec.default_schedule!r} is not available in this build"
    return None


def schedules_for(sampler: str) -> list[str]:
    """The schedule types the UI should offer for a sampler."""
    return [name for name in schedule_names() if unsupported_reason(sampler, name) is None]


def supports_zero_terminal_snr(sampler: str) -> bool:
    """Zero terminal SNR changes the model's noise table, not the sampler, so every sampler honours it."""
    find_sampler(sampler)
    return True


@dataclass(frozen=True)
class SamplerFit:
    """The schedule and zero-SNR setting that go with a sampler, and what had to change to get them."""

    schedule: str
    zero_terminal_snr: bool
    changes: tuple[str, ...] = ()  # one sentence per setting that was changed: the old value, the new one, and why


def fit_to_sampler(sampler: str, schedule: str | None, zero_terminal_snr: bool = False) -> SamplerFit:
    """Keep ``schedule`` and ``zero_terminal_snr`` when ``sampler`` honours them; otherwise fall back and say why.

    This is what switching samplers does: an artist on "DPM++ 2M" + "Karras" who picks "Euler a" keeps Karras;
    one who picks a sampler that cannot use a schedule gets Automatic and a sentence naming both schedules and the
    reason. Unknown names raise ValidationError.
    """
    sampler_name = find_sampler(sampler).name
    kept_schedule = find_schedule(schedule or DEFAULT_SCHEDULE).name
    changes: list[str] = []
    reason = unsupported_reason(sampler_name, kept_schedule)
    if reason and kept_schedule != DEFAULT_SCHEDULE:
        changes.append(f"Schedule type changed from {kept_schedule} to {DEFAULT_SCHEDULE}: {reason}.")
        kept_schedule = DEFAULT_SCHEDULE
    zero_snr = bool(zero_terminal_snr) and supports_zero_terminal_snr(sampler_name)
    return SamplerFit(schedule=kept_schedule, zero_terminal_snr=zero_snr, changes=tuple(changes))


def check_combination(sampler: str, schedule: str, zero_terminal_snr: bool = False) -> None:
    reason = unsupported_reason(sampler, schedule, zero_terminal_snr)
    if reason:
        raise ValidationError("schedule", reason)
