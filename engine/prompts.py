"""Prompt text to conditioning tensors, with A1111 weighting syntax and a cache.

A1111 writes weights as ``(word:1.2)``, ``(word)`` (×1.1) and ``[word]`` (÷1.1);
groups nest and their weights multiply. ``weighted_fragments`` reads that syntax
in one pass into (text, weight) runs, and compel's embeddings provider turns the
runs into embeddings and does the long-prompt chunking. Compel's own prompt
grammar is never used: it backtracks on nested brackets, so its time grows
exponentially with the nesting depth, and one short prompt held the whole job
queue.
"""
from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

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
    """Positive and negative embeddings for one prompt pair, on the model's device."""

    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None


class PromptEncoder:
    """Encodes prompts for one loaded model; remembers recent results.

    The cache key is (prompt, negative); one encoder belongs to one model, so a
    model switch starts from an empty cache.
    """

    def __init__(self, components, is_xl: bool, cache_size: int = 32):
        from compel import Compel, ReturnedEmbeddingsType

        self.is_xl = is_xl
        self.hits = 0
        self.misses = 0
        self._cache: OrderedDict[tuple[str, str], Conditioning] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._empty: torch.Tensor | None = None
        # Each text is cached on its own too, as A1111 caches cond and uncond separately: a new
        # prompt with the usual negative encodes only the prompt.
        self._texts: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._pipeline = components if hasattr(components, "encode_prompt") else None
        if is_xl:
            self._compel = Compel(
                tokenizer=[components.tokenizer, components.tokenizer_2],
                text_encoder=[components.text_encoder, components.text_encoder_2],
                returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                requires_pooled=[False, True],
                truncate_long_prompts=False,
            )
        else:
            self._compel = Compel(tokenizer=components.tokenizer, text_encoder=components.text_encoder, truncate_long_prompts=False)

    def encode(self, prompt: str, negative: str) -> Conditioning:
        key = (prompt, negative)
        with self._lock:
            if key in self._cache:
                self.hits += 1
                self._cache.move_to_end(key)
                return self._cache[key]
        conditioning = self._encode_uncached(prompt, negative)
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

    @torch.inference_mode()
    def _encode_uncached(self, prompt: str, negative: str) -> Conditioning:
        # Encoded one at a time and padded here: compel's own padding of a batch with
        # different lengths fails for SDXL's two encoders.
        positive, pooled = self._encode_one(prompt)
        negative_embeds, negative_pooled = self._encode_one(negative)
        length = max(positive.shape[1], negative_embeds.shape[1])
        return Conditioning(
            prompt_embeds=self._pad(positive, length), negative_embeds=self._pad(negative_embeds, length),
            pooled=pooled, negative_pooled=negative_pooled,
        )

    def _encode_one(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self._lock:
            if text in self._texts:
                self._texts.move_to_end(text)
                return self._texts[text]
        encoded = self._encode_text(text)
        with self._lock:
            self._texts[text] = encoded
            while len(self._texts) > 2 * self._cache_size:
                self._texts.popitem(last=False)
        return encoded

    def _encode_text(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if _SYNTAX.search(text):
            fragments = weighted_fragments(text)
            if any(weight != 1.0 for _, weight in fragments):
                return self._encode_weighted(fragments)
            text = "".join(fragment for fragment, _ in fragments)  # only escapes or stray brackets: plain text
        return self._encode_plain(text) if self._fits_one_window(text) else self._encode_unweighted_long(text)

    def _encode_weighted(self, fragments: list[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weighted runs through compel's embeddings providers (tokens, 75-token chunks, weights).

        Every weight scales its tokens' distance from the empty prompt's embedding, under 1 as
        over 1 (A1111 too scales both ways). Compel's own path also re-encodes the whole prompt
        once per down-weighted run, a cost that grows with the square of the prompt's length;
        here it is one text-encoder pass per chunk. SDXL's pooled embedding is read from the
        text without its syntax, as A1111 does.
        """
        provider = self._compel.conditioning_provider
        texts, weights = [text for text, _ in fragments], [weight for _, weight in fragments]
        device = self._compel.device
        parts = []
        for one in getattr(provider, "embedding_providers", [provider]):  # SDXL: one per text encoder
            tokens, token_weights, mask = one.get_token_ids_and_expand_weights(texts, weights, device=device)
            embeds = one.build_weighted_embedding_tensor(tokens, token_weights, mask, device=device)
            parts.append(embeds.to(one.text_encoder.device, dtype=one.text_encoder.dtype))
        pooled = provider.get_pooled_embeddings(["".join(texts)], device=device) if self.is_xl else None
        return torch.cat(parts, dim=-1), pooled

    def _fits_one_window(self, text: str) -> bool:
        """One CLIP window (start and end tokens included) for every tokenizer, and a pipeline to encode it."""
        if self._pipeline is None:
            return False
        tokenizers = [self._pipeline.tokenizer] + ([self._pipeline.tokenizer_2] if self.is_xl else [])
        return all(len(tokenizer(text).input_ids) <= tokenizer.model_max_length for tokenizer in tokenizers)

    def _encode_plain(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Plain text through diffusers' own ``encode_prompt``: the same tensors compel computes for
        it, bit for bit, without compel's per-call grammar build and parse (~15 ms per text on one
        CPU core, several times the text encoder itself; measured by bench/)."""
        device = self._pipeline.text_encoder.device
        if self.is_xl:
            embeds, _, pooled, _ = self._pipeline.encode_prompt(prompt=text, device=device, num_images_per_prompt=1,
                                                                 do_classifier_free_guidance=False)
            return embeds, pooled
        embeds, _ = self._pipeline.encode_prompt(text, device, 1, False)
        return embeds, None

    def _encode_unweighted_long(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text without weighting syntax but longer than one window: one weight-1 fragment straight
        to compel's embeddings provider, which chunks it exactly as a full compel call would. Skips
        building compel's prompt grammar, which is rebuilt on every call and costs more than a
        small text encoder."""
        provider = self._compel.conditioning_provider
        embeds = provider.get_embeddings_for_weighted_prompt_fragments(
            text_batch=[[text]], fragment_weights_batch=[[1.0]], device=self._compel.device)
        pooled = provider.get_pooled_embeddings([text], device=self._compel.device) if self.is_xl else None
        return embeds, pooled

    def _pad(self, embeds: torch.Tensor, length: int) -> torch.Tensor:
        """Extend a conditioning with empty-prompt chunks, as A1111 pads the shorter of cond/uncond."""
        if embeds.shape[1] >= length:
            return embeds
        if self._empty is None:
            self._empty = self._encode_one("")[0]
        pieces = [embeds]
        missing = length - embeds.shape[1]
        while missing > 0:
            piece = self._empty[:, :missing]
            pieces.append(piece)
            missing -= piece.shape[1]
        return torch.cat(pieces, dim=1)
