"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word"), found and used as A1111 does.

Files live in ``models/embeddings`` (subfolders included) and are named by their file stem. A name
written in a prompt, bare or inside weighting syntax (``(EasyNegative:1.2)``), stands for the file's
vectors: each vector takes one token slot where the name's tokens would have been, and the vector
replaces the token embedding there (position embeddings are added afterwards, as for any token).

Formats read:
- ``.safetensors`` with ``emb_params`` [vectors, width] (SD 1.x and 2.x);
- ``.safetensors`` with ``clip_l`` and ``clip_g`` (SDXL: one tensor per text encoder);
- A1111's ``.pt``/``.bin`` with ``string_to_param`` (``{"*": tensor}``), read with
  ``torch.load(weights_only=True)``, which refuses to run code from the pickle;
- diffusers' ``learned_embeds.bin``/``.safetensors``: one tensor under the placeholder token's name.

How a prompt uses them (``EmbeddingTokens``): a copy of the model's tokenizers (made once per model)
holds one placeholder token per vector, the name in the text becomes those placeholders, and the
text encoder is called through ``EmbeddingTextEncoder``, which hands the encoder token id 0 at those
slots (as A1111 does, so the pooled output still finds the end token) and overwrites the token
embedding there with the vectors through a forward hook removed after the call. The model's own
tokenizer and text encoder are never changed.
"""
from __future__ import annotations

import copy
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..errors import ModelError
from ..file_hashes import file_sha256

EMBEDDINGS_SUBDIR = "embeddings"
SUFFIXES = (".safetensors", ".pt", ".bin")
SDXL_KEYS = ("clip_l", "clip_g")
SINGLE = ""  # the key of a one-encoder embedding's vectors
TI_HASHES_KEY = "TI hashes"  # A1111's infotext key: "name: <short hash>" for each embedding the prompts used
SHORT_HASH_LENGTH = 12  # A1111's "TI hashes" show the first 12 hex digits of the file's SHA-256
_LETTER = r"[^\W\d_]"


def names_pattern(names) -> re.Pattern:
    """Where any of the names is written in a prompt, case-insensitively, as A1111 finds them by their CLIP
    tokens: longest names first (so "bad-hands-5" wins over "bad"), and a name that begins or ends with a
    letter does not run on into more letters (CLIP's tokenizer splits words from punctuation and digits)."""
    parts = []
    for name in sorted(names, key=len, reverse=True):
        before = f"(?<!{_LETTER})" if re.match(_LETTER, name[0]) else ""
        after = f"(?!{_LETTER})" if re.match(_LETTER, name[-1]) else ""
        parts.append(f"{before}{re.escape(name)}{after}")
    return re.compile("|".join(parts), re.IGNORECASE)


@dataclass(frozen=True)
class Embedding:
    """One embedding file's vectors: ``vectors[key]`` is [count, width], key ``""`` for a one-encoder
    embedding or ``clip_l``/``clip_g`` for SDXL's pair."""

    name: str
    path: Path
    vectors: dict[str, torch.Tensor]
    sha256: str
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def short_hash(self) -> str:
        return self.sha256[:SHORT_HASH_LENGTH]

    @property
    def count(self) -> int:
        """How many token slots the embedding takes."""
        return int(next(iter(self.vectors.values())).shape[0])

    @property
    def widths(self) -> dict[str, int]:
        return {key: int(tensor.shape[1]) for key, tensor in self.vectors.items()}

    @property
    def shape(self) -> int:
        """A1111's ``shape``: the width of one vector (for SDXL's pair, the widest encoder's)."""
        return max(self.widths.values())

    def vectors_for(self, keys: Sequence[str], widths: Sequence[int], model: str) -> list[torch.Tensor]:
        """The vectors for each of a model's text encoders (named by ``keys``, of ``widths``), or a
        ModelError naming the file when the embedding was made for another kind of model."""
        mine = ", ".join(f"{key or 'width'} {width}" for key, width in self.widths.items())
        theirs = ", ".join(f"{key or 'width'} {width}" for key, width in zip(keys, widths))
        if set(self.vectors) != set(keys) or any(self.vectors[key].shape[1] != width for key, width in zip(keys, widths)):
            raise ModelError(f"the embedding {self.path.name} was made for another kind of model ({mine}); "
                             f"{model} needs {theirs}")
        return [self.vectors[key] for key in keys]


def _as_matrix(tensor: object, path: Path, what: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() not in (1, 2):
        raise ModelError(f"the embedding {path.name}: {what} is not a [vectors, width] float tensor")
    matrix = tensor.detach().float()
    matrix = matrix.unsqueeze(0) if matrix.dim() == 1 else matrix
    if matrix.shape[0] < 1 or not torch.isfinite(matrix).all():
        raise ModelError(f"the embedding {path.name}: {what} is empty or holds non-finite values")
    return matrix.contiguous()


def read_embedding(path: Path) -> Embedding:
    """One embedding file, checked; a ModelError naming the file when it cannot be used."""
    path = Path(path)
    meta: dict = {}
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - safetensors and torch.load raise many kinds for a damaged file
        raise ModelError(f"the embedding {path.name} could not be read (corrupt or truncated?): "
                         f"{type(error).__name__}: {error}") from error
    if not isinstance(data, dict):
        raise ModelError(f"the embedding {path.name} is not a known embedding format (expected emb_params, "
                         "clip_l/clip_g or string_to_param)")
    if "string_to_param" in data:  # A1111's own training output
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ModelError(f"the embedding {path.name}: string_to_param must hold exactly one tensor")
        vectors = {SINGLE: _as_matrix(next(iter(params.values())), path, "string_to_param")}
        meta = {"step": data.get("step"), "sd_checkpoint": data.get("sd_checkpoint"),
                "sd_checkpoint_name": data.get("sd_checkpoint_name")}
    elif "emb_params" in data:
        vectors = {SINGLE: _as_matrix(data["emb_params"], path, "emb_params")}
    elif all(key in data for key in SDXL_KEYS):
        vectors = {key: _as_matrix(data[key], path, key) for key in SDXL_KEYS}
        if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise ModelError(f"the embedding {path.name}: clip_l and clip_g hold different numbers of vectors")
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):  # diffusers: {"<token>": tensor}
        vectors = {SINGLE: _as_matrix(next(iter(data.values())), path, "its one tensor")}
    else:
        raise ModelError(f"the embedding {path.name} is not a known embedding format: it has "
                         f"{', '.join(sorted(map(str, data))[:5]) or 'no tensors'}; expected emb_params, clip_l/clip_g "
                         "or string_to_param")
    meta = {key: (value if isinstance(value, (int, str)) else None) for key, value in meta.items()}
    return Embedding(name=path.stem, path=path, vectors=vectors, sha256=file_sha256(path), **meta)


class EmbeddingLibrary:
    """The embedding files under one folder, by name; files are read when a prompt first uses them
    and read again when they change on disk. The folder is rescanned when a folder in it changes."""

    def __init__(self, folder: Path | str | None):
        self.folder = Path(folder) if folder else None
        self._lock = threading.Lock()
        self._paths: dict[str, Path] = {}
        self._signature: tuple = ()
        self._pattern: re.Pattern | None = None
        self._read: dict[tuple, Embedding] = {}
        self.refresh()

    def refresh(self) -> None:
        """Scan the folder again. Names are file stems; when two files share one, the first in path order wins."""
        paths: dict[str, Path] = {}
        if self.folder and self.folder.is_dir():
            for path in sorted(self.folder.rglob("*")):
                relative = path.relative_to(self.folder)
                if (path.is_file() and path.suffix.lower() in SUFFIXES
                        and not any(part.startswith(".") for part in relative.parts)):
                    paths.setdefault(path.stem, path)
        pattern = names_pattern(paths) if paths else None
        with self._lock:
            self._paths, self._pattern, self._signature = paths, pattern, self._folder_signature()

    def _folder_signature(self) -> tuple:
        if not self.folder or not self.folder.is_dir():
            return ()
        return tuple((root, os.stat(root).st_mtime_ns) for root, _, _ in os.walk(self.folder))

    def _refresh_if_changed(self) -> None:
        if self._folder_signature() != self._signature:
            self.refresh()

    def names(self) -> list[str]:
        self._refresh_if_changed()
        with self._lock:
            return sorted(self._paths, key=str.lower)

    def path(self, name: str) -> Path | None:
        with self._lock:
            return self._paths.get(name)

    def get(self, name: str) -> Embedding:
        """The named embedding, read (or re-read, when its file changed); ModelError naming the file if unusable."""
        path = self.path(name)
        if path is None:
            raise ModelError(f"no embedding named {name!r} in {self.folder}")
        try:
            stat = path.stat()
        except OSError as error:
            raise ModelError(f"the embedding {path.name} cannot be read: {error.strerror or error}") from error
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._read:
                return self._read[key]
        embedding = read_embedding(path)
        with self._lock:
            self._read = {k: v for k, v in self._read.items() if k[0] != str(path)}
            self._read[key] = embedding
        return embedding

    def names_in(self, *texts: str) -> list[str]:
        """The embedding names the texts use, in order of first use (the file's own spelling)."""
        self._refresh_if_changed()
        with self._lock:
            pattern, paths = self._pattern, self._paths
        if pattern is None:
            return []
        lowered = {name.lower(): name for name in paths}
        found: dict[str, None] = {}
        for text in texts:
            for match in pattern.finditer(text):
                found.setdefault(lowered[match.group(0).lower()], None)
        return list(found)

    def used_in(self, *texts: str) -> tuple[Embedding, ...]:
        return tuple(self.get(name) for name in self.names_in(*texts))

    def all(self) -> tuple[list[Embedding], dict[str, str]]:
        """Every embedding that reads, and why each other file does not (name -> problem)."""
        readable, problems = [], {}
        for name in self.names():
            try:
                readable.append(self.get(name))
            except ModelError as error:
                problems[name] = str(error)
        return readable, problems


# -- using them in a prompt -----------------------------------------------------------------------
class EmbeddingTextEncoder:
    """A text encoder seen through a table of extra token ids: ids from ``first_id`` on are
    embedding vectors (``vectors[id - first_id]``). Anything else is the encoder's own attribute."""

    def __init__(self, text_encoder, first_id: int, vectors: torch.Tensor):
        self._encoder = text_encoder
        self._first_id = first_id
        self._vectors = vectors

    def __getattr__(self, name: str):
        return getattr(self._encoder, name)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        extra = input_ids >= self._first_id
        if not bool(extra.any()):
            return self._encoder(input_ids, attention_mask, **kwargs)
        vectors = self._vectors.to(self._encoder.device)[input_ids[extra] - self._first_id]
        caller = threading.get_ident()

        def overwrite(_module, _inputs, output):
            if threading.get_ident() != caller:  # the encoder is shared; only this call's output is changed
                return output
            output = output.clone()
            output[extra] = vectors.to(output.dtype)
            return output

        hook = self._encoder.get_input_embeddings().register_forward_hook(overwrite)
        try:
            # Id 0 at the embedding's slots, as A1111 feeds them: the pooled output looks for the end token
            # (or, in older configs, the largest id), which an id past the vocabulary would hijack.
            return self._encoder(input_ids.masked_fill(extra, 0), attention_mask, **kwargs)
        finally:
            hook.remove()


@dataclass
class EmbeddingTokens:
    """The tokenizers and text encoders one prompt encodes through, with a set of embeddings in place.

    ``key`` names the set (file names and hashes) for the prompt caches; an empty set is the model's own.
    """

    tokenizers: list
    text_encoders: list
    key: tuple = ()
    embeddings: tuple[Embedding, ...] = ()
    _placeholders: dict[str, str] = field(default_factory=dict)
    _pattern: re.Pattern | None = None

    def substitute(self, text: str) -> str:
        """The text with every embedding name replaced by its placeholder tokens."""
        if self._pattern is None:
            return text
        lowered = {name.lower(): placeholder for name, placeholder in self._placeholders.items()}
        return self._pattern.sub(lambda match: lowered[match.group(0).lower()], text)


def placeholder(index: int, vector: int) -> str:
    return f"<sfumato-ti-{index}-{vector}>"


class EmbeddingTokenCache:
    """Builds ``EmbeddingTokens`` for a model, remembering the last few sets.

    The model's tokenizers are copied once (a copy of CLIP's costs ~0.25 s), the first time a prompt
    uses an embedding; every embedding met since has its placeholder tokens in that copy, so a new set
    costs only the tokens it adds. Each set's encoders see the vectors of every placeholder so far.
    """

    def __init__(self, tokenizers: list, text_encoders: list, keys: Sequence[str], model: str, size: int = 4):
        self._tokenizers = tokenizers
        self._text_encoders = text_encoders
        self._keys = tuple(keys)
        self._model = model
        self._size = size
        self._lock = threading.Lock()
        self._built: OrderedDict[tuple, EmbeddingTokens] = OrderedDict()
        self._extended: list | None = None  # the tokenizer copies holding every placeholder so far
        self._first_ids: list[int] = []  # per encoder: the id of the first placeholder
        self._placeholders: dict[tuple[str, str], str] = {}  # (name, sha256) -> its placeholder tokens, joined
        self._vectors: list[list[torch.Tensor]] = [[] for _ in text_encoders]  # per encoder, in placeholder id order
        self.plain = EmbeddingTokens(list(tokenizers), list(text_encoders))

    def tokens(self, embeddings: Sequence[Embedding]) -> EmbeddingTokens:
        if not embeddings:
            return self.plain
        embeddings = tuple(sorted(embeddings, key=lambda e: e.name))
        key = tuple((e.name, e.sha256) for e in embeddings)
        with self._lock:
            if key in self._built:
                self._built.move_to_end(key)
                return self._built[key]
        if len(self._keys) != len(self._text_encoders):  # a family that has not said where its encoders' vectors are
            names = ", ".join(e.path.name for e in embeddings)
            raise ModelError(f"{self._model} models cannot use textual-inversion embeddings ({names})")
        widths = [int(encoder.get_input_embeddings().weight.shape[1]) for encoder in self._text_encoders]
        per_embedding = [e.vectors_for(self._keys, widths, self._model) for e in embeddings]  # checked before any change
        with self._lock:
            if self._extended is None:
                self._extended = [copy.deepcopy(tokenizer) for tokenizer in self._tokenizers]
                self._first_ids = [len(tokenizer) for tokenizer in self._extended]
            for embedding, vectors in zip(embeddings, per_embedding):
                self._register(embedding, vectors)
            encoders = [EmbeddingTextEncoder(encoder, first_id, torch.cat(table))
                        for encoder, first_id, table in zip(self._text_encoders, self._first_ids, self._vectors)]
            placeholders = {e.name: self._placeholders[(e.name, e.sha256)] for e in embeddings}
            built = EmbeddingTokens(list(self._extended), encoders, key, embeddings, placeholders,
                                    names_pattern(placeholders))
            self._built[key] = built
            while len(self._built) > self._size:
                self._built.popitem(last=False)
        return built

    def _register(self, embedding: Embedding, vectors: list[torch.Tensor]) -> None:
        """Placeholder tokens for an embedding not met before, in every tokenizer copy, and its vectors in the tables."""
        identity = (embedding.name, embedding.sha256)
        if identity in self._placeholders:
            return
        serial = len(self._placeholders)
        tokens = [placeholder(serial, v) for v in range(embedding.count)]
        for index, tokenizer in enumerate(self._extended):
            before = len(tokenizer)
            tokenizer.add_tokens(tokens)
            if len(tokenizer) != before + len(tokens):
                raise ModelError(f"the tokenizer refused the placeholder tokens of the embedding {embedding.path.name}")
            self._vectors[index].append(vectors[index])
        self._placeholders[identity] = "".join(tokens)


def api_listing(library: EmbeddingLibrary, model=None) -> dict:
    """``/sdapi/v1/embeddings`` in A1111's shape: ``{"loaded": {name: item}, "skipped": {name: item}}``, an item
    being ``step``, ``sd_checkpoint``, ``sd_checkpoint_name``, ``shape`` (a vector's width) and ``vectors``.

    With ``model`` (an ``engine.models.LoadedModel``) an embedding made for another kind of model is skipped;
    without one, every readable file is listed as loaded. Unreadable files are in neither (A1111 leaves them out too).
    """
    readable, _ = library.all()
    keys = widths = None
    if model is not None:
        keys = model.family.embedding_keys
        widths = [int(getattr(model.pipeline, encoder).get_input_embeddings().weight.shape[1])
                  for _, encoder in model.family.text_encoders]
    listing: dict[str, dict] = {"loaded": {}, "skipped": {}}
    for embedding in readable:
        item = {"step": embedding.step, "sd_checkpoint": embedding.sd_checkpoint,
                "sd_checkpoint_name": embedding.sd_checkpoint_name, "shape": embedding.shape, "vectors": embedding.count}
        fits = True
        if keys is not None:
            try:
                embedding.vectors_for(keys, widths, model.family.title)
            except ModelError:
                fits = False
        listing["loaded" if fits else "skipped"][embedding.name] = item
    return listing


def ti_hashes(embeddings: Sequence[Embedding]) -> str | None:
    """A1111's ``TI hashes`` infotext value: ``name: <12 hex>`` for each embedding used, comma-separated
    (A1111 drops colons and commas from the names so the list reads back)."""
    if not embeddings:
        return None
    return ", ".join(f"{e.name.replace(':', '').replace(',', '')}: {e.short_hash}" for e in embeddings)


def parse_ti_hashes(value: str) -> dict[str, str]:
    """``TI hashes`` read back: name -> short hash."""
    pairs = {}
    for part in value.split(","):
        name, colon, short = part.rpartition(":")
        if colon and name.strip():
            pairs[name.strip()] = short.strip().lower()
    return pairs


def infotext_problems(params: dict[str, str], library: EmbeddingLibrary) -> list[str]:
    """What a picture's ``TI hashes`` say that this studio cannot reproduce: embeddings missing here, or
    present under the name with other contents (a different hash)."""
    value = params.get(TI_HASHES_KEY)
    if not isinstance(value, str):
        return []
    problems = []
    for name, short in parse_ti_hashes(value).items():
        if library.path(name) is None and name not in library.names():
            problems.append(f"the embedding {name} is not in models/embeddings; the prompt will read it as a word")
            continue
        try:
            here = library.get(name).short_hash
        except ModelError as error:
            problems.append(str(error))
            continue
        if short and not here.startswith(short):
            problems.append(f"the embedding {name} here (hash {here}) is not the file the picture used (hash {short})")
    return problems
