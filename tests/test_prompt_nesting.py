"""Prompt weighting syntax costs time linear in the prompt: no short prompt can hold the shared queue.

Compel's grammar backtracked on nested brackets (16 levels of ``(`` ran for minutes) and re-encoded the
whole prompt once per down-weighted group. Weights that nest past any use are refused up front, naming
the field.
"""
from __future__ import annotations

import threading

import pytest
import torch

from engine import GenerationRequest
from engine.errors import ValidationError
from engine.prompts import weighted_fragments
from tests._compel import compel_for


def nested(depth: int, word: str = "cat", bracket: str = "()") -> str:
    return bracket[0] * depth + word + bracket[1] * depth


@pytest.fixture(scope="module")
def encoder(registry):
    return registry.load("tiny-sd1").prompt_encoder


def encode_within(encoder, text: str, seconds: float) -> bool:
    """True if ``text`` encodes within ``seconds``; run on a daemon thread so a runaway parse fails the test, not the run."""
    done = threading.Event()

    def work():
        encoder._encode_text(text)
        done.set()

    threading.Thread(target=work, daemon=True).start()
    return done.wait(seconds)


@pytest.mark.parametrize("depth", [11, 16, 32, 72])
def test_deeply_nested_round_brackets_encode_in_moments(encoder, depth):
    assert encode_within(encoder, nested(depth), seconds=10), f"{depth} levels of '(' did not encode in 10 s"


@pytest.mark.parametrize("depth", [16, 1000])
def test_deeply_nested_square_brackets_encode_in_moments(encoder, depth):
    assert encode_within(encoder, nested(depth, bracket="[]"), seconds=10)


def test_nested_weights_multiply_as_in_a1111():
    [(text, weight)] = weighted_fragments(nested(16))
    assert text == "cat" and weight == pytest.approx(1.1 ** 16)
    assert weighted_fragments("a ((b) c:0.5) d") == [("a ", 1.0), ("b", pytest.approx(0.55)), (" c", 0.5), (" d", 1.0)]


def test_down_weighted_groups_cost_one_text_encoder_pass_per_chunk(encoder, registry):
    text_encoder = registry.load("tiny-sd1").pipeline.text_encoder
    passes = []
    handle = text_encoder.register_forward_hook(lambda *_: passes.append(1))
    try:
        embeds, _ = encoder._encode_text("[a] " * 60)  # 60 down-weighted groups, a few 77-token chunks
    finally:
        handle.remove()
    chunks = embeds.shape[1] // 77
    assert len(passes) == chunks, f"{len(passes)} text-encoder passes for {chunks} chunks"


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sdxl"])
def test_weights_over_one_give_compel_s_embeddings(registry, model):
    """Only the parser changed for up-weights: the embeddings are what compel computed for the same runs."""
    encoder = registry.load(model).prompt_encoder
    ours, _ = encoder._encode_text("a (red:1.5) circle, ((blue)) sky")
    theirs = compel_for(encoder)(["a (red)1.5 circle, ((blue)1.1)1.1 sky"])
    assert torch.equal(ours, theirs[0] if isinstance(theirs, tuple) else theirs)


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_weights_nested_past_the_limit_are_refused_naming_the_field(field):
    with pytest.raises(ValidationError) as error:
        GenerationRequest(**{field: nested(100)})
    assert error.value.field == field and "cat" in error.value.message
    GenerationRequest(**{field: nested(72)})  # 1.1^72 ≈ 958: allowed
