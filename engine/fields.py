"""Every request field, declared once: what it holds and how each surface shows it.

A ``Field`` says everything the studio needs to know about one request field:

- its Python type and default, and its limits (a range, or a list of choices);
- the label and help the UI shows, and how its control steps;
- its key in A1111's infotext, its A1111 API name (a txt2img/img2img payload
  name and/or an ``override_settings`` key) and its command-line flag;
- whether presets save it, the modes it applies to, and its owner: ``"core"``
  or the extension that declared it;
- the model families that use it (``only_for``: a family trait, below), so the UI
  shows it only for those and the infotext writes it only for their pictures.

The request's validation (``engine.request``), the infotext writer and parser
(``engine.infotext``), presets (``engine.presets``), the UI tabs, the CLI and
the A1111 API all read these declarations; ``tests/test_fields.py`` walks the
registry and checks each surface a field declares. Adding a field means one
declaration here (or in an extension's folder) plus the code that gives it meaning.

An extension declares its own fields with ``owner`` set to its name; the
extension manager registers them when it loads the extension. Such a field's
value is the extension's settings, kept in ``GenerationRequest.extensions[owner]``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterator

from PIL import Image

from .sampling import table as samplers
from .seeds import MAX_SEED

CORE = "core"
MODES = ("txt2img", "img2img", "inpaint")
IMAGE_MODES = ("img2img", "inpaint")
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill")
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
INPAINT_AREAS = ("Whole picture", "Only masked")
MASK_MODES = ("Inpaint masked", "Inpaint not masked")  # A1111's "Mask mode" radio: invert_mask False / True
PREVIEW_METHODS = ("cheap", "full", "taesd", "none")
# Where the noise comes from, as A1111 names it: a CPU generator (the same on every machine), the GPU's own
# (what A1111 uses by default, and what an infotext without an "RNG" key was made with), or "NV", a CPU
# emulation of CUDA's Philox generator.
RNG_SOURCES = ("CPU", "GPU", "NV")
OUTPAINT_SIDES = ("left", "right", "up", "down")
# A1111's "SD VAE" values besides a file's name: the file named after the checkpoint (else its own), and its own.
VAE_AUTOMATIC, VAE_NONE = "Automatic", "None"
# Hires fix (A1111's "Hires. fix" accordion on txt2img): its fields carry this group, and "use the first pass's" choices.
HIRES_GROUP = "hires"
SAME_SAMPLER, SAME_SCHEDULE = "Use same sampler", "Use same scheduler"
REFINER_GROUP = "refiner"  # every tab's "Refiner" accordion

# Family traits: what sets model families apart as far as the request goes. Each ``Family`` has a set of them
# (``Family.traits``); a field that only some families use names the trait in ``only_for``. Declared here, not in
# engine.families, so a field's declaration says which models it is for without importing the models.
UNET = "unet"  # a Stable Diffusion UNet (SD 1.x, 2.x, SDXL): its CLIP text encoders are what A1111's "Clip skip" steps back through
FLOW = "flow"  # a flow-matching transformer (SD 3.5, Flux, Z-Image, Flux.2): its σs have a timestep shift; may be split files
DISTILLED_GUIDANCE = "distilled_guidance"  # the transformer embeds a guidance value (Flux.1 dev), Forge's "Distilled CFG Scale"
# diffusers' first block cache can carry the transformer's blocks (engine.step_cache): SD 3.5 and Flux.1. Not Z-Image,
# whose blocks take ``x`` where the cache passes ``hidden_states``, nor Flux.2, whose last block returns one stream
# where the cache subtracts two.
BLOCK_CACHE = "block_cache"
TRAITS = (UNET, FLOW, DISTILLED_GUIDANCE, BLOCK_CACHE)
# The traits of the picture's model when a caller does not say (an infotext written without a model): SD 1.x's.
DEFAULT_TRAITS: frozenset[str] = frozenset({UNET})


@dataclass(frozen=True)
class Field:
    """One request field and every surface it appears on. Only ``name``, ``type`` and ``default`` are required.

    ``type`` is the Python type a value has (``float`` fields also take ints; ``tuple`` is
    ``outpaint``'s four pixel counts; ``Image.Image`` an image; ``list``/``dict`` an extension's
    settings). ``optional``: None is a valid value (meaning is in ``help``).
    """

    name: str
    type: type
    default: Any
    # -- limits
    optional: bool = False
    range: tuple[float, float] | None = None  # inclusive
    # A callable for a list that lives elsewhere (samplers, schedules); its module also resolves aliases in any case.
    choices: tuple[str, ...] | Callable[[], list[str]] | None = None
    multiple_of: int | None = None
    max_length: int | None = None  # text
    # -- the UI
    label: str = ""
    help: str = ""
    control: str | None = None  # "slider", "number", "dropdown", "radio", "checkbox", "textbox"; None: no plain control
    step: float | None = None
    ui_range: tuple[float, float] | None = None  # a slider narrower than ``range`` (the API and CLI still take all of it)
    # -- other surfaces
    infotext: str | None = None  # A1111 infotext key
    infotext_when: Callable[[Any], bool] | None = None  # (request) -> write it? None: whenever the request's mode is in ``modes``
    # The family trait of the models that use it (None: every model). Other models ignore it: the UI hides it for
    # them and their infotext leaves it out.
    only_for: str | None = None
    # The model takes it as an input of its per-step call (``Family.request_inputs``), for the models ``only_for`` names.
    model_input: bool = False
    api: str | None = None  # A1111 txt2img/img2img payload name
    override: str | None = None  # A1111 ``override_settings`` key
    cli: str | None = None  # flag of ``launch.py generate``
    cli_names: dict[str, str] | None = None  # flag value -> choice, when the flag spells choices its own way
    preset: bool = False  # presets may save and restore it
    modes: tuple[str, ...] = MODES
    owner: str = CORE
    group: str | None = None  # controls laid out together (HIRES_GROUP: txt2img's "Hires. fix" accordion)

    def choice_list(self) -> list[str] | None:
        if self.choices is None:
            return None
        return list(self.choices()) if callable(self.choices) else list(self.choices)

    @property
    def limits(self) -> tuple[float, float] | None:
        """The range a UI slider spans."""
        return self.ui_range or self.range

    @property
    def preset_types(self) -> tuple[type, ...]:
        """Types a preset file may hold for it (JSON numbers: a float field takes ints too; bools are never numbers)."""
        return (int, float) if self.type is float else (self.type,)

    def used_by(self, traits: frozenset[str] | set[str]) -> bool:
        """Whether a model of a family with these traits (``Family.traits``) uses this field."""
        return self.only_for is None or self.only_for in traits

    def value_for(self, request: Any, traits: frozenset[str] | set[str]) -> Any:
        """The request's value for a model of a family with these traits; the default where such a model ignores it."""
        return getattr(request, self.name) if self.used_by(traits) else self.default

    def written_for(self, request: Any, traits: frozenset[str] | set[str] = DEFAULT_TRAITS) -> bool:
        """Whether the infotext of this request carries this field; ``traits``: those of the family of the model that
        drew it (a value the model ignored is not written: Distilled CFG on SD 1.x, Clip skip on Flux)."""
        if self.infotext is None or request.mode not in self.modes or not self.used_by(traits):
            return False
        return self.infotext_when(request) if self.infotext_when is not None else True

    def cli_choices(self) -> dict[str, str] | None:
        """Flag value -> choice: the declared spelling, or each choice in lower case with dashes ("just-resize")."""
        if self.cli_names is not None:
            return dict(self.cli_names)
        choices = self.choice_list()
        return None if choices is None else {choice.lower().replace(" ", "-"): choice for choice in choices}


