"""Finding LoRA and LyCORIS files, naming them as A1111 does, and hashing them.

Files live in ``models/Lora`` and ``models/LyCORIS`` under the models root the checkpoint
registry reads, subfolders included. A network's name is its file's stem; when two files share a
stem, each is named by its path under its folder (without the extension), so a name means one file.
Only ``.safetensors`` files are read: pickles (``.pt``, ``.ckpt``) can run code when loaded.
The repository's own LoRAs (``builtin/loras``, e.g. the demo model's ``sfumato-outline``) are listed
too, so every install has them; a user's file with the same name wins, as user models do.
"""
from __future__ import annotations

import difflib
import json
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ValidationError
from ..file_hashes import file_sha256

NETWORK_FOLDERS = ("Lora", "LyCORIS")
BUILTIN_NETWORKS_SUBDIR = "loras"  # under the registry's builtin folder (``builtin/loras``)
SUFFIXES = (".safetensors",)
SHORT_HASH_LENGTH = 12  # A1111's "shorthash" of a network
HEADER_LENGTH_BYTES = 8  # safetensors: a little-endian u64 header length, then the JSON header
MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers too


@dataclass(frozen=True)
class NetworkFile:
    name: str  # how a prompt names it: the file's stem (its path under the folder when stems clash)
    path: Path
    folder: Path  # the models/Lora or models/LyCORIS folder it was found in
    alias: str = ""  # the name its training metadata gives it (kohya's ss_output_name); a prompt may use it too
    builtin: bool = False  # shipped in the repository's builtin/loras, not a user's file

    @property
    def identity(self) -> tuple[str, int, int]:
        """Changes whenever the file does: the key of every cache of what was read from it."""
        stat = self.path.stat()
        return (str(self.path), stat.st_size, stat.st_mtime_ns)


def addnet_hash(path: Path) -> str:
    """A1111's hash of a safetensors network (``hashes.py``, "addnet hash", from the Additional Networks
    extension): the SHA-256 of the bytes after the header, so editing the metadata keeps the hash."""
    with open(path, "rb") as handle:
        header = handle.read(HEADER_LENGTH_BYTES)
    if len(header) < HEADER_LENGTH_BYTES:
        raise OSError(f"{path.name} is too short to be a safetensors file")
    return file_sha256(path, skip=HEADER_LENGTH_BYTES + struct.unpack("<Q", header)[0])


class HeaderError(ValueError):
    """A safetensors file whose header cannot be read; the message says why, for a person."""


