"""SHA-256 of a model file, read in blocks. A1111's hashes (model, VAE, embedding, LoRA) are prefixes of one.

Hashing is the slowest part of loading a big file from a warm disk cache (1.5 s of a 2 GB SD 1.5 checkpoint's 2.3 s
here; about 11 s for a 16 GB Flux file), so a running studio keeps the digests it computed in a JSON file, as A1111
keeps them in ``cache.json``: :func:`remember_hashes_in` names it. An entry counts only while the file's size and
modification time are the ones it was hashed at, so an edited or replaced file is hashed again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path

log = logging.getLogger("sfumato")

# Only files this big are written to the store: hashing a smaller one costs less than a few milliseconds, and tiny
# files (test fixtures, small embeddings) would only make the store grow.
PERSIST_FROM_BYTES = 16 << 20

_lock = threading.Lock()
_store: Path | None = None  # where digests are kept across runs (None: in this process only)
_known: dict[str, dict] = {}  # "<absolute path>|<skip>" → {"size", "mtime_ns", "sha256"}


def remember_hashes_in(path: Path | str | None) -> None:
    """Keep digests in the JSON file ``path`` (read now, rewritten after each new digest); None forgets the file."""
    global _store
    with _lock:
        _store = Path(path) if path is not None else None
        _known.clear()
        if _store is not None and _store.is_file():
            try:
                entries = json.loads(_store.read_text(encoding="utf-8"))
                # Entries of files that are gone are dropped (they are rewritten without them on the next digest).
                _known.update({key: value for key, value in entries.items()
                               if isinstance(value, dict) and Path(key.rpartition("|")[0]).is_file()})
            except (OSError, ValueError, AttributeError) as error:
                log.warning("the hash cache %s cannot be read (%s); files will be hashed again", _store, error)


def file_sha256(path: Path, skip: int = 0) -> str:
    """The hex SHA-256 of the file's bytes after the first ``skip`` (LoRAs hash what follows their header)."""
    path = Path(path)
    stat = path.stat()
    key = f"{path.resolve()}|{skip}"
    with _lock:
        known = _known.get(key)
    if known and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
        return known["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(skip)
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    sha256 = digest.hexdigest()
    _remember(key, {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256})
    return sha256


def _remember(key: str, entry: dict) -> None:
    from . import atomic_write

    with _lock:
        _known[key] = entry
        if _store is None or entry["size"] < PERSIST_FROM_BYTES:
            return
        try:
            _store.parent.mkdir(parents=True, exist_ok=True)
            kept = {key: value for key, value in _known.items() if value.get("size", 0) >= PERSIST_FROM_BYTES}
            atomic_write.write_file(_store, json.dumps(kept, indent=1, sort_keys=True) + "\n")
        except OSError as error:  # a read-only folder costs a rehash next run, nothing else
            log.warning("the hash cache %s cannot be written: %s", _store, error)


def forget_all() -> None:
    """Drop every remembered digest in this process (tests)."""
    with _lock:
        _known.clear()


__all__ = ["file_sha256", "forget_all", "remember_hashes_in"]
