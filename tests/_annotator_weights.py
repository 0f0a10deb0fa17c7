"""Random-weight annotator files in the key layout of the real ones, so controlnet_aux's own loading code runs offline.

Each recipe builds the network class controlnet_aux loads the file into, and
saves its state dict the way the published file is laid out: plain,
``module.``-prefixed (saved from DataParallel), without the enclosing block's
name (openpose), or wrapped in a dict (``state_dict``, ``model``, ``depth_model``).
"""
from __future__ import annotations

import functools
import importlib
import types
from pathlib import Path

import torch


def _aux(pre, dotted: str, borrows_torchvision: bool = False):
    pre.aux_module(dotted.split(".")[0], borrows_torchvision)
    return importlib.import_module(f"{pre._AUX_PACKAGE}.{dotted}")


def _prefixed(state: dict, prefix: str = "module.") -> dict:
    return {prefix + key: value for key, value in state.items()}


def _without_first_part(state: dict) -> dict:
    """The openpose files name layers without the block they sit in (``conv1_1.weight``, not ``model0.conv1_1.weight``)."""
    return {key.split(".", 1)[1]: value for key, value in state.items()}


def write_random_weights(pre, folder: Path, *files: str) -> None:
    """Each file as the real one is laid out: plain state dict, ``module.``-prefixed, or wrapped in a dict."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for file in files:
        if file == "ControlNetHED.pth":
            content = _aux(pre, "hed").ControlNetHED_Apache2().state_dict()
        elif file == "table5_pidinet.pth":
            content = {"state_dict": _prefixed(_aux(pre, "pidi").pidinet().state_dict())}
        elif file in ("sk_model.pth", "sk_model2.pth"):
            content = _aux(pre, "lineart").Generator(3, 1, 3).state_dict()
        elif file == "netG.pth":
            norm = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
            content = _prefixed(_aux(pre, "lineart_anime").UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False).state_dict())
        elif file in ("7_model.pth", "MTEED.pth"):
            content = _aux(pre, "teed.ted").TED().state_dict()
        elif file == "mlsd_large_512_fp32.pth":
            content = _aux(pre, "mlsd").MobileV2_MLSD_Large().state_dict()
        elif file == "body_pose_model.pth":
            content = _without_first_part(_aux(pre, "open_pose.model", True).bodypose_model().state_dict())
        elif file == "scannet.pt":
            args = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4, importance_ratio=0.7)
            content = {"model": _prefixed(_aux(pre, "normalbae", True).NNET(args).state_dict())}
        elif file == "res101.pth":
            content = {"depth_model": _prefixed(_aux(pre, "leres", True).RelDepthModel(backbone="resnext101").state_dict())}
        else:
            raise AssertionError(f"no random-weight recipe for {file}")
        torch.save(content, folder / file)
