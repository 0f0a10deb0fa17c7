"""Crash-safe files: outputs, settings, presets and extension state are complete or absent, whatever happens.

A save is killed with SIGKILL at each file-system step it takes (in a forked child, paused inside
the step), the disk is made to fill up mid-write, and stale temporary files from earlier kills are
swept at start.
"""
from __future__ import annotations

import errno
import io
import json
import os
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

from engine import atomic_write
from engine.errors import SfumatoError
from engine.extensions import ExtensionManager
from engine.outputs import OutputError, OutputWriter
from engine.presets import PresetStore
from engine.settings import Settings, SettingsStore
from engine.studio import Studio, StudioConfig

pytestmark = pytest.mark.timeout(120)  # a child that hangs instead of pausing fails the test rather than the run

IMAGE = Image.new("RGB", (16, 16), "teal")
NOW = datetime(2024, 3, 9, 14, 5, 7)
PAUSED, FINISHED = b"P", b"F"
STEPS_THAT_TOUCH_NAMES = ("fsync", "replace", "link", "rename")


def _all_files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


# -- one save for each kind of file, and what its final file must hold ------------------------------------------
class Writer:
    """One of the four kinds of files, saved once; ``final`` is the file the save writes."""

    def __init__(self, root: Path, kind: str):
        self.root, self.kind = root, kind
        if kind == "outputs":
            self.final = root / "00000-1.png"
        elif kind == "settings":
            self.store = SettingsStore(root / "settings.json")
            self.store.save(Settings(preview_every=2))  # an older version that must survive a failed save
            self.final = self.store.path
        elif kind == "presets":
            self.presets = PresetStore(root / "builtin", root)
            self.presets.save({"name": "Mine", "fields": {"steps": 12}})
            self.final = root / "Mine.json"
        elif kind == "extension state":
            (root / "extensions" / "dummy").mkdir(parents=True)
            (root / "extensions" / "dummy" / "__init__.py").write_text("# defines no EXTENSION: it only needs a name\n")
            self.manager = ExtensionManager(root / "extensions", root / "extensions.json", models_dir=root, builtin_dir=None)
            self.manager.set_enabled("dummy", True)
            self.final = root / "extensions.json"
        self.before = self.final.read_bytes() if self.final.exists() else None

    def save(self) -> None:
        if self.kind == "outputs":
            OutputWriter(self.root, "{index:05d}-{seed}").save(IMAGE, "Steps: 3", "txt2img", 1, now=NOW)
        elif self.kind == "settings":
            self.store.save(Settings(preview_every=7))
        elif self.kind == "presets":
            self.presets.save({"name": "Mine", "fields": {"steps": 30}})
        else:
            self.manager.set_enabled("dummy", False)

    def is_new(self, data: bytes) -> bool:
        if self.kind == "outputs":
            with Image.open(io.BytesIO(data)) as image:
                return image.info.get("parameters") == "Steps: 3" and image.convert("RGB").tobytes() == IMAGE.tobytes()
        value = json.loads(data)
        return {"settings": lambda: value["preview_every"] == 7, "presets": lambda: value["fields"]["steps"] == 30,
                "extension state": lambda: value["disabled"] == ["dummy"]}[self.kind]()


KINDS = ("outputs", "settings", "presets", "extension state")


def _kill_inside_step(save: Callable[[], None], pause_at: int) -> bool:
    """Run ``save`` in a forked child that pauses inside its ``pause_at``-th file-system step, then SIGKILL it.

    Returns False when the save finished before reaching that step (nothing was killed).
    """
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        status = 1
        try:
            os.close(read_end)
            calls = [0]

            def pausing(original):
                def step(*args, **kwargs):
                    if calls[0] == pause_at:
                        os.write(write_end, PAUSED)
                        time.sleep(60)
                    calls[0] += 1
                    return original(*args, **kwargs)
                return step

            for name in STEPS_THAT_TOUCH_NAMES:
                setattr(os, name, pausing(getattr(os, name)))
            save()
            os.write(write_end, FINISHED)
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        said = os.read(read_end, 1)
        if said == PAUSED:
            os.kill(child, signal.SIGKILL)
        _, status = os.waitpid(child, 0)
    finally:
        os.close(read_end)
    assert said in (PAUSED, FINISHED), f"the child died without saving (status {status})"
    return said == PAUSED


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")
@pytest.mark.parametrize("kind", KINDS)
def test_a_save_killed_at_any_step_leaves_the_old_file_or_the_complete_new_one(tmp_path, kind):
    killed_at = []
    for pause_at in range(6):
        root = tmp_path / f"kill-{pause_at}"
        root.mkdir()
        writer = Writer(root, kind)
        if not _kill_inside_step(writer.save, pause_at):
            break
        killed_at.append(pause_at)
        assert not [path for path in _all_files(root) if path.stat().st_size == 0], "an empty file was left behind"
        visible = [path for path in _all_files(root) if not path.name.startswith(atomic_write.TEMP_PREFIX)]
        if kind == "outputs":  # the only image is the one being saved: either absent or complete
            assert all(path == writer.final and writer.is_new(path.read_bytes()) for path in visible), visible
        else:
            data = writer.final.read_bytes()
            assert data == writer.before or writer.is_new(data)
        atomic_write.remove_stale_temps(root, older_than_s=0, recursive=True)
        assert not [path for path in _all_files(root) if path.name.startswith(atomic_write.TEMP_PREFIX)]
    assert len(killed_at) >= 2  # killed at least inside the data's fsync and inside the rename/link


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")
def test_an_output_killed_before_it_gets_its_name_leaves_nothing_under_that_name(tmp_path):
    """The reported bug: the final name was claimed as an empty file before the image was moved over it."""
    for pause_at in (0, 1):  # inside the fsync of the data, inside the step that names the file
        root = tmp_path / str(pause_at)
        root.mkdir()
        assert _kill_inside_step(Writer(root, "outputs").save, pause_at)
        assert not list(root.glob("*.png"))
        assert OutputWriter(root, "{index:05d}-{seed}").save(IMAGE, None, "txt2img", 1, now=NOW).name == "00000-1.png"


