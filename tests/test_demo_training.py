"""Tests of the demo-model training code (training/): world, evaluator and a smoke run.

The smoke run trains every stage for a few steps on a tiny dataset (~30 s on one thread)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from training import evaluate, world

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from training import demo_model

    root = tmp_path_factory.mktemp("smoke")
    paths = demo_model.main(["--smoke", "--threads", "1", "--out", str(root / "sfumato-demo")])
    return paths


def test_smoke_training_produces_loadable_pipeline_and_controlnet(smoke_run):
    from diffusers import ControlNetModel, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(smoke_run.out, local_files_only=True, dtype=torch.float32)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # any scheduler loads from the saved config
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a large red circle on the left, blue background", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    assert next(iter(pipe.unet.parameters())).dtype == torch.float32
    controlnet = ControlNetModel.from_pretrained(smoke_run.controlnet_out, local_files_only=True)
    assert controlnet.config.conditioning_embedding_out_channels[-1] > 0
    meta = json.loads((smoke_run.out / "sfumato.json").read_text())
    assert meta["family"] == "sfumato-demo" and meta["native_width"] == 64
    assert np.array(meta["latent_rgb_factors"]).shape == (4, 3) and len(meta["latent_rgb_bias"]) == 3
    assert meta["controlnets"] == ["sfumato-demo-controlnet-outline"]


def test_tokenizer_words_are_single_distinct_tokens(smoke_run):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(smoke_run.out / "tokenizer", local_files_only=True)
    ids = [tok(w, add_special_tokens=False).input_ids for w in world.VOCABULARY]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(ids)
    left = tok("a red circle on the left").input_ids
    right = tok("a red circle on the right").input_ids
    assert left != right


def test_evaluator_reads_ground_truth_images():
    acc = evaluate.score_ground_truth(n=300, seed=5)
    for attr in ("colour", "background", "position", "shape", "size"):
        assert acc[attr] >= 0.98, (attr, acc)


def test_captions_use_only_the_vocabulary_and_held_out_combos_never_train():
    rng = np.random.default_rng(0)
    vocab = set(world.VOCABULARY)
    for _ in range(3000):
        scene = world.sample_scene(rng)
        assert not world.is_held_out(scene)
        assert scene.background != scene.colour
        caption = world.random_caption(scene, rng)
        assert set(caption.replace(",", " , ").split()) <= vocab
    _, scenes = world.make_dataset(500, seed=1)
    assert not any(world.is_held_out(s) for s in scenes)
    assert len(world.HELD_OUT_COMBOS) == 6


def test_outline_is_white_edge_of_the_mask():
    scene = world.Scene("square", "red", "large", "center", "blue", 32, 32)
    mask, outline = world.shape_mask(scene), world.render_outline(scene)
    edge = outline[..., 0] > 0
    assert edge.sum() > 0 and not (edge & ~mask).any()
    assert set(np.unique(outline)) <= {0, 255}
