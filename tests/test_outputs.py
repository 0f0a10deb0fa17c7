"""Saving results: numbered names, no overwrites, no half files, nothing outside the output folder."""
from __future__ import annotations

import errno
import os
import tempfile
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from engine import outputs
from engine.errors import SfumatoError, ValidationError
from engine.image_metadata import read_generation_info
from engine.outputs import OutputError, OutputWriter

IMAGE = Image.new("RGB", (8, 8), "teal")
NOW = datetime(2024, 3, 9, 14, 5, 7)


def _files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


def test_default_pattern_numbers_files_per_folder(tmp_path):
    writer = OutputWriter(tmp_path)
    first = writer.save(IMAGE, "Steps: 1", "txt2img", 42, now=NOW)
    second = writer.save(IMAGE, "Steps: 2", "txt2img", 43, now=NOW)
    other = writer.save(IMAGE, None, "img2img", 7, now=NOW)
    assert first == tmp_path / "txt2img" / "2024-03-09" / "00000-42.png"
    assert second == tmp_path / "txt2img" / "2024-03-09" / "00001-43.png"
    assert other == tmp_path / "img2img" / "2024-03-09" / "00000-7.png"
    assert read_generation_info(second).infotext == "Steps: 2"


def test_index_continues_after_highest_existing_number(tmp_path):
    folder = tmp_path / "txt2img" / "2024-03-09"
    folder.mkdir(parents=True)
    (folder / "00007-1.png").write_bytes(b"old")
    (folder / "notes.txt").write_text("not an image")
    path = OutputWriter(tmp_path).save(IMAGE, None, "txt2img", 5, now=NOW)
    assert path.name == "00008-5.png"
    assert (folder / "00007-1.png").read_bytes() == b"old"


def test_never_overwrites_when_pattern_has_no_index(tmp_path):
    writer = OutputWriter(tmp_path, "{seed}")
    paths = [writer.save(IMAGE, None, "txt2img", 9, now=NOW) for _ in range(3)]
    assert [path.name for path in paths] == ["9.png", "9-1.png", "9-2.png"]


def test_name_taken_by_a_racing_writer_is_skipped(tmp_path, monkeypatch):
    writer = OutputWriter(tmp_path, "{index:03d}")
    (tmp_path / "000.png").write_bytes(b"racer")
    monkeypatch.setattr(OutputWriter, "_next_index", lambda self, folder: 0)  # as if listed before the racer wrote
    path = writer.save(IMAGE, None, "txt2img", 1, now=NOW)
    assert path.name == "001.png" and (tmp_path / "000.png").read_bytes() == b"racer"


def test_all_pattern_fields_fill_in(tmp_path):
    path = OutputWriter(tmp_path, "{model}/{date}-{time}/{mode}-{index}-{seed}").save(IMAGE, None, "inpaint", 3, now=NOW, model="sd15")
    assert path == tmp_path / "sd15" / "2024-03-09-140507" / "inpaint-0-3.png"


def test_values_with_separators_stay_inside_root(tmp_path):
    path = OutputWriter(tmp_path, "{model}/{index}").save(IMAGE, None, "txt2img", 1, now=NOW, model="../../etc/passwd")
    assert path.parent.parent == tmp_path and ".." not in path.relative_to(tmp_path).parts
    with pytest.raises(ValidationError):
        OutputWriter(tmp_path, "{model}/{index}").save(IMAGE, None, "txt2img", 1, now=NOW, model="..")
    with pytest.raises(ValidationError):
        OutputWriter(tmp_path, "{mode}/{index}").save(IMAGE, None, "txt\x00img", 1, now=NOW)


@pytest.mark.parametrize("pattern", ["../{index}", "/abs/{index}", "a/../../{index}", "{index}\x00", "a\\b", "{nope}", "{seed.real}", "{mode[0]}", "{index}/{seed}", "{index:x>3}", "{seed:/>8}", "{mode:/^9}/{index}", "{mode:05d}", "a//{index}", "", "{"])
def test_bad_patterns_are_refused_by_name(tmp_path, pattern):
    with pytest.raises(ValidationError) as error:
        OutputWriter(tmp_path, pattern)
    assert error.value.field == "output_pattern"


def test_symlink_out_of_root_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "txt2img").symlink_to(outside)
    with pytest.raises(ValidationError):
        OutputWriter(root, "{mode}/{index}").save(IMAGE, None, "txt2img", 1, now=NOW)
    assert _files(outside) == []


def _fail_with(monkeypatch, function_name: str, code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(outputs.os, function_name, fail)


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only"), (errno.EACCES, "read-only"), (errno.ENOSPC, "full")])
def test_unwritable_or_full_disk_is_a_clear_output_error(tmp_path, monkeypatch, code, words):
    writer = OutputWriter(tmp_path)
    _fail_with(monkeypatch, "fsync", code)
    with pytest.raises(OutputError) as error:
        writer.save(IMAGE, "x", "txt2img", 1, now=NOW)
    assert words in str(error.value) and "output folder" in str(error.value)
    assert isinstance(error.value, SfumatoError)
    assert _files(tmp_path) == []  # no temp file, no claimed name left behind


def test_failure_while_moving_into_place_leaves_no_files(tmp_path, monkeypatch):
    _fail_with(monkeypatch, "link", errno.EIO)
    with pytest.raises(OutputError):
        OutputWriter(tmp_path).save(IMAGE, "x", "txt2img", 1, now=NOW)
    assert _files(tmp_path) == []


def test_unreadable_image_leaves_no_files(tmp_path):
    with pytest.raises(ValidationError):
        OutputWriter(tmp_path).save("not an image", "x", "txt2img", 1, now=NOW)  # type: ignore[arg-type]
    assert _files(tmp_path) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_folder_is_an_output_error(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(OutputError):
            OutputWriter(tmp_path).save(IMAGE, "x", "txt2img", 1, now=NOW)
    finally:
        tmp_path.chmod(0o700)


pattern_piece = st.one_of(
    st.sampled_from(["{mode}", "{date}", "{seed}", "{model}", "{time}", "{index}", "{index:05d}", "..", ".", "/", "\\", "\x00", "{", "}", "{bad}", "C:", "~", "%s"]),
    st.text(max_size=5),
)
hostile_text = st.one_of(st.text(max_size=20), st.sampled_from(["..", ".", "/", "../..", "\x00", "a/../../b", "\\..\\", "C:\\x", " "]))


@settings(deadline=None, max_examples=100)
@given(
    pattern=st.one_of(st.just("{model}/{mode}/{index}-{seed}"), st.lists(pattern_piece, max_size=6).map("".join)),
    mode=hostile_text, model=st.one_of(st.none(), hostile_text), seed=st.integers(-(2**70), 2**70),
)
def test_hostile_patterns_and_values_never_escape_root(pattern, mode, model, seed):
    with tempfile.TemporaryDirectory() as temp:
        base = Path(temp)
        root = base / "root"
        try:
            path = OutputWriter(root, pattern).save(IMAGE, "x", mode, seed, now=NOW, model=model)
        except SfumatoError:
            pass
        except OSError as error:  # e.g. a name longer than the filesystem allows
            pytest.fail(f"raw OSError escaped: {error}")
        else:
            assert path.resolve().is_relative_to(root.resolve()) and path.is_file()
        assert all(file.resolve().is_relative_to(root.resolve()) for file in _files(base))
        assert not [file for file in _files(base) if file.name.endswith(".tmp")]
