"""Prompt text to conditioning tensors, with A1111 weighting syntax and a cache.

A1111 writes weights as ``(word:1.2)``, ``(word)`` (×1.1) and ``[word]`` (÷1.1);
groups nest and their weights multiply. ``weighted_fragments`` reads that syntax
in one pass into (text, weight) runs, and compel's embeddings provider turns the
runs into embeddings and does the long-prompt chunking. Compel's own prompt
grammar is never used: it backtracks on nested brackets, so its time grows
exponentially with the nesting depth, and one short prompt held the whole job
queue.

Which layer of which text encoder becomes the conditioning (A1111's "Clip skip")
is the model family's to say (``TextLayer``, ``engine.families``); this module
only reads it.
"""
from __future__ import annotations

import functools
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import torch

from .networks.embeddings import EmbeddingLibrary, EmbeddingTokenCache, EmbeddingTokens

ROUND_BRACKET_WEIGHT = 1.1
# Characters that A1111 reads as syntax. Text without them, short enough for one CLIP window,
# means exactly what diffusers' own ``encode_prompt`` computes.
_SYNTAX = re.compile(r"[()\[\]\\]")
# A1111 reads ``:number`` right before a group's ``)`` as the group's weight (sign, digits and dots only).
_WEIGHT = re.compile(r"\s*[+-]?[.\d]+\s*")


