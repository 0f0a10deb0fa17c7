"""The traced model call (engine.traced_calls) is the default exact path: it must give the eager call's pixels, bit for bit.

Each test draws the same request with the trace replaying and with the model running eagerly, and compares the
pictures exactly; each also checks that the trace really ran (otherwise two eager runs would compare equal).
"""
from __future__ import annotations

import numpy as np
import torch

from engine import Engine, GenerationRequest, ModelRegistry, traced_calls


def _denoiser(engine: Engine, model: str) -> torch.nn.Module:
    loaded = engine.registry.load(model)
    return getattr(loaded.pipeline, loaded.family.denoiser)


def _draw(engine: Engine, traced: bool, **fields) -> np.ndarray:
    cache = traced_calls.enable(_denoiser(engine, fields["model"]), active=traced)
    try:
        return np.asarray(engine.generate(GenerationRequest(**fields)).images[0].image)
    finally:
        cache.active = True


def _traced_equals_eager(engine: Engine, **fields) -> np.ndarray:
    cache = traced_calls.cache_of(_denoiser(engine, fields["model"]))
    assert cache is not None, "tracing is on by default"
    made = cache.traced
    traced = _draw(engine, True, **fields)
    assert cache.traced > made or cache.traces, "the traced call never ran"
    eager = _draw(engine, False, **fields)
    assert np.array_equal(traced, eager), f"traced and eager pictures differ by up to {np.abs(traced.astype(int) - eager).max()}/255"
    return traced


def test_demo_model_pixels_are_identical_with_the_traced_call(demo_engine):
    common = dict(prompt="a large red circle on the left, blue background", negative_prompt="blurry", model="sfumato-demo",
                  sampler="DPM++ 2M", steps=8, cfg_scale=7.0, seed=3, width=64, height=64)
    first = _traced_equals_eager(demo_engine, **common)
    cache = traced_calls.cache_of(_denoiser(demo_engine, "sfumato-demo"))
    made = cache.traced
    again = _draw(demo_engine, True, **common)  # replayed from the kept trace, not traced again
    assert cache.traced == made and np.array_equal(first, again)
    _traced_equals_eager(demo_engine, **{**common, "cfg_scale": 1.0, "negative_prompt": "", "sampler": "Euler a"})  # batch 1


def test_sdxl_added_inputs_pass_through_the_trace(engine):
    _traced_equals_eager(engine, prompt="a cat", negative_prompt="dog", model="tiny-sdxl", sampler="DPM++ 2M", steps=4,
                         cfg_scale=5.0, seed=5, width=64, height=64)


def test_weights_changed_in_place_are_seen_by_the_kept_trace(engine):
    """A job's LoRA is merged into the weights in place: a trace made before must compute with the new values."""
    fields = dict(prompt="a cat", model="tiny-sd1", sampler="Euler", steps=3, cfg_scale=5.0, seed=7, width=64, height=64)
    before = _traced_equals_eager(engine, **fields)
    weight = _denoiser(engine, "tiny-sd1").conv_in.weight
    kept = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.5)
        changed = _traced_equals_eager(engine, **fields)
        assert not np.array_equal(before, changed)
    finally:
        with torch.no_grad():
            weight.copy_(kept)
    assert np.array_equal(_draw(engine, True, **fields), before)


def test_calls_with_hook_inputs_run_eagerly(engine):
    module = _denoiser(engine, "tiny-sd1")
    seen = []

    def call(x, timestep, **kwargs):
        seen.append(sorted(kwargs))
        return module(x, timestep, **kwargs)

    cache = traced_calls.enable(module)
    replay = traced_calls.replayed(call, module)
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 32)
    with torch.inference_mode():
        plain = replay(x, t, encoder_hidden_states=text)[0]
        hooked = replay(x, t, encoder_hidden_states=text, down_block_additional_residuals=None)[0]
    # the hooked call reached the Python callable (eager); the plain one was traced, so the callable ran only while tracing
    assert any("down_block_additional_residuals" in keys for keys in seen)
    assert torch.equal(plain, hooked)
    assert cache.traces


def test_flux_transformer_with_a_constant_input_traces_per_value(tmp_path):
    from tests._flux_fixture import build_folder

    build_folder(tmp_path / "flux", "dev")
    engine = Engine(ModelRegistry(tmp_path, builtin_dir=None))
    fields = dict(prompt="a red fox", model="flux", sampler="Euler", schedule="Simple", steps=3, cfg_scale=1.0, seed=2)
    a = _traced_equals_eager(engine, distilled_cfg_scale=3.5, **fields)
    b = _traced_equals_eager(engine, distilled_cfg_scale=1.5, **fields)  # the guidance value is baked in: a new trace
    assert not np.array_equal(a, b)


def test_a_call_the_tracer_cannot_follow_runs_eagerly(engine):
    module = _denoiser(engine, "tiny-sd1")
    cache = traced_calls.enable(module)

    def call(x, timestep, **kwargs):
        if torch.jit.is_tracing():
            raise RuntimeError("not traceable")
        return module(x, timestep, **kwargs)

    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([400.0]), torch.randn(1, 77, 32)
    failed = len(cache.failed)
    with torch.inference_mode():
        out = traced_calls.replayed(call, module)(x, t, encoder_hidden_states=text)[0]
        assert torch.equal(out, module(x, t, encoder_hidden_states=text)[0])
    assert len(cache.failed) == failed + 1


def test_a_trace_that_fails_on_replay_falls_back_to_the_eager_call_for_good(engine):
    """A model whose ops depend on its inputs' values (Z-Image's caption lengths) can trace fine and then fail when
    replayed on other values: the job must still get the eager call's output, and the model stop tracing."""
    module = _denoiser(engine, "tiny-sd1")
    cache = traced_calls.enable(module)
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([400.0]), torch.randn(1, 77, 32)
    replay = traced_calls.replayed(module, module)
    try:
        with torch.inference_mode():
            replay(x, t, encoder_hidden_states=text)  # traced and kept as the pass's last trace
            for key in list(cache.traces):  # the kept trace now fails as a frozen value-dependent op would
                cache.traces[key] = _failing
            replay._last = replay._last[:4] + (_failing,) + replay._last[5:]
            out = replay(x, t, encoder_hidden_states=text)[0]
            assert torch.equal(out, module(x, t, encoder_hidden_states=text)[0])
        assert not cache.active  # the model runs eagerly from now on
    finally:
        cache.active = True


def _failing(*inputs):
    raise RuntimeError("The following operation failed in the TorchScript interpreter.")
