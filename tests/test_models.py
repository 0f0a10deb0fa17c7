"""The model registry: an A1111-style tree is scanned and named as A1111 names it, single-file
checkpoints load offline and draw the same pixels as the diffusers folder they came from,
families are told apart, and loaded models are cached (LRU)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import hashlib
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import Engine, GenerationRequest, ModelError, ModelRegistry
from engine.families import SD1, SD2, SDXL, detect_family

FAMILIES = {"sd1": SD1, "sdxl": SDXL}
from engine.models import SINGLE_FILE_CONFIGS
from engine.tiny_models import build_sd1
from tests._checkpoints import build_sd2_like, build_sdxl_two_widths, copy_configs, copy_model, write_single_file

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(300)

# Models are named as A1111 names them: a checkpoint by its file's stem, a diffusers folder by its name.
SD1_FOLDER = "tiny-sd1"
SD1_FILE = "sd1-single"
SDXL_FOLDER = "tiny-sdxl"
SDXL_FILE = "sdxl-single"
PICKLE = "old"
SD1_FILE_PATH = "sd1-single.safetensors"
SDXL_FILE_PATH = "sub/sdxl-single.safetensors"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {"sd1": build_sd1(root / "sd1", seed=0), "sdxl": build_sdxl_two_widths(root / "sdxl", seed=3),
            "sd1-inpaint": build_sd1(root / "sd1-inpaint", seed=4, in_channels=9)}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, sources) -> Path:
    """models/Stable-diffusion with single files (one in a subfolder), diffusers folders inside and
    outside it, and a pickle."""
    models = tmp_path_factory.mktemp("tree") / "models"
    checkpoints = models / "Stable-diffusion"
    copy_model(sources["sd1"], checkpoints / "tiny-sd1")
    copy_model(sources["sdxl"], models / "diffusers" / "deep" / "tiny-sdxl")
    write_single_file(sources["sd1"], checkpoints / SD1_FILE_PATH)
    write_single_file(sources["sdxl"], checkpoints / SDXL_FILE_PATH)
    (checkpoints / "old.ckpt").write_bytes(b"not a real pickle; never opened")
    return models


@pytest.fixture(scope="module")
def registry(models_dir) -> ModelRegistry:
    return ModelRegistry(models_dir, builtin_dir=None, device="cpu", cache_size=8)


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to reach the hub (or anything else) fails loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def pixels(engine: Engine, model: str, **changes) -> np.ndarray:
    fields = dict(prompt="a red circle", negative_prompt="blurry", model=model, steps=3, width=64, height=64, seed=7, preview_every=0)
    fields.update(changes)
    return np.asarray(engine.generate(GenerationRequest(**fields)).images[0].image)


# -- scanning and naming -----------------------------------------------------------------------
def test_tree_is_listed_with_a1111_names_and_kinds(registry):
    kinds = {entry.name: entry.kind for entry in registry.list()}
    assert kinds == {SD1_FOLDER: "diffusers", SDXL_FOLDER: "diffusers", SD1_FILE: "single-file",
                     SDXL_FILE: "single-file", PICKLE: "pickle"}


def test_single_file_config_folders_are_not_listed_as_models(registry, models_dir):
    assert (models_dir / "Stable-diffusion" / "sd1-single.config" / "model_index.json").is_file()
    assert not any(".config" in name for name in registry.names())


def test_default_is_a_user_model_never_a_pickle(registry):
    assert registry.default_name() in {SD1_FOLDER, SDXL_FOLDER, SD1_FILE, SDXL_FILE}


def test_default_falls_back_to_the_builtin_demo(tmp_path, sources):
    builtin = tmp_path / "builtin"
    copy_model(sources["sd1"], builtin / "sfumato-demo")
    only_pickles = tmp_path / "models" / "Stable-diffusion"
    only_pickles.mkdir(parents=True)
    (only_pickles / "x.ckpt").write_bytes(b"x")
    assert ModelRegistry(tmp_path / "models", builtin_dir=builtin, device="cpu").default_name() == "sfumato-demo"
    write_single_file(sources["sd1"], only_pickles / "mine.safetensors")
    assert ModelRegistry(tmp_path / "models", builtin_dir=builtin, device="cpu").default_name() == "mine"


def test_no_models_at_all_says_where_to_put_one(tmp_path):
    with pytest.raises(ModelError, match="models/Stable-diffusion"):
        ModelRegistry(tmp_path, builtin_dir=None, device="cpu").default_name()


def test_refresh_picks_up_new_and_removed_files(tmp_path, sources):
    models = tmp_path / "models"
    registry = ModelRegistry(models, builtin_dir=None, device="cpu")
    assert registry.names() == []
    write_single_file(sources["sd1"], models / "Stable-diffusion" / "late.safetensors")
    copy_model(sources["sd1"], models / "elsewhere" / "late-folder")
    assert set(registry.names()) == set()  # nothing changes until a refresh
    assert {e.name for e in registry.refresh()} == {"late", "late-folder"}
    (models / "Stable-diffusion" / "late.safetensors").unlink()
    assert registry.refresh() and registry.names() == ["late-folder"]


@pytest.mark.parametrize("spelling, expected", [
    (SD1_FILE, SD1_FILE),
    (f"{SD1_FILE} [0123456789]", SD1_FILE),  # A1111 title: "name [hash]"
    ("sd1-single.safetensors", SD1_FILE),  # with the extension
    ("sd1-single.safetensors [0123456789]", SD1_FILE),  # A1111's title of a checkpoint
    ("Stable-diffusion/sd1-single.safetensors", SD1_FILE),  # Sfumato's older names: the path under models/
    (f"{SDXL_FILE_PATH} [abcdef0123]", SDXL_FILE),
    ("sub/sdxl-single", SDXL_FILE),
    ("sub_sdxl-single", SDXL_FILE),  # A1111's model_name of a checkpoint in a subfolder
    (SD1_FOLDER, SD1_FOLDER),
    ("Stable-diffusion/tiny-sd1", SD1_FOLDER),
    ("diffusers/deep/tiny-sdxl", SDXL_FOLDER),
    ("old.ckpt", PICKLE),
])
def test_a1111_spellings_resolve(registry, spelling, expected):
    assert registry.get(spelling).name == expected


def test_single_file_hash_is_a1111_sha256_prefix(registry, models_dir):
    expected = hashlib.sha256((models_dir / "Stable-diffusion" / SD1_FILE_PATH).read_bytes()).hexdigest()[:10]
    loaded = registry.load(SD1_FILE)
    assert loaded.short_hash == expected and len(expected) == 10
    assert registry.short_hash(registry.get(SD1_FILE)) == expected


# -- single files --------------------------------------------------------------------------
@pytest.mark.parametrize("folder, single", [(SD1_FOLDER, SD1_FILE), (SDXL_FOLDER, SDXL_FILE)], ids=["sd1", "sdxl"])
def test_single_file_loads_offline_and_draws_the_same_pixels(registry, no_network, folder, single):
    engine = Engine(registry)
    from_file = registry.load(single)
    assert from_file.entry.kind == "single-file"
    assert np.array_equal(pixels(engine, single), pixels(engine, folder))


def test_single_file_weights_equal_the_folder_weights(registry):
    folder, single = registry.load(SDXL_FOLDER).pipeline, registry.load(SDXL_FILE).pipeline
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(folder, component).state_dict(), getattr(single, component).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), component


def test_inpainting_single_file_gets_nine_input_channels_from_its_weights(tmp_path, sources):
    """The config beside it says 4 input channels (a plain SD1 config); the weights say 9."""
    checkpoints = tmp_path / "models" / "Stable-diffusion"
    write_single_file(sources["sd1-inpaint"], checkpoints / "inpaint.safetensors", with_config=False)
    copy_configs(sources["sd1"], checkpoints / "inpaint.config")
    loaded = ModelRegistry(tmp_path / "models", builtin_dir=None, device="cpu").load("inpaint.safetensors")
    assert loaded.is_inpainting_model


def test_single_file_family_file_beside_it_is_honoured(tmp_path, sources):
    checkpoints = tmp_path / "models" / "Stable-diffusion"
    write_single_file(sources["sd1"], checkpoints / "own.safetensors")
    (checkpoints / "own.config" / "sfumato.json").write_text(json.dumps({"native_width": 64, "native_height": 64}))
    loaded = ModelRegistry(tmp_path / "models", builtin_dir=None, device="cpu").load("own")
    assert loaded.family.native_size == (64, 64) and loaded.family.latent_rgb_factors == SD1.latent_rgb_factors


def test_without_its_own_config_a_tiny_file_gets_the_shipped_sd1_config_and_a_clear_error(tmp_path, sources, no_network):
    """No ``<name>.config``: engine/configs/sd1 (real SD 1.5 shapes) is used offline, and the
    tiny weights do not fit it, which is reported, not fetched from the hub."""
    checkpoints = tmp_path / "models" / "Stable-diffusion"
    write_single_file(sources["sd1"], checkpoints / "bare.safetensors", with_config=False)
    registry = ModelRegistry(tmp_path / "models", builtin_dir=None, device="cpu")
    with pytest.raises(ModelError, match="configs/sd1"):
        registry.load("bare.safetensors")


# -- the shipped configs ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_shipped_tokenizers_encode_like_real_clip(tmp_path, family):
    from engine.models import _materialise_config
    from transformers import CLIPTokenizer

    folder = _materialise_config(SINGLE_FILE_CONFIGS / family, FAMILIES[family], tmp_path, None)
    names = ["tokenizer", "tokenizer_2"] if family == "sdxl" else ["tokenizer"]
    for name in names:
        tokenizer = CLIPTokenizer.from_pretrained(folder / name)
        assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
        assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        padded = tokenizer("a cat", padding="max_length", max_length=8).input_ids
        assert padded[-1] == (0 if name == "tokenizer_2" else 49407)  # SDXL's second tokenizer pads with "!"


def test_shipped_config_folders_stay_small():
    for family in ("sd1", "sdxl", "clip_tokenizer"):
        size = sum(p.stat().st_size for p in (SINGLE_FILE_CONFIGS / family).rglob("*") if p.is_file())
        assert size < 3 * 1024 * 1024, family
    assert not any(p.is_symlink() for p in SINGLE_FILE_CONFIGS.rglob("*"))


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> dict[str, object]:
    """The shipped SD 1.5 and SDXL configs built as empty (meta-device) modules."""
    from engine.models import _empty_components, _materialise_config

    built = {}
    for family in ("sd1", "sdxl"):
        folder = _materialise_config(SINGLE_FILE_CONFIGS / family, FAMILIES[family], tmp_path_factory.mktemp(family), None)
        built[family] = _empty_components(folder, FAMILIES[family])
    return built


def test_shipped_configs_build_models_of_the_published_sizes(shipped):
    """Parameter counts of SD 1.5 and SDXL base 1.0 (UNet, VAE, CLIP-L, OpenCLIP bigG)."""
    expected = {"sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
                "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}}
    for family, sizes in expected.items():
        for component, size in sizes.items():
            module = getattr(shipped[family], component)
            assert sum(p.numel() for p in module.parameters()) == size, (family, component)


@pytest.mark.parametrize("family, model_type", [("sd1", "v1"), ("sdxl", "xl_base")])
def test_our_single_file_names_for_full_size_models_are_the_ones_diffusers_reads(shipped, family, model_type):
    """Names and shapes only (meta tensors): a full-size SD 1.5/SDXL file as our converter names it is
    recognised by diffusers and maps back onto every weight of the shipped configs' modules."""
    from diffusers.loaders import single_file_utils as sfu

    from engine.checkpoint_convert import SDXL_OPENCLIP_PREFIX

    modules = shipped[family]
    ldm = {}
    for component in FAMILIES[family].single_file.components:
        ldm.update(component.convert(getattr(modules, component.attribute)))
    assert sfu.infer_diffusers_model_type(ldm) == model_type
    back = {"unet": sfu.convert_ldm_unet_checkpoint(ldm, dict(modules.unet.config)),
            "vae": sfu.convert_ldm_vae_checkpoint(ldm, dict(modules.vae.config)),
            "text_encoder": {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(ldm).items()}}
    if family == "sdxl":
        back["text_encoder_2"] = sfu.convert_open_clip_checkpoint(modules.text_encoder_2, ldm, prefix=SDXL_OPENCLIP_PREFIX)
    for component, converted in back.items():
        state = getattr(modules, component).state_dict()
        assert converted.keys() == state.keys(), component
        assert all(converted[k].shape == state[k].shape for k in state), component


