"""The flow demo model's recipe (training/demo_flow.py) on its ``--smoke`` run: every stage for a few steps on a tiny
dataset, then the saved SD3-layout folder through the engine as a user would load it.

A smoke model draws noise-like pictures, so these tests pin down what it can show: the engine detects the SD3 family
with the VAE's own latent constants, draws exactly what diffusers' ``StableDiffusion3Pipeline`` draws from the same σs
and noise, loads the model's single-file export back to the same pixels, encodes text as training did, and a rerun
resumes instead of training again."""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from engine.engine import Engine
from engine.extensions import ExtensionManager
from engine.models import ModelRegistry
from engine.request import GenerationRequest
from training import demo_flow

torch.set_num_threads(1)

NAME = "sfumato-demo-flow"
PROMPT = "a large red circle on the left, blue background"
PARITY_TOLERANCE = 0.51 / 255  # ours is rounded to uint8, diffusers' is the float picture (tests/test_sd3_family.py)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-smoke")
    return demo_flow.main(["--smoke", "--threads", "1", "--out", str(root / NAME)])


@pytest.fixture(scope="module")
def engine(smoke_run, tmp_path_factory):
    models = tmp_path_factory.mktemp("flow-models")
    shutil.copytree(smoke_run.out, models / NAME)
    return Engine(ModelRegistry(models, builtin_dir=None))


def _draw(engine: Engine, model: str = NAME, **changes) -> np.ndarray:
    request = GenerationRequest(**{"prompt": PROMPT, "model": model, "steps": 6, "sampler": "Euler",
                                   "schedule": "Simple", "seed": 5, "cfg_scale": 5.0, **changes})
    return np.asarray(engine.generate(request).images[0].image, dtype=np.float32) / 255


def _pipeline(folder):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None, local_files_only=True,
                                                    dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_engine_reads_the_folder_as_sd3_with_the_vaes_own_latent_constants(engine, smoke_run):
    model = engine.registry.load(NAME)
    vae_config = json.loads((smoke_run.out / "vae" / "config.json").read_text())
    assert model.family.id == "sd3"
    assert model.latent_channels == 16
    assert (model.scaling_factor, model.latent_shift) == (vae_config["scaling_factor"], vae_config["shift_factor"])
    assert (model.scaling_factor, model.latent_shift) != (1.5305, 0.0609)  # not SD 3.5's published constants
    meta = json.loads((smoke_run.out / "sfumato.json").read_text())
    assert (meta["native_width"], meta["native_height"]) == (64, 64)
    assert np.array(meta["latent_rgb_factors"]).shape == (16, 3) and len(meta["latent_rgb_bias"]) == 3


def test_the_engine_draws_what_diffusers_draws_from_the_same_sigmas_and_noise(engine, smoke_run):
    from engine.sampling import schedules
    from engine.sampling.denoiser import noise_table_for

    steps, seed, cfg = 6, 5, 5.0
    ours = _draw(engine, steps=steps, seed=seed, cfg_scale=cfg)
    assert ours.shape == (64, 64, 3)
    table, parameterization = noise_table_for(engine.registry.load(NAME))
    assert parameterization == "flow"
    sigmas = schedules.simple(table, steps)[:-1].double()
    shift = demo_flow.FlowRecipe().sigma_shift
    unshifted = sigmas / (shift - (shift - 1) * sigmas)  # diffusers shifts the σs it is given
    noise = torch.randn((1, 16, 16, 16), generator=torch.Generator().manual_seed(seed))  # A1111's CPU noise, f4 latent
    pipe = _pipeline(smoke_run.out)
    theirs = pipe(PROMPT, negative_prompt="", height=64, width=64, sigmas=unshifted.tolist(), guidance_scale=cfg,
                  latents=noise, output_type="np").images[0]
    assert torch.allclose(pipe.scheduler.sigmas[:-1].double(), sigmas, atol=1e-6)
    assert float(np.abs(ours - theirs).max()) <= PARITY_TOLERANCE
    other_prompt = _draw(engine, steps=steps, seed=seed, cfg_scale=cfg, prompt="a small white square, black background")
    assert float(np.abs(theirs - other_prompt).max()) > 1 / 255  # the prompt reaches the picture


