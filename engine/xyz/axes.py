"""The kinds of axis an X/Y/Z plot can vary, most of them read from the field registry.

Every request field that an artist sets with a plain control (a number, a checkbox, or a choice from a
list) is an axis: its values are parsed by the field's type, checked by the field's own validation, and
written to the request with ``with_changes``. A field declared later (the hires fields, an extension's
core-style field) becomes an axis with no change here. Beside those, a few axes are not one field:

- "Nothing": one cell, no change, no label;
- "Seed": -1 means a random seed, fixed once for the whole plot unless "Keep -1 for seeds" is on;
- "Prompt S/R": the first value is searched for in the prompt and the negative prompt and each value
  replaces it there (A1111's semantics: the first value's cells keep the prompt as it is);
- "Size": ``WIDTHxHEIGHT`` sets both;
- "Checkpoint name" and "VAE": the model and VAE fields, checked against the installed files.

``A1111_AXES`` is A1111 1.10's list of axis labels in its order (scripts/xyz_grid.py), so an API client's
axis *index* means what it meant there. Each row names the request field its axis sets, by that field's A1111
API or ``override_settings`` name, so it too finds our fields through the registry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from ..errors import SfumatoError, ValidationError
from ..fields import CORE, FIELDS, VAE_AUTOMATIC, VAE_NONE, Field
from ..request import GenerationRequest
from ..seeds import resolve_seed
from .ranges import parse_values

TABS = ("txt2img", "img2img")
# The plot runs each cell as its own job of the request's batch; these fields belong to the plot, not a cell.
_NOT_AXES = frozenset({"batch_count", "batch_size", "seed", "model", "vae", "preview_every", "preview_method"})
_PLAIN_TYPES = (int, float, bool, str)
_CONTROLS = ("slider", "number", "dropdown", "radio", "checkbox")
TRUE_FALSE = ("True", "False")


@dataclass(frozen=True)
class AxisType:
    """One kind of axis: how its values are read, checked, labelled and applied to a cell's request.

    ``changes(request, value, values)`` returns the request fields a value sets (``values`` is the whole
    axis, which Prompt S/R needs); ``cost`` orders the loops so that the costliest axis changes least often.
    """

    name: str  # stable id: a field's name, or one of the special axes' names
    label: str
    value_type: type  # int, float or str: how the values text is parsed
    changes: Callable[[GenerationRequest, Any, Sequence[Any]], dict[str, Any]]
    choices: Callable[[], list[str]] | None = None
    tabs: tuple[str, ...] = TABS
    cost: float = 0.0
    label_value_only: bool = False  # the grid shows "Euler", not "Sampler: Euler"
    field: Field | None = None

    def value_label(self, value: Any) -> str:
        """How a value is written on the grid (A1111: "Label: value", floats rounded to 8 places)."""
        if self.name == NOTHING:
            return ""
        if isinstance(value, float):
            value = round(value, 8)
        return str(value) if self.label_value_only else f"{self.label}: {value}"


NOTHING, SEED, PROMPT_SR, SIZE, CHECKPOINT, VAE = "nothing", "seed", "prompt_sr", "size", "checkpoint", "vae"


def _no_change(request: GenerationRequest, value: Any, values: Sequence[Any]) -> dict[str, Any]:
    return {}


def _seed(request: GenerationRequest, value: int, values: Sequence[Any]) -> dict[str, Any]:
    return {"seed": value}


def _search_replace(request: GenerationRequest, value: str, values: Sequence[Any]) -> dict[str, Any]:
    search = values[0]
    if search not in request.prompt and search not in request.negative_prompt:
        raise ValidationError("prompt", f"Prompt S/R did not find {search!r} in the prompt or the negative prompt")
    return {"prompt": request.prompt.replace(search, value), "negative_prompt": request.negative_prompt.replace(search, value)}


def _size(request: GenerationRequest, value: str, values: Sequence[Any]) -> dict[str, Any]:
    width, separator, height = value.lower().partition("x")
    try:
        return {"width": int(width.strip()), "height": int(height.strip())}
    except ValueError:
        raise ValidationError("size", f"{value!r} is not a size such as 512x768") from None


def _set(name: str) -> Callable[[GenerationRequest, Any, Sequence[Any]], dict[str, Any]]:
    def changes(request: GenerationRequest, value: Any, values: Sequence[Any]) -> dict[str, Any]:
        return {name: value}
    return changes


def _choice_of(field: Field) -> Callable[[GenerationRequest, Any, Sequence[Any]], dict[str, Any]]:
    """A choice written in any case becomes the declared spelling; anything else is left to the field's check."""
    def changes(request: GenerationRequest, value: str, values: Sequence[Any]) -> dict[str, Any]:
        spelled = {choice.lower(): choice for choice in field.choice_list() or ()}
        return {field.name: spelled.get(value.lower(), value)}
    return changes


