"""The flow families' one prompt encoder (engine/flow_prompts.py, issue #19) on the tiny fixtures: A1111's syntax on the
CLIP parts (checked against A1111's emphasis formula worked out here on the text encoders called directly), the plain
text to T5 and the LLMs (checked against their tokenizers called directly), 77-token chunks and BREAK on SD 3.5,
truncations reported in ``GenerationResult.warnings``, and no negative prompt encoded at CFG 1."""
from __future__ import annotations

import pytest
import torch

from engine.engine import Engine
from engine.flow_prompts import clip_chunks
from engine.models import ModelRegistry
from engine.prompts import plain_text
from engine.request import GenerationRequest, GenerationResult
from tests import _flux2_fixture, _flux_fixture, _sd3_fixture, _zimage_fixture

BUILDERS = {"sd3": _sd3_fixture.build_folder, "dev": lambda folder: _flux_fixture.build_folder(folder, "dev"),
            "schnell": lambda folder: _flux_fixture.build_folder(folder, "schnell"),
            "zimage": _zimage_fixture.build_folder, "flux2": _flux2_fixture.build_folder}
WINDOW = 77


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    torch.set_num_threads(1)
    models = tmp_path_factory.mktemp("models")
    for name, build in BUILDERS.items():
        build(models / name)
    return Engine(ModelRegistry(models, builtin_dir=None))


def _generate(engine: Engine, model: str, **changes) -> GenerationResult:
    request = GenerationRequest(**{"prompt": "a red fox", "model": model, "steps": 2, "sampler": "Euler",
                                   "schedule": "Simple", "seed": 3, "cfg_scale": 1.0, **changes})
    return engine.generate(request)


class _Inputs:
    """The token ids each forward call of a module was given (positional or ``input_ids=``)."""

    def __init__(self, module: torch.nn.Module):
        self.ids: list[torch.Tensor] = []
        self._handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.ids.append((args[0] if args else kwargs["input_ids"]).detach().clone())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def _chat(tokenizer, text: str, thinking: bool) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True,
                                         enable_thinking=thinking)


# -- plain text ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, plain", [
    ("a (red:1.5) cat", "a red cat"),
    ("a ((red)) [[cat]]", "a red cat"),
    (r"a \(literal\) cat", "a (literal) cat"),
    ("a red cat BREAK a blue dog", "a red cat a blue dog"),
    ("no syntax at all", "no syntax at all"),
])
def test_plain_text_drops_the_syntax_and_keeps_escaped_brackets(prompt, plain):
    assert plain_text(prompt) == plain


# -- T5 and the LLMs get the plain text ------------------------------------------------------------------------

def _reference_ids(model: str, pipeline, text: str) -> torch.Tensor:
    """What the plain encoder must be given for ``text``: its tokenizer called directly, padded to the family's limit."""
    if model == "dev":
        return pipeline.tokenizer_2(text, padding="max_length", max_length=512, truncation=True, return_tensors="pt").input_ids
    thinking = model == "zimage"  # Z-Image's chat turn thinks, Klein's does not
    return pipeline.tokenizer(_chat(pipeline.tokenizer, text, thinking), padding="max_length", max_length=512,
                              truncation=True, return_tensors="pt").input_ids


@pytest.mark.parametrize("model, encoder", [("dev", "text_encoder_2"), ("zimage", "text_encoder"), ("flux2", "text_encoder")])
def test_t5_and_llm_encoders_get_the_plain_text_token_ids(engine, model, encoder):
    loaded = engine.registry.load(model)
    with _Inputs(getattr(loaded.pipeline, encoder)) as seen:
        loaded.prompt_encoder.encode("a (red:1.5) [cat]", "", need_negative=False)
    assert len(seen.ids) == 1
    expected = _reference_ids(model, loaded.pipeline, "a red cat")
    assert torch.equal(seen.ids[0].cpu(), expected)
    assert not torch.equal(expected, _reference_ids(model, loaded.pipeline, "a (red:1.5) [cat]"))  # the syntax matters


# -- CLIP reads A1111's weights ---------------------------------------------------------------------------------

def _clip_window(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, padding="max_length", max_length=WINDOW, truncation=True, return_tensors="pt").input_ids


