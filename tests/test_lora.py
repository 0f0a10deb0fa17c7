"""LoRA and LyCORIS networks on the tiny SD 1.x and SDXL models and the demo model.

Weight math is checked against kohya's and LyCORIS's published formulas applied by hand to a copy of
the model's weights (ΔW = up·down·(alpha/rank)·multiplier; LoHa (w1a·w1b)⊙(w2a·w2b)·alpha/rank;
LoKr w1⊗(w2a·w2b)·alpha/rank), never through Sfumato's own code.
"""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import Engine, GenerationRequest, ModelRegistry
from engine.errors import ModelError, ValidationError
from engine.networks import NetworkError, active, parse_prompt, prepare
from tests import _lora_files as lora_files

DEMO = Path(__file__).resolve().parent.parent / "builtin" / "sfumato-demo"
TINY = ("tiny-sd1", "tiny-sdxl")
FORMATS = ("kohya", "locon", "peft", "loha", "lokr", "sgm-locon")
BUILDERS = {
    "kohya": lambda pipeline, path: lora_files.kohya_lora(pipeline, path, seed=1, alpha=1.0),
    "locon": lambda pipeline, path: lora_files.kohya_lora(pipeline, path, seed=2, alpha=4.0, conv=True),
    # kohya's SDXL trainer names UNet layers in the SGM layout (input_blocks_4_1_…, in_layers_2); SD 1.x files never do,
    # but the names are accepted on any UNet.
    "sgm-locon": lambda pipeline, path: lora_files.kohya_lora(pipeline, path, seed=6, alpha=2.0, conv=True, sgm=True),
    "peft": lambda pipeline, path: lora_files.peft_lora(pipeline, path, seed=3),
    "loha": lambda pipeline, path: lora_files.loha(pipeline, path, seed=4, alpha=1.0, conv=True),
    "lokr": lambda pipeline, path: lora_files.lokr(pipeline, path, seed=5, alpha=1.0),
}


# -- fixtures ---------------------------------------------------------------------------------------
def _build_files(engine: Engine, model: str, folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    pipeline = engine.registry.load(model).pipeline
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {kind: build(pipeline, folder / f"{model}-{kind}.safetensors") for kind, build in BUILDERS.items()}
    tensors["kohya-b"] = lora_files.kohya_lora(pipeline, folder / f"{model}-kohya-b.safetensors", seed=11, alpha=2.0, conv=True)
    tensors["text-only"] = lora_files.kohya_lora(pipeline, folder / f"{model}-text-only.safetensors", seed=12, unet=False, scale=1.0)
    return tensors


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    from engine.tiny_models import build_sd1, build_sdxl

    root = tmp_path_factory.mktemp("lora-models")
    build_sd1(root / "Stable-diffusion" / "tiny-sd1", seed=0)
    build_sdxl(root / "Stable-diffusion" / "tiny-sdxl", seed=2)
    return root


@pytest.fixture(scope="module")
def lora_engine(models_root):
    engine = Engine(ModelRegistry(models_root, builtin_dir=None, cache_size=2, device="cpu"))
    engine.file_tensors = {model: _build_files(engine, model, models_root / "Lora" / model) for model in TINY}
    # A LyCORIS folder with a subfolder: found too, named by stem.
    sub = models_root / "LyCORIS" / "styles"
    sub.mkdir(parents=True)
    shutil.copyfile(models_root / "Lora" / "tiny-sd1" / "tiny-sd1-loha.safetensors", sub / "lyco-loha.safetensors")
    engine.networks.refresh()
    return engine


@pytest.fixture(scope="module")
def demo_lora_engine(tmp_path_factory):
    if not (DEMO / "model_index.json").is_file():
        pytest.skip("builtin/sfumato-demo is not present")
    root = tmp_path_factory.mktemp("demo-lora")
    engine = Engine(ModelRegistry(root, builtin_dir=DEMO.parent, device="cpu"))
    engine.file_tensors = {"sfumato-demo": _build_files(engine, "sfumato-demo", root / "Lora")}
    engine.networks.refresh()
    return engine


def generate(engine: Engine, prompt: str, model: str = "tiny-sd1", **changes):
    base = dict(prompt=prompt, negative_prompt="blurry", model=model, steps=4, cfg_scale=5.0, seed=77, preview_every=0,
                width=64, height=64)
    return engine.generate(GenerationRequest(**{**base, **changes}))


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image, dtype=np.int16)


