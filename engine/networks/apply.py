"""Putting a job's networks on a loaded model, and taking them off when the job ends.

Adapters are peft layers wrapped around the model's own Linear and Conv2d layers. For the job they
are merged into the weights they adapt (no extra work per step), after a copy of each of those
weights is kept; when the job ends the copies are put back and the wrappers taken off, leaving
exactly the modules and weights that were there before, so the next job computes bit-identical
pixels. Switching networks re-wraps a few hundred layers; the base model is never reloaded.

LoRA and LoCon files load through diffusers' pipeline loader (``load_lora_weights``, peft LoRA
layers). kohya's layer names are first resolved against the model's own modules (``layer_names``),
with alpha/rank folded into the up matrix: diffusers' own kohya converter names CLIP's attention
layers as transformers 4 did, and with transformers 5 it drops them without an error. LyCORIS LoHa
and LoKr load through peft's LoHa and LoKr layers (``lycoris``). A flow transformer's (SD 3.5, Flux.1) kohya and
XLabs files are first renamed to diffusers' modules, fused layers split (``transformer_layouts``).

Multipliers follow kohya's formula for LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models"), ΔW = up·down·(alpha/rank)·multiplier (LoHa and LoKr: see ``lycoris``), with the text-encoder multiplier on the text encoders and the UNet multiplier on the
denoiser, as A1111 applies them.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch

from .formats import KOHYA_LOCON, KOHYA_LORA, XLABS_LORA, NetworkError, NetworkWeights
from .job import JobNetwork, JobNetworks
from .layer_names import kohya_as_peft
from .lycoris import LYCORIS_PARAMETERS, attach_lycoris
from .transformer_layouts import DENOISER_PREFIX, KOHYA_CONVERTERS, XLABS_CONVERTERS
from .syntax import NetworkUse

if TYPE_CHECKING:
    from ..models import LoadedModel

ADAPTER_PREFIX = "sfumato_network_"
_LORA_DOWN_MARKERS = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", ".lora_linear_layer.down.weight")


@contextmanager
def active(model: LoadedModel, job: JobNetworks) -> Iterator[None]:
    """The job's networks on ``model`` inside the block, none after it, even when it fails.

    A file that does not fit the model (made for another family, layers it lacks) raises a
    ``NetworkError`` naming it, and the model is left as it was.
    """
    applied = job.applied
    if not applied:
        yield
        return
    components = _components(model)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        uses = {}
        for index, network in enumerate(applied):
            adapter = f"{ADAPTER_PREFIX}{index}"
            _attach(model, components, network, adapter)
            uses[adapter] = network.use
        _activate(model, components, uses)
        kept = _merge(components)
        yield
    finally:
        _restore(kept)
        _detach(model, components)


def _components(model: LoadedModel) -> dict[str, torch.nn.Module]:
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
        suffixes = tuple("." + suffix for suffix in LYCORIS_PARAMETERS[weights.format])
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


def _attach(model: LoadedModel, components: dict[str, torch.nn.Module], network: JobNetwork, adapter: str) -> None:
    name, weights = network.file.path.name, network.weights
    try:
        with _quiet_loaders():
            expected = _load(model, components, weights, adapter)
    except NetworkError as error:
        raise NetworkError(f"LoRA file {name} ({weights.format}): {error}") from error
    except Exception as error:  # diffusers and peft raise many kinds for a file that does not fit
        raise NetworkError(f"LoRA file {name} ({weights.format}) does not fit {model.entry.name} ({model.family.title}): "
                           f"{type(error).__name__}: {str(error)[:300]}; was it made for another base model?") from error
    loaded = sum(1 for module in components.values() for layer in _tuner_layers(module) if _holds(layer, adapter))
    if loaded != expected:
        raise NetworkError(f"LoRA file {name} ({weights.format}) patches {expected} layers but only {loaded} exist in "
                           f"{model.entry.name} ({model.family.title}); was it made for another base model?")


def _load(model: LoadedModel, components: dict[str, torch.nn.Module], weights: NetworkWeights, adapter: str) -> int:
    """The file's adapters injected under ``adapter``; returns how many layers they must patch."""
    if weights.lycoris:
        attach_lycoris(model, components, weights, adapter)
        return _expected_layers(weights)
    layout = model.family.lora_layout
    if weights.format == XLABS_LORA or (layout and weights.format in (KOHYA_LORA, KOHYA_LOCON)):
        tensors = _transformer_as_peft(model, components, weights)
    elif weights.format in (KOHYA_LORA, KOHYA_LOCON):
        tensors = kohya_as_peft(model, components, weights)
    else:
        # diffusers pops what it converts: hand it a copy of the (cached) file's dict.
        model.pipeline.load_lora_weights(dict(weights.tensors), adapter_name=adapter, low_cpu_mem_usage=True)
        return _expected_layers(weights)
    # low_cpu_mem_usage: no random initialisation of adapter weights the file overwrites anyway.
    model.pipeline.load_lora_weights(tensors, adapter_name=adapter, low_cpu_mem_usage=True)
    return sum(1 for key in tensors if key.endswith(".lora_A.weight"))


