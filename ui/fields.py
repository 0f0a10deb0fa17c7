"""The map between GenerationRequest fields and the UI controls that hold them.

Each control is built from its field's declaration in ``engine.fields`` (``control()``): label, help,
range, step and default are read there, so a tab only lays controls out.

Every generation tab registers its controls under request field names. Reading
controls into a request, applying a preset, restoring an infotext and "send
to" all go through this one table, so a field is wired once.

Most fields are one control holding the request value as is. Two are not:
``invert_mask`` is the A1111 "Mask mode" radio, and ``outpaint`` is four
sliders (left, right, up, down). The schedule dropdown and the zero-SNR box
follow the sampler: whenever a sampler is applied, they are updated with it,
so the schedule's choices, its value and the box always agree with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from engine.errors import ValidationError
from engine.fields import FIELDS, MASK_MODES, OUTPAINT_SIDES

# What the artist sees for a name that is a setting rather than a request field.
_SETTING_LABELS = {"output_pattern": "Output file pattern"}


class _Labels(Mapping[str, str]):
    """Field name → the label its control shows (declared in ``engine.fields``); used so error messages name the control."""

    def __getitem__(self, name: str) -> str:
        label = FIELDS.label(name) or _SETTING_LABELS.get(name)
        if label is None:
            raise KeyError(name)
        return label

    def __iter__(self):
        return iter([field.name for field in FIELDS if field.label] + list(_SETTING_LABELS))

    def __len__(self) -> int:
        return len(list(iter(self)))


LABELS: Mapping[str, str] = _Labels()


def _is_type(name: str, kind: type) -> bool:
    field = FIELDS.get(name)
    return field is not None and field.type is kind


def control(name: str, mode: str, elem: str | None = None, **layout):
    """The Gradio control of one request field, built from its declaration: label, help, limits, step and default.

    ``elem`` names it in ``elem_id`` (``<mode>_<elem>``, default the field name); ``layout`` passes Gradio's layout
    arguments through, and may set ``value`` (a default that depends on the model), ``choices`` (fewer than declared)
    or ``info=None`` (no help line).
    """
    import gradio as gr

    declared = FIELDS[name]
    choices = layout.pop("choices", None) or declared.choice_list()  # a caller may narrow them (the default sampler's schedules)
    options = {"label": declared.label, "info": declared.help or None, "elem_id": f"{mode}_{elem or name}",
               "value": declared.default, **layout}
    integer = declared.type is int
    if declared.control == "slider":
        return gr.Slider(*declared.limits, step=declared.step, precision=0 if integer else None, **options)
    if declared.control == "number":
        low, high = declared.range or (None, None)
        return gr.Number(minimum=low, maximum=high, precision=0 if integer else None, step=declared.step or 1, **options)
    if declared.control == "dropdown":
        return gr.Dropdown(choices, **options)
    if declared.control == "radio":
        if name == "invert_mask":  # a bool shown as A1111's "Mask mode" radio
            choices = list(MASK_MODES)
            options["value"] = MASK_MODES[1] if options["value"] else MASK_MODES[0]
        return gr.Radio(choices, **options)
    if declared.control == "checkbox":
        return gr.Checkbox(**options)
    if declared.control == "textbox":
        return gr.Textbox(**options)
    raise ValueError(f"field {name!r} declares no plain control")


def outpaint_controls(mode: str) -> list:
    """Outpainting's four sliders (left, right, up, down), from its one declaration."""
    import gradio as gr

    declared = FIELDS["outpaint"]
    low, high = declared.limits
    return [gr.Slider(low, high, value=declared.default[index], step=declared.step, precision=0,
                      label=f"{side.capitalize()} (px)", elem_id=f"{mode}_outpaint_{side}")
            for index, side in enumerate(OUTPAINT_SIDES)]


def describe_error(field: str, message: str) -> str:
    """'CFG Scale (cfg_scale): must be between 0 and 30' — the control's label and the field name."""
    parts = field.split(".")
    root = parts[1] if parts[0] == "fields" and len(parts) > 1 else parts[0]  # preset files nest fields under "fields"
    label = LABELS.get(root)
    if label is None:
        return f"{field}: {message}"
    return f"{label} ({field}): {message}"


@dataclass
class Binding:
    """One request field held by one or more controls."""

    name: str
    components: list
    to_request: Callable[..., Any]
    to_ui: Callable[[Any, Mapping[str, Any]], list]  # (value, all fields being applied) -> control values
    keys: list[str] | None = None  # one parameter name per control, for the API; defaults to the field name
    # Applied again whenever this field is applied, even without a value for this one (to_ui then gets None).
    follows: str | None = None

    def component_keys(self) -> list[str]:
        return self.keys or [self.name]


