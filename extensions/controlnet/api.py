"""sd-webui-controlnet's HTTP endpoints, in its shapes (``scripts/api.py``).

- ``GET /controlnet/model_list`` → ``{"model_list": [...]}``
- ``GET /controlnet/module_list`` → ``{"module_list": [...], "module_detail": {name: {"model_free", "sliders", "available",
  "unavailable_reason", "fix", "missing_weights", "aliases"}}}``
- ``POST /controlnet/detect`` (``controlnet_module``, ``controlnet_input_images``,
  ``controlnet_processor_res``, ``controlnet_threshold_a``/``_b``) → ``{"images": [b64], "info": "Success"}``
- ``GET /controlnet/version``, ``GET /controlnet/settings``

The functions are plain (no web framework) so tests and other front-ends can
call them; :func:`add_routes` mounts them on a FastAPI app. Bad input raises
``ValidationError`` naming the request field; the app turns it into a 422.
"""
from __future__ import annotations

import base64
import io
from typing import Any, Mapping

from engine.errors import ValidationError

from . import preprocessors, units
from .hook import ControlNetRuntime

API_VERSION = 2  # what sd-webui-controlnet's /controlnet/version says for this API shape


def _runtime(runtime: ControlNetRuntime | None) -> ControlNetRuntime:
    if runtime is not None:
        return runtime
    from . import runtime as default

    return default


def model_list(runtime: ControlNetRuntime | None = None) -> dict[str, list[str]]:
    return {"model_list": list(_runtime(runtime).controlnets())}


def module_list(runtime: ControlNetRuntime | None = None, alias_names: bool = False) -> dict[str, Any]:
    """Every preprocessor with its sliders, checked now (packages and files present).

    ``module_list`` stays sd-webui-controlnet's plain list of names; ``module_detail``
    (A1111's own field, with extra keys its clients ignore) says for each whether
    it is ``available`` and, if not, the ``unavailable_reason``, the ``fix`` and any
    ``missing_weights`` file names.
    """
    models_dir = _runtime(runtime).models_dir
    detail = {}
    for name, spec in preprocessors.PREPROCESSORS.items():
        sliders = []
        if spec.resolution:
            low, high = preprocessors.RESOLUTION_RANGE
            sliders.append({"name": "Preprocessor Resolution", "value": preprocessors.DEFAULT_RESOLUTION, "min": low, "max": high, "step": 8})
        for param in (spec.threshold_a, spec.threshold_b):
            if param is not None:
                sliders.append({"name": param.label, "value": param.default, "min": param.minimum, "max": param.maximum, "step": param.step})
        problem = preprocessors.availability(name, models_dir)
        # A1111's model_free marks preprocessors that need no ControlNet model (reference_only, revision); we have none.
        detail[name] = {"model_free": False, "sliders": sliders, "available": problem is None,
                        "unavailable_reason": problem.reason if problem else None, "fix": problem.fix if problem else None,
                        "missing_weights": list(problem.missing_weights) if problem else [], "aliases": list(spec.aliases)}
    names = list(preprocessors.PREPROCESSORS)
    if alias_names:
        names = [spec.aliases[0] if spec.aliases else name for name, spec in preprocessors.PREPROCESSORS.items()]
    return {"module_list": names, "module_detail": detail}


def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def detect(payload: Mapping[str, Any], runtime: ControlNetRuntime | None = None) -> dict[str, Any]:
    """Run a preprocessor on each input image and return the maps."""
    if not isinstance(payload, Mapping):
        raise ValidationError("body", "must be a JSON object")
    module = preprocessors.canonical_name(payload.get("controlnet_module", "none"), "controlnet_module")
    problem = preprocessors.availability(module, _runtime(runtime).models_dir)
    if problem is not None:  # before decoding anything: the images cannot help
        raise ValidationError("controlnet_module", problem.sentence)
    images = payload.get("controlnet_input_images") or []
    if not isinstance(images, list) or not images:
        raise ValidationError("controlnet_input_images", "send at least one base64 image")
    resolution = payload.get("controlnet_processor_res")
    resolution = units.parse_resolution(-1 if resolution is None else resolution, "controlnet_processor_res")
    spec = preprocessors.PREPROCESSORS[module]
    thresholds = []
    for key, param in (("controlnet_threshold_a", spec.threshold_a), ("controlnet_threshold_b", spec.threshold_b)):
        value = payload.get(key)
        thresholds.append(units.parse_threshold(-1 if value is None else value, key, param))
    threshold_a, threshold_b = thresholds
    models_dir = _runtime(runtime).models_dir
    results = []
    for index, raw in enumerate(images):
        image = units.decode_image(raw, f"controlnet_input_images[{index}]")
        if image is None:
            raise ValidationError(f"controlnet_input_images[{index}]", "is empty")
        try:
            result = preprocessors.preprocess(module, image, resolution, threshold_a, threshold_b, models_dir)
        except ValidationError as error:
            raise ValidationError("controlnet_module", error.message) from None
        results.append(_png_base64(result))
    return {"images": results, "info": "Success"}


def settings(runtime: ControlNetRuntime | None = None) -> dict[str, Any]:
    return {"control_net_unit_count": units.DEFAULT_UNIT_COUNT}


def add_routes(app, runtime: ControlNetRuntime | None = None) -> None:
    """Mount the endpoints on a FastAPI app (sync handlers: FastAPI runs them in its thread pool)."""
    from fastapi import Body

    @app.get("/controlnet/version", tags=["ControlNet"])
    def controlnet_version() -> dict:
        return {"version": API_VERSION}

    @app.get("/controlnet/settings", tags=["ControlNet"])
    def controlnet_settings() -> dict:
        return settings(runtime)

    @app.get("/controlnet/model_list", tags=["ControlNet"])
    def controlnet_model_list(update: bool = True) -> dict:
        return model_list(runtime)

    @app.get("/controlnet/module_list", tags=["ControlNet"])
    def controlnet_module_list(alias_names: bool = False) -> dict:
        return module_list(runtime, alias_names)

    @app.post("/controlnet/detect", tags=["ControlNet"])
    def controlnet_detect(payload: dict = Body(..., examples=[{"controlnet_module": "canny", "controlnet_input_images": ["<base64 PNG>"],
                                                                "controlnet_processor_res": 512}])) -> dict:
        return detect(payload, runtime)
