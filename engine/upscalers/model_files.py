"""Model upscaler files (ESRGAN, Real-ESRGAN, SwinIR, DAT, … in any layout spandrel knows), as A1111's Extras runs them.

Where: ``models/ESRGAN``, ``models/RealESRGAN``, ``models/SwinIR``, ``models/DAT`` (A1111's folders) and
``models/upscale_models`` (ComfyUI's), subfolders included; ``.pth``, ``.pt`` and ``.safetensors`` files, named by
their stem as A1111 lists them.

Reading is ours, never spandrel's file loader: ``.safetensors`` through safetensors, ``.pth``/``.pt`` through
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers (spandrel would
``torch.jit.load`` a ``.pt``, and TorchScript archives carry code). spandrel then detects the architecture from the
keys and builds the network (``ModelLoader().load_from_state_dict``).

Running, after A1111 1.10 (``modules/upscaler.py``, ``modules/upscaler_utils.py``):
- the model runs at its native scale, pass after pass (at most :data:`MAX_PASSES`) until the image reaches the
  target, stopping early if a pass does not grow it; a Lanczos resize then gives exactly width × height;
- the image goes in as BGR in [0, 1] and comes out clamped, ×255, rounded (A1111 feeds its models BGR, the
  original ESRGAN's training order);
- an image larger than one tile is cut into :data:`TILE_SIZE` tiles overlapping by at least :data:`TILE_OVERLAP`
  pixels (A1111's ESRGAN defaults), spread evenly as A1111's ``split_grid`` spreads them; each tile's output is
  weighted by a linear ramp across the overlaps it shares and the weighted sum normalised, so seams blend and
  memory holds one tile's activations plus the output canvas, whatever the image size.
"""
from __future__ import annotations

import functools
import math
import re
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .. import cancellation
from ..errors import ModelError
from .torchvision_stand_in import import_spandrel

UPSCALER_SUBDIRS = ("ESRGAN", "RealESRGAN", "SwinIR", "DAT", "upscale_models")
SUFFIXES = (".pth", ".pt", ".safetensors")
TILE_SIZE = 192  # A1111's "Tile size for ESRGAN upscalers" default (input pixels)
TILE_OVERLAP = 8  # A1111's "Tile overlap for ESRGAN upscalers" default (input pixels)
MAX_PASSES = 3  # A1111's Upscaler.upscale runs the model at most this many times
LOADED_CACHE_SIZE = 2
# Architectures spandrel knows that are not image-to-image upscalers: refused with the reason.
NOT_UPSCALERS = {"LaMa": "an inpainting model", "MAT": "an inpainting model", "GFPGAN": "a face restorer",
                 "RestoreFormer": "a face restorer", "CodeFormer": "a face restorer", "DDColor": "a colorizer"}
_SCALE_IN_NAME = re.compile(r"(?:^|[^0-9a-z])(\d)x|x(\d)(?:[^0-9]|$)", re.IGNORECASE)


@dataclass(frozen=True)
class UpscalerFile:
    name: str  # the file's stem, as A1111 lists it
    path: Path
    architecture: str | None = None  # spandrel's id, when the keys were recognised
    problem: str | None = None  # why it cannot be used, found without running it

    @property
    def scale_from_name(self) -> int | None:
        """The factor a name like ``4x-UltraSharp`` or ``RealESRGAN_x4plus`` announces (what /upscalers reports
        before the file is loaded)."""
        match = _SCALE_IN_NAME.search(self.name)
        return int(match.group(1) or match.group(2)) if match else None


def find_files(models_dir: Path | None) -> list[Path]:
    """Every upscaler file under the known folders, in folder order then path order; hidden paths skipped."""
    found = []
    for subdir in UPSCALER_SUBDIRS:
        root = models_dir / subdir if models_dir else None
        if root is None or not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root)
            if (path.suffix.lower() in SUFFIXES and path.is_file()
                    and not any(part.startswith(".") for part in relative.parts)):
                found.append(path)
    return found


class _SafetensorsKeys(Mapping):
    """A safetensors file's tensors by name, each read only when asked for (detection reads keys alone)."""

    def __init__(self, handle):
        self._handle, self._keys = handle, list(handle.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error:\s*(.+)")


def _reason(error: Exception) -> str:
    """The useful line of a loader's error (torch's weights-only refusal wraps it in a page of advice)."""
    text = str(error)
    match = _UNPICKLER_REASON.search(text)
    line = match.group(1).strip() if match else text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(error).__name__}: {line[:300]}"


def _unreadable(path: Path, error: Exception) -> ModelError:
    return ModelError(f"the upscaler {path.name} cannot be read (corrupt, truncated, or not a weights file): {_reason(error)}")


