"""A1111 prompt syntax over compel: weights move embeddings the right way, long prompts are not cut."""
from __future__ import annotations

import pytest
import torch

from engine.prompts import weighted_fragments
from tests._compel import compel_for


@pytest.mark.parametrize("a1111,fragments", [
    ("a (red:1.5) circle", [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]),
    ("a (red) circle", [("a ", 1.0), ("red", 1.1), (" circle", 1.0)]),
    ("a [red] circle", [("a ", 1.0), ("red", 1 / 1.1), (" circle", 1.0)]),
    ("((red))", [("red", 1.1 * 1.1)]),
    (r"a \(literal\) bracket", [("a (literal) bracket", 1.0)]),
    ("(red, blue:0.8) sky", [("red, blue", 0.8), (" sky", 1.0)]),
    ("unbalanced ) bracket", [("unbalanced ) bracket", 1.0)]),
    ("(open group", [("open group", 1.1)]),
    ("plain words", [("plain words", 1.0)]),
    ("(time: 12:30)", [("time: 12", 30.0)]),  # A1111 reads the last ":number" as the weight too
    ("(red: 1.5 )", [("red", 1.5)]),
    ("x (a (b:2) c:0.5) y", [("x ", 1.0), ("a ", 0.5), ("b", 1.0), (" c", 0.5), (" y", 1.0)]),
    ("a(b)c", [("a", 1.0), ("b", 1.1), ("c", 1.0)]),
    ("(a)(b)", [("ab", 1.1)]),  # neighbouring runs of one weight merge
    ("()", [("", 1.0)]),
])
def test_a1111_syntax_becomes_weighted_runs(a1111, fragments):
    got = weighted_fragments(a1111)
    assert [text for text, _ in got] == [text for text, _ in fragments]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in fragments])


@pytest.fixture(scope="module", params=["tiny-sd1", "tiny-sdxl"])
def encoder(request, registry):
    encoder = registry.load(request.param).prompt_encoder
    encoder.tokenizer = registry.load(request.param).pipeline.tokenizer
    return encoder


def embedding(encoder, prompt):
    return encoder._encode_uncached(prompt, "").prompt_embeds[0].float()


def test_weighting_a_word_moves_the_embedding_in_the_expected_direction(encoder):
    base = embedding(encoder, "a red circle")
    up, more, down = (embedding(encoder, p) for p in ("a (red:1.5) circle", "a (red:2.0) circle", "a (red:0.5) circle"))
    delta_up, delta_more, delta_down = (up - base).flatten(), (more - base).flatten(), (down - base).flatten()
    assert delta_up.norm() > 0 and delta_down.norm() > 0
    assert torch.nn.functional.cosine_similarity(delta_up, delta_down, dim=0) < 0, "up- and down-weighting should pull opposite ways"
    assert delta_more.norm() > delta_up.norm(), "a larger weight should move further"
    assert torch.allclose(embedding(encoder, "a (red:1.0) circle"), base, atol=1e-5)


def test_a_200_token_prompt_is_not_truncated(encoder):
    words = " ".join(f"w{i % 10}" for i in range(100))  # 100 words → well over 200 tokens in the tiny character vocabulary
    tokens = len(encoder.tokenizer(words).input_ids)
    assert tokens > 200
    long = embedding(encoder, words)
    assert long.shape[0] >= 3 * 77, "long prompts are split into 77-token chunks, not cut"
    tail_changed = embedding(encoder, words + " zz")
    assert not torch.allclose(long[-77:], tail_changed[-77:]), "the end of a long prompt must still count"


def test_long_unweighted_prompt_fast_path_equals_a_full_compel_call(encoder):
    text = ", ".join(f"w{i % 10} v{i % 7}" for i in range(60))  # commas: compel picks split points on them
    assert len(encoder.tokenizer(text).input_ids) > 2 * 77
    fast, fast_pooled = encoder._encode_text(text)
    full = compel_for(encoder)([text])
    full, full_pooled = full if isinstance(full, tuple) else (full, None)
    assert torch.equal(fast, full)
    assert (fast_pooled is None) == (full_pooled is None)
    if fast_pooled is not None:
        assert torch.equal(fast_pooled, full_pooled)


def test_repeated_prompt_hits_the_cache(registry):
    encoder = registry.load("tiny-sd1").prompt_encoder
    hits = encoder.hits
    first = encoder.encode("cache me", "not this")
    second = encoder.encode("cache me", "not this")
    assert second is first and encoder.hits == hits + 1
    assert encoder.encode("cache me", "other negative") is not first
