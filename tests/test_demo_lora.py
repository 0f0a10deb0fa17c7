"""The shipped demo LoRA (builtin/loras/sfumato-outline): found by every install, loaded through the
engine's own network loader, and it makes the demo model draw outlines instead of filled shapes.

The judge is the pixel evaluator's fill reading (training/evaluate.py), checked first on ground truth.
Engine runs: 64×64, 12 steps, one torch thread; ~1 min in all."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from engine import Engine, GenerationRequest
from engine.models import ModelRegistry
from engine.networks import NetworkLibrary, detect_format, read_metadata
from engine.networks.formats import KOHYA_LOCON
from training import evaluate, world

torch.set_num_threads(1)

BUILTIN = Path(__file__).resolve().parent.parent / "builtin"
LORA = BUILTIN / "loras" / "sfumato-outline.safetensors"
#: Large shapes: the f8 VAE (8 px latent cells) can hollow out a 28 px shape but not an 18 px one.
PROMPTS = (
    "a large red circle, blue background", "a large yellow square, black background",
    "a large green triangle, white background", "a large white circle, purple background",
    "a large blue square, yellow background", "a large orange circle, gray background",
    "a large black square, green background", "a large purple circle, orange background",
)
SEED = 3
# "Most prompts": 5 of 8. Measured 6 of 8 outlined (fills 0.16-0.55, one at 0.48 by the 0.5 line) and 6 of 8
# colours right with the LoRA; 8 of 8 filled without it. One prompt of slack keeps a different CPU's rounding
# from flipping the verdict on the ring that sits nearest the line.
NEED = 5  # of 8 prompts


@pytest.fixture(scope="module")
def demo_engine():
    if not (BUILTIN / "sfumato-demo").is_dir() or not LORA.is_file():
        pytest.skip("the demo model or its LoRA is not present")
    return Engine(ModelRegistry(None, builtin_dir=BUILTIN))


def draw(engine, prompt: str, seed: int = SEED) -> np.ndarray:
    request = GenerationRequest(prompt=prompt, model="sfumato-demo", steps=12, cfg_scale=5.0, seed=seed, width=64, height=64)
    return np.asarray(engine.generate(request).images[0].image)


@pytest.fixture(scope="module")
def drawn(demo_engine):
    """Each prompt at weights none, 0, 0.5 and 1."""
    tags = {"none": "", "0": " <lora:sfumato-outline:0>", "0.5": " <lora:sfumato-outline:0.5>", "1": " <lora:sfumato-outline:1>"}
    return {key: [draw(demo_engine, prompt + tag) for prompt in PROMPTS] for key, tag in tags.items()}


# --------------------------------------------------------------------------- the evaluator's fill reading


def test_fill_reading_tells_filled_from_outlined_world_renders():
    accuracy = evaluate.score_styles_ground_truth(n=300, seed=11)
    assert accuracy["filled"] >= 0.99 and accuracy["outlined"] >= 0.99, accuracy


def test_fill_reading_on_hand_drawn_rings_and_discs():
    # Drawn here with PIL, not with world.render: a solid disc, a 4 px ring, and a ring with a gap
    # (its hull is still the disc, so it still reads hollow).
    def picture(kind: str) -> np.ndarray:
        img = Image.new("RGB", (64, 64), (30, 70, 220))
        d = ImageDraw.Draw(img)
        d.ellipse([18, 18, 46, 46], fill=(220, 30, 30))
        if kind != "disc":
            d.ellipse([22, 22, 42, 42], fill=(30, 70, 220))
        if kind == "broken":
            d.rectangle([30, 17, 34, 24], fill=(30, 70, 220))
        return np.asarray(img)

    disc, ring, broken = (evaluate.classify(picture(k)) for k in ("disc", "ring", "broken"))
    assert disc.fill == pytest.approx(1.0) and disc.style == "filled"
    assert ring.fill < 0.1 and ring.style == "outlined"
    assert broken.fill < 0.2 and broken.style == "outlined"
    assert ring.colour == disc.colour == "red" and ring.background == "blue" and ring.shape == "circle"


# --------------------------------------------------------------------------- the shipped file


def test_the_lora_ships_in_kohya_layout_with_its_preview_and_sidecar():
    if not LORA.is_file():
        pytest.skip("builtin/loras/sfumato-outline.safetensors is not present")
    from safetensors.torch import load_file

    tensors = load_file(LORA)
    assert detect_format(tensors) == KOHYA_LOCON  # attention projections and resnet convolutions
    keys = list(tensors)
    assert keys and all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert LORA.stat().st_size < 1_000_000
    meta = read_metadata(LORA)
    assert meta["ss_sd_model_name"] == "sfumato-demo" and meta["ss_output_name"] == "sfumato-outline"
    assert int(meta["ss_network_dim"]) == tensors[next(k for k in keys if k.endswith("lora_down.weight"))].shape[0]
    assert int(meta["ss_steps"]) > 100 and "outline" in json.dumps(meta["ss_tag_frequency"])
    sidecar = json.loads(LORA.with_suffix(".json").read_text())
    assert {"description", "activation text", "preferred weight", "sd version", "notes"} <= set(sidecar)
    assert Image.open(LORA.with_name("sfumato-outline.preview.png")).size[0] >= 64
    # the header is a plain safetensors header (A1111 reads it the same way)
    with open(LORA, "rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        assert "__metadata__" in json.loads(handle.read(length))


def test_every_install_lists_the_builtin_lora_and_a_users_file_of_that_name_wins(tmp_path):
    if not LORA.is_file():
        pytest.skip("builtin/loras/sfumato-outline.safetensors is not present")
    library = NetworkLibrary(None, BUILTIN / "loras")
    found = library.get("sfumato-outline")
    assert found.builtin and found.path == LORA
    (tmp_path / "Lora").mkdir()
    user = tmp_path / "Lora" / "sfumato-outline.safetensors"
    user.write_bytes(LORA.read_bytes())
    both = NetworkLibrary(tmp_path, BUILTIN / "loras")
    assert both.get("sfumato-outline").path == user and not both.get("sfumato-outline").builtin
    assert len(both.list()) == 1


# --------------------------------------------------------------------------- its effect, through the engine


def test_the_lora_makes_shapes_outlined_and_without_it_they_stay_filled(drawn):
    without = [evaluate.classify(im) for im in drawn["none"]]
    with_lora = [evaluate.classify(im) for im in drawn["1"]]
    assert sum(r.style == "filled" for r in without) >= NEED, [r.fill for r in without]
    assert sum(r.style == "outlined" for r in with_lora) >= NEED, [r.fill for r in with_lora]


def test_colour_and_background_stay_right_with_the_lora(drawn):
    expected = [(p.split()[2], p.split(", ")[1].split()[0]) for p in PROMPTS]
    readings = [evaluate.classify(im) for im in drawn["1"]]
    assert sum(r.colour == c for r, (c, _) in zip(readings, expected)) >= NEED, [(r.colour, c) for r, (c, _) in zip(readings, expected)]
    assert sum(r.background == b for r, (_, b) in zip(readings, expected)) >= NEED


def test_weight_zero_is_pixel_identical_to_no_tag_and_half_lies_between(drawn):
    for plain, zero in zip(drawn["none"], drawn["0"]):
        np.testing.assert_array_equal(plain, zero)
    mean_fill = {key: np.mean([evaluate.classify(im).fill or 1.0 for im in drawn[key]]) for key in ("none", "0.5", "1")}
    assert mean_fill["1"] < mean_fill["0.5"] < mean_fill["none"], mean_fill


# --------------------------------------------------------------------------- the training script


def test_the_training_script_smoke_run_writes_a_file_the_engine_applies(tmp_path):
    from training import demo_lora

    out = tmp_path / "builtin" / "loras"
    figures = demo_lora.main(["--smoke", "--threads", "1", "--out", str(out)])
    path = Path(figures["path"])
    assert path == out / "sfumato-outline.safetensors"
    assert (out / "sfumato-outline.json").is_file() and (out / "sfumato-outline.preview.png").is_file()
    assert read_metadata(path)["ss_steps"] == str(figures["lora"]["steps"]) == "3"
    (tmp_path / "builtin" / "sfumato-demo").symlink_to(BUILTIN / "sfumato-demo", target_is_directory=True)
    engine = Engine(ModelRegistry(None, builtin_dir=tmp_path / "builtin"))
    assert [n.name for n in engine.networks.list()] == ["sfumato-outline"]
    request = GenerationRequest(prompt="a red circle <lora:sfumato-outline:1>", model="sfumato-demo", steps=2, seed=1)
    result = engine.generate(request)
    assert result.images[0].image.size == (64, 64)
    assert "sfumato-outline" in result.images[0].infotext