def _true_false(name: str) -> Callable[[GenerationRequest, Any, Sequence[Any]], dict[str, Any]]:
    def changes(request: GenerationRequest, value: str, values: Sequence[Any]) -> dict[str, Any]:
        text = value.strip().lower()
        if text not in ("true", "false", "yes", "no", "1", "0"):
            raise ValidationError(name, f"{value!r} is not True or False")
        return {name: text in ("true", "yes", "1")}
    return changes


def _tabs(field: Field) -> tuple[str, ...]:
    return tuple(tab for tab in TABS if tab in field.modes or (tab == "img2img" and "inpaint" in field.modes))


def is_axis_field(field: Field) -> bool:
    """A request attribute an artist sets with one plain control: a number, a checkbox, or a choice from a list.

    An extension's own fields live inside ``request.extensions``, which the extension reads; they are not axes.
    """
    if field.name in _NOT_AXES or field.type not in _PLAIN_TYPES or field.control not in _CONTROLS:
        return False
    if field.owner != CORE:
        return False
    return field.type is not str or field.choices is not None


def field_axis(field: Field, label: str | None = None) -> AxisType:
    """The axis that sets one declared field."""
    label = label or field.label or field.name
    if field.type is bool:
        return AxisType(field.name, label, str, _true_false(field.name), choices=lambda: list(TRUE_FALSE),
                        tabs=_tabs(field), field=field)
    if field.type is str:
        return AxisType(field.name, label, str, _choice_of(field), choices=field.choice_list, tabs=_tabs(field),
                        label_value_only=True, field=field)
    return AxisType(field.name, label, field.type, _set(field.name), tabs=_tabs(field), field=field)