@pytest.mark.parametrize("kind", KINDS)
def test_a_full_disk_leaves_no_temp_file_and_no_new_file(tmp_path, monkeypatch, kind):
    writer = Writer(tmp_path, kind)
    before = {path: path.read_bytes() for path in _all_files(tmp_path)}
    written = []

    def disk_full(descriptor, data):
        if written:  # the first chunk fits, the next one does not: a half-written temporary file exists
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(len(data))
        return min(len(data), 10)

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(SfumatoError) as error:
        writer.save()
    monkeypatch.undo()
    assert written, "the save never wrote through the shared atomic writer"
    assert "space" in str(error.value) or "full" in str(error.value)
    after = {path: path.read_bytes() for path in _all_files(tmp_path)}
    assert after == before  # no temporary file, no new or changed file


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_file_is_written_by_the_one_atomic_writer(tmp_path, monkeypatch, kind):
    writer = Writer(tmp_path, kind)
    calls = []
    for name in ("write_file", "write_new_file"):
        original = getattr(atomic_write, name)
        monkeypatch.setattr(atomic_write, name, lambda *args, _original=original, _name=name: calls.append(_name) or _original(*args))
    writer.save()
    assert calls and writer.is_new(writer.final.read_bytes())


def test_stale_temp_files_are_removed_at_start_but_recent_ones_stay(tmp_path):
    config = StudioConfig(models_dir=tmp_path / "models", outputs_dir=tmp_path / "outputs", user_dir=tmp_path / "user",
                          builtin_models_dir=None)
    folder = config.outputs_dir / "txt2img" / "2024-03-09"
    folder.mkdir(parents=True)
    (config.user_dir / "presets").mkdir(parents=True)
    old = [folder / ".sfumato-0123abcd.tmp", config.user_dir / ".sfumato-feed.tmp", config.user_dir / "presets" / ".sfumato-1.tmp"]
    recent = folder / ".sfumato-fresh.tmp"
    unrelated = [folder / "00000-1.png", folder / ".hidden.tmp"]
    for path in old + [recent] + unrelated:
        path.write_bytes(b"x")
    an_hour_ago = time.time() - 3600
    for path in old + unrelated:
        os.utime(path, (an_hour_ago, an_hour_ago))
    Studio(config)
    assert not any(path.exists() for path in old)
    assert recent.exists() and all(path.exists() for path in unrelated)


def test_without_hard_links_a_lock_reserves_the_name_and_nothing_is_overwritten(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    (tmp_path / "a.txt").write_text("racer")
    (tmp_path / f"{atomic_write.TEMP_PREFIX}b.txt.lock{atomic_write.TEMP_SUFFIX}").write_text("")  # another writer holds b
    path = atomic_write.write_new_file(tmp_path, ["a.txt", "b.txt", "c.txt"], "mine")
    assert path.name == "c.txt" and path.read_text() == "mine" and (tmp_path / "a.txt").read_text() == "racer"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.txt", "c.txt", f"{atomic_write.TEMP_PREFIX}b.txt.lock{atomic_write.TEMP_SUFFIX}"])


def test_a_failed_output_save_is_an_output_error_naming_the_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda descriptor: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(OutputError, match="full"):
        OutputWriter(tmp_path).save(IMAGE, None, "txt2img", 1, now=NOW)
    assert _all_files(tmp_path) == []