def read_header(path: Path) -> dict[str, Any]:
    """A safetensors file's JSON header, read without its tensors; ``HeaderError`` saying what is wrong
    when the file is too short, its header is not JSON, or the tensors it lists run past its end (truncated)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(HEADER_LENGTH_BYTES)
        if len(prefix) < HEADER_LENGTH_BYTES:
            raise HeaderError(f"{path.name} is too short to be a safetensors file ({size} bytes)")
        length = struct.unpack("<Q", prefix)[0]
        if length > min(MAX_HEADER_BYTES, size - HEADER_LENGTH_BYTES):
            raise HeaderError(f"{path.name} is not a safetensors file, or it is truncated: its header would be {length} bytes "
                              f"in a file of {size}")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except ValueError as error:
        raise HeaderError(f"{path.name} is not a safetensors file (its header is not JSON: {error})") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{path.name} is not a safetensors file (its header is not a JSON object)")
    ends = [entry.get("data_offsets", [0, 0])[-1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)]
    needed = HEADER_LENGTH_BYTES + length + max((end for end in ends if isinstance(end, int)), default=0)
    if needed > size:
        raise HeaderError(f"{path.name} is truncated: its tensors need {needed} bytes and the file has {size} "
                          "(an interrupted download?)")
    return header


def read_metadata(path: Path) -> dict[str, Any]:
    """The ``__metadata__`` of a safetensors header (kohya's ``ss_*`` training notes), or {} when unreadable.

    Values that hold a JSON object (``ss_tag_frequency``, ``ss_dataset_dirs``) are decoded, as A1111 decodes them."""
    try:
        header = read_header(path)
    except (OSError, HeaderError):
        return {}
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        return {}
    decoded: dict[str, Any] = {}
    for key, value in metadata.items():
        decoded[str(key)] = value
        if isinstance(value, str) and value.startswith("{"):
            try:
                decoded[str(key)] = json.loads(value)
            except ValueError:
                pass
    return decoded


class NetworkLibrary:
    """The network files under a models root, plus the built-in ones; rescanned by ``refresh``."""

    def __init__(self, models_dir: Path | str | None, builtin_dir: Path | str | None = None):
        self.models_dir = Path(models_dir) if models_dir else None
        self.builtin_dir = Path(builtin_dir) if builtin_dir else None  # a folder of networks (builtin/loras)
        self._files: dict[str, NetworkFile] = {}
        self._aliases: dict[str, NetworkFile] = {}
        self._lock = threading.Lock()
        self.refresh()

    @staticmethod
    def _scan(folder: Path | None) -> list[tuple[Path, Path]]:
        """(file, folder) for every network file under ``folder``, hidden paths skipped."""
        if folder is None or not folder.is_dir():
            return []
        found = []
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if (path.is_file() and path.suffix.lower() in SUFFIXES
                    and not any(part.startswith(".") for part in relative.parts)):
                found.append((path, folder))
        return found

    def refresh(self) -> list[NetworkFile]:
        found: list[tuple[Path, Path]] = []
        for folder_name in NETWORK_FOLDERS:
            found += self._scan(self.models_dir / folder_name if self.models_dir else None)
        stems = Counter(path.stem for path, _ in found)
        files = {}
        for path, folder in found:
            name = path.stem if stems[path.stem] == 1 else path.relative_to(folder).with_suffix("").as_posix()
            alias = str(read_metadata(path).get("ss_output_name") or name)
            files[name] = NetworkFile(name=name, path=path, folder=folder, alias=alias)
        for path, folder in self._scan(self.builtin_dir):
            name = path.relative_to(folder).with_suffix("").as_posix()
            if name not in files:  # a user's network of that name wins
                alias = str(read_metadata(path).get("ss_output_name") or name)
                files[name] = NetworkFile(name=name, path=path, folder=folder, alias=alias, builtin=True)
        # A1111 also finds a network by its alias; an alias that is another file's name, or that two files share, names none.
        shared = Counter(network.alias for network in files.values())
        aliases = {network.alias: network for network in files.values() if network.alias not in files and shared[network.alias] == 1}
        with self._lock:
            self._files, self._aliases = files, aliases
        return self.list()

    def list(self) -> list[NetworkFile]:
        with self._lock:
            return list(self._files.values())

    def get(self, name: str) -> NetworkFile:
        """The file a prompt's tag names; a ``ValidationError`` on ``prompt`` naming the closest matches otherwise."""
        with self._lock:
            found = self._files.get(name) or self._aliases.get(name)
            names = list(self._files)
        if found is not None:
            return found
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ("; none are installed" if not names else "")
        folders = " or ".join(f"models/{folder}" for folder in NETWORK_FOLDERS)
        raise ValidationError("prompt", f"no LoRA named {name!r} in {folders}{hint}")

    def short_hash_of(self, name: str) -> str | None:
        """The short hash of the file a tag names, None when no file has that name or it cannot be read."""
        try:
            return self.short_hash(self.get(name))
        except (ValidationError, OSError):
            return None

    def short_hash(self, network: NetworkFile) -> str:
        """A1111's short hash (12 hex digits), computed once per version of the file (``file_hashes`` remembers it)."""
        return addnet_hash(network.path)[:SHORT_HASH_LENGTH]


def infotext_problems(params: dict[str, str], library: NetworkLibrary) -> list[str]:
    """What a picture's ``Lora hashes`` say that this studio cannot reproduce: LoRAs missing here (their tags in
    the prompt would stop Generate), or present under the name with other contents (a different hash)."""
    from ..infotext import LORA_HASHES_KEY, parse_name_hashes  # the infotext module imports this package

    value = params.get(LORA_HASHES_KEY)
    if not isinstance(value, str):
        return []
    problems = []
    folders = " or ".join(f"models/{folder}" for folder in NETWORK_FOLDERS)
    for name, short in parse_name_hashes(value).items():
        here = library.short_hash_of(name)
        if here is None:
            problems.append(f"the LoRA {name} is not in {folders} (or cannot be read); its tag in the prompt will stop Generate")
        elif short and not here.startswith(short.lower()):
            problems.append(f"the LoRA {name} here (hash {here}) is not the file the picture used (hash {short})")
    return problems
