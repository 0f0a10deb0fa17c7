"""Which files make up one flow model: the checkpoint's own components, then split files for what it lacks.

For each text encoder slot and the VAE: the checkpoint's own weights when it holds them; else the files the
request names (Forge's ``forge_additional_modules``); else, when the module folders hold exactly one file that
fits (the right kind of encoder, of the width the model's config needs, or a VAE of its latent channels), that
one. A name hint in the file name ("clip_l", "clip_g", "t5") settles two files of one kind and width. Anything
that does not fit is a ``ModelError`` naming the file and what is wrong, before any weight is read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError
from . import folders
from .layout import FileLayout, TextEncoderSlot
from .tensors import shape_reader, tensor_names

class ModuleError(ModelError):
    """The text encoder or VAE files for a model are missing, ambiguous, unfit or unreadable: a problem of the
    picks or the module folders, not of the model's own file (which is not marked broken for it)."""


VAE_LATENT_WEIGHT = "decoder.conv_in.weight"  # in both the original and diffusers' VAE layouts: [ch, latent channels, 3, 3]


@dataclass(frozen=True)
class Source:
    """One component's weights: a file, and the key prefix they sit under there ("" for a file of its own)."""

    path: Path
    prefix: str = ""


@dataclass(frozen=True)
class Parts:
    transformer: Source
    vae: Source
    text_encoders: dict[str, Source | None]  # slot component -> weights (None: an optional encoder left out)
    tokenizer_folders: dict[str, Path] = field(default_factory=dict)  # tokenizer component -> a <file>.tokenizer/ folder

    def module_files(self) -> tuple[Path, ...]:
        """The files besides the checkpoint, in slot order then the VAE (they name the loaded model in the cache)."""
        own = self.transformer.path
        files = [source.path for source in self.text_encoders.values() if source is not None] + [self.vae.path]
        return tuple(dict.fromkeys(path for path in files if path != own))


def _strip(keys: set[str], slot: TextEncoderSlot) -> tuple[set[str], str]:
    """Names without a wrapper prefix some files keep (``transformer.``), and that prefix."""
    if slot.marker in keys:
        return keys, ""
    for wrapper in slot.wrappers:
        if wrapper + slot.marker in keys:
            return {key[len(wrapper):] for key in keys if key.startswith(wrapper)}, wrapper
    return keys, ""


def _config(config_dir: Path, component: str) -> dict:
    return json.loads((config_dir / component / "config.json").read_text(encoding="utf-8"))


class _Files:
    """Module files with their tensor names, read once per resolution."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self._names: dict[Path, set[str]] = {}

    def names(self, path: Path) -> set[str]:
        if path not in self._names:
            self._names[path] = set(tensor_names(path))
        return self._names[path]


def _slot_fit(slot: TextEncoderSlot, path: Path, names: set[str], width: int) -> tuple[str | None, str]:
    """(None, prefix) when the file holds this slot's encoder at the needed width; else (why not, "")."""
    stripped, prefix = _strip(names, slot)
    if slot.marker not in stripped:
        return f"{path.name} holds no {slot.title} text encoder", ""
    found = shape_reader(path)(prefix + slot.width_key)[-1]
    if found != width:
        return (f"{path.name} is a {slot.title}-kind text encoder of width {found}, but this model's {slot.component} "
                f"needs width {width} (a different model's encoder?)"), ""
    return None, prefix


def _vae_fit(path: Path, names: set[str], latent_channels: int, prefix: str = "") -> str | None:
    key = prefix + VAE_LATENT_WEIGHT
    if key not in names:
        return f"{path.name} holds no VAE decoder ({VAE_LATENT_WEIGHT})"
    found = shape_reader(path)(key)[1]
    if found != latent_channels:
        return (f"{path.name} is a VAE for {found}-channel latents, but this model draws {latent_channels}-channel latents "
                "(a VAE of another family)")
    return None


def _hinted(slot: TextEncoderSlot, paths: list[Path]) -> list[Path]:
    named = [path for path in paths if any(hint in path.name.lower() for hint in slot.name_hints)]
    return named or paths