# -- families ------------------------------------------------------------------------------
def test_families_are_told_apart_and_carry_their_constants(registry, tmp_path):
    assert registry.load(SD1_FOLDER).family == SD1
    assert registry.load(SD1_FILE).family == SD1
    xl = registry.load(SDXL_FILE).family
    assert xl == SDXL and xl.latent_rgb_bias == SDXL.latent_rgb_bias and xl.text_encoders[1] == ("tokenizer_2", "text_encoder_2")
    sd2 = ModelRegistry(build_sd2_like(tmp_path / "m" / "sd2").parent, builtin_dir=None, device="cpu").load("sd2")
    assert sd2.family == SD2 and sd2.family.native_size == (768, 768)


def test_family_rules_on_unet_configs():
    assert detect_family({"cross_attention_dim": 768}) == SD1
    assert detect_family({"cross_attention_dim": 1024}) == SD2
    assert detect_family({"cross_attention_dim": 2048, "addition_embed_type": "text_time"}) == SDXL


# -- the cache -----------------------------------------------------------------------------
def test_cache_returns_the_same_object_and_evicts_the_least_recently_used(models_dir):
    registry = ModelRegistry(models_dir, builtin_dir=None, device="cpu", cache_size=2)
    first = registry.load(SD1_FOLDER)
    assert registry.load(SD1_FOLDER) is first
    registry.load(SD1_FILE)
    assert registry.load(SD1_FOLDER) is first  # now the most recently used
    registry.load(SDXL_FOLDER)  # evicts SD1_FILE, not the older-loaded SD1_FOLDER
    assert registry.loaded_names() == [SD1_FOLDER, SDXL_FOLDER]
    assert registry.load(SD1_FOLDER) is first
    registry.load(SD1_FILE)  # evicts SDXL_FOLDER
    assert registry.loaded_names() == [SD1_FOLDER, SD1_FILE]


def test_an_evicted_model_is_reloaded_as_a_new_object(models_dir):
    registry = ModelRegistry(models_dir, builtin_dir=None, device="cpu", cache_size=1)
    first = registry.load(SD1_FOLDER)
    registry.load(SD1_FILE)
    assert registry.loaded_names() == [SD1_FILE]
    assert registry.load(SD1_FOLDER) is not first


def test_a_pickle_is_listed_but_loading_it_is_refused(registry):
    from engine import UnsafeModelError

    with pytest.raises(UnsafeModelError, match="safetensors"):
        registry.load(PICKLE)
