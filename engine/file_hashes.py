"""SHA-256 of a model file, read in blocks. A1111's hashes (model, VAE, embedding, LoRA) are prefixes of one."""
from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path, skip: int = 0) -> str:
    """The hex SHA-256 of the file's bytes after the first ``skip`` (LoRAs hash what follows their header)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(skip)
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
