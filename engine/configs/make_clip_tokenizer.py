"""Rebuild ``clip_tokenizer/vocab.json`` and ``merges.txt`` from OpenAI CLIP's BPE file.

The 49,408-token CLIP vocabulary is defined by ``bpe_simple_vocab_16e6.txt.gz``
(shipped in OpenAI's ``CLIP`` repo and in the ``open_clip_torch`` wheel, MIT
licence). CLIP's own ``SimpleTokenizer.__init__`` builds the vocabulary from it:
the 256 byte characters of ``bytes_to_unicode``, the same with ``</w>``, one
token per merge (merges ``[1 : 49152 - 256 - 2 + 1]``), then the two special
tokens. This script repeats those steps and writes the files Hugging Face's
``CLIPTokenizer`` reads. It is run once, by hand, offline:

    pip download --no-deps open_clip_torch==3.3.0 -d /tmp/oc
    unzip -j /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl open_clip/bpe_simple_vocab_16e6.txt.gz -d /tmp/oc
    python -m engine.configs.make_clip_tokenizer /tmp/oc/bpe_simple_vocab_16e6.txt.gz
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "clip_tokenizer"
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
MERGE_COUNT = 49152 - 256 - 2  # CLIP keeps merges[1 : 49152 - 256 - 2 + 1]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def build(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1:MERGE_COUNT + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [char + "</w>" for char in byte_chars] + ["".join(merge.split()) for merge in merges] + list(SPECIAL_TOKENS)
    return {token: index for index, token in enumerate(tokens)}, merges


def write(vocab: dict[str, int], merges: list[str], out_dir: Path = OUT_DIR) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write(*build(Path(sys.argv[1])))
