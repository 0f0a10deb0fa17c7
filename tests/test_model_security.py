"""Model files are untrusted: pickles are never unpickled, broken or mismatched files give a clear
ModelError while the model already loaded keeps working, and a model name is never a path."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import numpy as np
import pytest
import torch

from engine import Engine, GenerationRequest, ModelError, ModelRegistry, UnsafeModelError
from engine.tiny_models import build_sd1
from tests._checkpoints import copy_configs, copy_model, edit_json, write_malicious_pickle, write_single_file

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(300)

GOOD_PATH = "Stable-diffusion/good"
GOOD = "good"  # a diffusers folder is named by its folder, as A1111 names a checkpoint by its file


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return build_sd1(tmp_path_factory.mktemp("source") / "sd1", seed=0)


@pytest.fixture(scope="module")
def wide_source(tmp_path_factory) -> Path:
    """A tiny SD1 of another architecture (its UNet is twice as wide)."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    folder = tmp_path_factory.mktemp("wide") / "sd1-wide"
    build_sd1(folder, seed=5)
    config = UNet2DConditionModel.load_config(folder / "unet")
    config["block_out_channels"] = [32, 64]
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.unet = UNet2DConditionModel.from_config(config)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture()
def models(tmp_path, source) -> Path:
    root = tmp_path / "models"
    copy_model(source, root / GOOD_PATH)
    return root


def request(model: str) -> GenerationRequest:
    return GenerationRequest(prompt="a red circle", model=model, steps=3, width=64, height=64, seed=3, preview_every=0)


# -- pickles ------------------------------------------------------------------------------------
def test_the_malicious_pickle_is_live(tmp_path):
    """Sanity: unpickling the test payload really writes the file (so the tests below mean something)."""
    sentinel = tmp_path / "pwned"
    path = write_malicious_pickle(tmp_path / "evil.ckpt", sentinel)
    torch.load(path, weights_only=False)
    assert sentinel.exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_checkpoint_is_listed_but_never_unpickled(models, tmp_path, suffix):
    sentinel = tmp_path / "pwned"
    write_malicious_pickle(models / "Stable-diffusion" / f"evil{suffix}", sentinel)
    registry = ModelRegistry(models, builtin_dir=None, device="cpu")
    assert registry.get(f"evil{suffix}").kind == "pickle"
    assert registry.default_name() == GOOD  # never the default
    with pytest.raises(UnsafeModelError, match=r"pickle.*\.safetensors"):
        registry.load(f"evil{suffix}")
    with pytest.raises(UnsafeModelError):
        Engine(registry).generate(request(f"evil{suffix}"))
    assert not sentinel.exists()


@pytest.mark.parametrize("component, weights", [("unet", "diffusion_pytorch_model.bin"), ("text_encoder", "pytorch_model.bin")])
def test_diffusers_folder_with_pickle_weights_is_refused_before_unpickling(models, tmp_path, component, weights):
    sentinel = tmp_path / "pwned"
    folder = models / "Stable-diffusion" / "pickled"
    copy_model(models / GOOD_PATH, folder)
    for path in (folder / component).glob("*.safetensors"):
        path.unlink()
    write_malicious_pickle(folder / component / weights, sentinel)
    registry = ModelRegistry(models, builtin_dir=None, device="cpu")
    with pytest.raises(UnsafeModelError, match=f"{component} has only pickle weights.*safetensors"):
        registry.load("Stable-diffusion/pickled")
    assert not sentinel.exists()