def test_the_single_file_export_draws_what_the_folder_draws(engine, smoke_run, tmp_path):
    models = tmp_path / "models"
    exported = smoke_run.run / f"{NAME}.safetensors"
    (models / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(exported, models / "Stable-diffusion" / "flow-aio.safetensors")
    shutil.copytree(exported.with_suffix(".config"), models / "Stable-diffusion" / "flow-aio.config")
    single = Engine(ModelRegistry(models, builtin_dir=None))
    assert single.registry.get("flow-aio").usable, single.registry.get("flow-aio").problem
    assert single.registry.load("flow-aio").family.id == "sd3"
    assert np.array_equal(_draw(single, "flow-aio"), _draw(engine))


def test_training_encodes_prompts_as_the_pipeline_does(smoke_run):
    from training.demo_model import tokenize

    pipe = _pipeline(smoke_run.out)
    captions = [PROMPT, "", "a triangle"]
    ids = tokenize(pipe.tokenizer, captions)
    with torch.no_grad():
        context, pooled = demo_flow.encode_text((pipe.text_encoder, pipe.text_encoder_2), ids,
                                                pipe.transformer.config.joint_attention_dim)
        theirs, _, theirs_pooled, _ = pipe.encode_prompt(captions, captions, captions, do_classifier_free_guidance=False)
    assert context.shape == theirs.shape and pooled.shape == theirs_pooled.shape
    assert torch.allclose(context, theirs, atol=1e-6) and torch.allclose(pooled, theirs_pooled, atol=1e-6)


def test_a_rerun_resumes_the_finished_stages_instead_of_training_again(smoke_run):
    from safetensors.torch import load_file

    weights = smoke_run.out / "transformer" / "diffusion_pytorch_model.safetensors"
    before = load_file(weights)
    step = torch.load(smoke_run.checkpoints / "transformer.pt", weights_only=False)["step"]
    demo_flow.main(["--smoke", "--threads", "1", "--out", str(smoke_run.out)])
    after = load_file(weights)
    assert torch.load(smoke_run.checkpoints / "transformer.pt", weights_only=False)["step"] == step
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_controlnet_only_rerun_keeps_the_saved_transformer_and_trains_a_new_controlnet(smoke_run, tmp_path):
    """``--transformer-from``: no transformer stage; the folder it writes carries the given model's transformer and
    text encoders bit for bit, and its ControlNet is trained anew from them."""
    from safetensors.torch import load_file

    out = tmp_path / NAME
    paths = demo_flow.main(["--smoke", "--threads", "1", "--out", str(out), "--transformer-from", str(smoke_run.out)])
    assert not (paths.checkpoints / "transformer.pt").exists()
    assert torch.load(paths.checkpoints / "controlnet.pt", weights_only=False)["done"]
    for part in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "text_encoder_2/model.safetensors"):
        given, written = load_file(smoke_run.out / part), load_file(out / part)
        assert given.keys() == written.keys() and all(torch.equal(given[k], written[k]) for k in given), part
    cn = "diffusion_pytorch_model.safetensors"
    first, second = load_file(smoke_run.controlnet_out / cn), load_file(paths.controlnet_out / cn)
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_controlnet_captions_name_another_position_only_at_the_conflict_rate():
    from training import world

    scene = world.sample_scene(np.random.default_rng(1))
    rng, untouched = np.random.default_rng(2), np.random.default_rng(2)
    assert all(demo_flow.caption_scene(scene, rng, 0.0) is scene for _ in range(20))
    assert rng.random() == untouched.random()  # no conflicts: the training stream is the recipe's as before
    moved = [demo_flow.caption_scene(scene, rng, 1.0) for _ in range(40)]
    assert all(m.position != scene.position and (m.shape, m.colour, m.size, m.background) ==
               (scene.shape, scene.colour, scene.size, scene.background) for m in moved)
    assert {m.position for m in moved} == set(world.POSITIONS) - {scene.position}
    share = np.mean([demo_flow.caption_scene(scene, rng, 0.3) is not scene for _ in range(2000)])
    assert 0.26 < share < 0.34


def test_the_transformer_stage_refuses_a_vae_below_the_shape_gate():
    with pytest.raises(SystemExit, match="shape 0.800 < 0.90"):
        demo_flow.check_vae_gate({"scores": {"shape": 0.8}}, 0.90)
    demo_flow.check_vae_gate({"scores": {"shape": 0.93}}, 0.90)


def test_train_demo_flow_runs_this_recipe_and_passes_the_other_arguments_on():
    from ui.cli import train_demo_command

    assert train_demo_command(["--flow", "--smoke", "--threads", "1"])[1:] == ["-m", "training.demo_flow", "--smoke",
                                                                               "--threads", "1"]
    assert train_demo_command(["--smoke"])[1:] == ["-m", "training.demo_model", "--smoke"]


def test_the_evaluator_samples_the_flow_pipeline_with_its_own_scheduler(smoke_run):
    from training import evaluate

    pipe = _pipeline(smoke_run.out)
    results, per_combo = evaluate.evaluate_model(pipe, cfgs=(1.0,), seeds=(0,), steps=2, n_seen=4)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert set(results["cfg1"]["all"]) == set(evaluate.ATTRIBUTES)
    assert len(per_combo["cfg1"]) == len(evaluate.HELD_OUT_COMBOS)