def carries_adapters(pipeline) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = [pipeline.unet, pipeline.text_encoder] + ([pipeline.text_encoder_2] if getattr(pipeline, "text_encoder_2", None) else [])
    return any(isinstance(layer, BaseTunerLayer) for module in modules for layer in module.modules())


def weights_snapshot(pipeline) -> dict[str, torch.Tensor]:
    modules = {"unet": pipeline.unet, "text_encoder": pipeline.text_encoder}
    return {f"{name}.{key}": value.clone() for name, module in modules.items() for key, value in module.state_dict().items()}


# -- the prompt syntax ----------------------------------------------------------------------------------
def test_tags_are_taken_out_with_a1111s_multipliers():
    parsed = parse_prompt("a cat <lora:detail:0.7>, <lora:style:0.5:-1.25> <lyco:ly:te=0.2:unet=0.3> <lora:plain> <hypernet:h:1>")
    assert parsed.text == "a cat ,    <hypernet:h:1>"
    named = {use.name: (use.te_weight, use.unet_weight) for use in parsed.uses}
    # A1111: the first number is the text-encoder multiplier, the second the UNet's (default: the first).
    assert named == {"detail": (0.7, 0.7), "style": (0.5, -1.25), "ly": (0.2, 0.3), "plain": (1.0, 1.0)}


@pytest.mark.parametrize("prompt", ["<lora:x:abc>", "<lora:x:nan>", "<lora::1>"])
def test_a_bad_tag_is_a_prompt_error(prompt):
    with pytest.raises(ValidationError) as caught:
        parse_prompt(prompt)
    assert caught.value.field == "prompt"


def test_unknown_name_lists_the_closest_matches(lora_engine):
    with pytest.raises(ValidationError) as caught:
        generate(lora_engine, "a cat <lora:tiny-sd1-kohay:1>")
    assert caught.value.field == "prompt"
    assert "tiny-sd1-kohay" in str(caught.value) and "tiny-sd1-kohya" in str(caught.value)


def test_files_are_found_in_lora_and_lycoris_subfolders(lora_engine):
    names = {network.name for network in lora_engine.networks.list()}
    assert {"tiny-sd1-kohya", "tiny-sdxl-lokr", "lyco-loha"} <= names


def test_a_network_is_found_by_its_training_name_too(tmp_path):
    """A1111 resolves a tag by the file's stem or by its alias (``ss_output_name``); an alias two files share names neither."""
    from engine.networks import NetworkLibrary
    from safetensors.torch import save_file

    folder = tmp_path / "Lora"
    folder.mkdir()
    tensors = {"lora_unet_x.lora_down.weight": torch.ones(1, 2)}
    save_file(tensors, str(folder / "file-a.safetensors"), metadata={"ss_output_name": "trained-name"})
    save_file(tensors, str(folder / "file-b.safetensors"), metadata={"ss_output_name": "twin"})
    save_file(tensors, str(folder / "file-c.safetensors"), metadata={"ss_output_name": "twin"})
    library = NetworkLibrary(tmp_path)
    assert library.get("trained-name").name == "file-a" and library.get("file-a").alias == "trained-name"
    with pytest.raises(ValidationError):
        library.get("twin")


