"""Clip skip as A1111 1.10 defines it per family.

SD 1.x: skip N conditions on CLIP's hidden state N layers from the end, through the final layer norm
(checked against transformers' CLIPTextModel directly). SD 2.x and SDXL: the setting changes nothing
(A1111's OpenCLIP embedders read a fixed layer; SDXL's CLIP-L too unless "Clip skip SDXL" is on).
The prompt cache never hands one skip's embeddings to another.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine import GenerationRequest
from engine.errors import ValidationError
from engine.families import SD1, SD2
from engine.prompts import PromptEncoder
from engine.tiny_models import build_tokenizer

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(300)

LAYERS = 4
PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A tiny CLIP text model with four layers (SD 1.x's has twelve)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return SimpleNamespace(tokenizer=tokenizer, text_encoder=CLIPTextModel(config).eval())


@torch.no_grad()
def reference(clip, token_ids: torch.Tensor, skip: int) -> torch.Tensor:
    """A1111's SD 1.x rule on transformers' own outputs: hidden_states[-N], then the final layer norm
    (N = 1: the model's last_hidden_state, which already ends with that norm)."""
    output = clip.text_encoder(token_ids, output_hidden_states=True)
    if skip == 1:
        return output.last_hidden_state
    return clip.text_encoder.final_layer_norm(output.hidden_states[-skip])


def window(clip, text: str) -> torch.Tensor:
    return clip.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


@pytest.mark.parametrize("skip", range(1, LAYERS + 1))
def test_sd1_clip_skip_reads_the_hidden_state_n_from_the_end_through_the_final_norm(clip, skip):
    conditioning = PromptEncoder(clip, SD1).encode(PROMPT, "", skip)
    assert torch.allclose(conditioning.prompt_embeds, reference(clip, window(clip, PROMPT), skip), atol=1e-6)
    assert torch.allclose(conditioning.negative_embeds, reference(clip, window(clip, ""), skip), atol=1e-6)


def test_sd1_clip_skip_applies_to_every_chunk_of_a_long_prompt(clip):
    """Chunked as compel chunks it (compel's own tokenizer split, an independent library); each 77-token
    window read at the skipped layer."""
    from compel.embeddings_provider import EmbeddingsProvider, SplitLongTextMode

    text = " ".join(f"w{i % 10}" for i in range(60))
    chunker = EmbeddingsProvider(clip.tokenizer, clip.text_encoder, truncate=False,
                                 split_long_text_mode=SplitLongTextMode.SENTENCES)
    tokens, _, _ = chunker.get_token_ids_and_expand_weights([text], [1.0], device="cpu")
    chunks = tokens.reshape(-1, 77)
    assert chunks.shape[0] >= 2
    expected = torch.cat([reference(clip, chunk[None], 2) for chunk in chunks], dim=1)
    got = PromptEncoder(clip, SD1).encode(text, "", 2).prompt_embeds
    assert torch.allclose(got, expected, atol=1e-6)


def test_sd1_clip_skip_reaches_weighted_prompts(clip):
    encoder = PromptEncoder(clip, SD1)
    weighted = "a (red:1.3) circle"
    assert not torch.equal(encoder.encode(weighted, "", 1).prompt_embeds, encoder.encode(weighted, "", 2).prompt_embeds)
    # A weight of exactly 1 changes nothing: the same embedding as the plain text at that skip.
    plain = reference(clip, window(clip, "a red circle"), 3)
    assert torch.allclose(encoder.encode("a (red:1.0) circle", "", 3).prompt_embeds, plain, atol=1e-6)


def test_clip_skip_past_the_encoders_depth_is_refused_naming_the_field(clip):
    with pytest.raises(ValidationError) as error:
        PromptEncoder(clip, SD1).encode(PROMPT, "", LAYERS + 1)
    assert error.value.field == "clip_skip"


def test_sd2_ignores_clip_skip(clip):
    encoder = PromptEncoder(clip, SD2)
    last = reference(clip, window(clip, PROMPT), 1)
    for skip in (1, 2, 3):
        assert torch.allclose(encoder.encode(PROMPT, "", skip).prompt_embeds, last, atol=1e-6)


def test_the_cache_keeps_clip_skips_apart(clip):
    encoder = PromptEncoder(clip, SD1)
    one = encoder.encode(PROMPT, "blurry", 1)
    two = encoder.encode(PROMPT, "blurry", 2)
    assert encoder.misses == 2 and encoder.hits == 0 and two is not one
    assert not torch.equal(one.prompt_embeds, two.prompt_embeds)
    assert not torch.equal(one.negative_embeds, two.negative_embeds)  # the per-text cache is keyed by skip too
    assert torch.allclose(two.prompt_embeds, reference(clip, window(clip, PROMPT), 2), atol=1e-6)
    assert encoder.encode(PROMPT, "blurry", 2) is two and encoder.hits == 1


def test_a_family_that_ignores_clip_skip_shares_one_cache_entry(clip):
    encoder = PromptEncoder(clip, SD2)
    first = encoder.encode(PROMPT, "", 1)
    assert encoder.encode(PROMPT, "", 2) is first and encoder.hits == 1


# -- through the engine ------------------------------------------------------------------------------
def picture(engine, model: str, **changes) -> np.ndarray:
    fields = dict(prompt="a red circle", negative_prompt="blurry", model=model, steps=3, cfg_scale=7.0, width=64, height=64,
                  seed=3, preview_every=0)
    fields.update(changes)
    return np.asarray(engine.generate(GenerationRequest(**fields)).images[0].image, dtype=np.int16)


def test_sd1_clip_skip_2_changes_the_picture_and_1_is_the_default(engine):
    default = picture(engine, "tiny-sd1")
    assert np.array_equal(picture(engine, "tiny-sd1", clip_skip=1), default)
    assert np.abs(picture(engine, "tiny-sd1", clip_skip=2) - default).max() > 0


def test_sdxl_clip_skip_leaves_the_picture_as_it_is(engine):
    assert np.array_equal(picture(engine, "tiny-sdxl", clip_skip=2), picture(engine, "tiny-sdxl", clip_skip=1))


def test_too_large_a_clip_skip_for_the_model_is_a_validation_error(engine):
    with pytest.raises(ValidationError) as error:
        picture(engine, "tiny-sd1", clip_skip=3)  # the tiny SD 1.x text encoder has two layers
    assert error.value.field == "clip_skip"


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sdxl"])
def test_the_default_is_what_diffusers_encode_prompt_gives(registry, model):
    """Clip skip 1 on SD 1.x and any Clip skip on SDXL: diffusers' own pipelines' embeddings, bit for bit."""
    loaded = registry.load(model)
    conditioning = loaded.prompt_encoder.encode("a blue square", "", 1)
    pipeline = loaded.pipeline
    if loaded.family.pooled_encoder is None:
        expected, _ = pipeline.encode_prompt("a blue square", loaded.device, 1, False)
        assert torch.equal(conditioning.prompt_embeds, expected)
    else:
        expected, _, pooled, _ = pipeline.encode_prompt(prompt="a blue square", device=loaded.device, num_images_per_prompt=1,
                                                        do_classifier_free_guidance=False)
        assert torch.equal(conditioning.prompt_embeds, expected) and torch.equal(conditioning.pooled, pooled)
        assert loaded.prompt_encoder.encode("a blue square", "", 2) is conditioning
