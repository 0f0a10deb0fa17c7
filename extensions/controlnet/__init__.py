"""ControlNet units for txt2img, img2img and inpaint: Sfumato's first extension.

The declaration below is all the core sees. Settings live in
``GenerationRequest.extensions["controlnet"]``: a list of units, as plain dicts
(``{"image": ..., "module": "canny", "model": "...", "weight": 1.0, ...}``) or
validated :class:`~.units.ControlNetUnit` objects.
"""
from __future__ import annotations

from engine.extensions import CliCommand, Extension, ExtensionEnv, ExtensionField
from engine.fields import Field

from . import units
from .hook import ControlNetRuntime

runtime = ControlNetRuntime()
"""Where this copy of the extension looks for models, and what it has loaded (set up by the ExtensionManager)."""


def _setup(env: ExtensionEnv) -> None:
    runtime.configure(env.models_dir, env.builtin_dir)
    runtime.unit_count = _saved_unit_count(env.user_dir)


def _step_hooks(context, settings: list[units.ControlNetUnit]):
    return runtime.step_hooks(context, settings)


NAME = "controlnet"

UNITS_SETTING = Field(
    "units", int, units.DEFAULT_UNIT_COUNT, range=(1, 8), label="ControlNet units (after restart)", control="slider", step=1,
    help="How many ControlNet units each generation tab shows.", owner=NAME,
)


def _saved_unit_count(user_dir) -> int:
    """The "ControlNet units" setting from the studio's settings file (Settings tab keeps it under this extension's name)."""
    import json

    try:
        data = json.loads((user_dir / "settings.json").read_text())
        mine = data.get("extensions", {}).get(NAME, {})
        count = mine.get(UNITS_SETTING.name, data.get("controlnet_units", UNITS_SETTING.default))  # older files: top level
    except (OSError, ValueError, AttributeError):
        return UNITS_SETTING.default
    low, high = UNITS_SETTING.range
    return count if isinstance(count, int) and not isinstance(count, bool) and low <= count <= high else UNITS_SETTING.default


def _build_ui(tab: str):
    from .ui import build  # imports gradio; only the UI calls this

    return build(tab, runtime, getattr(runtime, "unit_count", units.DEFAULT_UNIT_COUNT))


def _api_routes(app, studio) -> None:
    from .api import add_routes

    add_routes(app, runtime)


def _cli_args(values: list[str], studio=None, model: str | None = None):
    from .cli import parse_control_arg

    return [parse_control_arg(text, studio=studio, model=model) for text in values]


def _add_preprocess_arguments(parser) -> None:
    parser.add_argument("--module", required=True, help="preprocessor name, e.g. canny")
    parser.add_argument("image", help="input image")
    parser.add_argument("--out", required=True, help="output PNG path")
    parser.add_argument("--resolution", type=int, default=512, help="preprocessor resolution")


def _run_preprocess(args, config) -> int:
    from .cli import run_preprocess

    run_preprocess(args.module, args.image, args.out, args.resolution, models_dir=config.models_dir)
    print(args.out)
    return 0


_DEFAULT = units.ControlNetUnit()

UNITS_FIELD = Field(
    NAME, list, None, optional=True, label="ControlNet",
    help="ControlNet unit IMAGE,MODULE[,MODEL[,WEIGHT[,START,END]]] (repeatable).",
    infotext="ControlNet",  # one "ControlNet <slot>" entry per enabled unit
    api="alwayson_scripts.controlnet", cli="--control", preset=True, owner=NAME,
)

EXTENSION = Extension(
    name=NAME,
    title="ControlNet",
    description="Guide composition with control images: edges, lines, scribbles, depth... (sd-webui-controlnet compatible).",
    fields=(
        ExtensionField("enabled", _DEFAULT.enabled, "Use this unit (units given through the API are enabled unless they say otherwise)."),
        ExtensionField("image", None, "Control image; none means the img2img/inpaint source image."),
        ExtensionField("module", _DEFAULT.module, "Preprocessor that turns the image into a control map (see /controlnet/module_list)."),
        ExtensionField("model", None, "ControlNet model name (see /controlnet/model_list)."),
        ExtensionField("weight", _DEFAULT.weight, "Control weight, 0..2."),
        ExtensionField("guidance_start", _DEFAULT.guidance_start, "Starting control step, as a fraction of the steps, 0..1."),
        ExtensionField("guidance_end", _DEFAULT.guidance_end, "Ending control step, 0..1."),
        ExtensionField("control_mode", _DEFAULT.control_mode, " / ".join(units.CONTROL_MODES) + " (or 0/1/2)."),
        ExtensionField("resize_mode", _DEFAULT.resize_mode, " / ".join(units.RESIZE_MODES) + " (or 0/1/2)."),
        ExtensionField("pixel_perfect", _DEFAULT.pixel_perfect, "Pick the preprocessor resolution from the output size."),
        ExtensionField("processor_res", _DEFAULT.processor_res, "Preprocessor resolution; -1 means 512."),
        ExtensionField("threshold_a", _DEFAULT.threshold_a, "Preprocessor slider 1 (e.g. canny low threshold); -1 means its default."),
        ExtensionField("threshold_b", _DEFAULT.threshold_b, "Preprocessor slider 2 (e.g. canny high threshold); -1 means its default."),
    ),
    request_fields=(UNITS_FIELD,),
    settings=(UNITS_SETTING,),
    cli_args=_cli_args,
    cli_commands={"preprocess": CliCommand("write a ControlNet preprocessor's map", _add_preprocess_arguments, _run_preprocess)},
    validate=units.validate_units,
    step_hooks=_step_hooks,
    infotext_fields=units.infotext_fields,
    api_args=units.api_units,
    parse_infotext=units.parse_infotext,
    default_settings=units.default_units,
    ui={"txt2img": _build_ui, "img2img": _build_ui, "inpaint": _build_ui},
    api_routes=_api_routes,
    setup=_setup,
)