def test_diffusers_itself_refuses_pickle_weights_when_asked_for_safetensors(models, tmp_path):
    """What the registry relies on underneath: ``use_safetensors=True`` never falls back to a .bin."""
    from diffusers import DiffusionPipeline

    sentinel = tmp_path / "pwned"
    folder = models / "Stable-diffusion" / "pickled"
    copy_model(models / GOOD_PATH, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    write_malicious_pickle(folder / "unet" / "diffusion_pytorch_model.bin", sentinel)
    with pytest.raises(OSError, match="safetensors"):
        DiffusionPipeline.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    assert not sentinel.exists()


# -- broken files: a clear error, and the loaded model stays usable --------------------------------
def _truncated_single_file(models: Path, source: Path, wide: Path) -> str:
    path = write_single_file(source, models / "Stable-diffusion" / "cut.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "cut.safetensors"


def _garbage_single_file(models: Path, source: Path, wide: Path) -> str:
    (models / "Stable-diffusion" / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return "junk.safetensors"


def _empty_single_file(models: Path, source: Path, wide: Path) -> str:
    (models / "Stable-diffusion" / "empty.safetensors").write_bytes(b"")
    return "empty.safetensors"


def _single_file_with_another_models_config(models: Path, source: Path, wide: Path) -> str:
    path = write_single_file(source, models / "Stable-diffusion" / "mismatch.safetensors", with_config=False)
    copy_configs(wide, path.with_suffix(".config"))
    return "mismatch.safetensors"


def _single_file_config_with_extra_layers(models: Path, source: Path, wide: Path) -> str:
    """Shapes all fit, but the config wants a second transformer layer the file does not have."""
    path = write_single_file(source, models / "Stable-diffusion" / "deeper.safetensors")
    edit_json(path.with_suffix(".config") / "unet" / "config.json", transformer_layers_per_block=2)
    return "deeper.safetensors"


def _single_file_config_with_fewer_text_layers(models: Path, source: Path, wide: Path) -> str:
    """The file's second text-encoder layer would be dropped silently by diffusers."""
    path = write_single_file(source, models / "Stable-diffusion" / "shallow.safetensors")
    edit_json(path.with_suffix(".config") / "text_encoder" / "config.json", num_hidden_layers=1)
    return "shallow.safetensors"


def _a_lora_in_the_checkpoint_folder(models: Path, source: Path, wide: Path) -> str:
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 16)},
              str(models / "Stable-diffusion" / "style-lora.safetensors"))
    return "style-lora.safetensors"


def _folder(models: Path, source: Path, name: str) -> Path:
    return copy_model(source, models / "Stable-diffusion" / name)


def _unsupported_pipeline_class(models: Path, source: Path, wide: Path) -> str:
    folder = _folder(models, source, "flux")
    edit_json(folder / "model_index.json", _class_name="KandinskyPipeline")
    return "Stable-diffusion/flux"


def _component_naming_arbitrary_code(models: Path, source: Path, wide: Path) -> str:
    folder = _folder(models, source, "sneaky")
    edit_json(folder / "model_index.json", unet=["os", "system"])
    return "Stable-diffusion/sneaky"


def _sdxl_refiner_index(models: Path, source: Path, wide: Path) -> str:
    folder = _folder(models, source, "refiner")
    edit_json(folder / "model_index.json", _class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None],
              text_encoder_2=["transformers", "CLIPTextModelWithProjection"], tokenizer_2=["transformers", "CLIPTokenizer"])
    return "Stable-diffusion/refiner"


def _unet_config_with_wrong_shapes(models: Path, source: Path, wide: Path) -> str:
    folder = _folder(models, source, "wrong-shapes")
    edit_json(folder / "unet" / "config.json", block_out_channels=[32, 64])
    return "Stable-diffusion/wrong-shapes"


def _unet_config_with_missing_weights(models: Path, source: Path, wide: Path) -> str:
    folder = _folder(models, source, "missing-weights")
    edit_json(folder / "unet" / "config.json", transformer_layers_per_block=2)
    return "Stable-diffusion/missing-weights"


def _text_encoder_config_with_extra_layer(models: Path, source: Path, wide: Path) -> str:
    folder = _folder(models, source, "random-layer")
    edit_json(folder / "text_encoder" / "config.json", num_hidden_layers=3)
    return "Stable-diffusion/random-layer"


