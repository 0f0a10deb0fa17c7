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
