"""Finding ControlNet models, telling which base model each fits, and loading them (cached).

Where they come from (A1111 layout):

- ``<models_dir>/ControlNet/<name>/config.json`` + weights: a diffusers folder;
- ``<models_dir>/ControlNet/<name>.safetensors``: a single file, in the original
  (lllyasviel) layout or the diffusers one. Its config comes from a sibling
  ``<name>.config/config.json`` when present, else from the shipped
  ``configs/<family>/config.json`` picked by the file's own keys;
- ``builtin/*controlnet*/`` folders shipped with the app.

Everything loads with ``local_files_only=True``; pickles (.pth/.ckpt/.bin/.pt)
are never unpickled, only listed as skipped.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine import families
from engine.attention_calls import call_processors_directly
from engine.errors import ModelError

CONTROLNET_SUBDIR = "ControlNet"
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
PICKLE_SUFFIXES = (".pth", ".ckpt", ".pt", ".bin")


@dataclass(frozen=True)
class ControlNetEntry:
    name: str
    path: Path
    kind: str  # "diffusers" or "single-file"
    builtin: bool = False


def _is_diffusers_controlnet(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        return "ControlNet" in str(json.loads(config.read_text()).get("_class_name", "ControlNetModel"))
    except (OSError, ValueError):
        return False


def find_controlnets(models_dir: Path | None, builtin_dir: Path | None) -> dict[str, ControlNetEntry]:
    """Every installed ControlNet by name: user models first in name order, then the built-in ones."""
    entries: dict[str, ControlNetEntry] = {}
    root = Path(models_dir) / CONTROLNET_SUBDIR if models_dir else None
    if root is not None and root.is_dir():
        folders = sorted(config.parent for config in root.rglob("config.json") if _is_diffusers_controlnet(config.parent))
        for folder in folders:
            if folder.suffix == ".config":
                continue  # the config folder of a single file, not a model
            name = folder.relative_to(root).as_posix()
            entries[name] = ControlNetEntry(name, folder, "diffusers")
        for path in sorted(root.rglob("*.safetensors")):
            if any(parent in folders or parent.suffix == ".config" for parent in path.parents):
                continue  # weights inside a diffusers folder
            name = path.relative_to(root).with_suffix("").as_posix()
            entries.setdefault(name, ControlNetEntry(name, path, "single-file"))
    if builtin_dir and Path(builtin_dir).is_dir():
        for folder in sorted(Path(builtin_dir).iterdir()):
            if "controlnet" in folder.name.lower() and _is_diffusers_controlnet(folder):
                entries.setdefault(folder.name, ControlNetEntry(folder.name, folder, "diffusers", builtin=True))
    return entries


def skipped_pickles(models_dir: Path | None) -> list[Path]:
    """ControlNet pickle files that are not offered (convert them to .safetensors to use them)."""
    root = Path(models_dir) / CONTROLNET_SUBDIR if models_dir else None
    if root is None or not root.is_dir():
        return []
    return sorted(path for path in root.rglob("*") if path.suffix.lower() in PICKLE_SUFFIXES and path.is_file())


def resolve(name: str, entries: dict[str, ControlNetEntry]) -> ControlNetEntry | None:
    """An entry by exact name, by A1111's ``name [hash]`` title, or by file stem."""
    if name in entries:
        return entries[name]
    stripped = name.split(" [")[0].strip()
    if stripped in entries:
        return entries[stripped]
    return next((entry for entry in entries.values() if Path(entry.name).name == stripped or entry.path.stem == stripped), None)


# --- which base model a ControlNet fits ----------------------------------------------------

def _single_file_keys(path: Path) -> tuple[list[str], Any]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as error:  # noqa: BLE001 - safetensors raises its own types
        raise ModelError(f"{path.name} is not a readable safetensors file ({error})") from error
    return list(handle.keys()), handle


def _original_family(keys: list[str], handle: Any) -> str:
    """The base model family an original-layout ControlNet was made for, asked of the families: the
    ControlNet copies the UNet's encoder half, under ``control_model.`` or with no prefix."""
    prefix = "control_model." if any(key.startswith("control_model.") for key in keys) else ""
    return families.detect_unet_keys(keys, lambda key: list(handle.get_slice(key).get_shape()), prefix).id


