"""Importing spandrel without torchvision.

spandrel's package imports every architecture it knows, and two of them import torchvision at module level:
LaMa (``InterpolationMode`` and ``rotate``, for an inpainting model) and RestoreFormer (``normalize``, for a face
restorer). Neither is ever loaded as an upscaler here, and PyPI's torchvision wheels pin a torch build of their
own, so installing one would replace Sfumato's CPU torch.

:func:`import_spandrel` therefore lends a tiny ``torchvision.transforms.functional`` for the moment spandrel is
imported, and takes it out of ``sys.modules`` again afterwards, so nothing else in the process (diffusers,
transformers, an extension probing ``find_spec("torchvision")``) ever takes it for the real thing. The two
architectures keep the names they bound at import time:

- ``normalize`` is torchvision's documented per-channel ``(x - mean) / std``, written out;
- ``rotate`` raises, naming the model kind that needed it (LaMa is refused before it could ever be called);
- ``InterpolationMode`` carries the members torchvision's enum has, so an attribute read at call time works.

A real torchvision, when one is installed (imported already or only findable), is left alone and used.
"""
from __future__ import annotations

import enum
import importlib
import importlib.machinery
import importlib.util
import sys
import threading
import types
from typing import Sequence

import torch

_NAMES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
_lending = threading.Lock()


class InterpolationMode(enum.Enum):
    """torchvision's interpolation names (values as torchvision spells them)."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def normalize(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float], inplace: bool = False) -> torch.Tensor:
    """Per channel ``(x - mean) / std`` on a (…, C, H, W) tensor, as torchvision's ``normalize`` documents."""
    mean_t = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    if inplace:
        return tensor.sub_(mean_t).div_(std_t)
    return (tensor - mean_t) / std_t


def rotate(*_args, **_kwargs):
    raise NotImplementedError("torchvision's rotate is needed by LaMa inpainting models, which Sfumato does not run "
                              "(torchvision is not installed; only the names spandrel imports are stood in for)")


def _modules() -> dict[str, types.ModuleType]:
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode, functional.normalize, functional.rotate = InterpolationMode, normalize, rotate
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    package = types.ModuleType("torchvision")
    package.transforms = transforms
    modules = dict(zip(_NAMES, (package, transforms, functional)))
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=name != _NAMES[-1])
        if name != _NAMES[-1]:
            module.__path__ = []
    return modules


def _real_torchvision_available() -> bool:
    if "torchvision" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("torchvision") is not None
    except (ImportError, ValueError):
        return False


def import_spandrel() -> types.ModuleType:
    """``spandrel``, imported once; with the stand-in lent only while its architectures import."""
    if "spandrel" in sys.modules:
        return sys.modules["spandrel"]
    with _lending:
        if _real_torchvision_available():
            return importlib.import_module("spandrel")
        lent = _modules()
        sys.modules.update(lent)
        try:
            return importlib.import_module("spandrel")
        finally:
            for name, module in lent.items():
                if sys.modules.get(name) is module:
                    del sys.modules[name]
