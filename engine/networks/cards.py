"""The extra-networks browser's cards: one per LoRA, embedding and checkpoint, kept the way A1111 users keep them.

Beside a file ``name.safetensors`` (or a diffusers folder ``name/``) an A1111 user may keep:
- a preview picture, ``name.png`` or ``name.preview.png`` (also ``.jpg``, ``.jpeg``, ``.webp``, ``.gif``);
- a sidecar ``name.json`` with A1111's user-metadata keys: "description", "activation text",
  "preferred weight", "negative text", "sd version", "notes". A card edits it; keys it does not know are kept.

A LoRA's card also shows what kohya's trainer wrote in the safetensors header (read without the tensors): the
base model (``ss_base_model_version``, else ``ss_sd_model_name``) and the trigger words: the tags of
``ss_tag_frequency`` summed over its datasets, most frequent first, as A1111's LoRA metadata editor counts them
(A1111 also splits long caption-like tags into words; these are shown whole). A file that cannot
be read still gets a card, whose ``problem`` says why, so one bad download never hides the others.

The UI (``ui/extra_networks.py``) renders the cards and inserts ``Card.prompt_text`` into the prompt.
"""
from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from ..atomic_write import write_file
from .library import HeaderError, NetworkLibrary, read_header

LORA, EMBEDDING, CHECKPOINT = "lora", "embedding", "checkpoint"
KINDS = (LORA, EMBEDDING, CHECKPOINT)
PREVIEW_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")  # A1111's preview extensions, in the order it tries them
SIDECAR_SUFFIX = ".json"
DEFAULT_WEIGHT = 1.0  # A1111's "default multiplier for extra networks", used when a sidecar names no weight
TRIGGER_WORDS_SHOWN = 8
ALL_FOLDERS = "All"
BUILTIN_FOLDER = "built-in"

# A1111's sidecar keys (``ui_extra_networks_user_metadata``), and our attribute for each.
SIDECAR_KEYS = {"description": "description", "activation text": "activation_text", "preferred weight": "preferred_weight",
                "negative text": "negative_text", "sd version": "sd_version", "notes": "notes"}


@dataclass(frozen=True)
class Sidecar:
    """The user's notes on one file (``name.json``). ``preferred_weight`` 0 means "not set", as in A1111."""

    description: str = ""
    activation_text: str = ""
    preferred_weight: float = 0.0
    negative_text: str = ""
    sd_version: str = ""
    notes: str = ""
    other: dict[str, Any] = field(default_factory=dict)  # keys A1111 or an extension wrote that we keep as they were

    @property
    def weight(self) -> float:
        return self.preferred_weight or DEFAULT_WEIGHT


@dataclass(frozen=True)
class Card:
    kind: str  # LORA, EMBEDDING or CHECKPOINT
    name: str  # what a prompt (or the checkpoint picker) calls it
    path: Path  # the file, or a diffusers model's folder
    folder: str  # where it lies, for the folder filter: "Lora/characters", "embeddings", "Stable-diffusion"
    preview: Path | None = None
    sidecar: Sidecar = field(default_factory=Sidecar)
    base_model: str = ""
    trigger_words: tuple[str, ...] = ()
    alias: str = ""  # a LoRA's name in its training metadata, when it differs from ``name``
    problem: str | None = None  # why the file cannot be used, for the artist
    memory: str = ""  # a checkpoint's memory estimate at its native size (engine.memory), shown before it loads

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def prompt_text(self) -> str:
        """What clicking the card adds to the prompt: A1111's ``<lora:name:weight>`` and activation text, or an
        embedding's name. A checkpoint card adds nothing: it picks the checkpoint."""
        if self.kind == LORA:
            tag = f"<lora:{self.name}:{self.sidecar.weight:g}>"
            return f"{tag} {self.sidecar.activation_text}" if self.sidecar.activation_text else tag
        if self.kind == EMBEDDING:
            return self.name
        return ""

    @property
    def negative_text(self) -> str:
        return self.sidecar.negative_text if self.kind != CHECKPOINT else ""

    @property
    def search_text(self) -> str:
        """Everything a search matches: names, where it lies, the notes and the trigger words."""
        parts = (self.name, self.alias, self.folder, self.path.name, self.base_model, self.sidecar.description,
                 self.sidecar.activation_text, self.sidecar.notes, *self.trigger_words)
        return " ".join(part for part in parts if part).lower()


