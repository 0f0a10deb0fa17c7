"""Putting a job's networks on a loaded model, and taking them off when the job ends.

Adapters are peft layers wrapped around the model's own Linear and Conv2d layers: the base weights
are never changed, and taking the wrappers off (``_detach``) leaves exactly the modules that were
there before, so the next job computes bit-identical pixels. Switching networks re-wraps a few
hundred layers; the base model is never reloaded.

LoRA and LoCon files load through diffusers' pipeline loader (``load_lora_weights``, peft LoRA
layers). kohya's layer names are resolved here against the model's own modules first (SDXL's SGM
names through the single-file layout of ``engine.checkpoint_convert``), with alpha/rank folded into
the up matrix: diffusers' own kohya converter names CLIP's attention layers as transformers 4 did,
and with transformers 5 it drops them without an error. LyCORIS LoHa and LoKr load through peft's LoHa and LoKr layers
(diffusers reads neither for UNet families), with the same name resolution.

Multipliers follow kohya's formula, ΔW = up·down·(alpha/rank)·multiplier (LoHa: (w1a·w1b)⊙(w2a·w2b);
LoKr: w1⊗w2), with the text-encoder multiplier on the text encoders and the UNet multiplier on the
denoiser, as A1111 applies them.
"""
from __future__ import annotations

import collections
from contextlib import contextmanager
from typing import Iterator

import torch

from .formats import KOHYA_LOCON, KOHYA_LORA, LOHA, LOKR, NetworkError, NetworkWeights
from .job import JobNetwork, JobNetworks

ADAPTER_PREFIX = "sfumato_network_"
_LYCORIS_SUFFIXES = {
    LOHA: ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    LOKR: ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
}
_LORA_DOWN_MARKERS = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", ".lora_linear_layer.down.weight")


@contextmanager
def active(model, job: JobNetworks) -> Iterator[None]:
    """The job's networks on ``model`` (a ``LoadedModel``) inside the block, none after it, even when it fails.

    A file that does not fit the model (made for another family, layers it lacks) raises a
    ``NetworkError`` naming it, and the model is left as it was.
    """
    applied = job.applied
    if not applied:
        yield
        return
    components = _components(model)
    try:
        uses = {}
        for index, network in enumerate(applied):
            adapter = f"{ADAPTER_PREFIX}{index}"
            _attach(model, components, network, adapter)
            uses[adapter] = network.use
        _activate(model, components, uses)
        yield
    finally:
        _detach(model, components)


def _components(model) -> dict[str, torch.nn.Module]:
    """The modules networks patch, by pipeline attribute: the family's denoiser and text encoders."""
    names = dict.fromkeys(model.family.network_components().values())
    modules = {name: getattr(model.pipeline, name) for name in names if getattr(model.pipeline, name, None) is not None}
    return {name: getattr(module, "_orig_mod", module) for name, module in modules.items()}  # under torch.compile: the model inside


def _tuner_layers(module: torch.nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [layer for layer in module.modules() if isinstance(layer, BaseTunerLayer)]


def _holds(layer, adapter: str) -> bool:
    return any(adapter in getattr(layer, name) for name in layer.adapter_layer_names)


def _expected_layers(weights: NetworkWeights) -> int:
    """How many layers the file patches: one per module it names."""
    if weights.lycoris:
        suffixes = tuple("." + suffix for suffix in _LYCORIS_SUFFIXES[weights.format])
        return len({key.rpartition(".")[0] for key in weights.tensors if key.endswith(suffixes)})
    return sum(1 for key in weights.tensors if key.endswith(_LORA_DOWN_MARKERS))


@contextmanager
def _quiet_loaders() -> Iterator[None]:
    """No "Loading weights" progress bar from transformers for every job that loads a text-encoder LoRA."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def _attach(model, components: dict[str, torch.nn.Module], network: JobNetwork, adapter: str) -> None:
    name, weights = network.file.path.name, network.weights
    try:
        with _quiet_loaders():
            _load(model, components, weights, adapter)
    except NetworkError as error:
        raise NetworkError(f"LoRA file {name} ({weights.format}): {error}") from error
    except Exception as error:  # diffusers and peft raise many kinds for a file that does not fit
        raise NetworkError(f"LoRA file {name} ({weights.format}) does not fit {model.entry.name} ({model.family.title}): "
                           f"{type(error).__name__}: {str(error)[:300]}; was it made for another base model?") from error
    loaded = sum(1 for module in components.values() for layer in _tuner_layers(module) if _holds(layer, adapter))
    expected = _expected_layers(weights)
    if loaded != expected:
        raise NetworkError(f"LoRA file {name} ({weights.format}) patches {expected} layers but only {loaded} exist in "
                           f"{model.entry.name} ({model.family.title}); was it made for another base model?")


def _load(model, components: dict[str, torch.nn.Module], weights: NetworkWeights, adapter: str) -> None:
    if weights.lycoris:
        _attach_lycoris(model, components, weights, adapter)
    elif weights.format in (KOHYA_LORA, KOHYA_LOCON):
        # low_cpu_mem_usage: no random initialisation of adapter weights the file overwrites anyway.
        model.pipeline.load_lora_weights(_kohya_as_peft(model, components, weights), adapter_name=adapter, low_cpu_mem_usage=True)
    else:
        # diffusers pops what it converts: hand it a copy of the (cached) file's dict.
        model.pipeline.load_lora_weights(dict(weights.tensors), adapter_name=adapter, low_cpu_mem_usage=True)


def _activate(model, components: dict[str, torch.nn.Module], uses: dict) -> None:
    """Every adapter on, at its multiplier: the UNet multiplier on the denoiser, the text-encoder one on the encoders.
    An adapter whose multiplier is 0 for a component stays off there, so that component computes exactly what it
    would without the network."""
    denoiser = model.family.denoiser
    for component, module in components.items():
        scales = {adapter: (use.unet_weight if component == denoiser else use.te_weight) for adapter, use in uses.items()}
        live = [adapter for adapter, scale in scales.items() if scale != 0]
        for layer in _tuner_layers(module):
            layer.set_adapter(live, inference_mode=True)
            for adapter in live:
                layer.set_scale(adapter, scales[adapter])
        module.requires_grad_(False)


def _detach(model, components: dict[str, torch.nn.Module]) -> None:
    """Every adapter wrapper replaced by the layer it wraps, and peft's bookkeeping removed: the modules are the
    ones the model had before the job, with their untouched weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in components.values():
        if not _tuner_layers(module):
            continue
        unwrapped: list[str] = []
        for path, layer in list(module.named_modules()):  # outer wrappers come before the layers they wrap
            if not isinstance(layer, BaseTunerLayer) or any(path.startswith(done + ".") for done in unwrapped):
                continue
            parent, _, child = path.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, layer.get_base_layer())
            unwrapped.append(path)
        if hasattr(module, "peft_config"):
            del module.peft_config
        if getattr(module, "_hf_peft_config_loaded", None):
            module._hf_peft_config_loaded = False
        if _tuner_layers(module):  # never go on with a model that still carries a network
            raise RuntimeError(f"adapter layers were left on {model.entry.name}'s {type(module).__name__}")