class Names(tuple):
    """The type of a field whose value is a list of names (files); a request keeps it as a tuple."""


class FieldRegistry:
    """The declared fields, in declaration order (which is also the order of the infotext line)."""

    def __init__(self, fields: tuple[Field, ...] = ()) -> None:
        self._lock = threading.Lock()
        self._fields: dict[str, Field] = {}
        for field in fields:
            self.register(field)

    def register(self, field: Field) -> None:
        """Add a field; an owner may declare its field again (an extension loaded twice), nobody may take another's."""
        with self._lock:
            current = self._fields.get(field.name)
            if current is not None and current.owner != field.owner:
                raise ValueError(f"field {field.name!r} is already declared by {current.owner}")
            self._fields[field.name] = field

    def __getitem__(self, name: str) -> Field:
        return self._fields[name]

    def get(self, name: str) -> Field | None:
        return self._fields.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._fields

    def __iter__(self) -> Iterator[Field]:
        with self._lock:
            return iter(list(self._fields.values()))

    def core(self) -> list[Field]:
        return [field for field in self if field.owner == CORE]

    def owned_by_extensions(self) -> list[Field]:
        return [field for field in self if field.owner != CORE]

    def with_infotext(self) -> list[Field]:
        return [field for field in self if field.infotext]

    def with_api(self) -> list[Field]:
        return [field for field in self if field.api or field.override]

    def with_cli(self) -> list[Field]:
        return [field for field in self if field.cli]

    def saved_in_presets(self) -> list[Field]:
        return [field for field in self if field.preset]

    def by_infotext_key(self, key: str) -> Field | None:
        return next((field for field in self if field.infotext == key), None)

    def by_api_name(self, name: str) -> Field | None:
        return next((field for field in self if field.api == name), None)

    def by_override(self, key: str) -> Field | None:
        return next((field for field in self if field.override == key), None)

    def label(self, name: str) -> str | None:
        field = self.get(name)
        return field.label or None if field is not None else None