# A1111 1.10's axis options in their order: (label, tab or None for both, what it sets). What it sets is
# ("api", name) or ("override", key) for a request field found through the registry, ("axis", name) for one
# of the special axes, or None where Sfumato has nothing it could set.
A1111_AXES: tuple[tuple[str, str | None, tuple[str, str] | None], ...] = (
    ("Nothing", None, ("axis", NOTHING)),
    ("Seed", None, ("axis", SEED)),
    ("Var. seed", None, ("api", "subseed")),
    ("Var. strength", None, ("api", "subseed_strength")),
    ("Steps", None, ("api", "steps")),
    ("Hires steps", "txt2img", ("api", "hr_second_pass_steps")),
    ("CFG Scale", None, ("api", "cfg_scale")),
    ("Image CFG Scale", "img2img", ("api", "image_cfg_scale")),
    ("Prompt S/R", None, ("axis", PROMPT_SR)),
    ("Prompt order", None, None),
    ("Sampler", "txt2img", ("api", "sampler_name")),
    ("Hires sampler", "txt2img", ("api", "hr_sampler_name")),
    ("Sampler", "img2img", ("api", "sampler_name")),
    ("Checkpoint name", None, ("axis", CHECKPOINT)),
    ("Negative Guidance minimum sigma", None, ("api", "s_min_uncond")),
    ("Sigma Churn", None, ("api", "s_churn")),
    ("Sigma min", None, ("api", "s_tmin")),
    ("Sigma max", None, ("api", "s_tmax")),
    ("Sigma noise", None, ("api", "s_noise")),
    ("Schedule type", None, ("api", "scheduler")),
    ("Schedule min sigma", None, ("override", "sigma_min")),
    ("Schedule max sigma", None, ("override", "sigma_max")),
    ("Schedule rho", None, ("override", "rho")),
    ("Skip Early CFG", None, ("override", "skip_early_cond")),
    ("Beta schedule alpha", None, ("override", "beta_dist_alpha")),
    ("Beta schedule beta", None, ("override", "beta_dist_beta")),
    ("Eta", None, ("api", "eta")),
    ("Clip skip", None, ("override", "CLIP_stop_at_last_layers")),
    ("Denoising", None, ("api", "denoising_strength")),
    ("Initial noise multiplier", None, ("api", "initial_noise_multiplier")),
    ("Extra noise", None, ("override", "img2img_extra_noise")),
    ("Hires upscaler", "txt2img", ("api", "hr_upscaler")),
    ("Cond. Image Mask Weight", "img2img", ("api", "inpainting_mask_weight")),
    ("VAE", None, ("axis", VAE)),
    ("Styles", None, None),
    ("UniPC Order", None, ("override", "uni_pc_order")),
    ("Face restore", None, None),
    ("Token merging ratio", None, ("override", "token_merging_ratio")),
    ("Token merging ratio high-res", None, ("override", "token_merging_ratio_hr")),
    ("Always discard next-to-last sigma", None, ("override", "always_discard_next_to_last_sigma")),
    ("SGM noise multiplier", None, ("override", "sgm_noise_multiplier")),
    ("Refiner checkpoint", None, ("api", "refiner_checkpoint")),
    ("Refiner switch at", None, ("api", "refiner_switch_at")),
    ("RNG source", None, ("override", "randn_source")),
    ("FP8 mode", None, ("override", "fp8_storage")),
    ("Size", None, ("axis", SIZE)),
)


def a1111_labels(tab: str) -> list[str]:
    """A1111's axis dropdown on that tab, in order: an API client's axis index points into this list."""
    return [label for label, only, _ in A1111_AXES if only in (None, tab)]


def _special_axes() -> dict[str, AxisType]:
    model, vae = FIELDS["model"], FIELDS["vae"]
    return {
        NOTHING: AxisType(NOTHING, "Nothing", str, _no_change),
        SEED: AxisType(SEED, "Seed", int, _seed, field=FIELDS["seed"]),
        PROMPT_SR: AxisType(PROMPT_SR, "Prompt S/R", str, _search_replace, label_value_only=True),
        SIZE: AxisType(SIZE, "Size", str, _size),
        CHECKPOINT: AxisType(CHECKPOINT, "Checkpoint name", str, _set(model.name), cost=1.0, label_value_only=True, field=model),
        VAE: AxisType(VAE, "VAE", str, _set(vae.name), cost=0.7, field=vae),
    }


def _target_field(target: tuple[str, str]) -> Field | None:
    kind, name = target
    return FIELDS.by_api_name(name) if kind == "api" else FIELDS.by_override(name)


def _a1111_label_of(field: Field) -> str | None:
    for label, _, target in A1111_AXES:
        if target is not None and target[0] != "axis" and _target_field(target) is field:
            return label
    return None


def axis_types(tab: str = "txt2img") -> list[AxisType]:
    """The axes offered on a tab: A1111's that Sfumato can set, in A1111's order, then every other axis field.

    An axis that sets a field takes A1111's label for it where A1111 has one ("CFG Scale", "Denoising"),
    else the field's own label.
    """
    special = _special_axes()
    offered: list[AxisType] = []
    seen: set[str] = set()
    for label, only, target in A1111_AXES:
        if only not in (None, tab) or target is None:
            continue
        if target[0] == "axis":
            axis = special[target[1]]
        else:
            field = _target_field(target)
            if field is None or not is_axis_field(field) or tab not in _tabs(field):
                continue
            axis = field_axis(field, label)
        if axis.name not in seen:
            offered.append(axis)
            seen.add(axis.name)
    for field in FIELDS:
        if field.name not in seen and is_axis_field(field) and tab in _tabs(field):
            offered.append(field_axis(field))
            seen.add(field.name)
    return offered