# -- files beside a model file ------------------------------------------------------------------------------

def _base(path: Path) -> Path:
    """``name.safetensors`` -> ``name``; a diffusers folder is its own base (``name/`` -> ``name.png`` beside it)."""
    return path if path.is_dir() else path.with_suffix("")


def find_preview(path: Path) -> Path | None:
    """The preview picture kept beside ``path``: ``name.<ext>`` or ``name.preview.<ext>``, A1111's two conventions."""
    base = _base(path)
    for suffix in PREVIEW_SUFFIXES:
        for candidate in (base.with_name(base.name + suffix), base.with_name(base.name + ".preview" + suffix)):
            if candidate.is_file():
                return candidate
    return None


def sidecar_path(path: Path) -> Path:
    base = _base(path)
    return base.with_name(base.name + SIDECAR_SUFFIX)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _weight(value: Any) -> float:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        return 0.0
    return weight if weight == weight and abs(weight) != float("inf") else 0.0


def read_sidecar(path: Path) -> Sidecar:
    """The sidecar of the file at ``path``; an empty one when there is none or it is not a JSON object."""
    try:
        data = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return Sidecar()
    if not isinstance(data, dict):
        return Sidecar()
    values = {attribute: data.get(key) for key, attribute in SIDECAR_KEYS.items()}
    return Sidecar(**{attribute: (_weight(value) if attribute == "preferred_weight" else _text(value))
                      for attribute, value in values.items()},
                   other={key: value for key, value in data.items() if key not in SIDECAR_KEYS})


def write_sidecar(path: Path, sidecar: Sidecar) -> Path:
    """Write the sidecar of the file at ``path`` (complete or not at all); the keys it did not know are kept."""
    data = dict(sidecar.other)
    for key, attribute in SIDECAR_KEYS.items():
        data[key] = getattr(sidecar, attribute)
    return write_file(sidecar_path(path), json.dumps(data, indent=4, ensure_ascii=False) + "\n")


def edited(sidecar: Sidecar, weight: float | None, activation_text: str | None, notes: str | None) -> Sidecar:
    """The sidecar with the card form's three values; a weight of 0 or none leaves it unset (the default applies)."""
    return replace(sidecar, preferred_weight=_weight(weight), activation_text=(activation_text or "").strip(),
                   notes=(notes or "").strip())


# -- kohya's training notes -------------------------------------------------------------------------------

def trigger_words(metadata: dict[str, Any], limit: int = TRIGGER_WORDS_SHOWN) -> tuple[str, ...]:
    """The most frequent training tags: ``ss_tag_frequency`` ({dataset: {tag: count}}, a JSON string in the file)
    summed over datasets, most frequent first (ties in the order they first appear)."""
    frequency = metadata.get("ss_tag_frequency")
    if isinstance(frequency, str):
        try:
            frequency = json.loads(frequency)
        except ValueError:
            return ()
    if not isinstance(frequency, dict):
        return ()
    counts: Counter[str] = Counter()
    for tags in frequency.values():
        if not isinstance(tags, dict):
            continue
        for tag, count in tags.items():
            try:
                counts[str(tag).strip()] += int(count)
            except (TypeError, ValueError):
                continue
    counts.pop("", None)
    return tuple(tag for tag, _ in counts.most_common(limit))


def base_model(metadata: dict[str, Any]) -> str:
    """The model a LoRA was trained on, as kohya wrote it: its version tag ("sd_v1", "sdxl_base_v1-0"), else the
    file name of the checkpoint it started from."""
    for key in ("ss_base_model_version", "ss_sd_model_name"):
        value = metadata.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


class TrainingNotes(NamedTuple):
    base_model: str = ""
    trigger_words: tuple[str, ...] = ()
    problem: str | None = None  # why the header cannot be read


def _header_metadata(path: Path) -> dict[str, Any]:
    """The header's ``__metadata__`` (raises ``HeaderError``/``OSError`` for an unreadable file)."""
    metadata = read_header(path).get("__metadata__")
    return metadata if isinstance(metadata, dict) else {}


