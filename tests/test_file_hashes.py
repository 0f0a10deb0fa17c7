"""Model files are hashed once, not at every start: digests are kept in ``user_data/hashes.json`` (A1111's
``cache.json``), valid while the file's size and modification time stay as they were."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from engine import file_hashes
from engine.settings import Settings
from engine.studio import HASH_CACHE_FILE, StudioConfig, build_registry


@pytest.fixture(autouse=True)
def no_store_after(monkeypatch):
    monkeypatch.setattr(file_hashes, "PERSIST_FROM_BYTES", 0)  # the files here are small
    yield
    file_hashes.remember_hashes_in(None)


def test_small_files_and_files_that_are_gone_stay_out_of_the_store(tmp_path, monkeypatch):
    monkeypatch.setattr(file_hashes, "PERSIST_FROM_BYTES", 1000)
    store = tmp_path / HASH_CACHE_FILE
    small, big = tmp_path / "small.pt", tmp_path / "big.safetensors"
    small.write_bytes(b"s" * 999)
    big.write_bytes(b"b" * 1000)
    file_hashes.remember_hashes_in(store)
    file_hashes.file_sha256(small)
    file_hashes.file_sha256(big)
    assert [key.rpartition("|")[0] for key in json.loads(store.read_text())] == [str(big.resolve())]
    big.unlink()
    file_hashes.remember_hashes_in(store)
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"o" * 2000)
    file_hashes.file_sha256(other)
    assert [key.rpartition("|")[0] for key in json.loads(store.read_text())] == [str(other.resolve())]


def _refuse_to_hash(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the file was read and hashed again")
    monkeypatch.setattr(file_hashes.hashlib, "sha256", refuse)


def test_a_digest_is_kept_across_runs_and_redone_when_the_file_changes(tmp_path, monkeypatch):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights" * 1000)
    store = tmp_path / "user_data" / HASH_CACHE_FILE
    file_hashes.remember_hashes_in(store)
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert file_hashes.file_sha256(weights) == expected
    assert [entry["sha256"] for entry in json.loads(store.read_text()).values()] == [expected]

    file_hashes.remember_hashes_in(store)  # a new run reads the file's digest back instead of hashing
    with monkeypatch.context() as patch:
        _refuse_to_hash(patch)
        assert file_hashes.file_sha256(weights) == expected

    weights.write_bytes(b"other weights" * 1000)  # replaced: another size, another time
    assert file_hashes.file_sha256(weights) == hashlib.sha256(weights.read_bytes()).hexdigest() != expected


def test_a_file_touched_since_is_hashed_again_even_at_the_same_size(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 4096)
    file_hashes.remember_hashes_in(tmp_path / HASH_CACHE_FILE)
    first = file_hashes.file_sha256(weights)
    weights.write_bytes(b"b" * 4096)
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert file_hashes.file_sha256(weights) == hashlib.sha256(b"b" * 4096).hexdigest() != first


def test_a_lora_digest_after_its_header_is_kept_apart_from_the_whole_file_digest(tmp_path):
    weights = tmp_path / "lora.safetensors"
    weights.write_bytes(b"header--" + b"tensors" * 100)
    file_hashes.remember_hashes_in(tmp_path / HASH_CACHE_FILE)
    whole, after = file_hashes.file_sha256(weights), file_hashes.file_sha256(weights, skip=8)
    assert after == hashlib.sha256(b"tensors" * 100).hexdigest() != whole


def test_an_unreadable_store_costs_a_rehash_and_is_rewritten(tmp_path, caplog):
    store = tmp_path / HASH_CACHE_FILE
    store.write_text("{not json")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"w" * 100)
    file_hashes.remember_hashes_in(store)
    assert "cannot be read" in caplog.text
    assert file_hashes.file_sha256(weights) == hashlib.sha256(b"w" * 100).hexdigest()
    assert len(json.loads(store.read_text())) == 1


def test_the_studio_keeps_its_digests_in_user_data(tmp_path, monkeypatch):
    """A registry built for the app (studio or serve replica) loads a single file, then a new one over the same
    folders (the next start) loads it without hashing it again."""
    from tests._checkpoints import write_single_file
    from engine.tiny_models import build_sd1

    models = tmp_path / "models"
    write_single_file(build_sd1(tmp_path / "sd1-folder"), models / "Stable-diffusion" / "tiny.safetensors")
    config = StudioConfig(models_dir=models, user_dir=tmp_path / "user_data", builtin_models_dir=None)
    registry = build_registry(config, Settings(device="cpu"))
    name = registry.list()[0].name
    first = registry.load(name).short_hash
    assert (tmp_path / "user_data" / HASH_CACHE_FILE).is_file()

    file_hashes.forget_all()  # what a new process starts with
    with monkeypatch.context() as patch:
        _refuse_to_hash(patch)
        assert build_registry(config, Settings(device="cpu")).load(name).short_hash == first
