"""Flow models as users keep their files (issue #19): SD 3.5's original single file and Forge/ComfyUI's split files
load back and draw the same pixels as the diffusers folder they were written from; GGUF and fp8 transformers load;
files that do not belong together are refused with the file named, and the model loaded before stays loaded."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from engine.engine import Engine
from engine.errors import ModelError
from engine.models import ModelRegistry
from engine.request import GenerationRequest
from tests import _flow_files as files
from tests._sd3_fixture import build_folder, build_pipeline
from tests._t5_tokenizer import build_t5_tokenizer

PROMPT = "a red fox"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("source")
    pipeline = build_pipeline()
    folder = build_folder(root / "sd3tiny")
    return pipeline, folder


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    """The diffusers folder's picture: what every other layout must draw, pixel for pixel."""
    _, folder = source
    models = tmp_path_factory.mktemp("reference")
    shutil.copytree(folder, models / "sd3tiny")
    return _draw(Engine(ModelRegistry(models, builtin_dir=None)), "sd3tiny")


def _draw(engine: Engine, model: str, **changes) -> np.ndarray:
    request = GenerationRequest(**{"prompt": PROMPT, "model": model, "steps": 3, "sampler": "Euler", "schedule": "Simple",
                                   "seed": 5, **changes})
    return np.asarray(engine.generate(request).images[0].image, dtype=np.int16)


def test_an_all_in_one_sd3_file_draws_what_the_folder_draws(source, reference, tmp_path):
    pipeline, folder = source
    files.sd3_all_in_one(pipeline, tmp_path / "Stable-diffusion" / "sd3-aio.safetensors", with_config_from=folder)
    registry = ModelRegistry(tmp_path, builtin_dir=None)
    assert registry.get("sd3-aio").usable, registry.get("sd3-aio").problem
    assert np.array_equal(_draw(Engine(registry), "sd3-aio"), reference)
    assert registry.load("sd3-aio").family.id == "sd3"


@pytest.mark.parametrize("layout", [("diffusion_models", "text_encoders", "vae"), ("Stable-diffusion", "text_encoder", "VAE"),
                                    ("unet", "clip", "vae")])
def test_split_files_with_one_fitting_set_load_with_no_picks(source, reference, tmp_path, layout):
    pipeline, folder = source
    transformer_dir, encoder_dir, vae_dir = layout
    files.sd3_split(pipeline, tmp_path, "sd3-split", folder, transformer_dir, encoder_dir, vae_dir)
    registry = ModelRegistry(tmp_path, builtin_dir=None)
    assert registry.get("sd3-split").usable, registry.get("sd3-split").problem
    assert np.array_equal(_draw(Engine(registry), "sd3-split"), reference)


@pytest.fixture(scope="module")
def two_sets(source, tmp_path_factory):
    """ComfyUI folders holding two CLIP-L files, two CLIP-G files and two VAEs: auto-pick must refuse, picks decide.
    The "other" files are the same weights, so any correct pick draws the reference picture."""
    pipeline, folder = source
    models = tmp_path_factory.mktemp("two-sets")
    files.sd3_split(pipeline, models, "sd3-split", folder)
    for name in ("clip_l", "clip_g"):
        shutil.copyfile(models / "text_encoders" / f"{name}.safetensors", models / "text_encoders" / f"other_{name}.safetensors")
    shutil.copyfile(models / "vae" / "sd3_vae.safetensors", models / "vae" / "other_vae.safetensors")
    return models


def test_two_fitting_sets_are_refused_without_picks_and_the_message_names_them(two_sets):
    registry = ModelRegistry(two_sets, builtin_dir=None)
    with pytest.raises(ModelError, match=r"several files fit \(clip_l.safetensors, other_clip_l.safetensors\)"):
        registry.load("sd3-split")
    assert registry.get("sd3-split").usable  # the model's own files are fine: it is not marked broken