def test_sd3_clip_hidden_states_follow_a1111_original_emphasis(engine):
    loaded = engine.registry.load("sd3")
    pipeline = loaded.pipeline
    ours = loaded.prompt_encoder.encode("a (red:1.5) cat", "", need_negative=False)
    plain = loaded.prompt_encoder.encode("a red cat", "", need_negative=False)

    # By hand: both CLIPs' penultimate hidden states side by side (diffusers' SD3 layout, A1111's Sd3ClipLG), each
    # token times its weight, then rescaled to the unweighted mean (A1111 modules/sd_emphasis.py, EmphasisOriginal).
    ids = _clip_window(pipeline.tokenizer, "a red cat")
    with torch.no_grad():
        z = torch.cat([encoder(ids, output_hidden_states=True).hidden_states[-2]
                       for encoder in (pipeline.text_encoder, pipeline.text_encoder_2)], dim=-1)
        pooled = torch.cat([encoder(ids).text_embeds for encoder in (pipeline.text_encoder, pipeline.text_encoder_2)], dim=-1)
    before = len(pipeline.tokenizer("a", add_special_tokens=False).input_ids)
    red = len(pipeline.tokenizer("red", add_special_tokens=False).input_ids)
    weights = torch.ones(WINDOW)
    weights[1 + before: 1 + before + red] = 1.5
    expected = z * weights[None, :, None]
    expected = expected * (z.mean() / expected.mean())

    width = z.shape[-1]
    clip = ours.prompt_embeds[:, :WINDOW, :width]
    assert torch.allclose(clip, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(clip, z, atol=1e-3)  # the weight changed something
    assert torch.equal(plain.prompt_embeds[:, :WINDOW, :width], z)  # and without syntax, nothing
    assert torch.equal(ours.prompt_embeds[:, WINDOW:], plain.prompt_embeds[:, WINDOW:])  # the T5 part reads no weights
    assert torch.allclose(ours.pooled, pooled, atol=1e-6)  # pooled: the unweighted first chunk, as A1111


def test_flux_clip_pooled_reads_the_words_without_their_weights(engine):
    loaded = engine.registry.load("dev")
    pipeline = loaded.pipeline
    ours = loaded.prompt_encoder.encode("a (red:1.5) cat", "", need_negative=False)
    with torch.no_grad():
        expected = pipeline.text_encoder(_clip_window(pipeline.tokenizer, "a red cat")).pooler_output
    assert torch.allclose(ours.pooled, expected, atol=1e-6)


@pytest.mark.parametrize("model", ["sd3", "dev", "schnell", "zimage", "flux2"])
def test_a_short_plain_prompt_is_encoded_exactly_as_diffusers_encode_prompt(engine, model):
    loaded = engine.registry.load(model)
    pipeline, device = loaded.pipeline, loaded.pipeline.text_encoder.device
    ours = loaded.prompt_encoder.encode("a red fox", "blurry")
    with torch.no_grad():
        if model == "sd3":
            embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
                "a red fox", None, None, negative_prompt="blurry", device=device)
            assert torch.equal(ours.negative_embeds, negative) and torch.equal(ours.negative_pooled, negative_pooled)
        elif model in ("dev", "schnell"):
            embeds, pooled, _ = pipeline.encode_prompt("a red fox", None, device=device,
                                                       max_sequence_length=512 if model == "dev" else 256)
        elif model == "zimage":
            embeds, negative = pipeline.encode_prompt("a red fox", device=device, negative_prompt="blurry")
            embeds, pooled = embeds[0][None], None
            assert torch.equal(ours.negative_embeds[0, : negative[0].shape[0]], negative[0])
            ours.prompt_embeds = ours.prompt_embeds[:, : embeds.shape[1]]  # zero-padded to the negative's length
        else:
            embeds, _ = pipeline.encode_prompt("a red fox", device=device)
            pooled = None
    assert torch.equal(ours.prompt_embeds, embeds)
    assert (ours.pooled is None and pooled is None) or torch.equal(ours.pooled, pooled)


# -- chunks and BREAK on SD 3.5 ---------------------------------------------------------------------------------

def test_break_on_sd3_gives_two_clip_windows_each_encoded_alone(engine):
    """A1111 closes the 75-token chunk at BREAK: two 77-token CLIP windows, then the T5 tokens (zeros here: no T5)."""
    encoder = engine.registry.load("sd3").prompt_encoder
    both = encoder.encode("a red cat BREAK a blue dog", "", need_negative=True)
    first = encoder.encode("a red cat", "", need_negative=False).prompt_embeds
    second = encoder.encode("a blue dog", "", need_negative=False).prompt_embeds
    t5 = first.shape[1] - WINDOW
    assert both.prompt_embeds.shape[1] == 2 * WINDOW + t5
    assert torch.equal(both.prompt_embeds[:, :WINDOW], first[:, :WINDOW])
    assert torch.equal(both.prompt_embeds[:, WINDOW: 2 * WINDOW], second[:, :WINDOW])
    # The one-window negative is padded with an empty prompt's window to the same length, as A1111 pads uncond.
    empty = encoder.encode("", "", need_negative=False).prompt_embeds
    assert both.negative_embeds.shape == both.prompt_embeds.shape
    assert torch.equal(both.negative_embeds[:, WINDOW: 2 * WINDOW], empty[:, :WINDOW])
    assert not both.warnings


