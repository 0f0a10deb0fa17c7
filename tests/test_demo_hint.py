"""The demo model's one-line guide: what it knows, where real checkpoints go, and example prompts it really draws."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine import GenerationRequest
from engine.models import ModelEntry
from ui.demo_hint import example_prompts, hint_text, other_demos, vocabulary

DEMO_MODEL = Path(__file__).resolve().parent.parent / "builtin" / "sfumato-demo"


@pytest.fixture(scope="module")
def known():
    found = vocabulary(ModelEntry(DEMO_MODEL.name, DEMO_MODEL, "diffusers", builtin=True))
    if found is None:
        pytest.skip("builtin/sfumato-demo is not present")
    return found


def test_the_hint_says_what_the_demo_model_knows_and_where_checkpoints_go(known):
    line = hint_text(known, "models/Stable-diffusion")
    for word in ("circle", "square", "triangle", "red", "purple", "gray", "small", "large", "on the left", "in the center", "64×64"):
        assert word in line
    assert "`models/Stable-diffusion`" in line


def test_each_demo_models_hint_names_the_other_demo_model_and_no_ordinary_checkpoint(known, tiny_models_dir):
    from types import SimpleNamespace

    from engine.models import ModelRegistry

    if not (DEMO_MODEL.parent / "sfumato-demo-flow" / "sfumato.json").is_file():
        pytest.skip("builtin/sfumato-demo-flow is not present")
    studio = SimpleNamespace(registry=ModelRegistry(tiny_models_dir, builtin_dir=DEMO_MODEL.parent))
    assert other_demos(studio, "sfumato-demo") == ["sfumato-demo-flow"]
    assert other_demos(studio, "sfumato-demo-flow") == ["sfumato-demo"]
    assert "`sfumato-demo-flow` in the model list" in hint_text(known, "models/Stable-diffusion", ["sfumato-demo-flow"])
    assert "another model" not in hint_text(known, "models/Stable-diffusion")


def test_three_examples_made_only_of_words_the_model_knows(known):
    prompts = example_prompts(known)
    assert len(set(prompts)) == 3
    for prompt in prompts:
        assert set(re.findall(r"[a-z]+|,", prompt)) <= known.words, prompt


def test_the_demo_model_draws_what_each_example_says(known, demo_engine):
    from training.evaluate import classify

    for prompt in example_prompts(known):
        image = demo_engine.generate(GenerationRequest(prompt=prompt, seed=1, steps=20, cfg_scale=3.0)).images[0].image
        reading = classify(image)
        colour, background = re.search(r"(\w+) (?:circle|square|triangle).*, (\w+) background", prompt).groups()
        assert (reading.colour, reading.background) == (colour, background), (prompt, reading.as_dict())
        assert reading.position in prompt, (prompt, reading.as_dict())


def test_an_ordinary_checkpoint_gets_no_hint(tiny_models_dir):
    assert vocabulary(ModelEntry("Stable-diffusion/tiny-sd1", tiny_models_dir / "Stable-diffusion" / "tiny-sd1", "diffusers")) is None
    assert vocabulary(None) is None
