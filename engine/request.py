"""The one immutable, validated request the engine accepts, and what it returns.

Its fields are declared (type, default, limits) in ``engine.fields``; this module checks a request against them.
"""
from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Mapping

from PIL import Image

from .sampling import table as samplers
from .errors import ValidationError
from .fields import (  # noqa: F401 - the choice lists are declared with their fields; re-exported for existing callers
    FIELDS, INPAINT_AREAS, MASKED_CONTENT, MODES, OUTPAINT_SIDES, PREVIEW_METHODS, RESIZE_MODES, RNG_SOURCES, VAE_AUTOMATIC, VAE_NONE,
    SAME_SAMPLER, SAME_SCHEDULE, Field, Names, default,
)
from .prompts import weight_problem

# Each request field's limits are declared in engine/fields.py; this table reads them from there for older callers
# (``LIMITS["steps"]``), and adds the limits that belong to no one field.
LIMITS = {
    **{declared.name: declared.range for declared in FIELDS.core() if declared.range is not None},
    "size": FIELDS["width"].range,
    "prompt_chars": FIELDS["prompt"].max_length,
    "prompt_weight": 1000.0,  # the largest weight nested ``(...)`` groups may multiply to
    "image_pixels": 4096 * 4096,
}
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_range(name: str, value: Any, low: float, high: float, integer: bool) -> None:
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ValidationError(name, f"must be {kind} between {low} and {high}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValidationError(name, f"must be a finite number between {low} and {high}, got {value!r}")
    if not low <= value <= high:
        raise ValidationError(name, f"must be between {low} and {high}, got {value!r}")


def _check_choice(name: str, value: Any, choices: list[str] | tuple[str, ...]) -> None:
    if value not in choices:
        raise ValidationError(name, f"must be one of {', '.join(choices)}; got {value!r}")


def _check_image(name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, Image.Image):
        raise ValidationError(name, f"must be an image, got {type(value).__name__}")
    width, height = value.size
    if width < 1 or height < 1 or width * height > LIMITS["image_pixels"]:
        raise ValidationError(name, f"image is {width}x{height}; it must be non-empty and at most {LIMITS['image_pixels']} pixels")


def _check_text(name: str, value: Any, max_length: int | None) -> None:
    if not isinstance(value, str):
        raise ValidationError(name, f"must be text, got {type(value).__name__}")
    if max_length is not None and len(value) > max_length:
        raise ValidationError(name, f"is {len(value)} characters; at most {max_length} are allowed")
    if "\x00" in value:
        raise ValidationError(name, "must not contain NUL characters")


def check_declared(field: Field, value: Any) -> Any:
    """``value`` checked against ``field``'s declared type and limits; returns it (a tuple for ``outpaint``).

    Raises ValidationError naming the field. Checks that need other fields (a mask needs an
    init image) or another module's knowledge (sampler names) are the request's own.
    """
    name = field.name
    if value is None and field.optional:
        return value
    if field.type is bool:
        if not isinstance(value, bool):
            raise ValidationError(name, "must be true or false")
    elif field.type in (int, float):
        _check_range(name, value, *field.range, integer=field.type is int)
        if field.multiple_of and value % field.multiple_of:
            raise ValidationError(name, f"must be a multiple of {field.multiple_of}, got {value}")
    elif field.type is tuple:
        if not isinstance(value, (tuple, list)) or len(value) != len(OUTPAINT_SIDES):
            raise ValidationError(name, "must be four pixel counts: " + ", ".join(OUTPAINT_SIDES))
        for side, part in zip(OUTPAINT_SIDES, value):
            _check_range(f"{name}.{side}", part, *field.range, integer=True)
        return tuple(value)
    elif field.type is str:
        choices = field.choice_list()
        if choices is not None:
            _check_choice(name, value, choices)
        else:
            _check_text(name, value, field.max_length)
    elif field.type is Image.Image:
        _check_image(name, value)
    elif field.type is Names:  # kept as a tuple so the request stays hashable and immutable
        if isinstance(value, str) or not isinstance(value, (tuple, list)):
            raise ValidationError(name, "must be a list of names")
        for item in value:
            _check_text(name, item, field.max_length)
        return tuple(value)
    return value


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one generation needs. Validated when constructed; never mutated.

    Each field is declared, with its type, default, limits and meaning, in
    ``engine.fields``; the defaults below are read from there.
    ``width``/``height`` of None mean the model's native size. ``init_image``
    makes it img2img; a ``mask`` or a non-zero ``outpaint`` makes it inpaint.
    ``extensions`` maps an extension name to that extension's own settings.
    """

    prompt: str = default("prompt")
    negative_prompt: str = default("negative_prompt")
    model: str | None = default("model")
    sampler: str = default("sampler")
    schedule: str = default("schedule")
    zero_terminal_snr: bool = default("zero_terminal_snr")
    shift: float | None = default("shift")
    steps: int = default("steps")
    cfg_scale: float = default("cfg_scale")
    distilled_cfg_scale: float = default("distilled_cfg_scale")
    width: int | None = default("width")
    height: int | None = default("height")
    seed: int = default("seed")
    subseed: int = default("subseed")
    subseed_strength: float = default("subseed_strength")
    batch_size: int = default("batch_size")
    batch_count: int = default("batch_count")
    init_image: Image.Image | None = default("init_image")
    denoising_strength: float = default("denoising_strength")
    resize_mode: str = default("resize_mode")
    mask: Image.Image | None = default("mask")
    mask_blur: int = default("mask_blur")
    invert_mask: bool = default("invert_mask")
    masked_content: str = default("masked_content")
    inpaint_area: str = default("inpaint_area")
    inpaint_padding: int = default("inpaint_padding")
    outpaint: tuple[int, int, int, int] = default("outpaint")
    preview_every: int = default("preview_every")
    preview_method: str = default("preview_method")
    clip_skip: int = default("clip_skip")
    eta: float | None = default("eta")
    eta_noise_seed_delta: int = default("eta_noise_seed_delta")
    rng: str = default("rng")
    token_merging_ratio: float = default("token_merging_ratio")
    token_merging_ratio_hr: float = default("token_merging_ratio_hr")
    first_block_cache: float = default("first_block_cache")
    vae: str = default("vae")
    modules: tuple[str, ...] = default("modules")
    enable_hr: bool = default("enable_hr")
    hr_upscaler: str = default("hr_upscaler")
    hr_second_pass_steps: int = default("hr_second_pass_steps")
    hr_scale: float = default("hr_scale")
    hr_resize_x: int = default("hr_resize_x")
    hr_resize_y: int = default("hr_resize_y")
    hr_sampler_name: str = default("hr_sampler_name")
    hr_scheduler: str = default("hr_scheduler")
    hr_prompt: str = default("hr_prompt")
    hr_negative_prompt: str = default("hr_negative_prompt")
    hr_cfg: float = default("hr_cfg")
    refiner_checkpoint: str = default("refiner_checkpoint")
    refiner_switch_at: float = default("refiner_switch_at")
    extensions: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"):
            value = getattr(self, name)
            _check_text(name, value, FIELDS[name].max_length)
            surrogate = _LONE_SURROGATE.search(value)
            if surrogate:  # JSON "\ud800" decodes to one; nothing downstream (tokenizer, PNG text) can encode it
                raise ValidationError(name, f"contains an invalid character (an unpaired UTF-16 surrogate, "
                                            f"U+{ord(surrogate.group()):04X}, at position {surrogate.start()})")
            if (problem := weight_problem(value, LIMITS["prompt_weight"])) is not None:
                raise ValidationError(name, problem)
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip() or "\x00" in self.model):
            raise ValidationError("model", f"must be a model name, got {self.model!r}")
        if not isinstance(self.sampler, str):
            raise ValidationError("sampler", f"must be a sampler name, got {self.sampler!r}")
        if not isinstance(self.schedule, str):
            raise ValidationError("schedule", f"must be a schedule name, got {self.schedule!r}")
        sampler, legacy_schedule = samplers.split_legacy_name(self.sampler)
        schedule = samplers.find_schedule(self.schedule).name
        if legacy_schedule and schedule == samplers.DEFAULT_SCHEDULE:
            schedule = legacy_schedule
        object.__setattr__(self, "sampler", sampler)
        object.__setattr__(self, "schedule", schedule)
        if not isinstance(self.zero_terminal_snr, bool):
            raise ValidationError("zero_terminal_snr", "must be true or false")
        samplers.check_combination(sampler, schedule, self.zero_terminal_snr)
        self._resolve_hires_sampling()

        for declared in FIELDS.core():
            if declared.name in _CHECKED_ABOVE or declared.name not in _DATACLASS_FIELDS:
                continue
            object.__setattr__(self, declared.name, check_declared(declared, getattr(self, declared.name)))
        if not self.vae.strip():
            raise ValidationError("vae", f"must be {VAE_AUTOMATIC}, {VAE_NONE} or a VAE file's name, got {self.vae!r}")
        if (self.mask is not None or any(self.outpaint)) and self.init_image is None:
            raise ValidationError("init_image", "inpainting and outpainting need an init image")
        if self.mask is not None and self.mask.size != self.init_image.size:
            raise ValidationError(
                "mask",
                f"mask is {self.mask.size[0]}x{self.mask.size[1]} but the init image is {self.init_image.size[0]}x{self.init_image.size[1]}; they must match",
            )
        if not isinstance(self.extensions, Mapping):
            raise ValidationError("extensions", "must map extension names to their settings")
        object.__setattr__(self, "extensions", MappingProxyType(dict(self.extensions)))

    def _resolve_hires_sampling(self) -> None:
        """The second pass's sampler and schedule: "Use same …" or a name/alias, resolved like the first pass's."""
        for name in ("hr_sampler_name", "hr_scheduler"):
            if not isinstance(getattr(self, name), str):
                raise ValidationError(name, f"must be a name, got {getattr(self, name)!r}")
        hr_sampler, hr_schedule = self.hr_sampler_name, self.hr_scheduler
        legacy_schedule = None
        if hr_sampler != SAME_SAMPLER:
            try:
                hr_sampler, legacy_schedule = samplers.split_legacy_name(hr_sampler)
            except ValidationError as error:
                raise ValidationError("hr_sampler_name", error.message) from None
        if hr_schedule != SAME_SCHEDULE:
            try:
                hr_schedule = samplers.find_schedule(hr_schedule).name
            except ValidationError as error:
                raise ValidationError("hr_scheduler", error.message) from None
        if legacy_schedule and hr_schedule == SAME_SCHEDULE:
            hr_schedule = legacy_schedule
        object.__setattr__(self, "hr_sampler_name", hr_sampler)
        object.__setattr__(self, "hr_scheduler", hr_schedule)
        if self.enable_hr is True:
            sampler = self.sampler if hr_sampler == SAME_SAMPLER else hr_sampler
            schedule = self.schedule if hr_schedule == SAME_SCHEDULE else hr_schedule
            try:
                samplers.check_combination(sampler, schedule, self.zero_terminal_snr)
            except ValidationError as error:
                raise ValidationError("hr_scheduler" if hr_schedule != SAME_SCHEDULE else "hr_sampler_name", error.message) from None

    @property
    def mode(self) -> str:
        if self.mask is not None or any(self.outpaint):
            return "inpaint"
        if self.init_image is not None:
            return "img2img"
        return "txt2img"

    @property
    def images_total(self) -> int:
        return self.batch_size * self.batch_count

    def with_changes(self, **changes: Any) -> "GenerationRequest":
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


_DATACLASS_FIELDS = frozenset(GenerationRequest.field_names())
# Checked in __post_init__ before the declared checks: prompts (surrogates, weights), the model name, and the
# sampler and schedule (resolved from aliases and legacy names first); extensions are checked by their owners.
_CHECKED_ABOVE = frozenset({"prompt", "negative_prompt", "model", "sampler", "schedule", "zero_terminal_snr", "extensions",
                            "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt"})


STOP_REASONS = ("interrupted", "skipped")


@dataclass(frozen=True)
class EarlyStop:
    """Where an image's sampling ended before its last step, and why: its pixels are unfinished noise."""

    reason: str  # one of STOP_REASONS
    step: int  # sampling steps done when it stopped
    total_steps: int  # sampling steps this image would have run (fewer than ``steps`` in img2img)

    @property
    def description(self) -> str:
        """'Interrupted at step 2/20', as the UI shows it."""
        return f"{self.reason.capitalize()} at step {self.step}/{self.total_steps}"


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    subseed: int
    infotext: str
    path: str | None = None
    stopped_early: EarlyStop | None = None  # None: every sampling step ran
    grid: bool = False  # an X/Y/Z plot's grid (saved among the grids), not one generated image


@dataclass
class GenerationResult:
    request: GenerationRequest
    images: list[GeneratedImage]
    interrupted: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [image.seed for image in self.images]


@dataclass(frozen=True)
class Progress:
    """One step of one job: where it is, how long it took, and an optional preview.

    ``preview_source`` is an image, or a deferred preview (``engine.previews.DeferredPreview``)
    that is drawn when someone first reads ``preview``: on the thread that shows it, not the
    one sampling.
    """

    step: int
    total_steps: int
    image_index: int
    images_total: int
    elapsed: float
    eta: float
    preview_source: Any = None

    @property
    def has_preview(self) -> bool:
        return self.preview_source is not None

    @property
    def preview(self) -> Image.Image | None:
        source = self.preview_source
        if source is None or isinstance(source, Image.Image):
            return source
        return source.image()

    @property
    def fraction(self) -> float:
        done = self.image_index * self.total_steps + self.step
        return min(1.0, done / max(1, self.images_total * self.total_steps))


class CancelToken:
    """Held by whoever started a job. Interrupt stops the job; skip ends the current image only.

    An interrupt is *pending* until the engine honours it. Between steps the engine honours it by
    stopping the sampler and still decoding the image so far (as A1111 does); anywhere else, and
    for a second interrupt during that last decode, a pending interrupt stops the work at once.
    ``pending_for`` lets the compute thread's watchdog free the queue from work that cannot stop.
    """

    def __init__(self) -> None:
        self._interrupt = threading.Event()
        self._skip = threading.Event()
        self._pending_since: float | None = None  # time.monotonic() of the oldest interrupt not yet honoured
        self._listeners: list = []

    def interrupt(self) -> None:
        if self._pending_since is None:
            self._pending_since = time.monotonic()
        self._interrupt.set()
        self._tell("interrupt")

    def skip(self) -> None:
        self._skip.set()
        self._tell("skip")

    def listen(self, listener) -> None:
        """Call ``listener("interrupt" | "skip")`` on each later signal: how a job running in another
        process (a replica in serve mode) hears the token its owner holds here."""
        self._listeners.append(listener)

    def _tell(self, signal: str) -> None:
        for listener in list(self._listeners):
            listener(signal)

    @property
    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    @property
    def interrupt_pending(self) -> bool:
        return self._pending_since is not None

    def pending_for(self) -> float | None:
        """Seconds since the oldest interrupt the engine has not honoured yet, or None."""
        since = self._pending_since
        return None if since is None else time.monotonic() - since

    def honour_interrupt(self) -> None:
        """The engine is stopping for the interrupt in its own way (the sampler ends, the image so far is decoded)."""
        self._pending_since = None

    def take_skip(self) -> bool:
        """True once per skip request; the engine calls this between steps."""
        if self._skip.is_set():
            self._skip.clear()
            return True
        return False