def test_picks_name_the_files_for_the_engine(two_sets, reference):
    engine = Engine(ModelRegistry(two_sets, builtin_dir=None))
    picked = _draw(engine, "sd3-split", modules=("other_clip_l.safetensors", "text_encoders/other_clip_g.safetensors"),
                   vae="other_vae.safetensors")
    assert np.array_equal(picked, reference)
    loaded = engine.registry.loaded_names()
    assert loaded == ["sd3-split + other_clip_l.safetensors, text_encoders/other_clip_g.safetensors, other_vae.safetensors"]
    with pytest.raises(ModelError, match="has no place for sd3_vae.safetensors"):  # a second VAE
        engine.registry.load("sd3-split", modules=("clip_l", "clip_g", "other_vae.safetensors", "sd3_vae"))
    with pytest.raises(ModelError, match="'missing.safetensors' is not a text encoder or VAE file"):
        engine.registry.load("sd3-split", modules=("missing.safetensors",))
    assert engine.registry.get("sd3-split").usable
    assert engine.registry.loaded_names() == loaded  # the model loaded before stays loaded


def test_the_cli_takes_text_encoders_and_a_vae(two_sets, reference, tmp_path, capsys):
    from tests.test_cli import run_cli_here

    result = run_cli_here(capsys, "generate", "--models-dir", str(two_sets), "--model", "sd3-split", "--prompt", PROMPT,
                          "--steps", "3", "--sampler", "Euler", "--schedule", "Simple", "--seed", "5", "--cfg", "7",  # the reference's
                          "--text-encoder", "clip_l.safetensors", "--text-encoder", "clip_g.safetensors",
                          "--vae", "sd3_vae.safetensors", "--out", str(tmp_path), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    written = sorted(tmp_path.glob("*.png"))
    assert len(written) == 1
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(written[0]).convert("RGB"), dtype=np.int16), reference)


def test_the_api_takes_forge_additional_modules_as_full_paths(two_sets, reference):
    from types import SimpleNamespace

    from engine.settings import Settings
    from ui.api import txt2img_request
    from ui.api_models import Txt2ImgRequest

    registry = ModelRegistry(two_sets, builtin_dir=None)
    studio = SimpleNamespace(default_model=lambda: "sd3-split", registry=registry,
                             presets=SimpleNamespace(get=lambda name: None, list=lambda: []), settings=Settings(), extensions=None)
    modules = [str(two_sets / "text_encoders" / "clip_l.safetensors"), str(two_sets / "text_encoders" / "clip_g.safetensors"),
               str(two_sets / "vae" / "other_vae.safetensors")]
    body = Txt2ImgRequest(prompt=PROMPT, steps=3, sampler_name="Euler", scheduler="Simple", seed=5,
                          override_settings={"sd_model_checkpoint": "sd3-split", "forge_additional_modules": modules})
    request = txt2img_request(studio, body)
    assert request.modules == tuple(modules)
    image = Engine(registry).generate(request).images[0].image
    assert np.array_equal(np.asarray(image, dtype=np.int16), reference)


