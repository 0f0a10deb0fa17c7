"""kohya's layer names resolved against a loaded model's own modules.

kohya names a layer by its module path with '.' flattened to '_', under a prefix that says which
component it patches (``lora_unet_``, ``lora_te_``, ``lora_te1_`` / ``lora_te2_``; the family says
which prefix is which component). LyCORIS uses the same names. Resolving each name against the
live model (instead of by string rules) is what tells a file made for another base model apart:
its names have no module here.
"""
from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Callable

import torch

from .formats import NetworkError, NetworkWeights

if TYPE_CHECKING:
    from ..models import LoadedModel


def original_layout_names(module: torch.nn.Module) -> Callable[[str], str | None] | None:
    """For a diffusers UNet, a function from a module path to its name in the original (CompVis/SGM) layout;
    None for other modules. kohya trains SDXL on the SGM UNet, so SDXL files name layers that way
    (``input_blocks_4_1_…``, ``in_layers_2``); SD 1.x files use diffusers' names."""
    from ..checkpoint_convert import UNET_PREFIX, unet_key_mapper

    config = getattr(module, "config", None)
    if config is None or "layers_per_block" not in config or "up_block_types" not in config:
        return None
    try:
        mapper = unet_key_mapper(dict(config))
    except (KeyError, ValueError):
        return None

    def original(path: str) -> str | None:
        try:
            return mapper(f"{path}.weight").removeprefix(UNET_PREFIX).removesuffix(".weight")
        except (KeyError, ValueError, IndexError):
            return None

    return original


def module_names(module: torch.nn.Module) -> dict[str, str]:
    """kohya's flattened module names ('.' → '_') → the module's path, for every Linear and Conv2d.

    transformers 5's ``CLIPTextModel`` no longer nests its layers under ``text_model``, which kohya's
    names (made with older transformers) still include; both spellings are accepted. A UNet's layers
    are also found under their original-layout (SGM) names.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    original = original_layout_names(module)
    names = {}
    for path, layer in module.named_modules():
        # A layer another network of this job already wraps counts under its own path; the wrapped
        # layer (``base_layer``) and the adapters' own layers are not targets.
        inside_adapter = any(part == "base_layer" or part.startswith(("lora_", "hada_", "lokr_")) for part in path.split("."))
        if isinstance(layer, BaseTunerLayer) or (isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and not inside_adapter):
            flat = path.replace(".", "_")
            names[flat] = path
            names.setdefault("text_model_" + flat, path)
            sgm = original(path) if original is not None else None
            if sgm:
                names.setdefault(sgm.replace(".", "_"), path)
    return names


def by_component(model: LoadedModel, components: dict[str, torch.nn.Module], weights: NetworkWeights) -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors per component, renamed to ``<module path>.<parameter>`` (and ``<module path>.alpha``)."""
    prefixes = model.family.network_components()
    grouped: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    unknown = []
    names = {component: module_names(module) for component, module in components.items()}
    for key, tensor in weights.tensors.items():
        flat, _, parameter = key.partition(".")
        prefix = next((prefix for prefix in sorted(prefixes, key=len, reverse=True) if flat.startswith(prefix)), None)
        component = prefixes.get(prefix)
        path = names.get(component, {}).get(flat[len(prefix):]) if prefix else None
        if path is None:
            unknown.append(flat)
            continue
        grouped[component][f"{path}.{parameter}"] = tensor
    if unknown:
        shown = ", ".join(sorted(set(unknown))[:3])
        raise NetworkError(f"{len(set(unknown))} of its layers have no place in {model.entry.name} ({model.family.title}), "
                           f"like {shown}; was it made for another base model?")
    return grouped


def kohya_as_peft(model: LoadedModel, components: dict[str, torch.nn.Module], weights: NetworkWeights) -> dict[str, torch.Tensor]:
    """A kohya LoRA/LoCon as diffusers' PEFT layout: ``<component>.<module path>.lora_A.weight`` = down and
    ``.lora_B.weight`` = up·alpha/rank (kohya's scale; alpha defaults to the rank), so the adapter's own scale is
    the multiplier."""
    converted = {}
    for component, tensors in by_component(model, components, weights).items():
        for key, down in tensors.items():
            if not key.endswith(".lora_down.weight"):
                continue
            path = key.removesuffix(".lora_down.weight")
            up = tensors.get(f"{path}.lora_up.weight")
            if up is None:
                raise NetworkError(f"{path} has a lora_down but no lora_up weight")
            rank = down.shape[0]
            alpha = float(tensors[f"{path}.alpha"]) if f"{path}.alpha" in tensors else float(rank)
            converted[f"{component}.{path}.lora_A.weight"] = down
            converted[f"{component}.{path}.lora_B.weight"] = up * (alpha / rank)
    return converted
