"""VAE files in ``models/VAE``, chosen per job as A1111's "SD VAE" setting chooses them.

The files are those in ``models/VAE`` and, as A1111 lists them too, ``*.vae.safetensors`` files among the
checkpoints. A choice is "Automatic" (A1111 1.x's rule: the first file, in natural name order, whose name
begins with the checkpoint's name, so ``my-model.vae.safetensors`` or ``my-model-vae.safetensors`` for
``my-model``; else the checkpoint's own), "None" (the checkpoint's own) or a file's name
(``name.safetensors``, as A1111 lists it, or its stem).

A file holds an ``AutoencoderKL`` in the original (CompVis ``ldm``) key layout, with or without the
``first_stage_model.`` prefix, or in diffusers' layout. It is converted with diffusers' own single-file
converter (``convert_ldm_vae_checkpoint``, what ``AutoencoderKL.from_single_file`` runs) into a module
built from the loaded checkpoint's VAE config, and loaded strictly: a weight missing from the file or
left over is an error naming the file, never a silently random layer. Loaded VAEs are cached; a job
swaps one in for its own duration (``swapped``) and the checkpoint's own is put back after, whatever
happens, so the checkpoint is never reloaded and "None" is the checkpoint's VAE bit for bit.

Only safetensors files are read; a pickled ``.pt``/``.ckpt`` VAE is known by name (so asking for it says why it
is refused) but never offered in the picker or ``/sd-vae``.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import ModelError, ValidationError
from ..fields import FIELDS, VAE_AUTOMATIC, VAE_NONE
from ..file_hashes import file_sha256

VAE_SUBDIR = "VAE"
AUTOMATIC, NONE = VAE_AUTOMATIC, VAE_NONE  # the "SD VAE" values that name no file (declared with the field)
SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")
LDM_PREFIX = "first_stage_model."
IGNORED_KEYS = ("model_ema.decay", "model_ema.num_updates")  # A1111 drops these and the training loss's weights
VAE_HASH_KEY = "VAE hash"  # A1111's infotext key, written just before "VAE" when a file replaced the checkpoint's own
SHORT_HASH_LENGTH = 10  # A1111's "VAE hash": the first 10 hex digits of the file's SHA-256


@dataclass(frozen=True)
class VaeFile:
    name: str  # the file's name with its extension, as A1111 lists and writes it ("VAE: name.safetensors")
    path: Path
    problem: str | None = None  # why it cannot be used, when that is known without reading it

    @property
    def stem(self) -> str:
        return self.name.rsplit(".", 1)[0]


@dataclass(frozen=True)
class VaeChoice:
    """The VAE one job decodes with: ``file`` None is the checkpoint's own."""

    file: VaeFile | None = None
    module: object | None = None
    short_hash: str | None = None


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _stat_key(path: Path) -> tuple:
    stat = path.stat()
    return (str(path), stat.st_size, stat.st_mtime_ns)