@functools.lru_cache(maxsize=4096)
def _training_notes(path: str, size: int, mtime_ns: int) -> TrainingNotes:
    """The notes of one version of a safetensors file (the cache key changes with the file)."""
    try:
        metadata = _header_metadata(Path(path))
    except HeaderError as error:
        return TrainingNotes(problem=str(error))
    except OSError as error:
        return TrainingNotes(problem=f"{Path(path).name} cannot be read: {error.strerror or error}")
    return TrainingNotes(base_model=base_model(metadata), trigger_words=trigger_words(metadata))


def training_notes(path: Path) -> TrainingNotes:
    """What kohya wrote in a safetensors file's header, or why it cannot be read; read once per version of the file."""
    try:
        stat = path.stat()
    except OSError as error:
        return TrainingNotes(problem=f"{path.name} cannot be read: {error.strerror or error}")
    return _training_notes(str(path), stat.st_size, stat.st_mtime_ns)


# -- the cards of each kind -------------------------------------------------------------------------------

def _folder_label(path: Path, root: Path, root_label: str) -> str:
    inside = path.relative_to(root).parent if path.is_relative_to(root) else Path()
    return (Path(root_label) / inside).as_posix() if inside.parts else root_label


def lora_cards(library: NetworkLibrary) -> list[Card]:
    cards = []
    for network in library.list():
        notes = training_notes(network.path)
        cards.append(Card(kind=LORA, name=network.name, path=network.path,
                          folder=_folder_label(network.path, network.folder, network.folder.name),
                          preview=find_preview(network.path), sidecar=read_sidecar(network.path), base_model=notes.base_model,
                          trigger_words=notes.trigger_words, alias=network.alias if network.alias != network.name else "",
                          problem=notes.problem))
    return sorted(cards, key=lambda card: card.name.lower())


def embedding_cards(library) -> list[Card]:
    """Cards for an ``EmbeddingLibrary``'s files; only a safetensors file's header is checked (a pickle is read
    only when a prompt uses it)."""
    cards = []
    for name in library.names():
        path = library.path(name)
        if path is None:
            continue
        problem = training_notes(path).problem if path.suffix.lower() == ".safetensors" else None
        cards.append(Card(kind=EMBEDDING, name=name, path=path,
                          folder=_folder_label(path, library.folder, library.folder.name),
                          preview=find_preview(path), sidecar=read_sidecar(path), problem=problem))
    return cards


def _memory_line(registry, entry) -> str:
    """What the checkpoint needs, as the card shows it; empty when its files cannot be read (its problem says why)."""
    if entry.problem or entry.kind == "pickle":
        return ""
    try:
        return registry.estimate_memory(entry).summary()
    except Exception:  # noqa: BLE001 - a card never fails over an estimate
        return ""


def checkpoint_cards(registry) -> list[Card]:
    """Cards for a ``ModelRegistry``'s models, each with the problem its checks found."""
    cards = []
    for entry in registry.list():
        if entry.builtin:
            folder = BUILTIN_FOLDER
        elif registry.models_dir is not None and entry.path.is_relative_to(registry.models_dir):
            folder = entry.path.relative_to(registry.models_dir).parent.as_posix()
        else:
            folder = entry.path.parent.name
        cards.append(Card(kind=CHECKPOINT, name=entry.name, path=entry.path, folder=folder, preview=find_preview(entry.path),
                          sidecar=read_sidecar(entry.path), problem=entry.problem, memory=_memory_line(registry, entry)))
    return sorted(cards, key=lambda card: card.name.lower())


# -- the browser's filters ---------------------------------------------------------------------------------

def folders(cards: Iterable[Card]) -> list[str]:
    """The folder filter's choices: "All", then every folder that holds a card and each folder above it."""
    found: set[str] = set()
    for card in cards:
        parts = card.folder.split("/")
        found.update("/".join(parts[:depth]) for depth in range(1, len(parts) + 1))
    return [ALL_FOLDERS, *sorted(found, key=str.lower)]


def filter_cards(cards: Iterable[Card], search: str = "", folder: str = ALL_FOLDERS) -> list[Card]:
    """The cards in ``folder`` (or below it) whose text holds every word of ``search``, case-insensitively."""
    words = (search or "").lower().split()
    chosen = []
    for card in cards:
        if folder and folder != ALL_FOLDERS and not (card.folder == folder or card.folder.startswith(folder + "/")):
            continue
        if all(word in card.search_text for word in words):
            chosen.append(card)
    return chosen
