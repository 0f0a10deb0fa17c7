"""One prompt encoder for the flow-matching families (SD 3.5, Flux.1, Z-Image, Flux.2 Klein), after issue #19:

    "The A1111 prompt syntax applies to the CLIP parts. T5 and LLM encoders get the plain text. Long prompts go up
    to the encoder's own limit, and a truncation is reported, never silent."

A family declares only its facts (``FlowPrompts``): its CLIP encoders and whether their hidden states or only their
pooled outputs condition the model, and its T5 or LLM encoder (title, token limit, chat template, and the diffusers
helper that runs it). This module does the rest the same way for all four:

- **CLIP** reads the prompt as A1111 does (``engine.prompts.break_segments``: weights, ``[x]``, escapes, BREAK): the
  tokens are cut into 75-token chunks (the window less start and end tokens; A1111's ``TextConditionalModel.tokenize_line``: BREAK starts a chunk, a chunk
  that fills up moves the words after its last comma, within 20 tokens, to the next one), each chunk is encoded on
  its own between start and end tokens, and A1111's default "Original" emphasis weights it
  (``modules/sd_emphasis.py``, ``EmphasisOriginal``). The pooled output is the first chunk's, unweighted, as A1111's
  ``TextConditionalModel.forward`` returns it. SD3's CLIP-L and CLIP-G share one tokenization and their hidden states
  are weighted side by side, as A1111's ``Sd3ClipLG`` concatenates them before the emphasis.
- **T5 / LLM** get the plain text (``engine.prompts.plain_text``) through diffusers' own helper, padded or cut at the
  encoder's limit; a cut is reported as a warning that names the encoder and the dropped words, and the engine
  hands it on in ``GenerationResult.warnings``.
- A prompt without syntax that fits one CLIP window reaches every encoder exactly as diffusers' ``encode_prompt``
  sends it, so its embeddings are the pipeline's, bit for bit.
- The negative prompt is encoded only when CFG will read it (``need_negative``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from .prompts import Conditioning, TextLayer, break_segments, plain_text

CLIP_WINDOW = 77  # CLIP's window in every released model: 75 tokens of a chunk (A1111's chunk_length) + start + end
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack": how far back a full chunk looks for a comma
SHOWN_CHARACTERS = 100  # a dropped text longer than this is shown as its start and end


@dataclass(frozen=True)
class ClipEncoder:
    """A CLIP text encoder of the family: pipeline attribute names, and its name as the artist reads it."""

    tokenizer: str
    text_encoder: str
    title: str


@dataclass(frozen=True)
class PlainEncoder:
    """A T5 or LLM text encoder, which reads the prompt without A1111's syntax.

    ``encode(pipeline, text, max_tokens)`` returns its embeddings [1, L, D], through diffusers' own helper so a short
    prompt's tensors are the pipeline's. ``chat``: the ``apply_chat_template`` keywords when the text goes into one
    user turn of a chat (the LLMs); None: the raw text (T5).
    """

    tokenizer: str
    text_encoder: str
    title: str
    max_tokens: int
    encode: Callable[[Any, str, int], torch.Tensor]
    chat: Mapping[str, Any] | None = None


def t5_embeds(pipeline, text: str, max_tokens: int) -> torch.Tensor:
    """T5-XXL's last hidden state of ``text`` padded to ``max_tokens`` (zeros when the pipeline has no T5), by the
    helper diffusers' SD3 and Flux.1 pipelines share, so a short prompt's tensors are the pipeline's."""
    return pipeline._get_t5_prompt_embeds(prompt=text, max_sequence_length=max_tokens, device=pipeline.text_encoder.device)


@dataclass(frozen=True)
class FlowPrompts:
    """What a flow family's prompt encoding is made of.

    ``clip_layer``: the CLIP hidden state that conditions the model beside the T5 tokens (SD3: the penultimate layer);
    None when only the CLIP pooled outputs are read (Flux.1). ``variable_length``: the LLM's tokens are kept at each
    prompt's own length and travel with a mask (Z-Image); otherwise ``encode`` pads them to ``max_tokens``.
    """

    plain: PlainEncoder
    clip: tuple[ClipEncoder, ...] = ()
    clip_layer: TextLayer | None = None
    variable_length: bool = False