def _when_variation(request: Any) -> bool:
    return request.subseed_strength > 0


def _when_only_masked(request: Any) -> bool:
    return request.inpaint_area == "Only masked"


def _when_vae_file(request: Any) -> bool:
    """A1111 writes "VAE" only when a file replaced the checkpoint's own; the engine puts the resolved file's name in the request."""
    return request.vae not in (VAE_AUTOMATIC, VAE_NONE)


def _when_eta_differs(request: Any) -> bool:
    """A1111 writes eta only when it is set and differs from the sampler's own default."""
    spec = samplers.find_sampler(request.sampler)
    return request.eta is not None and spec.eta_default is not None and request.eta != spec.eta_default


def _when_ensd_applies(request: Any) -> bool:
    """ENSD only changes samplers that draw noise after the first, so only they write it."""
    return bool(request.eta_noise_seed_delta) and samplers.find_sampler(request.sampler).noise != samplers.NO_NOISE


def _when_not_default(name: str, default: Any) -> Callable[[Any], bool]:
    def written(request: Any) -> bool:
        return getattr(request, name) != default
    written.__doc__ = f"written when {name} is not {default!r}"
    return written


def _when_image_mode_or_hires(request: Any) -> bool:
    """img2img and inpaint always write their strength; txt2img only when hires fix used it (as A1111 does)."""
    return request.mode != "txt2img" or request.enable_hr


def _when_hires(written: Callable[[Any], bool] = lambda request: True) -> Callable[[Any], bool]:
    """A hires key is written only when hires fix is on, and then when ``written`` says so (A1111's rules)."""
    def hires_written(request: Any) -> bool:
        return bool(request.enable_hr) and written(request)
    hires_written.__doc__ = written.__doc__
    return hires_written


def _hires_by_scale(request: Any) -> bool:
    """"Hires upscale" when the target is a scale; "Hires resize" when either resize is set (A1111)."""
    return request.hr_resize_x == 0 and request.hr_resize_y == 0


