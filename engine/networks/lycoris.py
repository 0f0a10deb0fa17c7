"""LyCORIS LoHa and LoKr through peft's own LoHa and LoKr layers (diffusers reads neither for UNet families).

LoHa (Hyeon-Woo et al. 2022, "FedPara"): ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/rank.
LoKr (Yeh et al. 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
Evaluation"): ΔW = w1 ⊗ w2 · alpha/rank, either factor possibly stored as a low-rank product.
"""
from __future__ import annotations

import collections
from typing import TYPE_CHECKING

import torch

from .formats import LOHA, LOKR, NetworkError, NetworkWeights
from .layer_names import by_component

if TYPE_CHECKING:
    from ..models import LoadedModel

# The parameters each format's layers hold, named alike in LyCORIS files and in peft's layers.
LYCORIS_PARAMETERS = {
    LOHA: ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    LOKR: ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
}


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


def attach_lycoris(model: LoadedModel, components: dict[str, torch.nn.Module], weights: NetworkWeights, adapter: str) -> None:
    """Inject peft layers for each component the file patches, and copy the file's factors into them (shapes checked)."""
    from peft import inject_adapter_in_model

    for component, tensors in by_component(model, components, weights).items():
        module = components[component]
        config = _loha_config(tensors) if weights.format == LOHA else _lokr_config(tensors)
        inject_adapter_in_model(config, module, adapter_name=adapter)
        suffixes = LYCORIS_PARAMETERS[weights.format]
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