@dataclass
class MaskedConditioning(Conditioning):
    """Embeddings zero-padded to one length, with 1/0 masks ([1, L]) marking each prompt's real tokens."""

    prompt_mask: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class _Encoded:
    """One text through every encoder of the family."""

    clip_hidden: torch.Tensor | None  # [1, window·chunks, Σ CLIP widths] (77 tokens a window), A1111-weighted; None: no CLIP hidden states
    pooled: torch.Tensor | None  # the CLIP pooled outputs side by side; None: no CLIP
    plain: torch.Tensor  # the T5/LLM embeddings [1, L, D]
    truncated: str | None  # "for T5-XXL (512 tokens): dropped '…'" when the plain encoder cut the text


def clip_window(tokenizer, encoder) -> int:
    """The tokens one CLIP window holds: 77 for every released model. A model of our own may declare fewer (the flow
    demo's 16 words fit its captions and make training cheaper); diffusers' SD3 pipeline pads to the tokenizer's
    ``model_max_length``, and the encoder's position table bounds it."""
    declared = getattr(tokenizer, "model_max_length", None)
    positions = getattr(getattr(encoder, "config", None), "max_position_embeddings", None)
    return min(value for value in (declared, positions, CLIP_WINDOW) if isinstance(value, int) and value > 2)


def clip_chunks(tokenizer, prompt: str, chunk_tokens: int = CLIP_WINDOW - 2) -> list[list[tuple[int, float]]]:
    """The prompt as A1111 feeds CLIP: chunks of at most ``chunk_tokens`` (75) (token id, weight) pairs, without
    start and end tokens.

    As A1111's ``TextConditionalModel.tokenize_line``: each weighted run is tokenized on its own; BREAK closes the
    chunk (even an empty one); a chunk that is full when another token comes moves the tokens after its last comma
    to the next chunk if that comma is within the last 20; an empty prompt is one empty chunk.
    """
    comma = tokenizer.get_vocab().get(",</w>")
    chunks: list[list[tuple[int, float]]] = []
    chunk: list[tuple[int, float]] = []
    last_comma = -1

    def close() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = [], -1

    for index, segment in enumerate(break_segments(prompt)):
        if index:
            close()  # BREAK
        if not segment:
            continue
        token_runs = tokenizer([text for text, _ in segment], add_special_tokens=False).input_ids
        for tokens, (_, weight) in zip(token_runs, segment):
            for token in tokens:
                if token == comma:
                    last_comma = len(chunk)
                elif len(chunk) == chunk_tokens and last_comma != -1 and len(chunk) - last_comma <= COMMA_BACKTRACK:
                    moved = chunk[last_comma + 1:]
                    chunk = chunk[:last_comma + 1]
                    close()
                    chunk = moved
                if len(chunk) == chunk_tokens:
                    close()
                chunk.append((token, weight))
    if chunk or not chunks:
        close()
    return chunks


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis (``modules/sd_emphasis.py``, ``EmphasisOriginal``): every token's embedding times
    its weight, then the whole chunk rescaled so that its mean is the unweighted chunk's mean again."""
    if bool((weights == 1).all()):
        return z
    original_mean = z.mean()
    z = z * weights.reshape(1, -1, 1).to(z.dtype)
    return z * (original_mean / z.mean())


def _window(tokenizer, tokens: list[int], length: int) -> torch.Tensor:
    """One CLIP window: start token, the chunk's tokens, end token, then the tokenizer's padding (the end token for
    CLIP-L, "!" for SD3's CLIP-G: what diffusers pads with, and what A1111's ``Sd3ClipLG`` gives CLIP-G)."""
    ids = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id]
    return torch.tensor([ids + [tokenizer.pad_token_id] * (length - len(ids))])


def _shown(text: str) -> str:
    text = " ".join(text.split())
    if len(text) <= SHOWN_CHARACTERS:
        return text
    return f"{text[:60]} … {text[-30:]}"


