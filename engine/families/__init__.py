"""Model families, one file each, and how a model is told to be one of them.

The engine never tests a family's name: it asks the model's ``Family`` (``base.py``) for its
latent format, parameterization, noise table, prompt encoding, model-call inputs and sizes.
Adding a family means adding its file and listing it in ``FAMILIES``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..checkpoint_convert import NOT_A_CHECKPOINT, UNET_PREFIX
from .base import FAMILY_FILE, Family, LatentFormat, ModelInputs, SingleFileLayout
from .flux import FLUX_DEV, FLUX_SCHNELL
from .flux2 import FLUX2
from .sd1 import SD1
from .sd2 import SD2
from .sd3 import SD3
from .sdxl import SDXL
from .zimage import ZIMAGE

# Most specific first: the first family whose test matches wins (SD 1.x takes what no other claims).
FAMILIES: tuple[Family, ...] = (FLUX2, ZIMAGE, FLUX_DEV, FLUX_SCHNELL, SD3, SDXL, SD2, SD1)

__all__ = ["FAMILIES", "FAMILY_FILE", "FLUX2", "FLUX_DEV", "FLUX_SCHNELL", "Family", "LatentFormat", "ModelInputs", "SD1", "SD2", "SD3", "SDXL", "SingleFileLayout", "ZIMAGE",
           "detect_checkpoint", "detect_family", "detect_pipeline", "detect_unet_keys", "for_pipeline_class", "titles"]


def _with_overrides(family: Family, folder: Path | None) -> Family:
    if folder is not None and (folder / FAMILY_FILE).is_file():
        return family.with_overrides(folder / FAMILY_FILE)
    return family


def detect_family(unet_config: dict, folder: Path | None = None) -> Family:
    """The family of a diffusers UNet config; with ``folder``, as the folder's own ``sfumato.json`` adjusts it."""
    family = next((family for family in FAMILIES if family.matches_config(unet_config)), None)
    if family is None:
        raise ValueError(f"a {unet_config.get('_class_name')!r} model is none of the families Sfumato runs ({titles()})")
    return _with_overrides(family, folder)


def detect_pipeline(pipeline, folder: Path | None = None) -> Family:
    """The family of a loaded diffusers pipeline, read from the config of the denoiser each family names."""
    for family in FAMILIES:
        denoiser = getattr(pipeline, family.denoiser, None)
        if denoiser is not None and family.matches_config(dict(denoiser.config)):
            return _with_overrides(family, folder)
    raise ValueError(f"a {type(pipeline).__name__} is none of the families Sfumato runs ({titles()})")


def detect_checkpoint(keys: list[str] | set[str], folder: Path | None = None) -> Family:
    """The family of an original-layout single file, from its key names; ``ValueError`` with a readable
    reason when it is no checkpoint Sfumato runs (a LoRA, a VAE, a control model, an SDXL refiner...)."""
    keys = set(keys)
    for family in FAMILIES:  # a flow transformer, alone (split files) or in an all-in-one file
        if family.file_layout is not None and family.matches_checkpoint(keys):
            return _with_overrides(family, folder)
    has_unet = any(key.startswith(UNET_PREFIX) for key in keys)
    if has_unet:
        for family in FAMILIES:
            if family.file_layout is None and family.matches_checkpoint(keys):
                return _with_overrides(family, folder)
    for prefix, what in NOT_A_CHECKPOINT:
        if any(key.startswith(prefix) for key in keys):
            raise ValueError(f"this file looks like {what}")
    if not has_unet:
        raise ValueError(f"this file has no UNet weights ({UNET_PREFIX}*), so it is not a Stable Diffusion checkpoint")
    raise ValueError(f"this file has no text encoder weights Sfumato recognises ({titles()})")


def detect_unet_keys(keys: list[str] | set[str], shape_of: Callable[[str], list[int]], prefix: str = UNET_PREFIX) -> Family:
    """The family original-layout UNet weights under ``prefix`` were made for (a control model copies the
    UNet's encoder half under ``control_model.``); ``shape_of(key)`` reads one weight's shape."""
    keys = set(keys)
    return next(family for family in FAMILIES if family.matches_unet_keys(keys, shape_of, prefix))


def for_pipeline_class(class_name: str) -> Family | None:
    """The family a diffusers folder of this pipeline class holds, or None when Sfumato runs no such pipeline.

    SD 1.x and SD 2.x share their pipelines (and the components a folder must have); the UNet
    config tells them apart when the model loads.
    """
    return next((family for family in reversed(FAMILIES) if class_name in family.pipeline_classes), None)


def pipeline_classes() -> list[str]:
    return list(dict.fromkeys(name for family in reversed(FAMILIES) for name in family.pipeline_classes))


def titles() -> str:
    """The families as the artist reads them: "SD 1.x, SD 2.x and SDXL"."""
    names = list(dict.fromkeys(family.title for family in reversed(FAMILIES)))  # Flux.1 dev and schnell are one title
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