def _hires_sampler_differs(request: Any) -> bool:
    return request.hr_sampler_name not in (SAME_SAMPLER, request.sampler)


def _hires_schedule_differs(request: Any) -> bool:
    """A1111 writes the second pass's resolved schedule when it differs from the first pass's "Schedule type"."""
    from .hires import second_pass_sampler, second_pass_schedule

    written = samplers.infotext_schedule(second_pass_sampler(request), second_pass_schedule(request))
    return written is not None and written != samplers.infotext_schedule(request.sampler, request.schedule)


def _hires_text_differs(name: str, first_pass: str) -> Callable[[Any], bool]:
    def differs(request: Any) -> bool:
        value = getattr(request, name)
        return bool(value) and value != getattr(request, first_pass)
    differs.__doc__ = f"written when {name} is set and differs from {first_pass}"
    return differs


def _hires_sampler_choices() -> list[str]:
    return [SAME_SAMPLER, *samplers.sampler_names()]


def _hires_schedule_choices() -> list[str]:
    return [SAME_SCHEDULE, *samplers.schedule_names()]


_SAMPLING_HELP = "A1111 keeps it in Settings › Sampler parameters."
_HIRES = dict(group=HIRES_GROUP, modes=("txt2img",), preset=True)

CORE_FIELDS: tuple[Field, ...] = (
    Field("prompt", str, "", max_length=20_000, label="Prompt", help="What to draw; A1111 prompt syntax such as (word:1.2) works.",
          control="textbox", infotext="Prompt", api="prompt", cli="--prompt", preset=True),
    Field("negative_prompt", str, "", max_length=20_000, label="Negative prompt", help="What to avoid.",
          control="textbox", infotext="Negative prompt", api="negative_prompt", cli="--negative", preset=True),
    Field("steps", int, 20, range=(1, 150), label="Sampling steps", control="slider", step=1, infotext="Steps", api="steps",
          cli="--steps", preset=True),
    Field("sampler", str, samplers.DEFAULT_SAMPLER, choices=samplers.sampler_names, label="Sampling method", control="dropdown",
          help="A1111 sampler name or alias; a legacy name such as 'DPM++ 2M Karras' also sets the schedule.",
          infotext="Sampler", api="sampler_name", cli="--sampler", preset=True),
    Field("schedule", str, samplers.DEFAULT_SCHEDULE, choices=samplers.schedule_names, label="Schedule type", control="dropdown",
          infotext="Schedule type", api="scheduler", cli="--schedule", preset=True),
    Field("cfg_scale", float, 7.0, range=(0.0, 30.0), label="CFG Scale", control="slider", step=0.5,
          help="Classifier-free guidance scale.", infotext="CFG scale", api="cfg_scale", cli="--cfg", preset=True),
    Field("distilled_cfg_scale", float, 3.5, range=(0.0, 30.0), label="Distilled CFG Scale", control="slider", step=0.1,
          help="The guidance a guidance-distilled model (Flux.1 dev) is told to imitate, in one pass; other models ignore it.",
          infotext="Distilled CFG Scale", api="distilled_cfg_scale", cli="--distilled-cfg", preset=True,
          only_for=DISTILLED_GUIDANCE, model_input=True),
    Field("seed", int, -1, range=(-1, MAX_SEED), label="Seed", help="-1 picks a random seed; image i of the job uses seed + i.",
          control="number", infotext="Seed", api="seed", cli="--seed", preset=True),
    # The infotext writes the produced size as one "Size: WxH" entry; A1111's parser splits it into Size-1 and Size-2.
    Field("width", int, None, optional=True, range=(64, 4096), multiple_of=8, ui_range=(64, 2048), label="Width", control="slider",
          step=8, help="Default: the model's native width (txt2img), or the init image's (img2img).",
          infotext="Size-1", api="width", cli="--width", preset=True),
    Field("height", int, None, optional=True, range=(64, 4096), multiple_of=8, ui_range=(64, 2048), label="Height", control="slider",
          step=8, help="Default: the model's native height (txt2img), or the init image's (img2img).",
          infotext="Size-2", api="height", cli="--height", preset=True),
    Field("model", str, None, optional=True, label="Model", help="A model name as the model list shows it; default: the default model.", infotext="Model",
          override="sd_model_checkpoint", cli="--model", preset=True),
    # A1111's "SD VAE" setting. Presets never hold it: A1111 keeps it in Settings, outside any style or preset.
    Field("vae", str, VAE_AUTOMATIC, max_length=1000, label="SD VAE",
          help="Automatic (a file in models/VAE named after the checkpoint, else its own), None (the checkpoint's own) "
               "or a file in models/VAE.",
          infotext="VAE", infotext_when=_when_vae_file, override="sd_vae", cli="--vae"),
    # Forge's "VAE / Text Encoder" picks, for a flow model kept as split files (engine.model_files): file names (or,
    # as Forge's API sends them, paths) of text encoders and VAEs. With none, the one fitting set in the folders is used.
    # Its infotext is Forge's: one numbered key per file, its name without the extension ("Module 1: ae, Module 2: clip_l").
    Field("modules", Names, Names(), max_length=1000, label="VAE / Text Encoder",
          help="Text encoder and VAE files (models/text_encoder, models/VAE...) for a model kept as split files; "
               "default: the one set that fits.",
          infotext="Module", infotext_when=lambda request: bool(request.modules),
          override="forge_additional_modules", cli="--text-encoder", only_for=FLOW),
    Field("subseed", int, -1, range=(-1, MAX_SEED), label="Variation seed", control="number", help="-1 picks one.",
          infotext="Variation seed", infotext_when=_when_variation, api="subseed", cli="--variation-seed"),
    Field("subseed_strength", float, 0.0, range=(0.0, 1.0), label="Variation strength", control="slider", step=0.01,
          help="How far to move towards the variation seed's noise.", infotext="Variation seed strength",
          infotext_when=_when_variation, api="subseed_strength", cli="--variation-strength"),
    # One strength for img2img and for hires fix's second pass, as in A1111 (its hires slider starts at 0.7, its API at 0.75).
    Field("denoising_strength", float, 0.75, range=(0.0, 1.0), label="Denoising strength", control="slider", step=0.01,
          help="How much to change the init image (img2img), or the first pass's upscaled picture (hires fix).",
          infotext="Denoising strength", infotext_when=_when_image_mode_or_hires, api="denoising_strength",
          cli="--strength", preset=True),
    Field("resize_mode", str, "Just resize", choices=RESIZE_MODES, label="Resize mode", control="radio",
          infotext="Resize mode", api="resize_mode", cli="--resize-mode", modes=IMAGE_MODES),
    Field("mask_blur", int, 4, range=(0, 64), label="Mask blur", control="slider", step=1, infotext="Mask blur", api="mask_blur",
          cli="--mask-blur", modes=("inpaint",)),
    Field("invert_mask", bool, False, label="Mask mode", control="radio", help="Inpaint what is not masked.",
          infotext="Mask mode", api="inpainting_mask_invert", cli="--invert-mask", modes=("inpaint",)),
    Field("masked_content", str, "original", choices=MASKED_CONTENT, label="Masked content", control="radio",
          infotext="Masked content", api="inpainting_fill", cli="--masked-content", modes=("inpaint",)),
    Field("inpaint_area", str, "Whole picture", choices=INPAINT_AREAS, label="Inpaint area", control="radio",
          infotext="Inpaint area", api="inpaint_full_res", cli="--inpaint-area",
          cli_names={"whole": "Whole picture", "masked": "Only masked"}, modes=("inpaint",)),
    Field("inpaint_padding", int, 32, range=(0, 256), label="Only masked padding, pixels", control="slider", step=4,
          infotext="Masked area padding", infotext_when=_when_only_masked, api="inpaint_full_res_padding", cli="--padding",
          modes=("inpaint",)),
    Field("outpaint", tuple, (0, 0, 0, 0), range=(0, 1024), label="Outpainting", control="slider", step=8,
          help="Grow the canvas: left, right, up, down in pixels.", infotext="Outpaint",
          infotext_when=lambda request: any(request.outpaint), cli="--outpaint", modes=("inpaint",)),
    Field("zero_terminal_snr", bool, False, label="Zero terminal SNR", control="checkbox",
          help="Rescale betas so the last step is pure noise; for v-prediction models.",
          infotext="Noise Schedule", infotext_when=_when_not_default("zero_terminal_snr", False), cli="--zero-terminal-snr",
          preset=True),
    Field("shift", float, None, optional=True, range=(0.0, 100.0), label="Shift", control="number", step=0.05,
          help="Timestep shift of a flow model (SD 3.5, Flux): σ = shift·t / (1 + (shift − 1)·t); higher spends more "
               "steps at high noise. Empty or 0: the model's own. Ignored by other models.",
          infotext="Shift", infotext_when=lambda request: bool(request.shift), api="shift", cli="--shift", preset=True,
          only_for=FLOW),
    # Only the UNet families: the flow families' text encoders condition on fixed layers (their ``text_layers``).
    Field("clip_skip", int, 1, range=(1, 12), label="Clip skip", control="slider", step=1,
          help="1 uses the text encoder's last layer, 2 the one before, ... A1111 keeps it in Settings › Stable Diffusion.",
          infotext="Clip skip", infotext_when=_when_not_default("clip_skip", 1), override="CLIP_stop_at_last_layers",
          cli="--clip-skip", preset=True, only_for=UNET),
    Field("eta", float, None, optional=True, range=(0.0, 1.0), label="Eta", control="number", step=0.01,
          help="Noise multiplier of ancestral, SDE and DDIM samplers; empty: the sampler's own default. " + _SAMPLING_HELP,
          infotext="Eta", infotext_when=_when_eta_differs, api="eta", cli="--eta", preset=True),
    Field("eta_noise_seed_delta", int, 0, range=(0, 2**32 - 1), label="Eta noise seed delta (ENSD)", control="number",
          help="Ancestral and SDE noise is drawn from seed + this after the first noise. " + _SAMPLING_HELP,
          infotext="ENSD", infotext_when=_when_ensd_applies, override="eta_noise_seed_delta",
          cli="--ensd"),
    # Token merging (engine.token_merging): faster, and it changes the picture. A1111 keeps both in Settings › Optimizations.
    Field("token_merging_ratio", float, 0.0, range=(0.0, 0.9), label="Token merging ratio", control="slider", step=0.1,
          help="Faster on large pictures, and changes them: merges this share of the tokens before full-resolution "
               "self-attention (ToMe, as A1111 applies it; none in SDXL, which has no attention at full resolution). "
               "0: off, the exact picture.",
          infotext="Token merging ratio", infotext_when=_when_not_default("token_merging_ratio", 0.0),
          override="token_merging_ratio", cli="--token-merging", preset=True, only_for=UNET),
    Field("token_merging_ratio_hr", float, 0.0, range=(0.0, 0.9), label="Hires token merging ratio", control="slider",
          step=0.1, help="Token merging in the second pass; 0: the first pass's.", infotext="Token merging ratio hr",
          infotext_when=_when_hires(_when_not_default("token_merging_ratio_hr", 0.0)), override="token_merging_ratio_hr",
          cli="--hires-token-merging", only_for=UNET, **_HIRES),
    Field("first_block_cache", float, 0.0, range=(0.0, 1.0), label="First block cache threshold", control="slider",
          step=0.01, help="Faster, and changes the picture: a step whose first transformer block moved its output by less "
                          "than this (relative) skips the other blocks and reuses their last change (First Block Cache, "
                          "known from ComfyUI's WaveSpeed nodes; 0.1–0.3). 0: off, the exact picture.",
          infotext="First block cache", infotext_when=_when_not_default("first_block_cache", 0.0), api="first_block_cache",
          cli="--first-block-cache", preset=True, only_for=BLOCK_CACHE),
    # A1111 writes "RNG" only when it is not its default (GPU): an infotext without it was made with GPU noise.
    Field("rng", str, "CPU", choices=RNG_SOURCES, label="RNG",
          help="Where noise comes from: CPU (the same on every machine), GPU (A1111's default), NV (CUDA's generator "
               "emulated on the CPU; experimental). " + _SAMPLING_HELP,
          control="radio", infotext="RNG", infotext_when=_when_not_default("rng", "GPU"), override="randn_source", cli="--rng"),
    # -- hires fix: upscale the first pass and sample it again as img2img (A1111 1.10's StableDiffusionProcessingTxt2Img)
    Field("enable_hr", bool, False, label="Hires. fix", control="checkbox",
          help="Upscale the first picture and sample it again at the larger size.", api="enable_hr", cli="--hires", **_HIRES),
    Field("hr_upscaler", str, "Latent", max_length=1000, label="Upscaler", control="dropdown",
          help="A latent mode (resizes the latents) or a pixel upscaler (decode, upscale, encode); checked against the "
               "upscalers available when the job runs.",
          infotext="Hires upscaler", infotext_when=_when_hires(), api="hr_upscaler", cli="--hires-upscaler", **_HIRES),
    Field("hr_second_pass_steps", int, 0, range=(0, 150), label="Hires steps", control="slider", step=1,
          help="Steps of the second pass; 0: as many as the first.", infotext="Hires steps",
          infotext_when=_when_hires(lambda request: request.hr_second_pass_steps != 0), api="hr_second_pass_steps",
          cli="--hires-steps", **_HIRES),
    Field("hr_scale", float, 2.0, range=(1.0, 8.0), ui_range=(1.0, 4.0), label="Upscale by", control="slider", step=0.05,
          help="Target size as a multiple of the first pass's; used when both resize values are 0.",
          infotext="Hires upscale", infotext_when=_when_hires(_hires_by_scale), api="hr_scale", cli="--hires-scale", **_HIRES),
    # Written together as one "Hires resize: WxH" entry, read back as its -1 and -2 halves (like Size).
    Field("hr_resize_x", int, 0, range=(0, 4096), ui_range=(0, 2048), label="Resize width to", control="slider", step=8,
          help="0: from the height and the first pass's aspect (or from the scale when both are 0). With both set, "
               "the picture is scaled to cover that size and cropped to it.",
          infotext="Hires resize-1", infotext_when=_when_hires(lambda request: not _hires_by_scale(request)),
          api="hr_resize_x", cli="--hires-resize-x", **_HIRES),
    Field("hr_resize_y", int, 0, range=(0, 4096), ui_range=(0, 2048), label="Resize height to", control="slider", step=8,
          help="0: from the width and the first pass's aspect (or from the scale when both are 0).",
          infotext="Hires resize-2", infotext_when=_when_hires(lambda request: not _hires_by_scale(request)),
          api="hr_resize_y", cli="--hires-resize-y", **_HIRES),
    Field("hr_sampler_name", str, SAME_SAMPLER, choices=_hires_sampler_choices, label="Hires sampling method", control="dropdown",
          infotext="Hires sampler", infotext_when=_when_hires(_hires_sampler_differs), api="hr_sampler_name",
          cli="--hires-sampler", **_HIRES),
    Field("hr_scheduler", str, SAME_SCHEDULE, choices=_hires_schedule_choices, label="Hires schedule type", control="dropdown",
          infotext="Hires schedule type", infotext_when=_when_hires(_hires_schedule_differs), api="hr_scheduler",
          cli="--hires-schedule", **_HIRES),
    Field("hr_prompt", str, "", max_length=20_000, label="Hires prompt", control="textbox", help="Empty: the prompt.",
          infotext="Hires prompt", infotext_when=_when_hires(_hires_text_differs("hr_prompt", "prompt")), api="hr_prompt",
          cli="--hires-prompt", **_HIRES),
    Field("hr_negative_prompt", str, "", max_length=20_000, label="Hires negative prompt", control="textbox",
          help="Empty: the negative prompt.", infotext="Hires negative prompt",
          infotext_when=_when_hires(_hires_text_differs("hr_negative_prompt", "negative_prompt")), api="hr_negative_prompt",
          cli="--hires-negative", **_HIRES),
    # Forge's hires CFG (A1111 1.10 has none): 0 keeps A1111's behaviour, the first pass's CFG, for clients that never send it.
    Field("hr_cfg", float, 0.0, range=(0.0, 30.0), label="Hires CFG Scale", control="slider", step=0.5,
          help="CFG of the second pass; 0: the first pass's.", infotext="Hires CFG Scale",
          infotext_when=_when_hires(lambda request: request.hr_cfg not in (0, request.cfg_scale)), api="hr_cfg",
          cli="--hires-cfg", **_HIRES),
    # -- the refiner: another checkpoint takes over at a fraction of the pass (A1111 1.10's refiner_checkpoint/_switch_at)
    Field("refiner_checkpoint", str, "", max_length=1000, label="Refiner", control="dropdown",
          help="A checkpoint that takes over the sampling part way (SDXL's refiner); empty: none. With hires fix it refines "
               "the second pass.",
          infotext="Refiner", infotext_when=lambda request: bool(request.refiner_checkpoint), api="refiner_checkpoint",
          cli="--refiner", preset=True, group=REFINER_GROUP),
    Field("refiner_switch_at", float, 0.8, range=(0.01, 1.0), label="Switch at", control="slider", step=0.01,
          help="The fraction of the pass after which the refiner samples (read from σ, as A1111 does).",
          infotext="Refiner switch at", infotext_when=lambda request: bool(request.refiner_checkpoint), api="refiner_switch_at",
          cli="--refiner-switch-at", preset=True, group=REFINER_GROUP),
    Field("batch_count", int, 1, range=(1, 100), label="Batch count", control="slider", step=1, api="n_iter",
          cli="--batch-count", preset=True),
    Field("batch_size", int, 1, range=(1, 8), label="Batch size", control="slider", step=1, api="batch_size",
          cli="--batch-size", preset=True),
    Field("init_image", Image.Image, None, optional=True, label="Image", api="init_images", cli="--init-image",
          modes=IMAGE_MODES),
    Field("mask", Image.Image, None, optional=True, label="Mask", api="mask", cli="--mask", modes=("inpaint",)),
    Field("preview_every", int, 1, range=(0, 150), label="Preview every N steps", help="0: no live preview."),
    Field("preview_method", str, "cheap", choices=PREVIEW_METHODS, label="Preview method"),
    Field("extensions", dict, MappingProxyType({}), label="Extensions", api="alwayson_scripts",
          help="Each extension's settings, by extension name."),
)

FIELDS = FieldRegistry(CORE_FIELDS)
"""The registry every surface reads: the core's fields, and those of each extension loaded so far."""


def default(name: str) -> Any:
    """A field's declared default."""
    return FIELDS[name].default


def register(field: Field) -> None:
    """Declare an extension's field (its ``owner`` must be the extension's name)."""
    if field.owner == CORE:
        raise ValueError(f"field {field.name!r}: an extension's field must name the extension as its owner")
    FIELDS.register(field)