def pad_to_common_length(embeds: torch.Tensor, negative: torch.Tensor | None) -> MaskedConditioning:
    """Two [L, D] token runs of any lengths as [1, L_max, D] rows with their masks (no negative: None for it)."""
    length = max(embeds.shape[0], negative.shape[0] if negative is not None else 0)

    def padded(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        row = tokens.new_zeros((1, length, tokens.shape[1]))
        row[0, : tokens.shape[0]] = tokens
        mask = torch.zeros((1, length), dtype=torch.float32, device=tokens.device)
        mask[0, : tokens.shape[0]] = 1
        return row, mask

    row, mask = padded(embeds)
    negative_row, negative_mask = padded(negative) if negative is not None else (None, None)
    return MaskedConditioning(row, negative_row, prompt_mask=mask, negative_mask=negative_mask)


class FlowPromptEncoder:
    """Encodes prompts for one loaded flow model as its family's ``FlowPrompts`` say; remembers recent results.

    Two caches (``functools.lru_cache``): each text on its own, keyed by (text, networks), so a new prompt with the
    usual negative encodes only the prompt, as A1111 caches cond and uncond apart; and each whole request, keyed by
    (prompt, negative or None, networks), whose ``hits`` and ``misses`` are the encoder's. Clip skip does not apply
    to these families; textual-inversion embeddings are not read (their names reach the encoders as words).
    """

    def __init__(self, pipeline, facts: FlowPrompts, cache_size: int = 32):
        self.facts = facts
        self._pipeline = pipeline
        self._clip_window = (clip_window(getattr(pipeline, facts.clip[0].tokenizer), getattr(pipeline, facts.clip[0].text_encoder))
                             if facts.clip else CLIP_WINDOW)
        self._text = functools.lru_cache(maxsize=2 * cache_size)(self._encode_text)
        self._pair = functools.lru_cache(maxsize=cache_size)(self._encode_pair)

    @property
    def hits(self) -> int:
        return self._pair.cache_info().hits

    @property
    def misses(self) -> int:
        return self._pair.cache_info().misses

    def encode(self, prompt: str, negative: str, clip_skip: int = 1, embeddings=None, networks: tuple = (),
               need_negative: bool = True) -> Conditioning:
        """``networks``: what the text encoders carry for this job (a LoRA changes the embeddings, so it is part of
        every cache key). ``need_negative`` False (CFG 1): the negative prompt is not encoded and the result's
        negative embeddings are None. Truncations come back in ``warnings``."""
        return self._pair(prompt, negative if need_negative else None, networks)

    def clear(self) -> None:
        """Forget every cached embedding."""
        self._text.cache_clear()
        self._pair.cache_clear()

    # -- one request ----------------------------------------------------------------------------------
    def _encode_pair(self, prompt: str, negative: str | None, networks: tuple) -> Conditioning:
        with torch.inference_mode():
            positive = self._text(prompt, networks)
            unwanted = self._text(negative, networks) if negative is not None else None
            warnings = tuple(f"{label} truncated {encoded.truncated}"
                             for label, encoded in (("Prompt", positive), ("Negative prompt", unwanted))
                             if encoded is not None and encoded.truncated)
            if self.facts.variable_length:
                conditioning = pad_to_common_length(positive.plain[0], unwanted.plain[0] if unwanted else None)
            else:
                chunks = max(self._chunks(positive), self._chunks(unwanted))
                conditioning = Conditioning(self._joined(positive, chunks, networks),
                                            self._joined(unwanted, chunks, networks) if unwanted else None)
            conditioning.pooled = positive.pooled
            conditioning.negative_pooled = unwanted.pooled if unwanted else None
            conditioning.warnings = warnings
        return conditioning

    def _chunks(self, encoded: _Encoded | None) -> int:
        if encoded is None or encoded.clip_hidden is None:
            return 0
        return encoded.clip_hidden.shape[1] // self._clip_window

    def _joined(self, encoded: _Encoded, chunks: int, networks: tuple) -> torch.Tensor:
        """The model's text tokens: the CLIP hidden states (when the family reads them), padded with empty-prompt
        chunks to the longer of prompt and negative as A1111 pads cond and uncond, and widened with zeros to the
        T5 width, then the T5/LLM tokens (diffusers' SD3 layout)."""
        if encoded.clip_hidden is None:
            return encoded.plain
        clip = encoded.clip_hidden
        if self._chunks(encoded) < chunks:
            empty = self._text("", networks).clip_hidden
            clip = torch.cat([clip, *[empty] * (chunks - self._chunks(encoded))], dim=1)
        clip = torch.nn.functional.pad(clip, (0, encoded.plain.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, encoded.plain], dim=1)

    # -- one text -------------------------------------------------------------------------------------
    def _encode_text(self, text: str, networks: tuple) -> _Encoded:
        clip_hidden, pooled = self._encode_clip(text) if self.facts.clip else (None, None)
        plain = plain_text(text)
        part = self.facts.plain
        return _Encoded(clip_hidden, pooled, part.encode(self._pipeline, plain, part.max_tokens), self._truncation(plain))

    def _encode_clip(self, text: str) -> tuple[torch.Tensor | None, torch.Tensor]:
        """A1111's CLIP conditioning: weighted hidden states of every chunk, and the first chunk's pooled outputs.

        Flux.1 reads only the pooled output, so only the first chunk is encoded and a longer prompt's rest is not
        reported: that is how BFL's reference, Forge and ComfyUI read CLIP-L for Flux, and T5 carries the whole
        prompt (its own limit is reported)."""
        pipeline, facts = self._pipeline, self.facts
        tokenizers = [getattr(pipeline, clip.tokenizer) for clip in facts.clip]
        encoders = [getattr(pipeline, clip.text_encoder) for clip in facts.clip]
        layer = facts.clip_layer or TextLayer()
        window = self._clip_window
        chunks = clip_chunks(tokenizers[0], text, window - 2)  # one tokenization for every CLIP, as A1111's Sd3ClipLG
        if facts.clip_layer is None:
            chunks = chunks[:1]
        hidden, pooled = [], None
        for chunk in chunks:
            tokens = [token for token, _ in chunk]
            states, pools = [], []
            for tokenizer, encoder in zip(tokenizers, encoders):
                output = layer.run(encoder, _window(tokenizer, tokens, window).to(encoder.device))
                states.append(layer.pick(encoder, output))
                pools.append(output.text_embeds if getattr(output, "text_embeds", None) is not None else output.pooler_output)
            if pooled is None:
                pooled = torch.cat(pools, dim=-1)
            if facts.clip_layer is not None:
                weights = torch.tensor([1.0, *[weight for _, weight in chunk]] + [1.0] * (window - 1 - len(chunk)))
                hidden.append(emphasize(torch.cat(states, dim=-1), weights.to(states[0].device)))
        return (torch.cat(hidden, dim=1) if hidden else None), pooled

    def _truncation(self, text: str) -> str | None:
        """How the T5/LLM encoder cut ``text`` at its limit ("for T5-XXL (512 tokens): dropped '…'"), or None.

        Counts what the encoder is given: the text with the tokenizer's own special tokens (T5's end token), in its
        chat turn for an LLM. The dropped words are the text from the first token that did not fit."""
        part = self.facts.plain
        tokenizer = getattr(self._pipeline, part.tokenizer, None)
        if tokenizer is None or getattr(self._pipeline, part.text_encoder, None) is None or not text:
            return None  # e.g. SD 3.5 without T5: zeros stand in for its tokens, whatever the prompt
        given = text if part.chat is None else tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, **part.chat)
        room = part.max_tokens - tokenizer.num_special_tokens_to_add()
        if tokenizer.is_fast:
            encoded = tokenizer(given, add_special_tokens=False, return_offsets_mapping=True)
            if len(encoded.input_ids) <= room:
                return None
            begin = given.find(text)  # the prompt inside the chat turn (0 for T5)
            dropped = given[max(encoded.offset_mapping[room][0], begin): begin + len(text)]
        else:
            ids = tokenizer(given, add_special_tokens=False).input_ids
            if len(ids) <= room:
                return None
            dropped = tokenizer.decode(ids[room:], skip_special_tokens=True)
        shown = f"dropped '{_shown(dropped)}'" if dropped.strip() else "dropped the end of its chat template"
        return f"for {part.title} ({part.max_tokens} tokens): {shown}"
