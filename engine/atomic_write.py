"""Writing a file so that it is either complete or absent: the one writer for outputs, settings, presets
and extension state.

The data goes to a temporary file in the destination folder (``.sfumato-<random>.tmp``), which is
flushed and fsynced before it gets its final name, so a crash, a kill or a full disk never leaves a
half-written or empty file under a name a reader looks at. Replacing a file uses ``os.replace``;
creating a file that must not overwrite anything (a numbered output) uses ``os.link``, which fails
when the name is taken, so the final name is only ever created with its complete contents. Where a
filesystem has no hard links, an ``O_EXCL`` lock beside the file reserves the name instead.

Whatever fails, the temporary file is removed. Only a kill can leave one behind; ``remove_stale_temps``
sweeps those at start, once they are old enough that no running writer can still own them.
"""
from __future__ import annotations

import errno
import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path

TEMP_PREFIX = ".sfumato-"
TEMP_SUFFIX = ".tmp"
STALE_AFTER_S = 15 * 60  # far longer than any single write takes
_NO_HARD_LINKS = {errno.EPERM, errno.EINVAL, errno.EXDEV, errno.EMLINK, errno.ENOSYS, errno.EOPNOTSUPP,
                  getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def write_file(path: str | os.PathLike, data: bytes | str) -> Path:
    """Create or replace ``path`` with ``data`` (text is written as UTF-8); readers see the old file or the new one."""
    path = Path(path)
    temp = _write_temp(path.parent, data)
    try:
        os.replace(temp, path)
    except BaseException:
        _remove(temp)
        raise
    _fsync_folder(path.parent)
    return path


def write_new_file(folder: str | os.PathLike, names: Iterable[str], data: bytes | str) -> Path:
    """Write ``data`` under the first of ``names`` that is free in ``folder``; never overwrites a file.

    Raises FileExistsError when every name is taken.
    """
    folder = Path(folder)
    temp = _write_temp(folder, data)
    try:
        for name in names:
            target = folder / name
            if _publish_without_overwrite(temp, target):
                break
        else:
            raise FileExistsError(errno.EEXIST, f"every candidate name is taken in {folder}")
    finally:
        _remove(temp)  # after a hard link the data lives on under the final name; otherwise it is dropped
    _fsync_folder(folder)
    return target


def remove_stale_temps(folder: str | os.PathLike, older_than_s: float = STALE_AFTER_S, recursive: bool = False) -> list[Path]:
    """Delete our temporary files (and name locks) left in ``folder`` by a killed writer; returns what was removed.

    A temporary file younger than ``older_than_s`` may belong to a writer that is still running, so it stays.
    """
    cutoff = time.time() - older_than_s
    removed: list[Path] = []
    folders = (Path(root) for root, _, _ in os.walk(folder)) if recursive else iter([Path(folder)])
    for current in folders:
        try:
            candidates = list(os.scandir(current))
        except OSError:
            continue
        for entry in candidates:
            if not (entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(TEMP_SUFFIX)):
                continue
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
            except OSError:
                continue  # gone already, or not ours to delete
    return removed


def _write_temp(folder: Path, data: bytes | str) -> Path:
    """A new, fsynced temporary file in ``folder`` holding ``data``; nothing is left behind if this fails."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temp = folder / f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}"
        try:
            descriptor = os.open(temp, flags, 0o666)  # the umask applies, as for any file the user creates
            break
        except FileExistsError:
            continue
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view):]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except BaseException:
        _remove(temp)
        raise
    return temp


def _publish_without_overwrite(temp: Path, target: Path) -> bool:
    """Give the finished ``temp`` the name ``target`` unless that name exists; False when it does."""
    try:
        os.link(temp, target)
        return True
    except FileExistsError:
        return False
    except OSError as error:
        if error.errno not in _NO_HARD_LINKS:
            raise
    return _publish_under_lock(temp, target)


def _publish_under_lock(temp: Path, target: Path) -> bool:
    """For filesystems without hard links: an ``O_EXCL`` lock file reserves the name while it is checked and filled."""
    lock = target.with_name(f"{TEMP_PREFIX}{target.name}.lock{TEMP_SUFFIX}")
    try:
        os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return False
    try:
        if os.path.lexists(target):
            return False
        os.replace(temp, target)
        return True
    finally:
        _remove(lock)


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_folder(folder: Path) -> None:
    """Make the new directory entry durable too (best effort: not every platform can open a folder)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
