"""k-diffusion's ``sampling`` and ``external`` modules as an independent oracle, imported offline.

k-diffusion's package ``__init__`` imports its training code (torchvision, clean-fid, wandb), which does not
install beside our CPU torch, so this loads just the two modules the samplers live in, with the one helper
they take from ``k_diffusion.utils``. A1111 1.10 samples with these functions (k-diffusion 0.1.1, as pinned
there). Installed by requirements-nodeps.txt; tests that need it skip with a reason when it is missing.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest


def _append_dims(x, target_dims):
    """Append singleton dimensions until ``x`` has ``target_dims`` dimensions."""
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def load() -> tuple[types.ModuleType, types.ModuleType]:
    """(k_diffusion.sampling, k_diffusion.external); skips the calling test when k-diffusion is absent."""
    if "k_diffusion.sampling" in sys.modules and "k_diffusion.external" in sys.modules:
        return sys.modules["k_diffusion.sampling"], sys.modules["k_diffusion.external"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (requirements-nodeps.txt installs it)")
    root = Path(list(spec.submodule_search_locations)[0])
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(root)]
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = _append_dims
    package.utils = utils
    sys.modules["k_diffusion"] = package
    sys.modules["k_diffusion.utils"] = utils
    loaded = []
    for name in ("sampling", "external"):
        module_spec = importlib.util.spec_from_file_location(f"k_diffusion.{name}", root / f"{name}.py")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[f"k_diffusion.{name}"] = module
        module_spec.loader.exec_module(module)
        setattr(package, name, module)
        loaded.append(module)
    return loaded[0], loaded[1]