# -- each format on each model ------------------------------------------------------------------------
@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("kind", FORMATS)
def test_each_format_changes_the_picture_and_weight_0_does_not(lora_engine, model, kind):
    plain = pixels(generate(lora_engine, "a red circle", model))
    with_lora = pixels(generate(lora_engine, f"a red circle <lora:{model}-{kind}:1>", model))
    zero = pixels(generate(lora_engine, f"a red circle <lora:{model}-{kind}:0>", model))
    assert np.abs(with_lora - plain).mean() > 1.0
    assert np.array_equal(zero, plain)


@pytest.mark.parametrize("kind", FORMATS)
def test_each_format_changes_the_demo_models_picture(demo_lora_engine, kind):
    plain = pixels(generate(demo_lora_engine, "a red circle", "sfumato-demo", width=None, height=None))
    with_lora = pixels(generate(demo_lora_engine, f"a red circle <lora:sfumato-demo-{kind}:1>", "sfumato-demo", width=None, height=None))
    zero = pixels(generate(demo_lora_engine, f"a red circle <lora:sfumato-demo-{kind}:0>", "sfumato-demo", width=None, height=None))
    assert np.abs(with_lora - plain).mean() > 1.0
    assert np.array_equal(zero, plain)


def test_a_text_encoder_network_is_part_of_the_prompt_cache_key(lora_engine):
    """The text without its tag is the plain prompt, already cached: only a key that includes the network re-encodes."""
    plain = pixels(generate(lora_engine, "a red circle"))
    text_only = pixels(generate(lora_engine, "a red circle <lora:tiny-sd1-text-only:1>"))
    assert np.abs(text_only - plain).mean() > 1.0
    assert np.array_equal(pixels(generate(lora_engine, "a red circle")), plain)


# -- one job only ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", TINY)
def test_after_a_lora_job_the_next_plain_job_matches_a_fresh_engine(lora_engine, models_root, model):
    pipeline = lora_engine.registry.load(model).pipeline
    before = weights_snapshot(pipeline)
    generate(lora_engine, f"a red circle <lora:{model}-locon:0.8> <lora:{model}-loha:-0.5> <lora:{model}-lokr:1>", model)
    after = pixels(generate(lora_engine, "a red circle", model))
    fresh = Engine(ModelRegistry(models_root, builtin_dir=None, device="cpu"))
    assert np.array_equal(after, pixels(generate(fresh, "a red circle", model)))
    assert not carries_adapters(pipeline)
    now = weights_snapshot(pipeline)
    assert before.keys() == now.keys() and all(torch.equal(before[key], now[key]) for key in before)


def test_an_interrupted_or_failed_lora_job_leaves_no_network_behind(lora_engine):
    from engine import CancelToken

    pipeline = lora_engine.registry.load("tiny-sd1").pipeline
    plain = pixels(generate(lora_engine, "a red circle"))
    token = CancelToken()

    def on_progress(progress):
        if progress.step == 2:
            token.interrupt()

    stopped = lora_engine.generate(GenerationRequest(prompt="a red circle <lora:tiny-sd1-locon:1>", negative_prompt="blurry",
                                                     model="tiny-sd1", steps=8, cfg_scale=5.0, seed=77, width=64, height=64),
                                   on_progress=on_progress, cancel=token)
    assert stopped.interrupted and not carries_adapters(pipeline)
    with pytest.raises(ValidationError) as caught:  # fails after the networks are on: the tiny text encoder has 2 layers
        generate(lora_engine, "a red circle <lora:tiny-sd1-loha:1>", clip_skip=5)
    assert caught.value.field == "clip_skip"
    assert not carries_adapters(pipeline)
    assert np.array_equal(pixels(generate(lora_engine, "a red circle")), plain)


