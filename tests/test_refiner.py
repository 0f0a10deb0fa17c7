"""The refiner (A1111's refiner_checkpoint / refiner_switch_at): a second checkpoint takes over part way through a pass.

Two tiny random SDXL models; every UNet call is counted per model. The expected switch is computed here from A1111's
rule (the call's σ → nearest table timestep t → done = (999 − t) / 1000; switch once done ≥ switch_at) over Euler's
Uniform schedule, whose timesteps are k-diffusion's ``linspace(999, 0, steps)``: t_i = 999 − 111·i for 10 steps.
"""
from __future__ import annotations

import pytest

from engine import Engine, GenerationRequest, ModelRegistry
from engine.errors import ValidationError

BASE, REFINER, OTHER_FAMILY = "xl-base", "xl-refiner", "sd1"
STEPS = 10


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """An engine over two tiny SDXL models and a tiny SD 1.x; ``calls`` counts each model's UNet calls."""
    from engine.tiny_models import build_sd1, build_sdxl

    root = tmp_path_factory.mktemp("refiner-models")
    build_sdxl(root / "Stable-diffusion" / BASE, seed=2)
    build_sdxl(root / "Stable-diffusion" / REFINER, seed=5)
    build_sd1(root / "Stable-diffusion" / OTHER_FAMILY, seed=0)
    engine = Engine(ModelRegistry(root, builtin_dir=None, cache_size=4))
    calls: dict[str, int] = {BASE: 0, REFINER: 0}
    for name in calls:
        unet = engine.registry.load(name).pipeline.unet
        forward = unet.forward

        def counting(*args, _name=name, _forward=forward, **kwargs):
            calls[_name] += 1
            return _forward(*args, **kwargs)

        unet.forward = counting
    return engine, calls


def _generate(engine, calls, **changes):
    for name in calls:
        calls[name] = 0
    request = GenerationRequest(**{"prompt": "a cat", "model": BASE, "sampler": "Euler", "steps": STEPS, "width": 64, "height": 64,
                                   "seed": 3, "preview_every": 0, "refiner_checkpoint": REFINER, **changes})
    return engine.generate(request)


def _base_calls_a1111(switch_at: float, steps: int = STEPS) -> int:
    timesteps = [999 - 999 * i / (steps - 1) for i in range(steps)]
    return sum((999 - round(t)) / 1000 < switch_at for t in timesteps)


@pytest.mark.parametrize("switch_at", [0.3, 0.5, 0.8])
def test_the_refiner_takes_over_at_the_step_the_fraction_says(counted, switch_at):
    engine, calls = counted
    _generate(engine, calls, refiner_switch_at=switch_at)
    expected = _base_calls_a1111(switch_at)
    assert 0 < expected < STEPS
    assert calls == {BASE: expected, REFINER: STEPS - expected}


def test_the_refiner_changes_the_picture_and_is_written_as_a1111_does(counted):
    engine, calls = counted
    from engine.infotext import parse_infotext, request_fields_from_infotext

    refined = _generate(engine, calls, refiner_switch_at=0.5).images[0]
    plain = _generate(engine, calls, refiner_checkpoint="").images[0]
    assert refined.image.tobytes() != plain.image.tobytes()
    params = parse_infotext(refined.infotext)
    refiner_hash = engine.registry.short_hash(engine.registry.get(REFINER))
    assert (params["Refiner"], params["Refiner switch at"]) == (f"{REFINER} [{refiner_hash}]", "0.5")
    assert "Refiner" not in parse_infotext(plain.infotext)
    never = _generate(engine, calls, refiner_switch_at=1.0).images[0]  # (999 − t) / 1000 never reaches 1
    assert calls[REFINER] == 0 and "Refiner" not in parse_infotext(never.infotext)
    read = request_fields_from_infotext(params)
    assert (read["refiner_checkpoint"], read["refiner_switch_at"]) == (REFINER, 0.5)


def test_the_refiner_is_loaded_once_through_the_registry_cache(counted):
    engine, calls = counted
    loaded = engine.registry.load(REFINER)
    _generate(engine, calls, refiner_switch_at=0.5)
    assert engine.registry.load(REFINER) is loaded


def test_with_hires_fix_the_refiner_refines_the_second_pass_only(counted):
    engine, calls = counted
    # second pass: 10-step schedule at strength 0.5 keeps t_enc + 1 = 6 steps, i = 4..9 of the schedule
    result = _generate(engine, calls, refiner_switch_at=0.8, enable_hr=True, denoising_strength=0.5)
    assert result.images[0].image.size == (128, 128)
    second_pass_base = sum((999 - round(999 - 111 * i)) / 1000 < 0.8 for i in range(4, 10))
    assert calls == {BASE: STEPS + second_pass_base, REFINER: 6 - second_pass_base}


def test_a_refiner_of_another_latent_format_is_refused_naming_the_field(counted):
    engine, calls = counted
    with pytest.raises(ValidationError) as error:
        _generate(engine, calls, refiner_checkpoint=OTHER_FAMILY)
    assert error.value.field == "refiner_checkpoint" and "latent format" in error.value.message
    with pytest.raises(ValidationError) as error:
        _generate(engine, calls, refiner_checkpoint="no-such-model")
    assert error.value.field == "refiner_checkpoint"