def read_state_dict(path: Path, lazy: bool = False) -> Mapping[str, torch.Tensor]:
    """The file's tensors, read safely; ``lazy`` maps the file instead of reading it (enough to detect a layout).

    ModelError naming the file when it cannot be read, or when a pickle holds anything but tensors."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            return _SafetensorsKeys(safe_open(str(path), framework="pt")) if lazy else load_file(str(path))
        except Exception as error:  # noqa: BLE001 - safetensors raises several kinds for a damaged file
            raise _unreadable(path, error) from error
    try:
        # mmap reads only what is touched, but only the zip format (torch ≥ 1.6) can be mapped: the original
        # ESRGAN releases are older, and are read whole
        mappable = lazy and zipfile.is_zipfile(path)
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mappable)
    except Exception as error:  # noqa: BLE001 - torch.load raises many kinds for damaged or unsafe files
        if "Unsupported global" in str(error):  # a class or function to call: refused before running it
            raise ModelError(f"the upscaler {path.name} is a pickle holding more than weights (code or custom "
                             "classes), which Sfumato never unpickles; convert it to .safetensors") from error
        raise _unreadable(path, error) from error
    if not isinstance(state, Mapping):
        raise ModelError(f"the upscaler {path.name} holds a {type(state).__name__}, not a dictionary of weights")
    return state


def _detect(path: Path, state: Mapping) -> str:
    """spandrel's architecture id for these keys; ModelError naming the file when none fits or it is no upscaler."""
    spandrel = import_spandrel()
    state = spandrel.canonicalize_state_dict(state)
    for support in spandrel.MAIN_REGISTRY.architectures("detection"):
        if support.detect(state):
            arch = str(support.architecture.id)
            if arch in NOT_UPSCALERS:
                raise ModelError(f"the upscaler {path.name} is {NOT_UPSCALERS[arch]} ({arch}), not an upscaler")
            return arch
    raise ModelError(f"the upscaler {path.name} is no architecture spandrel {spandrel.__version__} recognises "
                     "(ESRGAN, Real-ESRGAN, SwinIR, DAT, HAT, SPAN, Compact, …)")


def inspect_file(path: Path) -> UpscalerFile:
    """The file as the list shows it: its architecture, or why it cannot be used (the weights are not built)."""
    try:
        return UpscalerFile(path.stem, path, architecture=_detect(path, read_state_dict(path, lazy=True)))
    except ModelError as error:
        return UpscalerFile(path.stem, path, problem=str(error))


def load_model(path: Path, device: torch.device, dtype: torch.dtype):
    """spandrel's ``ImageModelDescriptor`` for the file, in eval mode on ``device`` (in ``dtype`` where the
    architecture supports it, else float32); ModelError naming the file when it is not a 3-channel upscaler."""
    spandrel = import_spandrel()
    state = read_state_dict(path)
    _detect(path, state)
    try:
        descriptor = spandrel.ModelLoader(device="cpu").load_from_state_dict(state)
    except Exception as error:  # noqa: BLE001 - an architecture's loader indexes and reshapes the weights it expects
        raise ModelError(f"the upscaler {path.name} could not be built from its weights: {_reason(error)}") from error
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise ModelError(f"the upscaler {path.name} is a {descriptor.architecture.name} model that needs a mask, not an upscaler")
    if descriptor.input_channels != 3 or descriptor.output_channels != 3 or descriptor.purpose == "FaceSR":
        raise ModelError(f"the upscaler {path.name} ({descriptor.architecture.name}) does not map an RGB image to an "
                         f"RGB image ({descriptor.input_channels} → {descriptor.output_channels} channels, "
                         f"purpose {descriptor.purpose})")
    supported = {torch.float16: descriptor.supports_half, torch.bfloat16: descriptor.supports_bfloat16}.get(dtype, True)
    descriptor.to(device, dtype if supported else torch.float32)
    descriptor.eval()
    return descriptor


@functools.lru_cache(maxsize=LOADED_CACHE_SIZE)
def _cached_model(path: str, size: int, mtime_ns: int, device: str, dtype: torch.dtype):
    return load_model(Path(path), torch.device(device), dtype)


def cached_model(path: Path, device: torch.device, dtype: torch.dtype):
    """``load_model``, from a small LRU cache keyed by the file's identity (a changed file is loaded afresh)."""
    try:
        stat = path.stat()
    except OSError as error:
        raise ModelError(f"the upscaler {path.name} cannot be read: {error.strerror or error}") from error
    return _cached_model(str(path), stat.st_size, stat.st_mtime_ns, str(device), dtype)


# --- running -------------------------------------------------------------------------

