"""The four ``torchvision.transforms`` classes that controlnet_aux's openpose, normal_bae and LeReS import.

PyPI's torchvision wheels pin a torch build of their own, so installing one
would replace Sfumato's CPU torch. These annotators use torchvision only for
trivial tensor transforms (openpose's face module merely constructs
``ToTensor``/``ToPILImage``; normal_bae normalises; LeReS converts and
normalises), so this module gives those classes, with torchvision's documented
behaviour, and :func:`provided_while_importing` lends them under the name
``torchvision`` for the moment those modules are imported.
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import sys
import threading
import types
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Any], Any]]):
        self.transforms = list(transforms)

    def __call__(self, value: Any) -> Any:
        for transform in self.transforms:
            value = transform(value)
        return value


class ToTensor:
    """HxWxC array or PIL image → CxHxW tensor; only ``uint8`` input is scaled to [0, 1], as torchvision does."""

    def __call__(self, picture: Any) -> torch.Tensor:
        array = np.asarray(picture)
        if array.ndim == 2:
            array = array[:, :, None]
        tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        if tensor.dtype == torch.uint8:
            return tensor.to(torch.get_default_dtype()).div(255)
        return tensor


class ToPILImage:
    """CxHxW tensor in [0, 1] (or ``uint8``) → PIL image."""

    def __call__(self, tensor: torch.Tensor) -> Image.Image:
        array = tensor.detach().cpu()
        if array.is_floating_point():
            array = array.mul(255).round().clamp(0, 255).to(torch.uint8)
        array = array.numpy().transpose(1, 2, 0)
        return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


class Normalize:
    """Per channel ``(x - mean) / std`` on a CxHxW (or NxCxHxW) tensor."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], inplace: bool = False):
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        return (tensor - mean) / std


_MODULE_NAMES = ("torchvision", "torchvision.transforms", "torchvision.transforms.transforms")
_lending = threading.Lock()


def _modules() -> dict[str, types.ModuleType]:
    transforms = types.ModuleType("torchvision.transforms")
    for cls in (Compose, ToTensor, ToPILImage, Normalize):
        setattr(transforms, cls.__name__, cls)
    transforms.transforms = transforms  # ``from torchvision.transforms import transforms`` (LeReS)
    package = types.ModuleType("torchvision")
    package.transforms = transforms
    modules = {"torchvision": package, "torchvision.transforms": transforms, "torchvision.transforms.transforms": transforms}
    for name, module in modules.items():
        # A spec, so a library that probes ``importlib.util.find_spec("torchvision")`` in this instant gets an answer, not a ValueError.
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=name != "torchvision.transforms.transforms")
        module.__path__ = []
    return modules


@contextlib.contextmanager
def provided_while_importing() -> Iterator[None]:
    """Let ``import torchvision.transforms`` find this module, and only for the duration of the block.

    The names are removed afterwards, so nothing else in the process (diffusers,
    transformers) ever takes this subset for a real torchvision. A real
    torchvision, if one is installed, is left alone and used.
    """
    with _lending:
        if any(name in sys.modules for name in _MODULE_NAMES):
            yield
            return
        lent = _modules()
        sys.modules.update(lent)
        try:
            yield
        finally:
            for name, module in lent.items():
                if sys.modules.get(name) is module:
                    del sys.modules[name]
