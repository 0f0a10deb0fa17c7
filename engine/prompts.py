"""Prompt text to conditioning tensors, with A1111 weighting syntax and a cache.

Weighting and long-prompt chunking are done by compel. A1111 writes weights as
``(word:1.2)``, ``(word)`` (×1.1) and ``[word]`` (÷1.1); compel writes
``(word)1.2``. ``a1111_to_compel`` is the thin translation between the two.
"""
from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

ROUND_BRACKET_WEIGHT = 1.1
# Characters that A1111 or compel may read as syntax. Text without them, short enough for one
# CLIP window, means exactly what diffusers' own ``encode_prompt`` computes.
_SYNTAX = re.compile(r"[()\[\]\\+\-]")


def a1111_to_compel(prompt: str) -> str:
    """Rewrite A1111 attention syntax as compel syntax; escaped brackets stay literal."""
    out: list[str] = []
    stack: list[tuple[str, int]] = []  # (opening bracket, index in out where its group starts)
    i = 0
    while i < len(prompt):
        char = prompt[i]
        if char == "\\" and i + 1 < len(prompt) and prompt[i + 1] in "()[]":
            out.append("\\" + prompt[i + 1])
            i += 2
            continue
        if char in "([":
            stack.append((char, len(out)))
            out.append("(")
        elif char == ")" and stack and stack[-1][0] == "(":
            _, start = stack.pop()
            body = "".join(out[start + 1:])
            weight = ROUND_BRACKET_WEIGHT
            head, sep, tail = body.rpartition(":")
            if sep and _is_number(tail):
                body, weight = head, float(tail)
            del out[start:]
            out.append(f"({body}){_format_weight(weight)}")
        elif char == "]" and stack and stack[-1][0] == "[":
            _, start = stack.pop()
            body = "".join(out[start + 1:])
            del out[start:]
            out.append(f"({body}){_format_weight(1 / ROUND_BRACKET_WEIGHT)}")
        elif char in "()[]":
            out.append("\\" + char)  # unbalanced bracket: keep it as text
        else:
            out.append(char)
        i += 1
    # Unclosed groups: A1111 applies their weight to the rest of the prompt.
    while stack:
        opener, start = stack.pop()
        body = "".join(out[start + 1:])
        weight = ROUND_BRACKET_WEIGHT if opener == "(" else 1 / ROUND_BRACKET_WEIGHT
        del out[start:]
        out.append(f"({body}){_format_weight(weight)}")
    return "".join(out)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip() != ""


def _format_weight(weight: float) -> str:
    return f"{weight:.4f}".rstrip("0").rstrip(".")


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
        if not _SYNTAX.search(text):
            return self._encode_plain(text) if self._fits_one_window(text) else self._encode_unweighted_long(text)
        if self.is_xl:
            embeds, pooled = self._compel([a1111_to_compel(text)])
            return embeds, pooled
        return self._compel([a1111_to_compel(text)]), None

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