# -- LyCORIS (LoHa, LoKr) through peft -----------------------------------------------------------
def _original_layout_names(module: torch.nn.Module):
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


def _module_names(module: torch.nn.Module) -> dict[str, str]:
    """kohya's flattened module names ('.' → '_') → the module's path, for every Linear and Conv2d.

    transformers 5's ``CLIPTextModel`` no longer nests its layers under ``text_model``, which kohya's
    names (made with older transformers) still include; both spellings are accepted. A UNet's layers
    are also found under their original-layout (SGM) names.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    original = _original_layout_names(module)
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


def _by_component(model, components: dict[str, torch.nn.Module], weights: NetworkWeights) -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors per component, renamed to ``<module path>.<parameter>`` (and ``<module path>.alpha``)."""
    prefixes = model.family.network_components()
    grouped: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    unknown = []
    names = {component: _module_names(module) for component, module in components.items()}
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


def _kohya_as_peft(model, components: dict[str, torch.nn.Module], weights: NetworkWeights) -> dict[str, torch.Tensor]:
    """A kohya LoRA/LoCon as diffusers' PEFT layout: ``<component>.<module path>.lora_A.weight`` = down and
    ``.lora_B.weight`` = up·alpha/rank (kohya's scale; alpha defaults to the rank), so the adapter's own scale is
    the multiplier."""
    converted = {}
    for component, tensors in _by_component(model, components, weights).items():
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


def _loha_config(tensors: dict[str, torch.Tensor]):
    """peft's LoHa config for these modules: each module's rank (LyCORIS "dim") and alpha, as the file has them."""
    from peft import LoHaConfig

    modules = sorted({key.rpartition(".hada_")[0] for key in tensors if ".hada_w1_a" in key})
    ranks = {module: int(tensors[f"{module}.hada_w1_b"].shape[0]) for module in modules}
    alphas = {module: float(tensors[f"{module}.alpha"]) if f"{module}.alpha" in tensors else float(ranks[module])
              for module in modules}
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    return LoHaConfig(r=rank, alpha=float(rank), target_modules=modules, rank_pattern=dict(ranks), alpha_pattern=dict(alphas))


def _lokr_config(tensors: dict[str, torch.Tensor]):
    """peft's LoKr config, inferred from the factors' shapes by diffusers (which first folds each module's
    alpha/rank into its left factor, as LyCORIS scales a decomposed factor)."""
    from diffusers.loaders.lora_conversion_utils import _bake_lokr_alpha_
    from diffusers.utils.peft_utils import _create_lokr_config

    _bake_lokr_alpha_(tensors)
    return _create_lokr_config(tensors, None)


def _attach_lycoris(model, components: dict[str, torch.nn.Module], weights: NetworkWeights, adapter: str) -> None:
    from peft import inject_adapter_in_model

    for component, tensors in _by_component(model, components, weights).items():
        module = components[component]
        config = _loha_config(tensors) if weights.format == LOHA else _lokr_config(tensors)
        inject_adapter_in_model(config, module, adapter_name=adapter)
        suffixes = _LYCORIS_SUFFIXES[weights.format]
        for key, tensor in tensors.items():
            path, _, parameter = key.rpartition(".")
            if parameter not in suffixes:
                continue
            target = getattr(module.get_submodule(path), parameter)[adapter]
            if tuple(target.shape) != tuple(tensor.shape):
                raise NetworkError(f"{key} has shape {tuple(tensor.shape)} in the file where {model.entry.name} needs "
                                   f"{tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor)
