"""A small T5 tokenizer built offline, for tiny flow-model fixtures (Flux.1, SD 3.5's T5).

Real T5 tokenizers are SentencePiece Unigram models (Kudo 2018, "Subword Regularization"); this one is the same
kind of model, built from a word list written here instead of trained: every word of ``WORDS`` is one piece
("▁fox"), and every printable character is a piece alone and word-initial, so any text tokenizes without
``<unk>``. Scores are log-probabilities that favour whole words over their characters. Special tokens sit where
T5's are: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2; ``</s>`` ends every sequence.
"""
from __future__ import annotations

import math
import string
from pathlib import Path

WORDS = ("a", "an", "the", "of", "in", "on", "with", "and", "red", "blue", "green", "fox", "cat", "dog", "house",
         "tree", "sky", "photo", "painting", "portrait", "forest", "river", "mountain", "city", "night", "light")


def vocabulary(words: tuple[str, ...] = WORDS) -> list[tuple[str, float]]:
    """The Unigram pieces and their scores, special tokens first (T5's ids)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{word}", -1.0 - 0.01 * index) for index, word in enumerate(words)]
    characters = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    pieces += [(f"▁{char}", -8.0) for char in characters]
    pieces += [(char, -8.0 - math.log(2)) for char in characters]
    seen: set[str] = set()
    return [(piece, score) for piece, score in pieces if not (piece in seen or seen.add(piece))]  # "▁a": the word's


def build_t5_tokenizer(folder: Path | None = None, words: tuple[str, ...] = WORDS):
    """A ``T5TokenizerFast`` over ``vocabulary(words)`` (no sentinel ids); saved to ``folder`` when given."""
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast(vocab=vocabulary(words), extra_ids=0, model_max_length=512)
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer
