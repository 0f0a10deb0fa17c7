"""Finding, loading and caching checkpoints.

The registry scans an A1111-style models directory (``models/Stable-diffusion``
single files, diffusers folders anywhere below ``models/``) plus the repo's
built-in models, and loads with diffusers from local files only. Loaded models
live in a small LRU cache; a failed load leaves the cache as it was.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .devices import pick_device, pick_dtype
from .errors import ModelError, UnsafeModelError
from .families import ModelFamily, detect_family
from .prompts import PromptEncoder

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILTIN_DIR = REPO_ROOT / "builtin"
DEFAULT_MODEL_NAME = "sfumato-demo"
CHECKPOINT_SUBDIR = "Stable-diffusion"
SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_CONFIGS = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    kind: str  # "diffusers", "single-file" or "pickle"
    builtin: bool = False

    @property
    def untrained(self) -> bool:
        return (self.path / "UNTRAINED").exists() if self.kind == "diffusers" else False


@dataclass
class LoadedModel:
    entry: ModelEntry
    pipeline: object
    family: ModelFamily
    device: torch.device
    dtype: torch.dtype
    prompt_encoder: PromptEncoder
    short_hash: str
    extras: dict = field(default_factory=dict)

    @property
    def unet_in_channels(self) -> int:
        return int(self.pipeline.unet.config.in_channels)

    @property
    def is_inpainting_model(self) -> bool:
        return self.unet_in_channels == 9

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.pipeline.vae.config.scaling_factor)


def _is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def file_short_hash(path: Path) -> str:
    """A1111's "Model hash": the first 10 hex digits of the file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def model_short_hash(entry: ModelEntry) -> str:
    if entry.kind != "diffusers":
        return file_short_hash(entry.path)
    weights = sorted((entry.path / "unet").glob("*.safetensors")) or sorted((entry.path / "unet").glob("*"))
    digest = hashlib.sha256()
    for weight in weights:
        if weight.is_file():
            digest.update(bytes.fromhex(file_short_hash(weight).ljust(10, "0")))
    return digest.hexdigest()[:10]