def weighted_fragments(prompt: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) runs, in order, A1111's way; linear in the prompt's length.

    ``\\(`` and friends are literal brackets, an unmatched closing bracket is text, and a group left
    open weighs the rest of the prompt. Neighbouring runs of equal weight are merged.
    """
    # Pass 1: split into text and bracket tokens, match the brackets, and learn each group's weight
    # (a round group's ``:number`` is only known at its close).
    tokens: list[tuple[str, str | int]] = []  # ("text", str) | ("open", group) | ("close", group)
    weights: list[float] = []
    openers: list[tuple[str, int]] = []  # (bracket, group) of the groups still open
    text: list[str] = []

    def flush() -> str:
        run = "".join(text)
        text.clear()
        return run

    i = 0
    while i < len(prompt):
        char = prompt[i]
        if char == "\\" and i + 1 < len(prompt) and prompt[i + 1] in "()[]\\":
            text.append(prompt[i + 1])
            i += 2
            continue
        if char in "([":
            tokens.append(("text", flush()))
            openers.append((char, len(weights)))
            tokens.append(("open", len(weights)))
            weights.append(ROUND_BRACKET_WEIGHT if char == "(" else 1 / ROUND_BRACKET_WEIGHT)
        elif char in ")]" and openers and openers[-1][0] == ("(" if char == ")" else "["):
            _, group = openers.pop()
            run = flush()
            if char == ")":
                head, colon, tail = run.rpartition(":")
                if colon and _WEIGHT.fullmatch(tail) and _is_number(tail):
                    run, weights[group] = head, float(tail)
            tokens.append(("text", run))
            tokens.append(("close", group))
        else:
            text.append(char)
        i += 1
    tokens.append(("text", flush()))

    # Pass 2: every run weighs the product of the groups around it.
    fragments: list[tuple[str, float]] = []
    products = [1.0]
    for kind, value in tokens:
        if kind == "open":
            products.append(products[-1] * weights[value])
        elif kind == "close":
            products.pop()
        elif value:
            weight = products[-1]
            if fragments and fragments[-1][1] == weight:
                fragments[-1] = (fragments[-1][0] + value, weight)
            else:
                fragments.append((value, weight))
    return fragments or [("", 1.0)]


# A1111's BREAK: the word in capitals, on its own, ends the current 75-token CLIP chunk (``prompt_parser.re_break``,
# which also swallows the whitespace around it).
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def break_segments(prompt: str) -> list[list[tuple[str, float]]]:
    """The prompt's weighted runs (``weighted_fragments``) cut at each BREAK, as A1111's ``parse_prompt_attention``
    reads it: a BREAK inside a weighted group cuts too, and the words on both sides keep the group's weight.

    One segment per BREAK-separated part, in order; a segment may be empty ("BREAK" at the very start).
    """
    segments: list[list[tuple[str, float]]] = [[]]
    for text, weight in weighted_fragments(prompt):
        for index, piece in enumerate(_BREAK.split(text)):
            if index:
                segments.append([])
            if piece:
                segments[-1].append((piece, weight))
    return segments


def plain_text(prompt: str) -> str:
    """The prompt's words without A1111's syntax, for encoders that read no weights (T5, LLMs; issue #19).

    Brackets and ``:weight`` go, escaped brackets stay as the literal characters, and BREAK becomes one space.
    Text without any syntax comes back unchanged.
    """
    if not _SYNTAX.search(prompt) and not _BREAK.search(prompt):
        return prompt
    parts = ("".join(text for text, _ in segment) for segment in break_segments(prompt))
    return " ".join(part for part in parts if part)


def weight_problem(prompt: str, limit: float) -> str | None:
    """Why the prompt's weights cannot be used (a run weighing more than ``limit`` either way), or None.

    Nested groups multiply: 100 levels of ``(`` weigh 1.1^100 ≈ 13,780, which turns the text
    embedding into noise or, past float range, into NaN that only shows up at decode time.
    """
    if not _SYNTAX.search(prompt):
        return None
    for text, weight in weighted_fragments(prompt):
        if not abs(weight) <= limit:  # also catches inf and NaN
            shown = text.strip()[:40] or "(empty)"
            return f"the brackets around {shown!r} multiply to a weight of {weight:.4g}; at most {limit:g} is allowed"
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass
class Conditioning:
    """Positive and negative embeddings for one prompt pair, on the model's device.

    ``negative_embeds`` is None when the negative prompt was not encoded because CFG does not read it (a flow
    family's encoder at CFG 1, ``engine.flow_prompts``). ``warnings``: what the artist should know about the encoding
    (a prompt cut at an encoder's limit); the engine hands them on in ``GenerationResult.warnings``.
    """

    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    embeddings: tuple = ()  # the textual-inversion embeddings the prompts used (engine.networks.embeddings.Embedding)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class TextLayer:
    """Which output of a CLIP text encoder conditions the model: the hidden state ``from_end`` layers from
    the end (1 = the last layer's output), passed through the encoder's final layer norm or not.

    A1111's "Clip skip" N picks ``from_end = N`` with the final norm for SD 1.x; each family says which
    layer it reads (``Family.text_layers``).
    """

    from_end: int = 1
    final_norm: bool = True

    def read(self, text_encoder, token_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.pick(text_encoder, self.run(text_encoder, token_ids, attention_mask))

    def run(self, text_encoder, token_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """The encoder's output, with its hidden states when this layer needs them."""
        keeps_hidden = not (self.from_end == 1 and self.final_norm)  # else the encoder's own output is the layer
        return text_encoder(token_ids, attention_mask, output_hidden_states=keeps_hidden, return_dict=True)

    def pick(self, text_encoder, output) -> torch.Tensor:
        if self.from_end == 1 and self.final_norm:
            return output.last_hidden_state
        hidden = output.hidden_states[-self.from_end]
        if self.final_norm:
            # transformers 5's CLIPTextModel holds the norm itself; ...WithProjection keeps it under text_model.
            hidden = getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)
        return hidden


class TextEncoding(Protocol):
    """What a prompt encoder needs to know about a model family (``engine.families.Family`` provides it)."""

    text_encoders: tuple[tuple[str, str], ...]  # (tokenizer, text encoder) attribute names, in concatenation order
    pooled_encoder: int | None  # the index of the encoder whose projected output is the pooled embedding
    embedding_keys: tuple[str, ...]  # each text encoder's key in an embedding file ("" = a one-encoder file)
    title: str

    def text_layers(self, clip_skip: int) -> tuple[TextLayer, ...]: ...


@functools.cache
def _layer_provider_class():
    """compel's embeddings provider (tokens, 75-token chunks, weights), reading the text encoder at a chosen layer."""
    from compel.embeddings_provider import EmbeddingsProvider, SplitLongTextMode

    class LayerEmbeddingsProvider(EmbeddingsProvider):
        def __init__(self, tokenizer, text_encoder, layer: TextLayer):
            # Compel's own defaults for a Compel object built with truncate_long_prompts=False.
            super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, truncate=False,
                             split_long_text_mode=SplitLongTextMode.SENTENCES)
            self.layer = layer

        def _encode_token_ids_to_embeddings(self, token_ids, attention_mask=None):
            return self.layer.read(self.text_encoder, token_ids, attention_mask)

    return LayerEmbeddingsProvider


class PromptEncoder:
    """Encodes prompts for one loaded model; remembers recent results.

    The cache key is (prompt, negative, the text layers Clip skip selects, the embedding files the
    prompts use, by name and hash, the networks on the text encoders); one encoder belongs to one model, so a
    model switch starts from an empty cache. A family that ignores Clip skip reads the same layers for every
    value, so those values share cache entries.
    """

    def __init__(self, components, encoding: TextEncoding, cache_size: int = 32):
        self.encoding = encoding
        self.hits = 0
        self.misses = 0
        self._components = components
        self._tokenizers = [getattr(components, tokenizer) for tokenizer, _ in encoding.text_encoders]
        self._text_encoders = [getattr(components, encoder) for _, encoder in encoding.text_encoders]
        self._cache: OrderedDict[tuple, Conditioning] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._empty: dict[tuple, torch.Tensor] = {}  # (layers, networks) -> the empty prompt's embedding
        self._providers: dict[tuple, list] = {}  # (layers, embedding set) -> one provider per text encoder
        # Each text is cached on its own too, as A1111 caches cond and uncond separately: a new
        # prompt with the usual negative encodes only the prompt.
        self._texts: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._embedding_tokens = EmbeddingTokenCache(self._tokenizers, self._text_encoders, encoding.embedding_keys,
                                                     encoding.title)

    def encode(self, prompt: str, negative: str, clip_skip: int = 1,
               embeddings: EmbeddingLibrary | None = None, networks: tuple = (), need_negative: bool = True) -> Conditioning:
        """``embeddings``: the textual-inversion files whose names the prompts may use (none when None).
        ``networks``: what the text encoders carry for this job (``JobNetworks.text_encoder_key``); a LoRA
        changes the embeddings, so it is part of every cache key. ``need_negative`` is accepted for the engine's
        one call shape and ignored: a UNet family's negative costs one small CLIP pass and is usually cached."""
        layers = self._layers(clip_skip)
        used = embeddings.used_in(prompt, negative) if embeddings is not None else ()
        tokens = self._embedding_tokens.tokens(used)
        key = (prompt, negative, layers, tokens.key, networks)
        with self._lock:
            if key in self._cache:
                self.hits += 1
                self._cache.move_to_end(key)
                return self._cache[key]
        conditioning = self._encode_uncached(prompt, negative, layers, tokens, networks)
        with self._lock:
            self.misses += 1
            self._cache[key] = conditioning
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return conditioning

    def clear(self) -> None:
        """Forget every cached embedding (the hit and miss counters stay)."""
        with self._lock:
            self._cache.clear()
            self._texts.clear()

    def _layers(self, clip_skip: int) -> tuple[TextLayer, ...]:
        """The family's layers for this Clip skip, refused when an encoder has fewer layers than asked for."""
        from .errors import ValidationError

        layers = tuple(self.encoding.text_layers(clip_skip))
        for layer, text_encoder in zip(layers, self._text_encoders):
            depth = int(text_encoder.config.num_hidden_layers)
            if layer.from_end > depth:
                raise ValidationError("clip_skip", f"{clip_skip} skips more layers than this model's text encoder has "
                                                   f"({depth}); use 1 to {depth}")
        return layers

    def _device(self) -> torch.device:
        return self._text_encoders[0].device

    @torch.inference_mode()
    def _encode_uncached(self, prompt: str, negative: str, layers: tuple[TextLayer, ...] | None = None,
                         tokens: EmbeddingTokens | None = None, networks: tuple = ()) -> Conditioning:
        layers = layers if layers is not None else self._layers(1)
        tokens = tokens or self._embedding_tokens.plain
        # Encoded one at a time and padded here: compel's own padding of a batch with
        # different lengths fails for SDXL's two encoders.
        positive, pooled = self._encode_one(prompt, layers, tokens, networks)
        negative_embeds, negative_pooled = self._encode_one(negative, layers, tokens, networks)
        length = max(positive.shape[1], negative_embeds.shape[1])
        return Conditioning(
            prompt_embeds=self._pad(positive, length, layers, networks),
            negative_embeds=self._pad(negative_embeds, length, layers, networks),
            pooled=pooled, negative_pooled=negative_pooled, embeddings=tokens.embeddings,
        )

    def _encode_one(self, text: str, layers: tuple[TextLayer, ...], tokens: EmbeddingTokens | None = None,
                    networks: tuple = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = tokens or self._embedding_tokens.plain
        key = (text, layers, tokens.key, networks)
        with self._lock:
            if key in self._texts:
                self._texts.move_to_end(key)
                return self._texts[key]
        encoded = self._encode_text(text, layers, tokens)
        with self._lock:
            self._texts[key] = encoded
            while len(self._texts) > 2 * self._cache_size:
                self._texts.popitem(last=False)
        return encoded

    def _encode_text(self, text: str, layers: tuple[TextLayer, ...] | None = None,
                     tokens: EmbeddingTokens | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        layers = layers if layers is not None else self._layers(1)
        tokens = tokens or self._embedding_tokens.plain
        text = tokens.substitute(text)  # embedding names become their placeholder tokens
        if _SYNTAX.search(text):
            fragments = weighted_fragments(text)
            if any(weight != 1.0 for _, weight in fragments):
                return self._encode_weighted(fragments, layers, tokens)
            text = "".join(fragment for fragment, _ in fragments)  # only escapes or stray brackets: plain text
        if self._fits_one_window(text, tokens):
            return self._encode_plain(text, layers, tokens)
        return self._encode_unweighted_long(text, layers, tokens)

    def _layer_providers(self, layers: tuple[TextLayer, ...], tokens: EmbeddingTokens | None = None) -> list:
        """One compel embeddings provider per text encoder, reading that encoder's layer (built once per layer
        choice and embedding set)."""
        tokens = tokens or self._embedding_tokens.plain
        key = (layers, tokens.key)
        with self._lock:
            if key not in self._providers:
                cls = _layer_provider_class()
                self._providers[key] = [cls(tokenizer, text_encoder, layer) for tokenizer, text_encoder, layer
                                        in zip(tokens.tokenizers, tokens.text_encoders, layers)]
                while len(self._providers) > 8:  # each embedding set holds tokenizer copies
                    self._providers.pop(next(iter(self._providers)))
            return self._providers[key]

    def _pooled(self, text: str, layers: tuple[TextLayer, ...], tokens: EmbeddingTokens | None = None) -> torch.Tensor | None:
        """The pooled embedding, read from the text without its weighting syntax, as A1111 does."""
        index = self.encoding.pooled_encoder
        if index is None:
            return None
        return self._layer_providers(layers, tokens)[index].get_pooled_embeddings([text], device=self._device())

    def _encode_weighted(self, fragments: list[tuple[str, float]], layers: tuple[TextLayer, ...],
                         tokens: EmbeddingTokens | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weighted runs through compel's embeddings providers (tokens, 75-token chunks, weights).

        Every weight scales its tokens' distance from the empty prompt's embedding, under 1 as
        over 1 (A1111 too scales both ways). Compel's own path also re-encodes the whole prompt
        once per down-weighted run, a cost that grows with the square of the prompt's length;
        here it is one text-encoder pass per chunk.
        """
        texts, weights = [text for text, _ in fragments], [weight for _, weight in fragments]
        device = self._device()
        parts = []
        for one in self._layer_providers(layers, tokens):  # one per text encoder, concatenated along the features
            ids, token_weights, mask = one.get_token_ids_and_expand_weights(texts, weights, device=device)
            embeds = one.build_weighted_embedding_tensor(ids, token_weights, mask, device=device)
            parts.append(embeds.to(one.text_encoder.device, dtype=one.text_encoder.dtype))
        return torch.cat(parts, dim=-1), self._pooled("".join(texts), layers, tokens)

    def _fits_one_window(self, text: str, tokens: EmbeddingTokens | None = None) -> bool:
        """One CLIP window (start and end tokens included) for every tokenizer."""
        tokenizers = (tokens or self._embedding_tokens.plain).tokenizers
        return all(len(tokenizer(text).input_ids) <= tokenizer.model_max_length for tokenizer in tokenizers)

    def _encode_plain(self, text: str, layers: tuple[TextLayer, ...],
                      tokens: EmbeddingTokens | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Plain text in one window, as diffusers' ``encode_prompt`` computes it (padded to the window,
        no attention mask): the same tensors compel computes, without compel's per-call grammar build
        and parse (several times the cost of a small text encoder; measured by bench/)."""
        parts, pooled = [], None
        tokens = tokens or self._embedding_tokens.plain
        for index, (tokenizer, text_encoder, layer) in enumerate(zip(tokens.tokenizers, tokens.text_encoders, layers)):
            ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(text_encoder.device)
            output = layer.run(text_encoder, ids)
            parts.append(layer.pick(text_encoder, output))
            if index == self.encoding.pooled_encoder:  # the pooled embedding from the same pass
                pooled = output.text_embeds
        return torch.cat(parts, dim=-1), pooled

    def _encode_unweighted_long(self, text: str, layers: tuple[TextLayer, ...],
                                tokens: EmbeddingTokens | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text without weighting syntax but longer than one window: one weight-1 fragment straight
        to compel's embeddings providers, which chunk it exactly as a full compel call would. Skips
        building compel's prompt grammar, which is rebuilt on every call and costs more than a
        small text encoder."""
        device = self._device()
        parts = [one.get_embeddings_for_weighted_prompt_fragments(text_batch=[[text]], fragment_weights_batch=[[1.0]],
                                                                  device=device)
                 for one in self._layer_providers(layers, tokens)]
        return torch.cat(parts, dim=-1), self._pooled(text, layers, tokens)

    def _pad(self, embeds: torch.Tensor, length: int, layers: tuple[TextLayer, ...], networks: tuple = ()) -> torch.Tensor:
        """Extend a conditioning with empty-prompt chunks, as A1111 pads the shorter of cond/uncond."""
        if embeds.shape[1] >= length:
            return embeds
        if (layers, networks) not in self._empty:
            self._empty[layers, networks] = self._encode_one("", layers, networks=networks)[0]
        empty = self._empty[layers, networks]
        pieces = [embeds]
        missing = length - embeds.shape[1]
        while missing > 0:
            piece = empty[:, :missing]
            pieces.append(piece)
            missing -= piece.shape[1]
        return torch.cat(pieces, dim=1)