def single_file_config(path: Path) -> Path:
    """The diffusers config folder for a single-file ControlNet: ``configs/<family id>`` (engine.families)."""
    sibling = path.with_suffix(".config")
    if (sibling / "config.json").is_file():
        return sibling
    keys, handle = _single_file_keys(path)
    if any(key.startswith("controlnet_cond_embedding.") for key in keys):
        raise ModelError(f"{path.name} holds diffusers-layout weights but no config; put its config.json in {sibling}/")
    return CONFIGS_DIR / _original_family(keys, handle)


def read_config(entry: ControlNetEntry) -> dict:
    folder = entry.path if entry.kind == "diffusers" else single_file_config(entry.path)
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ModelError(f"ControlNet {entry.name}: cannot read its config ({error})") from error


def _width(config: dict) -> int | None:
    """The width the control model's residuals must have: a UNet's text width, a transformer's hidden width."""
    if "attention_head_dim" in config and "num_attention_heads" in config and "cross_attention_dim" not in config:
        return int(config["attention_head_dim"]) * int(config["num_attention_heads"])
    return config.get("cross_attention_dim")


def fits(config: dict, denoiser_config: Any) -> bool:
    """Whether a ControlNet (by its config) was made for this denoiser (UNet or flow transformer): the same family,
    of the same width."""
    denoiser = dict(denoiser_config)
    try:
        same_family = type(families.detect_family(config)) is type(families.detect_family(denoiser))
    except ValueError:
        return False
    return same_family and _width(config) == _width(denoiser)


def fitting(entries: dict[str, ControlNetEntry], unet_config: Any) -> list[ControlNetEntry]:
    found = []
    for entry in entries.values():
        try:
            if fits(read_config(entry), unet_config):
                found.append(entry)
        except ModelError:
            continue
    return found


# --- loading -------------------------------------------------------------------------------------

class ControlNetCache:
    """A few loaded ControlNets, keyed by file, device and dtype; a failed load leaves it as it was."""

    def __init__(self, size: int = 3):
        self.size = max(1, size)
        self._loaded: OrderedDict[tuple, torch.nn.Module] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, entry: ControlNetEntry, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        key = (str(entry.path), entry.path.stat().st_mtime_ns if entry.path.exists() else 0, str(device), str(dtype))
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            model = load_controlnet(entry, device, dtype)
            self._loaded[key] = model
            while len(self._loaded) > self.size:
                self._loaded.popitem(last=False)
            return model

    def clear(self) -> None:
        with self._lock:
            self._loaded.clear()


# The diffusers classes a control model's config may name: a UNet ControlNet, and the flow transformers' own.
MODEL_CLASSES = ("ControlNetModel", "SD3ControlNetModel", "FluxControlNetModel")


def model_class(config: dict):
    """The diffusers class of a ControlNet, from its config's ``_class_name``."""
    import diffusers

    name = str(config.get("_class_name", "ControlNetModel"))
    if name not in MODEL_CLASSES:
        raise ModelError(f"a {name} is not a control model Sfumato runs ({', '.join(MODEL_CLASSES)})")
    return getattr(diffusers, name)


def load_controlnet(entry: ControlNetEntry, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    try:
        model_type = model_class(read_config(entry))
        if entry.kind == "diffusers":
            model = model_type.from_pretrained(entry.path, local_files_only=True, dtype=dtype)
        else:
            config_dir = single_file_config(entry.path)
            keys, _ = _single_file_keys(entry.path)
            if model_type.__name__ != "ControlNetModel" or any(key.startswith("controlnet_cond_embedding.") for key in keys):
                # diffusers-layout weights with their config beside them; transformer ControlNets come only so
                # (diffusers' single-file loader knows no original layout for them).
                from safetensors.torch import load_file

                model = model_type.from_config(model_type.load_config(config_dir))
                model.load_state_dict(load_file(str(entry.path)))
                model = model.to(dtype)
            else:
                model = model_type.from_single_file(str(entry.path), config=str(config_dir), local_files_only=True, dtype=dtype)
    except ModelError:
        raise
    except Exception as error:  # diffusers raises many kinds for broken files
        raise ModelError(f"could not load ControlNet {entry.name!r}: {type(error).__name__}: {error}") from error
    call_processors_directly(model)
    return model.to(device).eval().requires_grad_(False)