class ModelRegistry:
    """Knows which checkpoints exist and keeps a few of them loaded."""

    def __init__(self, models_dir: Path | str | None = None, builtin_dir: Path | str | None = BUILTIN_DIR,
                 device: str = "auto", dtype: str = "auto", cache_size: int = 2):
        self.models_dir = Path(models_dir) if models_dir else None
        self.builtin_dir = Path(builtin_dir) if builtin_dir else None
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self.cache_size = max(1, cache_size)
        self._entries: dict[str, ModelEntry] = {}
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.RLock()
        self.refresh()

    # -- discovery ---------------------------------------------------------
    def refresh(self) -> list[ModelEntry]:
        entries: dict[str, ModelEntry] = {}
        if self.builtin_dir and self.builtin_dir.is_dir():
            for folder in sorted(self.builtin_dir.iterdir()):
                if _is_diffusers_folder(folder):
                    entries[folder.name] = ModelEntry(folder.name, folder, "diffusers", builtin=True)
        if self.models_dir and self.models_dir.is_dir():
            for index_file in sorted(self.models_dir.rglob("model_index.json")):
                folder = index_file.parent
                entries[folder.relative_to(self.models_dir).as_posix()] = ModelEntry(folder.relative_to(self.models_dir).as_posix(), folder, "diffusers")
            checkpoints = self.models_dir / CHECKPOINT_SUBDIR
            if checkpoints.is_dir():
                for path in sorted(checkpoints.rglob("*")):
                    if path.suffix.lower() in SAFE_SUFFIXES + PICKLE_SUFFIXES and path.is_file():
                        kind = "single-file" if path.suffix.lower() in SAFE_SUFFIXES else "pickle"
                        name = path.relative_to(checkpoints).as_posix()
                        entries[name] = ModelEntry(name, path, kind)
        with self._lock:
            self._entries = entries
        return self.list()

    def list(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._entries.values())

    def names(self) -> list[str]:
        return [entry.name for entry in self.list()]

    def default_name(self) -> str:
        """The first user model when there is one, else the built-in demo model."""
        entries = self.list()
        user = [entry for entry in entries if not entry.builtin and entry.kind != "pickle"]
        if user:
            return user[0].name
        if DEFAULT_MODEL_NAME in self._entries:
            return DEFAULT_MODEL_NAME
        if entries:
            return entries[0].name
        raise ModelError("no models found: put a checkpoint in models/Stable-diffusion or run `python -m training.demo_model`")

    def get(self, name: str | None) -> ModelEntry:
        name = name or self.default_name()
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                # A1111 clients send titles like "name [hash]" or names without the suffix.
                stripped = name.split(" [")[0]
                entry = self._entries.get(stripped) or next(
                    (e for e in self._entries.values() if Path(e.name).stem == stripped or e.path.stem == stripped), None)
        if entry is None:
            raise ModelError(f"model {name!r} not found; available: {', '.join(self.names()) or 'none'}")
        return entry

    # -- loading -----------------------------------------------------------
    def loaded_names(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def load(self, name: str | None = None) -> LoadedModel:
        entry = self.get(name)
        with self._lock:
            if entry.name in self._loaded:
                self._loaded.move_to_end(entry.name)
                return self._loaded[entry.name]
            loaded = self._load_uncached(entry)
            self._loaded[entry.name] = loaded
            while len(self._loaded) > self.cache_size:
                self._loaded.popitem(last=False)
            return loaded

    def _load_uncached(self, entry: ModelEntry) -> LoadedModel:
        if entry.kind == "pickle":
            raise UnsafeModelError(
                f"{entry.path.name} is a pickle checkpoint ({entry.path.suffix}); pickles can run code when loaded, so "
                "Sfumato does not load them. Convert it to .safetensors with a trusted tool and put that file in "
                "models/Stable-diffusion instead."
            )
        try:
            pipeline = self._read_pipeline(entry)
        except ModelError:
            raise
        except Exception as error:  # diffusers raises many kinds for broken files
            raise ModelError(f"could not load model {entry.name!r}: {type(error).__name__}: {error}") from error
        pipeline.to(self.device)
        for module_name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            module = getattr(pipeline, module_name, None)
            if module is not None:
                module.eval().requires_grad_(False)
        family = detect_family(dict(pipeline.unet.config), entry.path if entry.kind == "diffusers" else None)
        is_xl = hasattr(pipeline, "text_encoder_2")
        return LoadedModel(
            entry=entry, pipeline=pipeline, family=family, device=self.device, dtype=self.dtype,
            prompt_encoder=PromptEncoder(pipeline, is_xl=is_xl), short_hash=model_short_hash(entry),
        )

    def _read_pipeline(self, entry: ModelEntry):
        from diffusers import DiffusionPipeline

        common = dict(local_files_only=True, dtype=self.dtype)
        if entry.kind == "diffusers":
            index = json.loads((entry.path / "model_index.json").read_text())
            extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
            return DiffusionPipeline.from_pretrained(entry.path, use_safetensors=True, **common, **extra)
        return self._read_single_file(entry, common)

    def _read_single_file(self, entry: ModelEntry, common: dict):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from safetensors import safe_open

        try:
            with safe_open(str(entry.path), framework="pt") as handle:
                keys = list(handle.keys())
        except Exception as error:
            raise ModelError(f"{entry.path.name} is not a readable safetensors file ({error})") from error
        is_xl = any(key.startswith("conditioner.embedders.1") for key in keys)
        config_dir = self._single_file_config(entry, "sdxl" if is_xl else "sd1")
        cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
        extra = {} if is_xl else {"safety_checker": None, "requires_safety_checker": False}
        return cls.from_single_file(str(entry.path), config=str(config_dir), **common, **extra)

    @staticmethod
    def _single_file_config(entry: ModelEntry, family: str) -> Path:
        """Configs live beside the checkpoint (``<name>.config/``) or in engine/configs/<family>."""
        for candidate in (entry.path.with_suffix(".config"), SINGLE_FILE_CONFIGS / family):
            if _is_diffusers_folder(candidate):
                return candidate
        raise ModelError(
            f"{entry.path.name} is a single-file {family} checkpoint but no local config was found; put a diffusers "
            f"config folder (model_index.json, */config.json, tokenizer files) at {entry.path.with_suffix('.config')}"
        )