def find_axis(name: str, tab: str = "txt2img") -> AxisType:
    """An axis by its id, its label or its field's label, in any case ("steps", "Sampling steps", "Steps")."""
    key = name.strip().lower()
    for axis in axis_types(tab):
        names = {axis.name.lower(), axis.label.lower(), axis.name.replace("_", " ").lower()}
        if axis.field is not None and axis.field.label:
            names.add(axis.field.label.lower())
        if key in names:
            return axis
    known = ", ".join(axis.label for axis in axis_types(tab))
    raise ValidationError("xyz", f"no axis {name!r} on {tab}; the axes are: {known}")


def a1111_axis(index: Any, tab: str, which: str) -> AxisType:
    """The axis an API client means by A1111's index (or label) on that tab; unsupported ones are named."""
    labels = a1111_labels(tab)
    field_name = f"script_args.{which}_type"
    if isinstance(index, str) and not index.strip().lstrip("-").isdigit():
        matches = [i for i, label in enumerate(labels) if label.lower() == index.strip().lower()]
        if not matches:
            raise ValidationError(field_name, f"{index!r} is not one of A1111's axis types on {tab}")
        index = matches[0]
    if isinstance(index, bool) or not isinstance(index, (int, str)) or not 0 <= int(index) < len(labels):
        raise ValidationError(field_name, f"must be an index into A1111's {len(labels)} axis types on {tab}, got {index!r}")
    label = labels[int(index)]
    _, _, target = [row for row in A1111_AXES if row[1] in (None, tab)][int(index)]
    offered = {axis.name: axis for axis in axis_types(tab)}
    if target is not None:
        if target[0] == "axis" and target[1] in offered:
            return offered[target[1]]
        field = _target_field(target) if target[0] != "axis" else None
        if field is not None and field.name in offered:
            return offered[field.name]
    raise ValidationError(field_name, f"the {which.upper()} axis type {int(index)} ({label}) is not supported by Sfumato")


def seed_values(values: Iterable[int], keep_random: bool) -> list[int]:
    """A Seed axis's values with each -1 drawn once, so every cell in its row or column shares it."""
    return [value if keep_random or value != -1 else resolve_seed(-1) for value in values]


def read_values(axis: AxisType, text: str | Sequence[Any], which: str) -> list[Any]:
    """An axis's values, from its values text (ranges expand) or from a list already split (a dropdown)."""
    where = f"{which.upper()} axis ({axis.label})"
    if axis.name == NOTHING:
        return [None]
    if isinstance(text, str):
        return parse_values(text, axis.value_type, where)
    if not text:
        raise ValidationError(where, "has no values")
    values = []
    for value in text:
        values.extend(parse_values(str(value), axis.value_type, where) if axis.value_type is not str else [str(value)])
    return values


def check_values(axis: AxisType, values: Sequence[Any], base: GenerationRequest, which: str,
                 known: Callable[[str, str], str | None] | None = None) -> None:
    """Every value applied to the base request and validated as the field declares, before any cell runs.

    ``known(kind, name)`` says what is wrong with a "model" or "vae" name (None: it is installed), where the
    caller can tell; the engine would otherwise find out only when that cell runs.
    """
    where = f"{which.upper()} axis ({axis.label})"
    for value in values:
        try:
            changes = axis.changes(base, value, values)
            base.with_changes(**changes)
        except ValidationError as error:
            raise ValidationError(where, f"{value!r}: {error.message}") from None
        if axis.name in (CHECKPOINT, VAE) and known is not None:
            problem = known("model" if axis.name == CHECKPOINT else "vae", value)
            if problem is not None:
                raise ValidationError(where, f"{value!r}: {problem}")


def installed_in(registry: Any) -> Callable[[str, str], str | None]:
    """``known`` for ``check_values``: what is wrong with a model or VAE name in this model registry, or None."""
    def known(kind: str, name: str) -> str | None:
        if kind == "vae" and name in (VAE_AUTOMATIC, VAE_NONE):
            return None
        try:
            if kind == "model":
                registry.get(name)
            else:
                registry.vaes.find(name)
        except SfumatoError as error:
            return getattr(error, "message", None) or str(error)
        return None
    return known