def read_vae_state(path: Path, config: dict) -> dict[str, torch.Tensor]:
    """A VAE file's weights in diffusers' layout for ``config``; ModelError naming the file when unreadable."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as error:  # noqa: BLE001 - safetensors raises several kinds for a damaged file
        raise ModelError(f"the VAE {path.name} is not a readable safetensors file (corrupt or truncated?): {error}") from error
    state = {key.removeprefix(LDM_PREFIX): value for key, value in state.items()
             if not key.removeprefix(LDM_PREFIX).startswith("loss") and key not in IGNORED_KEYS}
    if any(".up_blocks." in key or ".down_blocks." in key for key in state):
        return state  # already diffusers' layout
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    try:
        return convert_ldm_vae_checkpoint(state, dict(config))
    except Exception as error:  # noqa: BLE001 - the converter indexes keys it expects
        raise ModelError(f"the VAE {path.name} is not a VAE in the original or diffusers layout: "
                         f"{type(error).__name__}: {error}") from error


def load_vae(path: Path, like, device: torch.device | None = None) -> object:
    """An ``AutoencoderKL`` shaped like ``like`` (the checkpoint's VAE) with the file's weights, in ``like``'s
    dtype on ``device`` (default: ``like``'s), prepared as the model loader prepares the checkpoint's own;
    ModelError naming the file when its weights do not fit that shape."""
    from diffusers import AutoencoderKL

    from .. import cancellation
    from ..attention_calls import call_processors_directly

    state = read_vae_state(path, like.config)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(like.config)
    expected = set(vae.state_dict())
    missing, unused = expected - set(state), set(state) - expected
    if missing or unused:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights the model's VAE needs are missing ({', '.join(sorted(missing)[:3])})")
        if unused:
            parts.append(f"{len(unused)} weights have no place in it ({', '.join(sorted(unused)[:3])})")
        raise ModelError(f"the VAE {path.name} does not fit this model's VAE: " + "; ".join(parts))
    reference = next(like.parameters())
    try:
        vae.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:  # shapes: a VAE of another architecture (latent channels, widths)
        raise ModelError(f"the VAE {path.name} does not fit this model's VAE: {error}") from error
    target = torch.device(device or reference.device)
    loaded = next(vae.parameters())
    if loaded.device != target or loaded.dtype != reference.dtype:  # diffusers warns on every .to(), needed or not
        vae = vae.to(target, reference.dtype)
    vae = vae.eval().requires_grad_(False)
    call_processors_directly(vae)
    if getattr(like, "use_tiling", False):
        vae.enable_tiling()
    cancellation.install_checkpoints(vae)
    return vae


class VaeLibrary:
    """The VAE files under ``models/VAE``; loaded VAEs are cached (``cache_size`` of them)."""

    def __init__(self, folder: Path | str | None, cache_size: int = 2, checkpoints: Path | str | None = None,
                 also: tuple[Path | str, ...] = ()):
        self.folder = Path(folder) if folder else None
        self.also = tuple(Path(path) for path in also)  # ComfyUI's models/vae, listed like models/VAE
        self.checkpoints = Path(checkpoints) if checkpoints else None  # where ``*.vae.safetensors`` files count too
        self.cache_size = max(1, cache_size)
        self._lock = threading.Lock()
        self._files: dict[str, VaeFile] = {}
        self._loaded: OrderedDict[tuple, object] = OrderedDict()
        self.refresh()

    def refresh(self) -> list[VaeFile]:
        files: dict[str, VaeFile] = {}
        found = []
        for root, pattern in ((self.folder, "*"), *((path, "*") for path in self.also), (self.checkpoints, "*.vae.*")):
            if root and root.is_dir():
                found += [(root, path) for path in sorted(root.rglob(pattern))]
        for root, path in found:
            relative = path.relative_to(root)
            suffix = path.suffix.lower()
            if not path.is_file() or any(part.startswith(".") for part in relative.parts):
                continue
            if suffix in SAFE_SUFFIXES:
                files.setdefault(path.name, VaeFile(path.name, path))
            elif suffix in PICKLE_SUFFIXES:
                files.setdefault(path.name, VaeFile(path.name, path, problem=(
                    f"{path.name} is a pickle, which can run code when loaded, so Sfumato never loads it; "
                    "convert it to .safetensors")))
        with self._lock:
            self._files = files
        return self.files()

    def files(self) -> list[VaeFile]:
        """In A1111's natural order: by name, numbers by value (``v2`` before ``v10``)."""
        with self._lock:
            return sorted(self._files.values(), key=lambda file: _natural_key(file.name))

    def names(self) -> list[str]:
        return [file.name for file in self.files()]

    def choices(self) -> list[str]:
        """What a picker offers: Automatic, None, then every usable file."""
        return [AUTOMATIC, NONE] + [file.name for file in self.files() if file.problem is None]

    def find(self, name: str) -> VaeFile:
        """The file a name means: its name, its stem, or its path under models/VAE."""
        files = self.files()
        for candidate in files:
            if name in (candidate.name, candidate.stem) or any(
                    folder and candidate.path.is_relative_to(folder) and name == candidate.path.relative_to(folder).as_posix()
                    for folder in (self.folder, *self.also)):
                return candidate
        raise ValidationError("vae", f"no VAE named {name!r} in models/VAE; choose {AUTOMATIC}, {NONE}"
                                     + (f" or one of {', '.join(file.name for file in files)}" if files else ""))

    def resolve(self, choice: str | None, checkpoint_name: str, checkpoint_path: Path | None = None) -> VaeFile | None:
        """The file a job's choice means for this checkpoint (None: the checkpoint's own VAE)."""
        choice = choice or AUTOMATIC
        if choice == NONE:
            return None
        if choice != AUTOMATIC:
            return self.find(choice)
        stem = checkpoint_path.name.rsplit(".", 1)[0] if checkpoint_path is not None else checkpoint_name
        for file in self.files():
            if file.problem is None and file.name.startswith(stem):
                return file
        return None

    def short_hash(self, file: VaeFile) -> str:
        """The file's short hash, computed once per version of the file (``file_hashes`` remembers it)."""
        return file_sha256(file.path)[:SHORT_HASH_LENGTH]

    def load(self, file: VaeFile, like, device: torch.device | None = None) -> object:
        """The file's VAE shaped like ``like`` on ``device``, from the cache when the file is unchanged."""
        if file.problem:
            raise ModelError(file.problem)
        try:
            key = _stat_key(file.path) + (json.dumps(dict(like.config), sort_keys=True, default=str),
                                          str(device or next(like.parameters()).device), str(next(like.parameters()).dtype))
        except OSError as error:
            raise ModelError(f"the VAE {file.name} cannot be read: {error.strerror or error}") from error
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
        vae = load_vae(file.path, like, device)
        with self._lock:
            self._loaded[key] = vae
            while len(self._loaded) > self.cache_size:
                self._loaded.popitem(last=False)
        return vae

    def choose(self, choice: str | None, model) -> VaeChoice:
        """The VAE a job uses on ``model`` (an ``engine.models.LoadedModel``), loaded."""
        entry = model.entry
        file = self.resolve(choice, entry.name, entry.path if entry.kind != "diffusers" else None)
        if file is None:
            return VaeChoice()
        # On the model's device even when the checkpoint's components are offloaded to the CPU between uses
        # (no offload hooks move this one), as the decode runs there.
        module = self.load(file, model.extras.get("checkpoint_vae", model.pipeline.vae), model.device)
        return VaeChoice(file, module, self.short_hash(file))


@contextmanager
def swapped(pipeline, vae, own) -> Iterator[None]:
    """``pipeline.vae`` is ``vae`` inside the block and ``own`` (the checkpoint's VAE) after it.

    Both are set outright rather than remembered from the pipeline, so a job never takes over a VAE
    another job left in place (one abandoned on a stalled compute thread, say)."""
    pipeline.vae = vae
    try:
        yield
    finally:
        pipeline.vae = own

def infotext_problems(params: dict[str, str], library: VaeLibrary) -> list[str]:
    """What a picture's ``VAE`` and ``VAE hash`` say that this studio cannot reproduce: the file missing
    here, or a file of that name with other contents."""
    name = params.get(FIELDS["vae"].infotext)
    if not isinstance(name, str) or name in (AUTOMATIC, NONE, ""):
        return []
    try:
        file = library.find(name)
    except ValidationError:
        return [f"the VAE {name} is not in models/VAE"]
    wanted = params.get(VAE_HASH_KEY)
    if isinstance(wanted, str) and wanted.strip():
        here = library.short_hash(file)
        if here != wanted.strip().lower()[:SHORT_HASH_LENGTH]:
            return [f"the VAE {name} here (hash {here}) is not the file the picture used (hash {wanted.strip()})"]
    return []