def _pixels_differ(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


# Measured on this fixture (3 Euler steps, 32 px), largest pixel difference from the float32 folder's picture:
# F16 GGUF 1/255 (mean 0.007), Q8_0 GGUF with 6 tensors quantized 1/255 (mean 0.08); Q4_0 would be 6/255 (mean 1.1).
GGUF_TOLERANCE = {"F16": 1, "Q8_0": 2}


@pytest.mark.parametrize("quantized", ["F16", "Q8_0"])
def test_a_gguf_transformer_loads_with_split_files_and_draws_close_to_the_folder(source, reference, tmp_path, quantized):
    pipeline, folder = source
    transformer = files.sd3_split(pipeline, tmp_path, "sd3-split", folder, transformer_dir="unet")
    gguf_path, count = files.mmdit_gguf(pipeline.transformer, tmp_path / "unet" / "sd3-q.gguf",
                                        None if quantized == "F16" else quantized)
    shutil.copytree(transformer.with_suffix(".config"), gguf_path.with_suffix(".config"))
    transformer.unlink()
    assert quantized == "F16" or count > 0
    registry = ModelRegistry(tmp_path, builtin_dir=None)
    assert registry.get("sd3-q").usable, registry.get("sd3-q").problem
    drawn = _draw(Engine(registry), "sd3-q")
    if quantized != "F16":
        from diffusers.quantizers.gguf.utils import GGUFParameter

        kinds = {type(p) for p in registry.load("sd3-q").pipeline.transformer.parameters()}
        assert GGUFParameter in kinds  # kept quantized, dequantized per layer
    assert _pixels_differ(drawn, reference) <= GGUF_TOLERANCE[quantized]


def test_an_fp8_single_file_is_upcast_to_the_compute_dtype(source, reference, tmp_path):
    pipeline, folder = source
    path = files.sd3_all_in_one(pipeline, tmp_path / "Stable-diffusion" / "sd3-fp8.safetensors", with_config_from=folder,
                                dtype=torch.float8_e4m3fn)
    registry = ModelRegistry(tmp_path, builtin_dir=None)
    model = registry.load("sd3-fp8")
    weight = model.pipeline.transformer.context_embedder.weight
    assert weight.dtype == torch.float32
    expected = pipeline.transformer.context_embedder.weight.detach().to(torch.float8_e4m3fn).to(torch.float32)
    assert torch.equal(weight, expected)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert handle.get_tensor("model.diffusion_model.context_embedder.weight").dtype == torch.float8_e4m3fn
    # fp8 keeps 3 mantissa bits: measured here, the picture differs from the float32 one by 4.3/255 on average.
    assert np.abs(_draw(Engine(registry), "sd3-fp8") - reference).mean() < 8


def test_a_vae_of_another_family_is_refused_naming_the_file(source, tmp_path):
    pipeline, folder = source
    files.sd3_split(pipeline, tmp_path, "sd3-split", folder)
    (tmp_path / "vae" / "sd3_vae.safetensors").unlink()
    files.save_vae(files.tiny_vae(latent_channels=4), tmp_path / "vae" / "sdxl_vae.safetensors")
    registry = ModelRegistry(tmp_path, builtin_dir=None)
    with pytest.raises(ModelError, match="no VAE for 16-channel latents was found"):
        registry.load("sd3-split")
    with pytest.raises(ModelError, match="sdxl_vae.safetensors is a VAE for 4-channel latents, but this model draws "
                                         "16-channel latents"):
        registry.load("sd3-split", modules=("sdxl_vae.safetensors",))
    assert registry.get("sd3-split").usable


def test_a_t5_of_the_wrong_width_is_refused_and_a_missing_t5_tokenizer_says_where_it_goes(source, tmp_path):
    pipeline, folder = source
    transformer = files.sd3_split(pipeline, tmp_path, "sd3-split", folder)
    files.add_t5_to_config(transformer.with_suffix(".config"), files.tiny_t5(d_model=32))
    files.save_text_encoder(files.tiny_t5(d_model=48), tmp_path / "text_encoders" / "t5xxl_fp16.safetensors")
    registry = ModelRegistry(tmp_path, builtin_dir=None)
    with pytest.raises(ModelError, match="t5xxl_fp16.safetensors is a T5-XXL-kind text encoder of width 48, but this "
                                         "model's text_encoder_3 needs width 32"):
        registry.load("sd3-split")
    files.save_text_encoder(files.tiny_t5(d_model=32), tmp_path / "text_encoders" / "t5xxl_fp16.safetensors")
    with pytest.raises(ModelError, match=r"T5-XXL text encoder needs its tokenizer.*models/text_encoder/<encoder file "
                                         r"name>.tokenizer/"):
        registry.load("sd3-split")
    assert registry.get("sd3-split").usable


def test_a_truncated_file_is_named_and_the_model_loaded_before_stays(source, reference, tmp_path):
    pipeline, folder = source
    files.sd3_split(pipeline, tmp_path, "sd3-split", folder)
    whole = files.sd3_all_in_one(pipeline, tmp_path / "Stable-diffusion" / "sd3-cut.safetensors", with_config_from=folder)
    data = whole.read_bytes()
    whole.write_bytes(data[: len(data) * 2 // 3])  # a download cut short
    registry = ModelRegistry(tmp_path, builtin_dir=None)
    assert "sd3-cut.safetensors is not a readable safetensors file (corrupt or truncated?): it is truncated" in (
        registry.get("sd3-cut").problem)
    engine = Engine(registry)
    assert np.array_equal(_draw(engine, "sd3-split"), reference)
    with pytest.raises(ModelError, match=r"sd3-cut.safetensors .*: it is truncated"):
        registry.load("sd3-cut")
    clip = tmp_path / "text_encoders" / "clip_g.safetensors"
    clip.write_bytes(clip.read_bytes()[:-100])
    other = ModelRegistry(tmp_path, builtin_dir=None)
    with pytest.raises(ModelError, match=r"clip_g.safetensors .*: it is truncated"):
        other.load("sd3-split")
    assert registry.loaded_names() == ["sd3-split"]  # the model loaded before the failed load is still there
    assert np.array_equal(_draw(engine, "sd3-split"), reference)


def test_the_shipped_sd35_configs_are_picked_by_the_transformers_shapes():
    """Meta-device MMDiTs built from the shipped configs, under their original names, pick their own config:
    38 joint blocks → Large (the base folder), 24 with 13 MMDiT-X blocks → Medium; anything else → none. Their
    weights (the positional table included) match Stability's published sizes, 8.1 B and 2.5 B, to their rounding."""
    import json

    from diffusers import SD3Transformer2DModel

    from engine.families import SD3
    from engine.models import SINGLE_FILE_CONFIGS

    base = json.loads((SINGLE_FILE_CONFIGS / "sd3" / "transformer" / "config.json").read_text())
    medium = json.loads((SINGLE_FILE_CONFIGS / "sd3" / "variants" / "medium" / "transformer" / "config.json").read_text())
    layout = SD3.file_layout
    for config, variant, parameters in ((base, "", 8.1e9), (medium, "medium", 2.5e9)):
        with torch.device("meta"):
            model = SD3Transformer2DModel.from_config(config)
        names = set(files.mmdit_original_names(model))
        assert layout.config_variant(names, lambda key: [0]) == variant
        weights = sum(tensor.numel() for tensor in model.state_dict().values())  # 8,146,280,768 and 2,469,663,936
        assert abs(weights - parameters) < 0.05e9
    assert layout.config_variant({"joint_blocks.0.x_block.attn.qkv.weight"}, lambda key: [0]) is None


def test_the_ui_picker_sends_its_picks_and_remembers_them_per_model(two_sets, tmp_path):
    from types import SimpleNamespace

    from engine.settings import Settings, SettingsStore
    from ui.app import _module_choices, remember_modules, remembered_modules
    from ui.generation_tab import _build_request

    store = SettingsStore(tmp_path / "settings.json")
    studio = SimpleNamespace(registry=ModelRegistry(two_sets, builtin_dir=None), settings=Settings(), settings_store=store)
    studio.update_settings = lambda settings: (store.save(settings), setattr(studio, "settings", settings))
    assert set(_module_choices(studio)) == {"clip_l.safetensors", "clip_g.safetensors", "other_clip_l.safetensors",
                                           "other_clip_g.safetensors", "sd3_vae.safetensors", "other_vae.safetensors"}
    request = _build_request(studio, "txt2img", "sd3-split", {"prompt": PROMPT},
                             {"modules": ["other_clip_l.safetensors", "other_clip_g.safetensors"]}, {})
    assert request.modules == ("other_clip_l.safetensors", "other_clip_g.safetensors")
    remember_modules(studio, "sd3-split", ["other_clip_l.safetensors", "gone.safetensors"])
    studio.settings = store.load()  # as a restart reads the settings file
    assert studio.settings.model_modules == {"sd3-split": ["other_clip_l.safetensors", "gone.safetensors"]}
    assert remembered_modules(studio, "sd3-split") == ["other_clip_l.safetensors"]  # a file since removed is dropped
    assert remembered_modules(studio, "another-model") == []


@pytest.fixture(scope="module")
def t5_source(tmp_path_factory):
    """The tiny SD 3.5 with a T5, as a diffusers folder, and that folder's picture."""
    models = tmp_path_factory.mktemp("t5-reference")
    pipeline = files.sd3_with_t5(models / "sd3t5")
    return pipeline, models / "sd3t5", _draw(Engine(ModelRegistry(models, builtin_dir=None)), "sd3t5")


def test_t5_loads_from_an_all_in_one_file_and_from_a_split_file_with_its_tokenizer_beside(t5_source, tmp_path):
    pipeline, folder, reference_t5 = t5_source
    files.sd3_all_in_one(pipeline, tmp_path / "Stable-diffusion" / "sd3-aio-t5.safetensors", with_config_from=folder)
    split = tmp_path / "split"
    transformer = files.sd3_split(pipeline, split, "sd3-split-t5", folder)
    shutil.rmtree(transformer.with_suffix(".config") / "tokenizer_3")  # the tokenizer comes with the T5 file instead
    files.save_text_encoder(pipeline.text_encoder_3, split / "text_encoders" / "t5xxl_fp16.safetensors")
    build_t5_tokenizer(split / "text_encoders" / "t5xxl_fp16.tokenizer")
    whole = Engine(ModelRegistry(tmp_path, builtin_dir=None))
    assert whole.registry.load("sd3-aio-t5").pipeline.text_encoder_3 is not None
    assert np.array_equal(_draw(whole, "sd3-aio-t5"), reference_t5)
    parts = Engine(ModelRegistry(split, builtin_dir=None))
    assert np.array_equal(_draw(parts, "sd3-split-t5"), reference_t5)
    assert parts.registry.load("sd3-split-t5").pipeline.text_encoder_3 is not None


def test_the_flux_converter_agrees_with_diffusers_own_at_flux1_width():
    """At Flux.1's width (3072), diffusers' converter and Sfumato's (which reads the width from the config) give the
    same names and shapes for the BFL file of a meta-device FLUX.1-dev transformer (one block of each kind)."""
    import json

    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from engine.model_files.bfl_keys import flux_to_diffusers
    from engine.models import SINGLE_FILE_CONFIGS

    config = json.loads((SINGLE_FILE_CONFIGS / "flux" / "transformer" / "config.json").read_text())
    config.update(num_layers=1, num_single_layers=1)
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    original = files.flux_original(model)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    ours = flux_to_diffusers(dict(original), config)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert set(ours) == set(model.state_dict())


PICKS = ["other_clip_l.safetensors", "other_clip_g.safetensors", "sd3_vae.safetensors"]


def test_forge_additional_modules_posted_to_options_are_remembered_for_the_model(two_sets, tmp_path):
    from ui.api import SdApi, txt2img_request
    from ui.api_models import Txt2ImgRequest
    from tests._api_fixtures import make_studio

    studio = make_studio(tmp_path, two_sets)
    api = SdApi(studio)
    answer = api.set_options({"sd_model_checkpoint": "sd3-split",
                              "forge_additional_modules": PICKS})
    assert answer["ignored"] == []
    assert studio.settings.model_modules == {"sd3-split": PICKS}
    assert studio.registry.loaded_names() == ["sd3-split + " + ", ".join(PICKS)]
    request = txt2img_request(studio, Txt2ImgRequest(prompt=PROMPT))
    assert (request.model, request.modules) == ("sd3-split", tuple(PICKS))


# -- Flux.1 -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_source(tmp_path_factory):
    """The tiny Flux.1 dev and schnell as diffusers folders, and each folder's picture."""
    from tests._flux_fixture import build_folder as build_flux_folder
    from tests._flux_fixture import build_pipeline as build_flux_pipeline

    models = tmp_path_factory.mktemp("flux-reference")
    made = {}
    for variant in ("dev", "schnell"):
        folder = build_flux_folder(models / f"flux-{variant}", variant)
        made[variant] = build_flux_pipeline(variant), folder
    engine = Engine(ModelRegistry(models, builtin_dir=None))
    return {variant: (pipeline, folder, _draw(engine, folder.name)) for variant, (pipeline, folder) in made.items()}


def test_flux_all_in_one_and_split_files_draw_what_the_folder_draws(flux_source, tmp_path):
    pipeline, folder, reference_flux = flux_source["dev"]
    files.flux_all_in_one(pipeline, tmp_path / "aio" / "Stable-diffusion" / "flux-aio.safetensors", with_config_from=folder)
    files.flux_split(pipeline, tmp_path / "split", "flux1-dev", folder)
    for models, name in ((tmp_path / "aio", "flux-aio"), (tmp_path / "split", "flux1-dev")):
        registry = ModelRegistry(models, builtin_dir=None)
        assert registry.get(name).usable, registry.get(name).problem
        assert np.array_equal(_draw(Engine(registry), name), reference_flux), name
        assert registry.load(name).family.name == "flux-dev"


def test_flux_schnell_split_files_are_told_from_dev_by_their_weights(flux_source, tmp_path):
    pipeline, folder, reference_schnell = flux_source["schnell"]
    files.flux_split(pipeline, tmp_path, "flux1-schnell", folder, transformer_dir="unet", encoder_dir="clip", vae_dir="VAE")
    registry = ModelRegistry(tmp_path, builtin_dir=None)
    assert registry.load("flux1-schnell").family.name == "flux-schnell"
    assert np.array_equal(_draw(Engine(registry), "flux1-schnell"), reference_schnell)


def test_a_flux_gguf_transformer_loads_through_sfumatos_converter(flux_source, tmp_path):
    pipeline, folder, reference_flux = flux_source["dev"]
    transformer = files.flux_split(pipeline, tmp_path, "flux1-dev", folder)
    gguf_path, count = files.write_gguf(files.flux_original(pipeline.transformer),
                                        tmp_path / "diffusion_models" / "flux1-dev-Q8_0.gguf", "flux", "Q8_0")
    shutil.copytree(transformer.with_suffix(".config"), gguf_path.with_suffix(".config"))
    transformer.unlink()
    assert count > 0
    registry = ModelRegistry(tmp_path, builtin_dir=None)
    # Measured: within 1/255 of the float32 folder's picture.
    assert _pixels_differ(_draw(Engine(registry), "flux1-dev-Q8_0"), reference_flux) <= 2


def test_a_flux_transformer_with_an_sd3_sized_t5_is_refused_naming_the_file(flux_source, tmp_path):
    pipeline, folder, _ = flux_source["dev"]
    files.flux_split(pipeline, tmp_path, "flux1-dev", folder)
    files.save_text_encoder(files.tiny_t5(d_model=64), tmp_path / "text_encoders" / "t5xxl_fp16.safetensors")
    with pytest.raises(ModelError, match="t5xxl_fp16.safetensors is a T5-XXL-kind text encoder of width 64, but this "
                                         "model's text_encoder_2 needs width 32"):
        ModelRegistry(tmp_path, builtin_dir=None).load("flux1-dev")


def test_the_shipped_flux_configs_have_flux1s_published_size_and_are_picked_by_shape():
    import json

    from diffusers import FluxTransformer2DModel

    from engine.families import FLUX_DEV
    from engine.models import SINGLE_FILE_CONFIGS

    layout = FLUX_DEV.file_layout
    for variant, folder in (("", SINGLE_FILE_CONFIGS / "flux"), ("schnell", SINGLE_FILE_CONFIGS / "flux" / "variants" / "schnell")):
        config = json.loads((folder / "transformer" / "config.json").read_text())
        with torch.device("meta"):
            model = FluxTransformer2DModel.from_config(config)
        weights = sum(tensor.numel() for tensor in model.state_dict().values())  # 11,901,408,320 and 11,891,178,560
        assert abs(weights - 12e9) < 0.15e9  # "a 12 billion parameter rectified flow transformer"
        assert layout.config_variant(set(files.flux_original(model)), lambda key: [0]) == variant