def image_to_bgr(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float32 in [0, 1], channels B, G, R."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)[:, :, ::-1] / 255.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).unsqueeze(0)


def bgr_to_image(tensor: torch.Tensor) -> Image.Image:
    array = tensor.squeeze(0).float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array[::-1].transpose(1, 2, 0)), "RGB")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles begin along one side: the fewest tiles of ``tile`` that overlap by at least ``overlap``,
    spread evenly from 0 to ``length - tile`` (A1111's ``split_grid`` placement)."""
    if length <= tile:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"the tile overlap ({overlap}) must be smaller than the tile ({tile})")
    count = math.ceil((length - overlap) / (tile - overlap))
    return [index * (length - tile) // (count - 1) for index in range(count)]  # integers: the last one ends at the edge


def _ramp(length: int, starts: list[int], index: int, tile: int, scale: int) -> torch.Tensor:
    """One tile's blending weights along one side (output pixels): rising linearly across the overlap with
    the previous tile, falling across the overlap with the next, 1 elsewhere and at the image's edges."""
    size = min(tile, length) * scale
    weight = torch.ones(size)
    position = torch.arange(size, dtype=torch.float32)
    if index > 0:
        shared = (starts[index - 1] + tile - starts[index]) * scale
        weight = torch.minimum(weight, (position + 1) / (shared + 1))
    if index + 1 < len(starts):
        shared = (starts[index] + tile - starts[index + 1]) * scale
        weight = torch.minimum(weight, (size - position) / (shared + 1))
    return weight


def run_tiled(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, scale: int,
              tile: int = TILE_SIZE, overlap: int = TILE_OVERLAP,
              device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``model`` applied to a (1, 3, H, W) CPU image tile by tile; an image within one tile runs whole.

    Tiles run on ``device`` in ``dtype``; the blended output canvas stays on the CPU in float32."""
    _, channels, height, width = image.shape
    device, dtype = device or image.device, dtype or image.dtype

    def apply(part: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(part.to(device, dtype)).float().cpu()

    if tile <= 0 or (height <= tile and width <= tile):
        return apply(image)
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    canvas = torch.zeros(channels, height * scale, width * scale)
    total = torch.zeros(1, height * scale, width * scale)
    for row, top in enumerate(rows):
        for col, left in enumerate(cols):
            cancellation.check("upscaling")  # a job's interrupt stops a large upscale between tiles
            out = apply(image[:, :, top:top + tile, left:left + tile])[0]
            if out.shape[-2:] != (min(tile, height) * scale, min(tile, width) * scale):
                raise ModelError(f"the upscaler's output tile is {tuple(out.shape[-2:])}, not {scale}× its input")
            weight = _ramp(height, rows, row, tile, scale)[:, None] * _ramp(width, cols, col, tile, scale)[None, :]
            y, x = top * scale, left * scale
            canvas[:, y:y + out.shape[-2], x:x + out.shape[-1]] += out * weight
            total[:, y:y + out.shape[-2], x:x + out.shape[-1]] += weight
    return canvas.div_(total).unsqueeze(0)


class ModelUpscaler:
    """A ``PixelUpscaler`` running one model file."""

    def __init__(self, file: UpscalerFile, device: torch.device, dtype: torch.dtype,
                 tile: int = TILE_SIZE, overlap: int = TILE_OVERLAP,
                 on_failure: Callable[[UpscalerFile, str], None] | None = None):
        self.file, self.name, self.device, self.dtype = file, file.name, device, dtype
        self.tile, self.overlap = tile, overlap
        self._on_failure = on_failure  # told when the file fails to load, so the list can mark it

    @property
    def descriptor(self):
        if self.file.problem:
            raise ModelError(self.file.problem)
        try:
            return cached_model(self.file.path, self.device, self.dtype)
        except ModelError as error:
            if self._on_failure:
                self._on_failure(self.file, str(error))
            raise

    @property
    def native_scale(self) -> int:
        return int(self.descriptor.scale)

    def upscale_once(self, image: Image.Image) -> Image.Image:
        """One pass of the model at its native scale."""
        descriptor = self.descriptor
        model_dtype = next(descriptor.model.parameters()).dtype
        out = run_tiled(descriptor, image_to_bgr(image), int(descriptor.scale), self.tile, self.overlap,
                        device=self.device, dtype=model_dtype)
        return bgr_to_image(out)

    def upscale(self, image: Image.Image, width: int, height: int) -> Image.Image:
        image = image.convert("RGB")
        same_size = image.size == (width, height)
        for done in range(MAX_PASSES):
            # A1111 runs one pass even at scale 1 (a 1× restoration model is asked for its own size)
            if image.width >= width and image.height >= height and (done or not same_size):
                break
            before = image.size
            image = self.upscale_once(image)
            if image.size == before:  # a 1× model: more passes would not get closer
                break
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        return image