def _coerce(name: str, value: Any) -> Any:
    if value is None:
        return value
    if _is_type(name, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if _is_type(name, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def simple(name: str, component) -> Binding:
    return Binding(name, [component], lambda value: _coerce(name, value), lambda value, fields: [value])


def schedule(component) -> Binding:
    """The schedule dropdown: its choices are the applied sampler's, and its value one of them.

    Applied with a sampler but no schedule (an infotext without "Schedule type"), it
    goes to Automatic, which is what such an infotext means.
    """
    import gradio as gr

    from engine.sampling import table as samplers

    def to_ui(value: Any, fields: Mapping[str, Any]) -> list:
        sampler = fields.get("sampler")
        if not sampler:
            return [value]
        try:
            choices = samplers.schedules_for(sampler)
        except ValidationError:
            return [gr.skip()]
        return [gr.update(choices=choices, value=value if value in choices else samplers.DEFAULT_SCHEDULE)]

    return Binding("schedule", [component], lambda value: value, to_ui, follows="sampler")


def zero_terminal_snr(component) -> Binding:
    """The zero-SNR box: shown only for samplers that can rescale their betas, and never ticked for others."""
    import gradio as gr

    from engine.sampling import table as samplers

    def to_ui(value: Any, fields: Mapping[str, Any]) -> list:
        sampler = fields.get("sampler")
        if not sampler:
            return [bool(value)]
        try:
            supported = samplers.supports_zero_terminal_snr(sampler)
        except ValidationError:
            return [gr.skip()]
        if value is None:  # the sampler alone was applied: keep the tick where it may stay
            return [gr.update(visible=True)] if supported else [gr.update(visible=False, value=False)]
        return [gr.update(visible=supported, value=bool(value) and supported)]

    return Binding("zero_terminal_snr", [component], lambda value: bool(value), to_ui, follows="sampler")


def sampling_note(changes: tuple[str, ...] | list[str]):
    """The note under the sampler row: what a sampler change did to the schedule or zero SNR and why; hidden when nothing."""
    import gradio as gr

    return gr.update(value=" ".join(changes), visible=bool(changes))


def mask_mode(component) -> Binding:
    return Binding(
        "invert_mask", [component],
        lambda mode: mode == MASK_MODES[1],
        lambda invert, fields: [MASK_MODES[1] if invert else MASK_MODES[0]],
        keys=["mask_mode"],
    )


def outpaint(components: list) -> Binding:
    return Binding(
        "outpaint", list(components),
        lambda *pixels: tuple(int(p or 0) for p in pixels),
        lambda value, fields: [int(p) for p in value],
        keys=[f"outpaint_{side}" for side in OUTPAINT_SIDES],
    )


class FieldMap:
    """The request fields one tab holds, in a fixed order."""

    def __init__(self) -> None:
        self.bindings: dict[str, Binding] = {}

    def add(self, binding: Binding) -> None:
        self.bindings[binding.name] = binding

    def __contains__(self, name: str) -> bool:
        return name in self.bindings

    @property
    def names(self) -> list[str]:
        return list(self.bindings)

    def components(self, names: list[str] | None = None) -> list:
        chosen = names if names is not None else self.names
        return [component for name in chosen if name in self.bindings for component in self.bindings[name].components]

    def keyed_components(self) -> dict[str, Any]:
        """Every control by its API parameter name (``outpaint_left``, ``mask_mode``, or the field name)."""
        return {key: component for binding in self.bindings.values()
                for key, component in zip(binding.component_keys(), binding.components)}

    def read_keyed(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword values (from ``keyed_components``) → request field values."""
        return {binding.name: binding.to_request(*(values[key] for key in binding.component_keys()))
                for binding in self.bindings.values()}

    def read(self, values: list, names: list[str] | None = None) -> dict[str, Any]:
        """Control values (in ``components()`` order) → request field values."""
        chosen = [name for name in (names if names is not None else self.names) if name in self.bindings]
        result: dict[str, Any] = {}
        position = 0
        for name in chosen:
            binding = self.bindings[name]
            count = len(binding.components)
            result[name] = binding.to_request(*values[position:position + count])
            position += count
        return result

    def updates(self, fields: Mapping[str, Any], names: list[str] | None = None) -> list:
        """New control values for the given fields, aligned with ``components(names)``; others are left alone."""
        import gradio as gr

        chosen = [name for name in (names if names is not None else self.names) if name in self.bindings]
        result: list = []
        for name in chosen:
            binding = self.bindings[name]
            if name in fields or (binding.follows is not None and binding.follows in fields):
                result.extend(binding.to_ui(fields.get(name), fields))
            else:
                result.extend(gr.skip() for _ in binding.components)
        return result