def _transformer_as_peft(model: LoadedModel, components: dict[str, torch.nn.Module],
                         weights: NetworkWeights) -> dict[str, torch.Tensor]:
    """A flow transformer's kohya or XLabs LoRA in diffusers' PEFT names (``transformer_layouts``); a kohya file's
    text-encoder layers (``lora_te…``) resolve against the encoders as for UNet families."""
    layout = model.family.lora_layout
    converters = XLABS_CONVERTERS if weights.format == XLABS_LORA else KOHYA_CONVERTERS
    if layout not in converters:
        raise NetworkError(f"it is a {weights.format} file, made for another kind of model than {model.family.title}")
    transformer = components[model.family.denoiser]
    if weights.format == XLABS_LORA:
        return converters[layout](dict(weights.tensors), transformer)
    denoiser = {key: value for key, value in weights.tensors.items() if key.startswith(DENOISER_PREFIX)}
    text = NetworkWeights(weights.format, {key: value for key, value in weights.tensors.items() if key not in denoiser})
    converted = converters[layout](denoiser, transformer) if denoiser else {}
    return {**converted, **(kohya_as_peft(model, components, text) if text.tensors else {})}


def _activate(model: LoadedModel, components: dict[str, torch.nn.Module], uses: dict[str, NetworkUse]) -> None:
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


def _merge(components: dict[str, torch.nn.Module]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each active adapter's ΔW·multiplier added into the weight it adapts, for the job: no per-step cost.

    Every adapted weight is copied first (to the CPU, as A1111 keeps its backups) and ``_restore`` copies it
    back, so the base weights come back bit for bit; subtracting ΔW again would not (float rounding).
    Returns (weight, its copy) pairs.
    """
    layers = [layer for module in components.values() for layer in _tuner_layers(module)]
    if any(layer.get_base_layer().weight.is_meta for layer in layers):
        return []  # sequential CPU offload (--lowvram) keeps the weights elsewhere: the adapters run unmerged
    kept, seen = [], set()
    for layer in layers:  # every copy before any merge: nested wrappers of one layer share its weight
        for parameter in (layer.get_base_layer().weight, getattr(layer.get_base_layer(), "bias", None)):
            if parameter is not None and id(parameter) not in seen:
                seen.add(id(parameter))
                kept.append((parameter, parameter.detach().to("cpu", copy=True)))
    with torch.no_grad():
        for layer in layers:
            live = [adapter for adapter in layer.active_adapters if _holds(layer, adapter)]
            if live:
                layer.merge(adapter_names=live)
    return kept


def _restore(kept: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for parameter, original in kept:
            parameter.copy_(original)


def _detach(model: LoadedModel, components: dict[str, torch.nn.Module]) -> None:
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