def test_training_with_the_t5_zeros_collapsed_is_the_same_function_as_sampling_with_all_of_them():
    recipe = demo_flow.FlowRecipe()
    transformer = demo_flow.build_transformer(recipe, 16, seed=3).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 16, 16, generator=generator)
    width = demo_flow.joint_width(recipe)
    clip = torch.randn(2, recipe.clip_tokens, width, generator=generator)
    pooled, t = torch.randn(2, width, generator=generator), torch.tensor([300.0, 900.0])
    with torch.no_grad():
        full = transformer(x, encoder_hidden_states=torch.cat([clip, torch.zeros(2, demo_flow.T5_TOKENS, width)], 1),
                           pooled_projections=pooled, timestep=t, return_dict=False)[0]
        one_zero = torch.cat([clip, torch.zeros(2, 1, width)], 1)
        with demo_flow.collapsed_zeros(transformer):
            collapsed = transformer(x, encoder_hidden_states=one_zero, pooled_projections=pooled, timestep=t,
                                    return_dict=False)[0]
        uncorrected = transformer(x, encoder_hidden_states=one_zero, pooled_projections=pooled, timestep=t,
                                  return_dict=False)[0]  # diffusers' processor is back: one zero weighs as one
    assert demo_flow.T5_TOKENS == 256
    assert torch.allclose(collapsed, full, atol=1e-5), float((collapsed - full).abs().max())
    assert float((uncorrected - full).abs().max()) > 1e-2


def test_a_raised_budget_trains_a_finished_stage_on(tmp_path):
    from training.demo_model import Checkpoint

    ckpt = Checkpoint(tmp_path, "transformer")
    ckpt.save(modules={}, optimizer={}, step=3, elapsed=8.0, done=True)
    demo_flow.reopen_if_budget_raised(ckpt, seconds=20.0, max_steps=3)
    assert ckpt.load()["done"]  # the step budget is still used up: nothing left to do
    demo_flow.reopen_if_budget_raised(ckpt, seconds=20.0, max_steps=5)
    assert not ckpt.load()["done"] and ckpt.load()["step"] == 3


def test_the_outline_controlnet_is_saved_in_sd3s_controlnet_layout_and_draws_as_diffusers_draws(smoke_run, tmp_path,
                                                                                                monkeypatch):
    """The ControlNet reads the pooled text and the VAE's shift as it did in training (not InstantX's zeros), through
    the engine exactly as through diffusers' ``StableDiffusion3ControlNetPipeline``, and the outline moves pixels."""
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from PIL import Image

    from engine.sampling import schedules
    from engine.sampling.denoiser import noise_table_for
    from training import world

    config = json.loads((smoke_run.controlnet_out / "config.json").read_text())
    assert config["_class_name"] == "SD3ControlNetModel" and config["force_zeros_for_pooled_projection"] is False
    builtin = tmp_path / "builtin"
    shutil.copytree(smoke_run.out, builtin / NAME)
    shutil.copytree(smoke_run.controlnet_out, builtin / smoke_run.controlnet_out.name)
    manager = ExtensionManager(demo_flow.REPO / "extensions", tmp_path / "extensions.json", models_dir=tmp_path / "m",
                               builtin_dir=builtin)
    engine = Engine(ModelRegistry(tmp_path / "m", builtin_dir=builtin), manager)
    scene = world.Scene("square", "red", "large", "right", "blue", *world.POSITION_ANCHORS["right"])
    outline = Image.fromarray(world.render_outline(scene))
    unit = {"image": outline, "module": "none", "model": smoke_run.controlnet_out.name}
    ours = _draw(engine, extensions={"controlnet": [unit]})
    assert float(np.abs(ours - _draw(engine)).max()) > 1 / 255

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    table, _ = noise_table_for(engine.registry.load(NAME))
    sigmas = schedules.simple(table, 6)[:-1].double()
    shift = demo_flow.FlowRecipe().sigma_shift
    controlnet = SD3ControlNetModel.from_pretrained(smoke_run.controlnet_out, local_files_only=True, dtype=torch.float32)
    pipe = StableDiffusion3ControlNetPipeline.from_pretrained(smoke_run.out, controlnet=controlnet, text_encoder_3=None,
                                                              tokenizer_3=None, local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPT, negative_prompt="", height=64, width=64, sigmas=(sigmas / (shift - (shift - 1) * sigmas)).tolist(),
                  guidance_scale=5.0, latents=torch.randn((1, 16, 16, 16), generator=torch.Generator().manual_seed(5)),
                  control_image=outline, output_type="np").images[0]
    assert float(np.abs(ours - theirs).max()) <= PARITY_TOLERANCE