def test_switching_loras_does_not_reload_the_model(lora_engine, monkeypatch):
    model = lora_engine.registry.load("tiny-sd1")
    loads = []
    original = lora_engine.registry._load_uncached
    monkeypatch.setattr(lora_engine.registry, "_load_uncached", lambda entry: loads.append(entry) or original(entry))
    for kind in ("kohya", "peft", "loha", "lokr"):
        generate(lora_engine, f"a red circle <lora:tiny-sd1-{kind}:1>")
    assert loads == [] and lora_engine.registry.load("tiny-sd1") is model


# -- the weight math, against the published formulas --------------------------------------------------------
def delta(kind: str, tensors: dict[str, torch.Tensor], name: str, weight: torch.Tensor) -> torch.Tensor:
    """ΔW of one layer at multiplier 1, written from each format's published formula."""
    if kind in ("kohya", "locon", "kohya-b", "text-only", "sgm-locon"):
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        rank = down.shape[0]
        product = (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(weight.shape)
        return product * (float(tensors[f"{name}.alpha"]) / rank)
    if kind == "peft":
        return tensors[f"{name}.lora_B.weight"] @ tensors[f"{name}.lora_A.weight"]
    if kind == "loha":
        rank = tensors[f"{name}.hada_w1_b"].shape[0]
        w1 = tensors[f"{name}.hada_w1_a"] @ tensors[f"{name}.hada_w1_b"]
        w2 = tensors[f"{name}.hada_w2_a"] @ tensors[f"{name}.hada_w2_b"]
        return (w1 * w2).reshape(weight.shape) * (float(tensors[f"{name}.alpha"]) / rank)
    if kind == "lokr":
        rank = tensors[f"{name}.lokr_w2_b"].shape[0]
        w2 = tensors[f"{name}.lokr_w2_a"] @ tensors[f"{name}.lokr_w2_b"]
        return torch.kron(tensors[f"{name}.lokr_w1"], w2) * (float(tensors[f"{name}.alpha"]) / rank)
    raise KeyError(kind)


def merged_reference(pipeline, networks: list[tuple[str, dict, float, float]]):
    """Copies of the UNet and text encoders with each network's ΔW·multiplier added to the weights by hand."""
    copies = {name: copy.deepcopy(getattr(pipeline, name)) for name in ("unet", "text_encoder", "text_encoder_2")
              if getattr(pipeline, name, None) is not None}
    for kind, tensors, te_weight, unet_weight in networks:
        original = lora_files.sgm_names(pipeline.unet) if kind == "sgm-locon" else None
        for prefix, component, path, _ in lora_files.targets(pipeline, conv=True):
            if kind == "peft":
                name = f"{component}.{path}"
                present = f"{name}.lora_A.weight" in tensors
            else:
                name = lora_files.kohya_name(prefix, path, component != "unet", original)
                present = any(key.startswith(name + ".") for key in tensors)
            if not present:
                continue
            module = copies[component].get_submodule(path)
            multiplier = unet_weight if component == "unet" else te_weight
            with torch.no_grad():
                module.weight += delta(kind, tensors, name, module.weight) * multiplier
    return copies


def model_outputs(pipeline, components: dict) -> dict[str, torch.Tensor]:
    """Each text encoder's hidden states and the UNet's prediction on fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 60, (1, 77), generator=generator)
    outputs, embeds = {}, []
    with torch.no_grad():
        for name in ("text_encoder", "text_encoder_2"):
            if name in components:
                outputs[name] = components[name](ids, output_hidden_states=True).hidden_states[-2]
                embeds.append(outputs[name])
        unet = components["unet"]
        extra = {}
        if unet.config.addition_embed_type == "text_time":
            extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, unet.config.projection_class_embeddings_input_dim - 48,
                                                                     generator=generator),
                                          "time_ids": torch.tensor([[64.0, 64.0, 0, 0, 64.0, 64.0]])}
        latents = torch.randn(1, 4, 8, 8, generator=generator)
        outputs["unet"] = unet(latents, torch.tensor([400]), torch.cat(embeds, dim=-1), **extra).sample
    return outputs


def live_components(pipeline) -> dict:
    return {name: getattr(pipeline, name) for name in ("unet", "text_encoder", "text_encoder_2") if getattr(pipeline, name, None) is not None}


def assert_outputs_close(actual: dict, expected: dict, plain: dict) -> None:
    for name in expected:
        change = (expected[name] - plain[name]).abs().max().item()
        assert change > 1e-3, f"{name}: the reference network changes nothing, so the test would prove nothing"
        error = (actual[name] - expected[name]).abs().max().item()
        assert error <= 1e-4 * max(1.0, expected[name].abs().max().item()), f"{name}: off by {error} (the network moves it {change})"


@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("kind", FORMATS)
def test_weight_math_matches_the_published_formula(lora_engine, model, kind):
    loaded = lora_engine.registry.load(model)
    tensors = lora_engine.file_tensors[model][kind]
    te_weight, unet_weight = 0.7, -0.6  # separate multipliers, one negative
    job = prepare(lora_engine.networks, f"x <lora:{model}-{kind}:{te_weight}:{unet_weight}>")
    plain = model_outputs(loaded.pipeline, live_components(loaded.pipeline))
    expected = model_outputs(loaded.pipeline, merged_reference(loaded.pipeline, [(kind, tensors, te_weight, unet_weight)]))
    with active(loaded, job):
        actual = model_outputs(loaded.pipeline, live_components(loaded.pipeline))
    assert_outputs_close(actual, expected, plain)


@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("kinds", [("locon", "kohya-b"), ("peft", "loha", "lokr")])
def test_several_networks_at_once_add_their_changes(lora_engine, model, kinds):
    """Each network adds its own ΔW to the same layers, so together they add up, also across formats."""
    loaded = lora_engine.registry.load(model)
    files = lora_engine.file_tensors[model]
    multipliers = (0.5, 1.5, -0.8)
    job = prepare(lora_engine.networks, "x " + " ".join(f"<lora:{model}-{kind}:{m}>" for kind, m in zip(kinds, multipliers)))
    plain = model_outputs(loaded.pipeline, live_components(loaded.pipeline))
    expected = model_outputs(loaded.pipeline, merged_reference(
        loaded.pipeline, [(kind, files[kind], m, m) for kind, m in zip(kinds, multipliers)]))
    with active(loaded, job):
        actual = model_outputs(loaded.pipeline, live_components(loaded.pipeline))
    assert_outputs_close(actual, expected, plain)


# -- bad files ----------------------------------------------------------------------------------------------
def _bad_files(lora_engine, models_root) -> dict[str, Path]:
    folder = models_root / "Lora" / "bad"
    folder.mkdir(exist_ok=True)
    good = (models_root / "Lora" / "tiny-sd1" / "tiny-sd1-kohya.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    shutil.copyfile(models_root / "Lora" / "tiny-sdxl" / "tiny-sdxl-kohya.safetensors", folder / "made-for-sdxl.safetensors")
    from safetensors.torch import save_file

    save_file({"some.random.tensor": torch.ones(3), "another.one": torch.zeros(2)}, str(folder / "mystery.safetensors"))
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.oft_blocks": torch.ones(2, 2, 2)}, str(folder / "oft.safetensors"))
    save_file({"lora_unet_down_blocks_0_resnets_0_conv1.lokr_w1": torch.ones(4, 4),
               "lora_unet_down_blocks_0_resnets_0_conv1.lokr_w2": torch.ones(4, 4, 3, 3)}, str(folder / "lokr-conv.safetensors"))
    lora_engine.networks.refresh()
    return {name: folder / f"{name}.safetensors" for name in ("truncated", "made-for-sdxl", "mystery", "oft", "lokr-conv")}


@pytest.mark.parametrize("bad, words", [("truncated", "truncated"), ("made-for-sdxl", "another base model"),
                                        ("mystery", "no LoRA format"), ("oft", "OFT"), ("lokr-conv", "convolution")])
def test_a_bad_file_is_a_clear_error_and_leaves_the_model_as_it_was(lora_engine, models_root, bad, words):
    _bad_files(lora_engine, models_root)
    pipeline = lora_engine.registry.load("tiny-sd1").pipeline
    plain = pixels(generate(lora_engine, "a red circle"))
    before = weights_snapshot(pipeline)
    # A good network first, so the bad one fails with another already on the model.
    with pytest.raises(ModelError) as caught:
        generate(lora_engine, f"a red circle <lora:tiny-sd1-loha:1> <lora:{bad}:1>")
    assert isinstance(caught.value, NetworkError)
    assert f"{bad}.safetensors" in str(caught.value) and words in str(caught.value)
    assert not carries_adapters(pipeline)
    now = weights_snapshot(pipeline)
    assert all(torch.equal(before[key], now[key]) for key in before)
    assert np.array_equal(pixels(generate(lora_engine, "a red circle")), plain)


def test_a_file_gone_since_the_scan_is_a_clear_error(lora_engine, models_root):
    folder = models_root / "Lora" / "gone"
    folder.mkdir(exist_ok=True)
    shutil.copyfile(models_root / "Lora" / "tiny-sd1" / "tiny-sd1-kohya.safetensors", folder / "vanishing.safetensors")
    lora_engine.networks.refresh()
    (folder / "vanishing.safetensors").unlink()
    with pytest.raises(NetworkError, match="vanishing.safetensors.*refresh"):
        generate(lora_engine, "a red circle <lora:vanishing:1>")
    lora_engine.networks.refresh()


# -- infotext --------------------------------------------------------------------------------------------------
def a1111_short_hash(path: Path) -> str:
    """A1111's LoRA hash, from its description: SHA-256 of the safetensors file after its header, first 12 hex."""
    data = path.read_bytes()
    header_length = struct.unpack("<Q", data[:8])[0]
    return hashlib.sha256(data[8 + header_length:]).hexdigest()[:12]


def test_infotext_keeps_the_tags_and_writes_lora_hashes(lora_engine, models_root):
    from engine.infotext import parse_infotext, parse_name_hashes

    prompt = "a red circle <lora:tiny-sd1-kohya:0.8> <lora:lyco-loha:0.4>"
    info = generate(lora_engine, prompt).images[0].infotext
    assert info.splitlines()[0] == prompt
    kohya = a1111_short_hash(models_root / "Lora" / "tiny-sd1" / "tiny-sd1-kohya.safetensors")
    loha = a1111_short_hash(models_root / "LyCORIS" / "styles" / "lyco-loha.safetensors")
    assert f'Lora hashes: "tiny-sd1-kohya: {kohya}, lyco-loha: {loha}"' in info
    assert parse_name_hashes(parse_infotext(info)["Lora hashes"]) == {"tiny-sd1-kohya": kohya, "lyco-loha": loha}


def test_loading_an_infotext_with_lora_hashes_notes_only_files_that_differ(lora_engine, models_root):
    """"Lora hashes" is no setting to apply (the tags in the prompt apply the LoRAs): never an unknown key; a note
    names a LoRA only when the local file's hash differs from the image's."""
    from engine.infotext import loading_notes, parse_infotext, request_fields_from_infotext

    kohya = a1111_short_hash(models_root / "Lora" / "tiny-sd1" / "tiny-sd1-kohya.safetensors")
    loha = a1111_short_hash(models_root / "LyCORIS" / "styles" / "lyco-loha.safetensors")
    other = "0123456789ab" if loha != "0123456789ab" else "ba9876543210"
    text = ("a cat <lora:tiny-sd1-kohya:1> <lora:lyco-loha:1> <lora:elsewhere:1>\nSteps: 4, Sampler: Euler, Seed: 1, "
            f'Lora hashes: "tiny-sd1-kohya: {kohya}, lyco-loha: {other}, elsewhere: 111111111111", Version: v1.10.1')
    params = parse_infotext(text)
    applied = request_fields_from_infotext(params)
    assert not any("Lora hashes" in note for note in loading_notes(params, applied))
    differ = [note for note in loading_notes(params, applied, lora_engine.networks.short_hash_of) if "hashes differ" in note]
    assert len(differ) == 1 and "lyco-loha" in differ[0] and "tiny-sd1-kohya" not in differ[0] and "elsewhere" not in differ[0]


def test_the_hash_ignores_metadata_edits(lora_engine, models_root, tmp_path):
    """A1111's "addnet" hash covers the tensors only: the same tensors with other metadata hash the same."""
    from engine.networks import NetworkFile
    from safetensors.torch import load_file, save_file

    source = models_root / "Lora" / "tiny-sd1" / "tiny-sd1-kohya.safetensors"
    copy_path = tmp_path / "renamed.safetensors"
    save_file(load_file(str(source)), str(copy_path), metadata={"ss_output_name": "something else entirely"})
    library = lora_engine.networks
    assert library.short_hash(NetworkFile("renamed", copy_path, tmp_path)) == a1111_short_hash(copy_path) == a1111_short_hash(source)


# -- the HTTP API ----------------------------------------------------------------------------------------------
def test_api_lists_loras_in_a1111s_shape_and_refresh_finds_new_ones(tmp_path):
    import requests

    from _api_fixtures import make_studio, running_server
    from engine.tiny_models import build_sd1
    from safetensors.torch import save_file

    models = tmp_path / "models"
    build_sd1(models / "Stable-diffusion" / "tiny", seed=0)
    (models / "Lora" / "sub").mkdir(parents=True)
    tensors = {"lora_unet_x.lora_down.weight": torch.ones(1, 2), "lora_unet_x.lora_up.weight": torch.ones(2, 1)}
    save_file(tensors, str(models / "Lora" / "sub" / "detail.safetensors"),
              metadata={"ss_output_name": "detail_v2", "ss_tag_frequency": json.dumps({"set": {"outline": 3}})})
    studio = make_studio(tmp_path / "studio", models)
    with running_server(studio, api=True) as server:
        items = requests.get(server.url + "/sdapi/v1/loras", timeout=10).json()
        assert items == [{"name": "detail", "alias": "detail_v2", "path": str(models / "Lora" / "sub" / "detail.safetensors"),
                          "metadata": {"ss_output_name": "detail_v2", "ss_tag_frequency": {"set": {"outline": 3}}}}]
        (models / "LyCORIS").mkdir()
        save_file(tensors, str(models / "LyCORIS" / "later.safetensors"))
        assert requests.post(server.url + "/sdapi/v1/refresh-loras", timeout=10).status_code == 200
        names = {item["name"] for item in requests.get(server.url + "/sdapi/v1/loras", timeout=10).json()}
        assert names == {"detail", "later"}

        lora_files.kohya_lora(studio.registry.load("tiny").pipeline, models / "Lora" / "real.safetensors", seed=1)
        requests.post(server.url + "/sdapi/v1/refresh-loras", timeout=10)
        payload = {"prompt": "a cat <lora:real:0.9>", "steps": 3, "width": 64, "height": 64, "seed": 3}
        response = requests.post(server.url + "/sdapi/v1/txt2img", json=payload, timeout=120)
        assert response.status_code == 200, response.text
        infotext = json.loads(response.json()["info"])["infotexts"][0]
        assert infotext.startswith("a cat <lora:real:0.9>") and 'Lora hashes: "real: ' in infotext
        unknown = requests.post(server.url + "/sdapi/v1/txt2img", json={**payload, "prompt": "<lora:reel:1>"}, timeout=120)
        assert unknown.status_code == 422 and unknown.json()["field"] == "prompt" and "real" in unknown.json()["detail"]