def test_a_long_prompt_on_sd3_gets_more_clip_windows_and_no_warning(engine):
    result = _generate(engine, "sd3", prompt="a red fox " * 30)  # 210 tokens of the character tokenizer
    assert result.images and result.warnings == []
    embeds = engine.registry.load("sd3").prompt_encoder.encode("a red fox " * 30, "", need_negative=False).prompt_embeds
    assert embeds.shape[1] == 3 * WINDOW + 256


def test_a_full_chunk_moves_the_words_after_its_last_comma_to_the_next_one(engine):
    """A1111's comma backtrack: the chunk ends after the comma when that is within the last 20 tokens."""
    tokenizer = engine.registry.load("sd3").pipeline.tokenizer  # one token per character, one per word-final character
    prompt = "ab " * 30 + "x, " + "cd " * 10  # 60 tokens, "x" and "," then 20 more: the 76th token needs a new chunk
    chunks = clip_chunks(tokenizer, prompt)
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    assert [len(chunk) for chunk in chunks] == [62, 20]
    assert chunks[0][-1][0] == comma


# -- truncation is reported -------------------------------------------------------------------------------------

def test_a_prompt_past_t5s_limit_is_reported_in_the_result_warnings(engine):
    tokenizer = engine.registry.load("schnell").pipeline.tokenizer_2
    kept = "fox " * 255  # schnell's T5 reads 256 tokens: 255 words and its end token
    assert len(tokenizer(kept).input_ids) == 256
    result = _generate(engine, "schnell", prompt=kept + "river mountain city")
    assert result.images
    assert len(result.warnings) == 1, result.warnings
    warning = result.warnings[0]
    assert "T5" in warning and "256" in warning and "dropped 'river mountain city'" in warning, warning
    assert _generate(engine, "schnell", prompt="a red fox by the river").warnings == []


@pytest.mark.parametrize("model", ["flux2", "zimage"])
def test_a_prompt_past_the_llms_limit_names_the_prompts_last_words_not_the_chat_template(engine, model):
    loaded = engine.registry.load(model)
    tokenizer = loaded.pipeline.tokenizer
    prompt = "red fox " * 300 + "golden hour"
    assert len(tokenizer(_chat(tokenizer, prompt, model == "zimage")).input_ids) > 512
    if model == "flux2":
        warnings = _generate(engine, model, prompt=prompt, negative_prompt="blurry").warnings
    else:  # the tiny Z-Image transformer's position table is shorter than 512 text tokens: the encoder alone
        warnings = list(loaded.prompt_encoder.encode(prompt, "blurry").warnings)
    assert len(warnings) == 1 and warnings[0].startswith("Prompt truncated for Qwen3 (512 tokens): dropped '"), warnings
    assert warnings[0].endswith("red fox golden hour'") and "im_end" not in warnings[0]


# -- the negative prompt at CFG 1 -------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["sd3", "dev", "zimage", "flux2"])
def test_the_negative_prompt_is_encoded_only_when_cfg_reads_it(engine, model):
    loaded = engine.registry.load(model)
    with _Inputs(loaded.pipeline.text_encoder) as seen:
        _generate(engine, model, prompt=f"an owl {model}", negative_prompt=f"unwanted {model}", cfg_scale=1.0)
    assert len(seen.ids) == 1  # the prompt only
    with _Inputs(loaded.pipeline.text_encoder) as seen:
        _generate(engine, model, prompt=f"an owl {model}", negative_prompt=f"unwanted {model}", cfg_scale=2.0)
    assert len(seen.ids) == 1  # the negative now, the prompt from the cache


def test_a_hires_pass_with_its_own_cfg_gets_the_negative_the_first_pass_skipped(engine):
    transformer = engine.registry.load("dev").pipeline.transformer
    rows: list[int] = []
    handle = transformer.register_forward_hook(
        lambda module, args, kwargs, output: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        result = _generate(engine, "dev", prompt="a fox at dusk", negative_prompt="blurry", cfg_scale=1.0, enable_hr=True,
                           hr_scale=2.0, hr_cfg=3.0, hr_second_pass_steps=2, denoising_strength=0.5)
    finally:
        handle.remove()
    assert result.images and rows[:2] == [1, 1] and len(rows) > 2 and set(rows[2:]) == {2}  # the second pass runs CFG
