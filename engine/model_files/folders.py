"""The folders Forge and ComfyUI keep model parts in, under one ``models/`` directory.

A1111 keeps whole checkpoints in ``models/Stable-diffusion``; Forge adds ``models/text_encoder`` and takes a
transformer alone in ``models/Stable-diffusion``; ComfyUI keeps transformers in ``models/diffusion_models``
(formerly ``models/unet``), text encoders in ``models/text_encoders`` (formerly ``models/clip``) and VAEs in
``models/vae``. Sfumato reads all of them, so one ``models/`` folder can be shared with either tool.
"""
from __future__ import annotations

from pathlib import Path

CHECKPOINT_DIRS = ("Stable-diffusion", "diffusion_models", "unet")  # whole checkpoints, or a transformer alone
TEXT_ENCODER_DIRS = ("text_encoder", "text_encoders", "clip")
VAE_DIRS = ("VAE", "vae")
TRANSFORMER_SUFFIXES = (".safetensors", ".gguf")  # GGUF: quantized transformers (city96's layout)
MODULE_SUFFIXES = (".safetensors",)
TOKENIZER_SUFFIX = ".tokenizer"  # models/text_encoder/<name>.tokenizer/ holds the tokenizer a text encoder file lacks


def files_in(models_dir: Path | None, subdirs: tuple[str, ...], suffixes: tuple[str, ...]) -> list[Path]:
    """The files with one of ``suffixes`` below the named subfolders, each once (``VAE`` and ``vae`` may be one
    folder on a case-insensitive disk), skipping hidden folders and ``.config``/``.tokenizer`` folders."""
    if models_dir is None:
        return []
    seen: dict[Path, Path] = {}
    for subdir in subdirs:
        root = models_dir / subdir
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            inside = path.relative_to(root).parts[:-1]
            if (path.suffix.lower() in suffixes and path.is_file()
                    and not any(part.startswith(".") or part.endswith((".config", TOKENIZER_SUFFIX)) for part in inside)):
                seen.setdefault(path.resolve(), path)
    return list(seen.values())


def text_encoder_files(models_dir: Path | None) -> list[Path]:
    return files_in(models_dir, TEXT_ENCODER_DIRS, MODULE_SUFFIXES)


def vae_files(models_dir: Path | None) -> list[Path]:
    return files_in(models_dir, VAE_DIRS, MODULE_SUFFIXES)


def module_files(models_dir: Path | None) -> list[Path]:
    """Every text encoder and VAE file a split model may be given (Forge's "VAE / Text Encoder" list)."""
    return text_encoder_files(models_dir) + vae_files(models_dir)


def find_module(name: str, files: list[Path], models_dir: Path | None) -> Path | None:
    """The file a pick names: its file name, its stem, its path under ``models/`` or under its folder, or a full
    path (Forge's API sends those) that is one of ``files``. Names are looked up, never opened as paths."""
    wanted = name.replace("\\", "/").strip()
    for path in files:
        spellings = {path.name, path.stem, path.as_posix(), str(path.resolve())}
        if models_dir is not None:
            relative = path.relative_to(models_dir).as_posix()
            spellings |= {relative, relative.split("/", 1)[1] if "/" in relative else relative}
        if wanted in spellings:
            return path
    return None
