"""VAE files chosen per job: an override decodes with the file's weights, "None" is the checkpoint's own
bit for bit, "Automatic" finds the file named like the checkpoint, and a bad file changes nothing.

The reference for an override is diffusers' own ``AutoencoderKL`` loaded from the diffusers folder the
VAE file was written from, put in the pipeline by hand.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from engine.errors import ModelError, SfumatoError, ValidationError

CHECKPOINT = "vae-sd1"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from engine import Engine, ModelRegistry
    from engine.checkpoint_convert import save_single_file
    from engine.tiny_models import build_sd1

    root = tmp_path_factory.mktemp("vae-models")
    build_sd1(root / "Stable-diffusion" / CHECKPOINT, seed=3)
    donor = build_sd1(root / "donor" / "vae-donor", seed=21)  # a same-shaped model whose VAE differs
    single = save_single_file(donor, root / "donor.safetensors") or root / "donor.safetensors"
    ldm = {key: value for key, value in load_file(str(single)).items() if key.startswith("first_stage_model.")}
    (root / "VAE").mkdir()
    save_file(ldm, str(root / "VAE" / "other.safetensors"))  # A1111's layout, prefix kept
    save_file({k.removeprefix("first_stage_model."): v for k, v in ldm.items()}, str(root / "VAE" / "bare.safetensors"))
    registry = ModelRegistry(root, builtin_dir=None, device="cpu", cache_size=2)
    return root, registry, Engine(registry), donor


def generate(engine, vae: str, seed: int = 5) -> np.ndarray:
    from engine.request import GenerationRequest

    result = engine.generate(GenerationRequest(prompt="abc", model=CHECKPOINT, steps=2, width=64, height=64, seed=seed,
                                               vae=vae, preview_every=0))
    return np.asarray(result.images[0].image), result.images[0].infotext


def test_override_decodes_with_the_file_and_none_restores(setup):
    from diffusers import AutoencoderKL

    root, registry, engine, donor = setup
    own, own_info = generate(engine, "None")
    other, other_info = generate(engine, "other.safetensors")
    assert np.abs(own.astype(int) - other.astype(int)).max() > 10
    assert "VAE" not in own_info.split("\n")[-1].replace("VAE hash", "")

    # The reference: the same checkpoint, in a fresh registry, whose own VAE is the donor's as diffusers loads it.
    from engine import Engine, ModelRegistry

    fresh = ModelRegistry(root, builtin_dir=None, device="cpu", cache_size=1)
    fresh.load(CHECKPOINT).pipeline.vae = AutoencoderKL.from_pretrained(donor / "vae").eval()
    reference, _ = generate(Engine(fresh), "None")
    assert np.array_equal(other, reference)
    own_vae = registry.load(CHECKPOINT).pipeline.vae

    bare, _ = generate(engine, "bare")  # diffusers-less spelling: the stem, and a file without the prefix
    assert np.array_equal(bare, reference)
    again, _ = generate(engine, "None")
    assert np.array_equal(again, own)
    assert registry.load(CHECKPOINT).pipeline.vae is own_vae


def test_automatic_picks_the_file_named_like_the_checkpoint(setup):
    root, registry, engine, _ = setup
    own, _ = generate(engine, "None")
    assert np.array_equal(generate(engine, "Automatic")[0], own)
    named = root / "VAE" / f"{CHECKPOINT}.vae.safetensors"
    named.write_bytes((root / "VAE" / "other.safetensors").read_bytes())
    registry.vaes.refresh()
    try:
        automatic, info = generate(engine, "Automatic")
        assert np.array_equal(automatic, generate(engine, "other.safetensors")[0])
        assert f"VAE: {named.name}" in info
    finally:
        named.unlink()
        registry.vaes.refresh()
    # A1111's rule is a name prefix; *.vae.* files among the checkpoints count too, and a pickle never does.
    beside = root / "Stable-diffusion" / f"{CHECKPOINT}-b.vae.safetensors"
    beside.write_bytes((root / "VAE" / "other.safetensors").read_bytes())
    (root / "Stable-diffusion" / f"{CHECKPOINT}-a.vae.pt").write_bytes(b"not loaded")
    registry.vaes.refresh()
    try:
        assert f"{CHECKPOINT}-b.vae.safetensors" in registry.vaes.choices()
        assert f"{CHECKPOINT}-a.vae.pt" not in registry.vaes.choices()
        assert not any(".vae" in name for name in (entry.name for entry in registry.refresh()))  # not checkpoints
        automatic, info = generate(engine, "Automatic")
        assert f"VAE: {beside.name}" in info and not np.array_equal(automatic, own)
    finally:
        beside.unlink()
        (root / "Stable-diffusion" / f"{CHECKPOINT}-a.vae.pt").unlink()
        registry.vaes.refresh()


def test_infotext_round_trip(setup):
    from engine.infotext import loading_notes, parse_infotext, request_fields_from_infotext

    root, registry, engine, _ = setup
    _, info = generate(engine, "other.safetensors")
    params = parse_infotext(info)
    expected_hash = hashlib.sha256((root / "VAE" / "other.safetensors").read_bytes()).hexdigest()[:10]
    assert params["VAE"] == "other.safetensors"
    assert params["VAE hash"] == expected_hash
    assert request_fields_from_infotext(params)["vae"] == "other.safetensors"
    line = info.split("\n")[-1]
    assert line.index("Model: ") < line.index("VAE hash: ") < line.index("VAE: ")  # A1111's order
    assert not loading_notes(params, request_fields_from_infotext(params))  # the hash is a fact about the image, not a setting


def test_bad_files_are_clear_errors_and_change_nothing(setup):
    root, registry, engine, _ = setup
    own, _ = generate(engine, "None")
    own_vae = registry.load(CHECKPOINT).pipeline.vae
    data = (root / "VAE" / "other.safetensors").read_bytes()
    (root / "VAE" / "cut.safetensors").write_bytes(data[: len(data) // 2])
    partial = load_file(str(root / "VAE" / "other.safetensors"))
    partial.pop(sorted(partial)[0])
    save_file(partial, str(root / "VAE" / "partial.safetensors"))
    registry.vaes.refresh()
    with pytest.raises(ModelError, match=r"cut\.safetensors.*(corrupt or truncated)"):
        generate(engine, "cut.safetensors")
    with pytest.raises(ModelError, match=r"partial\.safetensors does not fit"):
        generate(engine, "partial.safetensors")
    with pytest.raises(ValidationError, match="no VAE named 'missing.safetensors'"):
        generate(engine, "missing.safetensors")
    assert registry.load(CHECKPOINT).pipeline.vae is own_vae
    assert np.array_equal(generate(engine, "None")[0], own)
    # A VAE left in the pipeline by a job that never finished is not taken for the checkpoint's own.
    registry.load(CHECKPOINT).pipeline.vae = registry.vaes.load(registry.vaes.find("other.safetensors"), own_vae)
    assert np.array_equal(generate(engine, "None")[0], own)
    assert registry.load(CHECKPOINT).pipeline.vae is own_vae


def test_the_request_refuses_a_non_name():
    from engine.request import GenerationRequest

    with pytest.raises(SfumatoError):
        GenerationRequest(vae="")


def test_api_lists_vaes_and_reads_override_settings(setup):
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from engine.settings import Settings
    from ui.api import install_api, txt2img_request
    from ui.api_models import Txt2ImgRequest

    root, registry, _, _ = setup
    studio = SimpleNamespace(registry=registry, default_model=lambda: CHECKPOINT, presets=SimpleNamespace(list=lambda: []),
                             settings=Settings(), extensions=None)
    app = FastAPI()
    install_api(app, studio)
    client = TestClient(app)
    listed = client.get("/sdapi/v1/sd-vae").json()
    assert {"model_name": "other.safetensors", "filename": str(root / "VAE" / "other.safetensors")} in listed
    assert client.post("/sdapi/v1/refresh-vae").status_code == 200
    request = txt2img_request(studio, Txt2ImgRequest(prompt="x", override_settings={"sd_vae": "other.safetensors"}))
    assert request.vae == "other.safetensors"
    assert txt2img_request(studio, Txt2ImgRequest(prompt="x")).vae == "Automatic"


def test_the_ui_picker_reaches_the_request(setup):
    from types import SimpleNamespace

    from engine.settings import Settings
    from ui.generation_tab import _build_request

    studio = SimpleNamespace(settings=Settings())
    request = _build_request(studio, "txt2img", CHECKPOINT, {"prompt": "x"}, {"vae": "other.safetensors"}, {})
    assert request.vae == "other.safetensors"
    assert _build_request(studio, "txt2img", CHECKPOINT, {"prompt": "x"}, {}, {}).vae == "Automatic"


def test_png_info_checks_the_vae_hash(setup):
    from engine.networks.vae_files import infotext_problems

    root, registry, _, _ = setup
    right = hashlib.sha256((root / "VAE" / "other.safetensors").read_bytes()).hexdigest()[:10]
    assert infotext_problems({"VAE": "other.safetensors", "VAE hash": right}, registry.vaes) == []
    assert "not the file the picture used" in infotext_problems({"VAE": "other.safetensors", "VAE hash": "0" * 10},
                                                                registry.vaes)[0]
    assert "not in models/VAE" in infotext_problems({"VAE": "gone.safetensors"}, registry.vaes)[0]


def test_png_info_send_notes(setup):
    from types import SimpleNamespace

    from ui.send_to import network_notes, vae_choice

    root, registry, _, _ = setup
    studio = SimpleNamespace(registry=registry)
    right = hashlib.sha256((root / "VAE" / "other.safetensors").read_bytes()).hexdigest()[:10]
    matching = f"p\nSteps: 2, VAE hash: {right}, VAE: other.safetensors"
    assert network_notes(studio, matching) == []
    assert vae_choice(studio, matching) == "other.safetensors"  # sending it sets the SD VAE picker
    assert vae_choice(studio, "p\nSteps: 2, Seed: 1, VAE: other") == "other.safetensors"  # its stem names it too
    assert vae_choice(studio, "p\nSteps: 2, Seed: 1, VAE: gone.safetensors") is None
    assert vae_choice(studio, "p\nSteps: 2") is None
    notes = network_notes(studio, 'p\nSteps: 2, TI hashes: "absent: 0123456789ab", VAE: gone.safetensors')
    assert any("absent" in note for note in notes) and any("gone.safetensors" in note for note in notes)
    assert network_notes(studio, "p\nSteps: 2") == []


def test_the_cli_option_reaches_the_request():
    import argparse

    from ui.cli import add_generate_args, build_request

    parser = argparse.ArgumentParser()
    add_generate_args(parser)
    assert build_request(parser.parse_args(["--prompt", "x", "--out", "o", "--vae", "None"]), "x").vae == "None"
    assert build_request(parser.parse_args(["--prompt", "x", "--out", "o"]), "x").vae == "Automatic"
