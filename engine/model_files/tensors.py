"""Reading the weights of one model file: safetensors or GGUF, whole or under one key prefix.

A file is untrusted: only its header is read to list names and shapes, and a header that does not parse,
or promises more bytes than the file holds (a download cut short), is a ``ModelError`` naming the file.
fp8 tensors (``float8_e4m3fn``/``e5m2``, as "fp8" checkpoints store them) are upcast to the compute dtype as
they are read: no device Sfumato runs computes in fp8.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ModelError

GGUF_SUFFIX = ".gguf"
FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))
_SAFETENSORS_HEADER_LENGTH = 8  # a little-endian u64 before the JSON header


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == GGUF_SUFFIX


def _gguf_reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError as error:  # pragma: no cover - gguf is in requirements.txt
        raise ModelError(f"{path.name} is a GGUF file and the gguf package is not installed (pip install gguf)") from error
    try:
        return GGUFReader(str(path))
    except Exception as error:  # the reader raises ValueError/IndexError/struct errors for a cut file
        raise ModelError(f"{path.name} is not a readable GGUF file (corrupt or truncated?): {error}") from error


def _check_safetensors_length(path: Path) -> None:
    """safetensors' own reader maps the file lazily, so a file cut short is found only when a tensor is read;
    the header says where the last tensor ends, so compare that with the file's size first."""
    import json
    import struct

    unreadable = f"{path.name} is not a readable safetensors file (corrupt or truncated?)"
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw = handle.read(_SAFETENSORS_HEADER_LENGTH)
        if len(raw) < _SAFETENSORS_HEADER_LENGTH:
            raise ModelError(f"{unreadable}: it is only {size} bytes long")
        (length,) = struct.unpack("<Q", raw)
        if length > size - _SAFETENSORS_HEADER_LENGTH:
            raise ModelError(f"{unreadable}: its header should be {length:,} bytes long, but only "
                             f"{size - _SAFETENSORS_HEADER_LENGTH:,} bytes follow")
        try:
            header = json.loads(handle.read(length))
            end = max((info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
            raise ModelError(f"{unreadable}: its header is not valid ({error})") from error
    expected = _SAFETENSORS_HEADER_LENGTH + length + end
    if size < expected:
        raise ModelError(f"{unreadable}: it is truncated, its header describes {expected:,} bytes but the file has "
                         f"{size:,} (an interrupted download or copy?)")


def tensor_names(path: Path) -> list[str]:
    """The tensor names a file holds; ModelError naming the file when it is unreadable or cut short."""
    if is_gguf(path):
        return [tensor.name for tensor in _gguf_reader(path).tensors]
    from safetensors import safe_open

    _check_safetensors_length(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as error:
        raise ModelError(f"{path.name} is not a readable safetensors file (corrupt or truncated?): {error}") from error


def tensor_shape(path: Path, key: str) -> list[int]:
    """One tensor's logical shape (GGUF stores dimensions innermost first; this is torch's order)."""
    if is_gguf(path):
        tensor = next(t for t in _gguf_reader(path).tensors if t.name == key)
        return [int(n) for n in reversed(tensor.shape.tolist())]
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.get_slice(key).get_shape())


def shape_reader(path: Path):
    """``shape_of(key)`` for one file, opening it once."""
    if is_gguf(path):
        shapes = {t.name: [int(n) for n in reversed(t.shape.tolist())] for t in _gguf_reader(path).tensors}
        return shapes.__getitem__
    from safetensors import safe_open

    def shape_of(key: str) -> list[int]:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.get_slice(key).get_shape())
    return shape_of


def read_tensors(path: Path, prefix: str = "", dtype: torch.dtype | None = None, keep_prefix: bool = False) -> dict[str, torch.Tensor]:
    """The safetensors file's tensors whose names start with ``prefix`` (the prefix removed unless ``keep_prefix``);
    fp8 tensors upcast to ``dtype``."""
    from safetensors import safe_open

    _check_safetensors_length(path)
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(prefix):
                    tensor = handle.get_tensor(key)
                    if tensor.dtype in FP8_DTYPES:
                        tensor = tensor.to(dtype or torch.float32)
                    tensors[key if keep_prefix else key[len(prefix):]] = tensor
    except Exception as error:
        raise ModelError(f"{path.name} could not be read (corrupt or truncated?): {error}") from error
    return tensors
