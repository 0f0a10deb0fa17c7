"""The one immutable, validated request the engine accepts, and what it returns."""
from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Mapping

from PIL import Image

from . import samplers
from .errors import ValidationError
from .prompts import weight_problem
from .seeds import MAX_SEED

MODES = ("txt2img", "img2img", "inpaint")
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill")
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
INPAINT_AREAS = ("Whole picture", "Only masked")
PREVIEW_METHODS = ("cheap", "full", "taesd", "none")
# Where the noise comes from, as A1111 names it: a CPU generator (the same on every machine), the GPU's own
# (what A1111 uses by default, and what an infotext without an "RNG" key was made with), or "NV", a CPU
# emulation of CUDA's Philox generator.
RNG_SOURCES = ("CPU", "GPU", "NV")

LIMITS = {
    "steps": (1, 150),
    "cfg_scale": (0.0, 30.0),
    "size": (64, 4096),
    "batch_size": (1, 8),
    "batch_count": (1, 100),
    "denoising_strength": (0.0, 1.0),
    "subseed_strength": (0.0, 1.0),
    "mask_blur": (0, 64),
    "inpaint_padding": (0, 256),
    "outpaint": (0, 1024),
    "preview_every": (0, 150),
    "clip_skip": (1, 12),
    "eta": (0.0, 1.0),
    "eta_noise_seed_delta": (0, 2**32 - 1),
    "prompt_chars": 20_000,
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


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
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


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one generation needs. Validated when constructed; never mutated.

    ``width``/``height`` of None mean the model's native size. ``init_image``
    makes it img2img; a ``mask`` or a non-zero ``outpaint`` makes it inpaint.
    ``extensions`` maps an extension name to that extension's own settings.
    """

    prompt: str = ""
    negative_prompt: str = ""
    model: str | None = None
    sampler: str = samplers.DEFAULT_SAMPLER
    schedule: str = samplers.DEFAULT_SCHEDULE
    zero_terminal_snr: bool = False
    steps: int = 20
    cfg_scale: float = 7.0
    width: int | None = None
    height: int | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    batch_size: int = 1
    batch_count: int = 1
    init_image: Image.Image | None = None
    denoising_strength: float = 0.75
    resize_mode: str = "Just resize"
    mask: Image.Image | None = None
    mask_blur: int = 4
    invert_mask: bool = False
    masked_content: str = "original"
    inpaint_area: str = "Whole picture"
    inpaint_padding: int = 32
    outpaint: tuple[int, int, int, int] = (0, 0, 0, 0)
    preview_every: int = 1
    preview_method: str = "cheap"
    clip_skip: int = 1  # A1111's "Clip skip": 1 uses the text encoder's last layer, 2 the one before, ...
    eta: float | None = None  # None: the sampler's own default (1 for ancestral and SDE samplers, 0 for DDIM)
    eta_noise_seed_delta: int = 0  # A1111's ENSD: ancestral and SDE noise is drawn from seed + this after the first noise
    rng: str = "CPU"  # one of RNG_SOURCES
    vae: str = "Automatic"  # A1111's "SD VAE": "Automatic", "None" (the checkpoint's own) or a file in models/VAE
    extensions: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValidationError(name, f"must be text, got {type(value).__name__}")
            if len(value) > LIMITS["prompt_chars"]:
                raise ValidationError(name, f"is {len(value)} characters; at most {LIMITS['prompt_chars']} are allowed")
            if "\x00" in value:
                raise ValidationError(name, "must not contain NUL characters")
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

        _check_range("steps", self.steps, *LIMITS["steps"], integer=True)
        _check_range("cfg_scale", self.cfg_scale, *LIMITS["cfg_scale"], integer=False)
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is None:
                continue
            _check_range(name, value, *LIMITS["size"], integer=True)
            if value % 8:
                raise ValidationError(name, f"must be a multiple of 8, got {value}")
        for name in ("seed", "subseed"):
            _check_range(name, getattr(self, name), -1, MAX_SEED, integer=True)
        _check_range("subseed_strength", self.subseed_strength, *LIMITS["subseed_strength"], integer=False)
        _check_range("batch_size", self.batch_size, *LIMITS["batch_size"], integer=True)
        _check_range("batch_count", self.batch_count, *LIMITS["batch_count"], integer=True)
        _check_range("denoising_strength", self.denoising_strength, *LIMITS["denoising_strength"], integer=False)
        _check_choice("resize_mode", self.resize_mode, RESIZE_MODES)
        _check_range("mask_blur", self.mask_blur, *LIMITS["mask_blur"], integer=True)
        if not isinstance(self.invert_mask, bool):
            raise ValidationError("invert_mask", "must be true or false")
        _check_choice("masked_content", self.masked_content, MASKED_CONTENT)
        _check_choice("inpaint_area", self.inpaint_area, INPAINT_AREAS)
        _check_range("inpaint_padding", self.inpaint_padding, *LIMITS["inpaint_padding"], integer=True)
        if not isinstance(self.outpaint, (tuple, list)) or len(self.outpaint) != 4:
            raise ValidationError("outpaint", "must be four pixel counts: left, right, up, down")
        for side, value in zip(("left", "right", "up", "down"), self.outpaint):
            _check_range(f"outpaint.{side}", value, *LIMITS["outpaint"], integer=True)
        object.__setattr__(self, "outpaint", tuple(self.outpaint))
        _check_range("preview_every", self.preview_every, *LIMITS["preview_every"], integer=True)
        _check_choice("preview_method", self.preview_method, PREVIEW_METHODS)
        _check_range("clip_skip", self.clip_skip, *LIMITS["clip_skip"], integer=True)
        if self.eta is not None:
            _check_range("eta", self.eta, *LIMITS["eta"], integer=False)
        _check_range("eta_noise_seed_delta", self.eta_noise_seed_delta, *LIMITS["eta_noise_seed_delta"], integer=True)
        _check_choice("rng", self.rng, RNG_SOURCES)
        if not isinstance(self.vae, str) or not self.vae.strip() or "\x00" in self.vae or len(self.vae) > 1000:
            raise ValidationError("vae", f"must be Automatic, None or a VAE file's name, got {self.vae!r}")
        _check_image("init_image", self.init_image)
        _check_image("mask", self.mask)
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

    def interrupt(self) -> None:
        if self._pending_since is None:
            self._pending_since = time.monotonic()
        self._interrupt.set()

    def skip(self) -> None:
        self._skip.set()

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
