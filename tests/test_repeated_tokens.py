"""SD 3.5 without T5: the 256 zero tokens in T5's place computed as one (``engine.families.repeated_tokens``).

The reference is diffusers' own transformer, with its own attention processors, on the whole context; the engine's
pictures are held to diffusers' pipeline by ``tests/test_sd3_family.py`` and ``tests/test_demo_flow_training.py``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.engine import Engine
from engine.families import sd3
from engine.families.repeated_tokens import RepeatedLastTokenAttention
from engine.request import GenerationRequest

torch.set_num_threads(1)
ZEROS = 256  # diffusers' max_sequence_length: the zero tokens an SD 3.5 pipeline without T5 puts in T5's place


def _transformer(dual: bool):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(  # SD 3.5 Medium's shape with ``dual``: qk norms and a second, image-only attention
        sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=24, out_channels=16, pos_embed_max_size=16,
        qk_norm="rms_norm" if dual else None, dual_attention_layers=(0,) if dual else ()).eval()


def _inputs(batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    clip = torch.randn((batch, 5, 32), generator=generator)
    context = torch.cat([clip, torch.zeros((batch, ZEROS, 32))], dim=1)
    return (torch.randn((batch, 16, 8, 8), generator=generator), torch.tensor([700.0, 700.0][:batch]), context,
            torch.randn((batch, 24), generator=generator))


def _diffusers(transformer, x, timestep, context, pooled) -> torch.Tensor:
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=context, pooled_projections=pooled,
                           return_dict=False)[0]


@pytest.mark.parametrize("dual", [False, True], ids=["sd3.5-large-shape", "sd3.5-medium-shape"])
def test_one_zero_token_with_its_bias_gives_the_transformer_on_all_of_them(dual):
    transformer = _transformer(dual)
    x, timestep, context, pooled = _inputs()
    reference = _diffusers(transformer, x, timestep, context, pooled)  # diffusers' processors, every token
    call = sd3.TransformerCall(transformer, zero_tokens=ZEROS)
    assert call.zero_tokens == ZEROS
    with torch.no_grad():
        (ours,) = call(x, timestep, encoder_hidden_states=context, added_cond_kwargs={"pooled_projections": pooled})
    assert torch.allclose(ours, reference, atol=2e-5, rtol=1e-4), float((ours - reference).abs().max())
    # The bias is what makes it so: one zero token weighed once is another function.
    unweighted = _diffusers(transformer, x, timestep, context[:, :6], pooled)
    assert float((unweighted - reference).abs().max()) > 1e-3


def test_without_repeats_the_processor_is_diffusers_bit_for_bit():
    transformer = _transformer(dual=True)
    inputs = _inputs()
    reference = _diffusers(transformer, *inputs)
    sd3.TransformerCall(transformer, zero_tokens=ZEROS)  # installs the processor
    assert all(isinstance(p, RepeatedLastTokenAttention) for p in transformer.attn_processors.values())
    assert torch.equal(_diffusers(transformer, *inputs), reference)


def test_a_collapsed_call_and_a_whole_one_never_share_a_traced_replay():
    """A traced call is keyed by the call's class and its ``trace_key``: a replay recorded on one zero token must not
    answer for a whole context of the same shape (T5's real tokens)."""
    from engine import traced_calls

    transformer = _transformer(dual=False)
    collapsed, whole = sd3.TransformerCall(transformer, zero_tokens=ZEROS), sd3.TransformerCall(transformer)
    assert traced_calls._call_key(collapsed) != traced_calls._call_key(whole)
    cache = traced_calls.enable(transformer)
    x, timestep, context, pooled = _inputs()
    with torch.no_grad():
        for call in (collapsed, whole):
            traced_calls.replayed(call, transformer)(x, timestep, encoder_hidden_states=context,
                                                     added_cond_kwargs={"pooled_projections": pooled})
    assert cache.traced == 2


def test_only_a_model_without_t5_collapses_its_context():
    class Pipeline:
        def __init__(self, t5):
            self.transformer, self.text_encoder_3 = _transformer(dual=False), t5

    assert sd3.SD3.model_call(Pipeline(t5=None)).zero_tokens == ZEROS
    with_t5 = sd3.SD3.model_call(Pipeline(t5=torch.nn.Linear(1, 1)))
    assert with_t5.zero_tokens == 0 and with_t5.attention_kwargs is None


def test_the_flow_demo_draws_the_same_pictures_from_one_zero_token(demo_engine: Engine, monkeypatch):
    """The default model (SD 3.5's layout, no T5): the pixels of the whole-context call, every sampler family."""
    def draw(prompt: str, seed: int, sampler: str) -> np.ndarray:
        request = GenerationRequest(prompt=prompt, model="sfumato-demo-flow", steps=12, seed=seed, cfg_scale=3.0,
                                    sampler=sampler, preview_every=0)
        return np.asarray(demo_engine.generate(request).images[0].image, dtype=np.int16)

    cases = [("a large red circle on the left, blue background", 1, "Euler"),
             ("a small green square at the top, white background", 2, "DPM++ 2M"),
             ("a yellow triangle in the center, black background", 3, "Euler a")]
    collapsed = [draw(*case) for case in cases]
    monkeypatch.setattr(sd3.StableDiffusion3, "model_call", lambda self, pipeline: sd3.TransformerCall(pipeline.transformer))
    whole = [draw(*case) for case in cases]
    assert max(int(np.abs(a - b).max()) for a, b in zip(collapsed, whole)) <= 1
