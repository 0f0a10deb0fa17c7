"""A tiny offline stand-in for the Qwen tokenizer the LLM-encoded families (Z-Image, Flux.2 Klein) load.

A byte-level BPE trained here, in well under a second, on text generated from a fixed word list, wrapped as
transformers' ``Qwen2TokenizerFast`` (the class those folders name), with Qwen's chat markers as special tokens and a
chat template that writes a conversation the way Qwen3's does: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per
message, then ``<|im_start|>assistant\\n`` for the generation prompt, followed by an empty think block when
``enable_thinking`` is false. Nothing is downloaded.
"""
from __future__ import annotations

import random

PAD = "<|endoftext|>"
SPECIAL_TOKENS = (PAD, "<|im_start|>", "<|im_end|>", "<think>", "</think>")
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
WORDS = ("a red fox in the snow portrait of cat dog painting blue sky mountain lake city night light oil watercolor "
         "photo of an old man woman child tree forest river sunset golden hour cinematic detailed sharp soft").split()


def _corpus(lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(lines)]


def build_qwen_tokenizer(vocab_size: int = 400):
    """A ``Qwen2TokenizerFast`` with a byte-level BPE of about ``vocab_size`` tokens and Qwen3's chat layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    vocab = bpe.get_vocab(with_added_tokens=True)
    merges = _merges(bpe)
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=merges, unk_token=None, pad_token=PAD, eos_token="<|im_end|>",
                                   additional_special_tokens=list(SPECIAL_TOKENS[1:]))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _merges(bpe) -> list[tuple[str, str]]:
    import json

    state = json.loads(bpe.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state]