def _corrupt_weights_in_a_folder(models: Path, source: Path, wide: Path) -> str:
    folder = _folder(models, source, "corrupt")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return "Stable-diffusion/corrupt"


def _broken_model_index(models: Path, source: Path, wide: Path) -> str:
    folder = _folder(models, source, "bad-index")
    (folder / "model_index.json").write_text("{ this is not json")
    return "Stable-diffusion/bad-index"


BROKEN = {  # maker -> what the message must say
    _truncated_single_file: "corrupt or truncated",
    _garbage_single_file: "corrupt or truncated",
    _empty_single_file: "corrupt or truncated",
    _single_file_with_another_models_config: "mismatch.config.*different architecture",
    _single_file_config_with_extra_layers: "not in the file",
    _single_file_config_with_fewer_text_layers: "no place in the config",
    _a_lora_in_the_checkpoint_folder: "LoRA",
    _unsupported_pipeline_class: "KandinskyPipeline",
    _component_naming_arbitrary_code: "os.system",
    _sdxl_refiner_index: "refiner",
    _unet_config_with_wrong_shapes: "has shape .* different architecture",
    _unet_config_with_missing_weights: "not in the file",
    _text_encoder_config_with_extra_layer: "not in the file",
    _corrupt_weights_in_a_folder: "corrupt or truncated",
    _broken_model_index: "not readable JSON",
}


@pytest.fixture(scope="module")
def broken(tmp_path_factory, source, wide_source):
    """One tree holding every broken model beside a good one, and an engine that has drawn with the good one."""
    models = tmp_path_factory.mktemp("broken") / "models"
    copy_model(source, models / GOOD_PATH)
    names = {maker: maker(models, source, wide_source) for maker in BROKEN}
    engine = Engine(ModelRegistry(models, builtin_dir=None, device="cpu", cache_size=2))
    reference = np.asarray(engine.generate(request(GOOD)).images[0].image)
    return engine, names, reference


@pytest.mark.parametrize("make_broken", list(BROKEN), ids=[maker.__name__.strip("_") for maker in BROKEN])
def test_broken_model_gives_a_clear_error_and_the_loaded_model_stays_loaded(broken, make_broken):
    engine, names, _ = broken
    good = engine.registry.load(GOOD)
    with pytest.raises(ModelError, match=BROKEN[make_broken]) as raised:
        engine.generate(request(names[make_broken]))
    assert not isinstance(raised.value, UnsafeModelError)
    assert engine.registry.loaded_names() == [GOOD] and engine.registry.load(GOOD) is good


def test_engine_draws_the_same_image_after_every_failed_load(broken):
    engine, names, reference = broken
    for name in names.values():
        with pytest.raises(ModelError):
            engine.registry.load(name)
    assert np.array_equal(np.asarray(engine.generate(request(GOOD)).images[0].image), reference)


# -- names are looked up, never opened ------------------------------------------------------
@pytest.mark.parametrize("name", [
    "../good", "../../etc/passwd", "/etc/passwd", "Stable-diffusion/../Stable-diffusion/good", "good\x00.safetensors",
    "Stable-diffusion/good/unet/diffusion_pytorch_model.safetensors", "~/models/x", "C:\\models\\x.safetensors",
])
def test_path_like_names_never_resolve(models, name):
    registry = ModelRegistry(models, builtin_dir=None, device="cpu")
    with pytest.raises(ModelError, match="not found"):
        registry.get(name)


def test_an_absolute_path_to_a_real_checkpoint_outside_the_tree_is_not_loaded(models, source, tmp_path):
    outside = write_single_file(source, tmp_path / "outside" / "elsewhere.safetensors")
    registry = ModelRegistry(models, builtin_dir=None, device="cpu")
    for name in (str(outside), str(models / GOOD_PATH), os.path.relpath(outside, models)):
        with pytest.raises(ModelError, match="not found"):
            registry.load(name)
    assert registry.loaded_names() == []