def resolve(model: Path, keys: set[str], layout: FileLayout, config_dir: Path, models_dir: Path | None,
            picks: tuple[str, ...] = (), fallback_vae: str | None = None, model_title: str = "") -> Parts:
    """The files one flow model loads from. ``picks`` name text encoder and VAE files (a file name, stem or path)
    that replace the checkpoint's own; ``fallback_vae`` (the "SD VAE" choice) is used only by a model with no VAE."""
    title = model_title or model.name
    _, transformer_prefix = layout.transformer_names(keys)
    encoder_files = _Files(folders.text_encoder_files(models_dir))
    vae_files = _Files(folders.vae_files(models_dir))
    everything = encoder_files.paths + vae_files.paths
    picked: list[Path] = []
    for name in picks:
        path = folders.find_module(name, everything, models_dir)
        if path is None:
            where = ", ".join(f"models/{d}" for d in folders.TEXT_ENCODER_DIRS + folders.VAE_DIRS)
            raise ModuleError(f"the module {name!r} is not a text encoder or VAE file in {where}")
        picked.append(path)
    used: set[Path] = set()
    files = _Files(list(dict.fromkeys(picked + everything)))

    encoders: dict[str, Source | None] = {}
    index = json.loads((config_dir / "model_index.json").read_text(encoding="utf-8"))
    for slot in layout.text_encoders:
        if slot.optional and not (index.get(slot.component) or [None])[0]:
            encoders[slot.component] = None  # the model's config leaves this encoder out (an SD 3.5 folder without T5)
            continue
        width = int(_config(config_dir, slot.component)[slot.width_config])
        fits = []
        for path in picked:  # a named file replaces the checkpoint's own encoder, as in Forge
            stripped = _strip(files.names(path), slot)[0]
            if slot.marker not in stripped or path in used:
                continue
            why, prefix = _slot_fit(slot, path, files.names(path), width)
            if why is not None:
                raise ModuleError(f"{title}: {why}")
            fits.append((path, prefix))
        if len(fits) > 1:
            fits = [fit for fit in fits if fit[0] in _hinted(slot, [path for path, _ in fits])]
        if fits:
            choice = fits[0]
        elif any(key.startswith(slot.prefix) for key in keys):
            encoders[slot.component] = Source(model, slot.prefix)
            continue
        else:  # nothing named for this slot: the one file in the folders that fits
            candidates, unfit = [], []
            for path in encoder_files.paths:
                why, prefix = _slot_fit(slot, path, encoder_files.names(path), width)
                if why is None and path not in used:
                    candidates.append((path, prefix))
                elif why is not None and slot.marker in _strip(encoder_files.names(path), slot)[0]:
                    unfit.append((path, why))
            meant = [why for path, why in unfit if any(hint in path.name.lower() for hint in slot.name_hints)]
            if not candidates and meant:  # the file named for this slot is there, but of another model's width
                raise ModuleError(f"{title}: {meant[0]}")
            if len(candidates) > 1:
                hinted = _hinted(slot, [path for path, _ in candidates])
                candidates = [fit for fit in candidates if fit[0] in hinted]
            if len(candidates) > 1:
                raise ModuleError(
                    f"{title} needs a {slot.title} text encoder and several files fit "
                    f"({', '.join(path.name for path, _ in candidates)}); name one (--text-encoder, or "
                    "forge_additional_modules in the API)")
            choice = candidates[0] if candidates else None
        if choice is None:
            if slot.optional:
                encoders[slot.component] = None
                continue
            raise ModuleError(
                f"{title} holds no {slot.title} text encoder and none of width {width} was found: put its file "
                f"(e.g. {slot.name_hints[0]}.safetensors) in models/text_encoder (or models/text_encoders, models/clip)")
        used.add(choice[0])
        encoders[slot.component] = Source(*choice)

    latent_channels = int(_config(config_dir, "vae")["latent_channels"])
    vae = None
    named = [path for path in picked if path not in used]
    if not named and fallback_vae and layout.vae_prefix + VAE_LATENT_WEIGHT not in keys:
        path = folders.find_module(fallback_vae, vae_files.paths, models_dir)
        named = [path] if path is not None else []
    for path in named:
        names = files.names(path) if path in files.paths else vae_files.names(path)
        prefix = layout.vae_prefix if layout.vae_prefix + VAE_LATENT_WEIGHT in names else ""
        why = _vae_fit(path, names, latent_channels, prefix)
        if why is not None:
            raise ModuleError(f"{title}: {why}")
        vae = Source(path, prefix)
        break
    if vae is None and layout.vae_prefix + VAE_LATENT_WEIGHT in keys:
        vae = Source(model, layout.vae_prefix)
    if vae is None:
        candidates = []
        for path in vae_files.paths:
            names = vae_files.names(path)
            prefix = layout.vae_prefix if layout.vae_prefix + VAE_LATENT_WEIGHT in names else ""
            if _vae_fit(path, names, latent_channels, prefix) is None:
                candidates.append(Source(path, prefix))
        if len(candidates) > 1:
            raise ModuleError(f"{title} needs a VAE and several files fit ({', '.join(s.path.name for s in candidates)}); "
                             "name one (--vae, or forge_additional_modules in the API)")
        if not candidates:
            raise ModuleError(f"{title} holds no VAE and no VAE for {latent_channels}-channel latents was found: put "
                             "its file in models/VAE (or models/vae)")
        vae = candidates[0]
    used.add(vae.path)
    unused = [path for path in picked if path not in used]
    if unused:
        raise ModuleError(f"{title} has no place for {', '.join(path.name for path in unused)}: it fits none of the model's "
                         "text encoders or its VAE")
    tokenizers = {}
    for slot in layout.text_encoders:
        source = encoders.get(slot.component)
        if source is not None and source.path != model:
            folder = source.path.with_name(source.path.stem + folders.TOKENIZER_SUFFIX)
            if folder.is_dir():
                tokenizers[slot.tokenizer] = folder
    return Parts(Source(model, transformer_prefix), vae, encoders, tokenizers)
