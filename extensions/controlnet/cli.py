"""Command-line pieces the launcher wires in: ``--control`` units and the ``preprocess`` command.

``--control IMAGE,MODULE[,MODEL[,WEIGHT[,START,END]]]`` becomes one unit dict;
with MODEL left out, the first installed ControlNet that fits the model being
used is chosen.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from engine.errors import SfumatoError, ValidationError
from engine.models import BUILTIN_DIR, REPO_ROOT
from engine.untrusted_images import read_untrusted_image

from . import models, preprocessors, units

FIELD = "control"


def _open_image(path: str, field: str) -> Image.Image:
    if not Path(path).is_file():
        raise ValidationError(field, f"image {path} not found")
    try:
        return read_untrusted_image(path, field)
    except ValidationError as error:
        raise ValidationError(field, f"{path}: {error.message}") from None


def _dirs(studio: Any, models_dir: Path | None, builtin_dir: Path | None) -> tuple[Path | None, Path | None]:
    if studio is not None:
        config = getattr(studio, "config", None)
        models_dir = models_dir or getattr(config, "models_dir", None)
        builtin_dir = builtin_dir or getattr(config, "builtin_models_dir", None)
    return models_dir or REPO_ROOT / "models", builtin_dir if builtin_dir is not None else BUILTIN_DIR


def _unet_config(studio: Any, model: str | None):
    """The UNet config of the model the command will use (loads it; the registry keeps it for the generation)."""
    if studio is None:
        return None
    return studio.registry.load(model or studio.default_model()).denoising_model.config


def default_model(studio: Any = None, model: str | None = None, models_dir: Path | None = None,
                  builtin_dir: Path | None = None) -> str:
    """The first installed ControlNet that fits the model (any installed one when no studio is given)."""
    models_dir, builtin_dir = _dirs(studio, models_dir, builtin_dir)
    entries = models.find_controlnets(models_dir, builtin_dir)
    if not entries:
        raise ValidationError(FIELD, f"no ControlNet model is installed: put one in {Path(models_dir) / models.CONTROLNET_SUBDIR}")
    unet_config = _unet_config(studio, model)
    candidates = list(entries.values()) if unet_config is None else models.fitting(entries, unet_config)
    if not candidates:
        raise ValidationError(FIELD, f"none of the installed ControlNets ({', '.join(entries)}) fits the model {model or 'in use'}; "
                                     "name one that does as MODEL")
    return candidates[0].name


def parse_control_arg(text: str, studio: Any = None, model: str | None = None, models_dir: Path | None = None,
                      builtin_dir: Path | None = None) -> dict[str, Any]:
    """``IMAGE,MODULE[,MODEL[,WEIGHT[,START,END]]]`` → a unit dict (image opened, module checked)."""
    parts = [part.strip() for part in str(text).split(",")]
    if len(parts) < 2 or len(parts) > 6 or len(parts) == 5:
        raise ValidationError(FIELD, f"expected IMAGE,MODULE[,MODEL[,WEIGHT[,START,END]]], got {text!r}")
    image_path, module = parts[0], parts[1]
    unit: dict[str, Any] = {
        "enabled": True,
        "image": _open_image(image_path, FIELD),
        "module": preprocessors.canonical_name(module, FIELD),
    }
    controlnet = parts[2] if len(parts) > 2 else ""
    unit["model"] = controlnet or default_model(studio, model, models_dir, builtin_dir)
    try:
        if len(parts) > 3 and parts[3]:
            unit["weight"] = float(parts[3])
        if len(parts) == 6:
            unit["guidance_start"], unit["guidance_end"] = float(parts[4]), float(parts[5])
    except ValueError:
        raise ValidationError(FIELD, f"WEIGHT, START and END must be numbers in {text!r}") from None
    try:
        units.validate_unit(unit, FIELD)
    except ValidationError as error:
        raise ValidationError(FIELD, f"{error.field.removeprefix(FIELD + '.')}: {error.message}") from None
    return unit


def run_preprocess(module: str, image_path: str | Path, out_path: str | Path, resolution: int = preprocessors.DEFAULT_RESOLUTION,
                   models_dir: Path | None = None, threshold_a: float = -1, threshold_b: float = -1) -> Path:
    """Write one preprocessor's map for an image as a PNG (``sfumato preprocess canny photo.png edges.png``)."""
    image = _open_image(str(image_path), "image")
    result = preprocessors.preprocess(module, image, resolution, threshold_a, threshold_b, models_dir or REPO_ROOT / "models")
    out = Path(out_path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        result.save(out, format="PNG")
    except OSError as error:
        raise SfumatoError(f"could not write {out}: {error}") from error
    return out
