"""Finding, loading and caching checkpoints.

The registry scans an A1111-style models directory (``models/Stable-diffusion``
single files, diffusers folders anywhere below ``models/``) plus the repo's
built-in models, and loads with diffusers from local files only. Which family a
model belongs to, and what that family loads, is ``engine.families``' to say. Loaded models
live in a small LRU cache; a failed load leaves the cache as it was.

Files are untrusted. Only safetensors weights are read: pickle checkpoints
(``.ckpt``, ``.pt``, ``.pth``, ``.bin``) are listed but never unpickled, and a
diffusers folder is checked (pipeline class, component classes, weight files)
before diffusers sees it. Every component's weights are compared name by name
with its config (after loading a folder, before loading a single file), because
diffusers and transformers only warn when a config and its weights disagree:
unused weights are dropped and missing ones left random or empty.

Single-file checkpoints (the original CompVis/SGM key layout) load through
``from_single_file`` with a local diffusers config folder: ``<name>.config/``
beside the file when there is one, else ``engine/configs/<family>``. The CLIP
tokenizer files are shared by every family (``engine/configs/clip_tokenizer``)
and copied into a temporary config folder at load time.

Flow families (SD 3.5, Flux.1) are also read as their makers and Forge/ComfyUI keep them: an original
single file, or the transformer alone (``models/Stable-diffusion``, ``diffusion_models``, ``unet``;
``.safetensors`` or ``.gguf``) with split text encoders and VAE. ``engine.model_files`` finds and
loads those parts from the family's ``FileLayout``; the config is ``<name>.config/`` or the shipped
one the transformer's shapes pick. Text encoder and VAE picks (``load(name, modules=...)``) name
files; a loaded model is cached under its name plus its picks.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import re
import shutil
import struct
import tempfile
import threading
from collections import Counter, OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from .file_hashes import file_sha256
from . import cancellation
from . import checkpoint_convert as layout_keys
from .compute import run_on_compute_thread
from .performance import PerformanceOptions
from .performance import apply as apply_performance
from .performance import place as place_pipeline
from . import memory
from .devices import pick_device, pick_dtype
from .errors import ModelError, NotEnoughMemoryError, UnsafeModelError
from . import families
from .families import Family
from .networks.embeddings import EMBEDDINGS_SUBDIR, EmbeddingLibrary
from .networks.vae_files import VAE_SUBDIR, VaeLibrary
from .upscalers.library import UpscalerLibrary
from .tiny_decoders import TinyDecoderLibrary
from .model_files import folders as model_folders
from .model_files import tensors as model_tensors
from .model_files import assemble as model_assemble
from .model_files import parts as model_parts
from .prompts import PromptEncoder

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILTIN_DIR = REPO_ROOT / "builtin"
DEFAULT_MODEL_NAME = "sfumato-demo-flow"  # the better of the two built-in demos (builtin/sfumato-demo-flow/MODEL_CARD.md)
CHECKPOINT_SUBDIR = "Stable-diffusion"
SAFE_SUFFIXES = (".safetensors",)
GGUF_SUFFIX = ".gguf"  # a quantized transformer (engine.model_files)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_CONFIGS = Path(__file__).resolve().parent / "configs"
SHARED_TOKENIZER = SINGLE_FILE_CONFIGS / "clip_tokenizer"
CONFIG_SUFFIX = ".config"
VARIANTS_DIR = "variants"  # engine/configs/<family>/variants/<name>/: files replacing the base config's for one shape
CONFIG_FILE_SUFFIXES = (".json", ".txt")  # what a config folder may hold; weights there are never read

CONVERT_HINT = ("Convert it to .safetensors with a tool you trust (for example diffusers' conversion scripts, "
                "in an isolated environment) and put the result in models/Stable-diffusion.")

TEXT_ENCODERS = {"CLIPTextModel", "CLIPTextModelWithProjection"}
TOKENIZERS = {"CLIPTokenizer", "CLIPTokenizerFast"}
LLM_TEXT_ENCODERS = {"Qwen3Model", "Qwen3ForCausalLM"}  # Z-Image, Flux.2 Klein
LLM_TOKENIZERS = {"Qwen2Tokenizer", "Qwen2TokenizerFast"}
COMPONENT_CLASSES = {  # component -> (library, allowed class names); the scheduler is checked separately
    "unet": ("diffusers", {"UNet2DConditionModel"}),
    "transformer": ("diffusers", {"SD3Transformer2DModel", "FluxTransformer2DModel", "ZImageTransformer2DModel",
                                  "Flux2Transformer2DModel"}),
    "text_encoder_3": ("transformers", {"T5EncoderModel"}),
    "tokenizer_3": ("transformers", {"T5Tokenizer", "T5TokenizerFast"}),
    "vae": ("diffusers", {"AutoencoderKL", "AutoencoderKLFlux2"}),
    "text_encoder": ("transformers", TEXT_ENCODERS | LLM_TEXT_ENCODERS),
    "text_encoder_2": ("transformers", TEXT_ENCODERS | {"T5EncoderModel"}),  # Flux.1's T5 is its second encoder
    "tokenizer": ("transformers", TOKENIZERS | LLM_TOKENIZERS),
    "tokenizer_2": ("transformers", TOKENIZERS | {"T5Tokenizer", "T5TokenizerFast"}),
}
NOT_LOADED = ("safety_checker", "feature_extractor", "image_encoder")  # never loaded, whatever the index says
WEIGHT_COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
WEIGHT_BASENAMES = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}
# diffusers < 0.14 named VAE attention weights query/key/value/proj_attn; diffusers renames them on load.
LEGACY_ATTENTION_NAMES = ((".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0."))


@dataclass(frozen=True)
class ModelEntry:
    name: str  # as A1111 names it: the file's stem or the folder's name (its path under models/ when two share it)
    path: Path
    kind: str  # "diffusers", "single-file" or "pickle"
    builtin: bool = False
    problem: str | None = None  # why it cannot be loaded (found by checking its files, or by a failed load)
    aliases: tuple[str, ...] = ()  # other spellings that name it: paths under models/, with or without the extension
    title: str = ""  # how A1111's title begins: a checkpoint's path under Stable-diffusion (with extension), else the name

    def __post_init__(self):
        if not self.title:
            object.__setattr__(self, "title", self.name)

    @property
    def usable(self) -> bool:
        return self.problem is None

    @property
    def untrained(self) -> bool:
        return (self.path / "UNTRAINED").exists() if self.kind == "diffusers" else False


@dataclass(frozen=True)
class ModulePicks:
    """Files named for a model kept as split files: text encoders and VAEs (``modules``), and the "SD VAE" file
    for a model that holds no VAE (``vae``). A model loaded with picks is cached apart from the same model without."""

    modules: tuple[str, ...] = ()
    vae: str | None = None

    def cache_name(self, name: str) -> str:
        picked = self.modules + ((self.vae,) if self.vae else ())
        return name if not picked else f"{name} + {', '.join(picked)}"


@dataclass
class LoadedModel:
    entry: ModelEntry
    pipeline: object
    family: Family
    device: torch.device
    dtype: torch.dtype
    prompt_encoder: PromptEncoder
    short_hash: str
    extras: dict = field(default_factory=dict)

    @property
    def denoising_model(self) -> torch.nn.Module:
        """The pipeline's denoising network (a UNet, or a transformer for the flow families)."""
        return getattr(self.pipeline, self.family.denoiser)

    @property
    def unet_in_channels(self) -> int:
        return int(self.denoising_model.config.in_channels)

    @property
    def latent_channels(self) -> int:
        """The channels of the latent the sampler works on (what the denoising model outputs)."""
        return self.family.latent_channels(dict(self.denoising_model.config))

    @property
    def is_inpainting_model(self) -> bool:
        return self.unet_in_channels == 9

    @property
    def vae_scale_factor(self) -> int:
        """Picture pixels per model-latent pixel: the VAE's downsampling times the family's latent patch."""
        return 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1) * self.family.latent_patch

    @property
    def max_size(self) -> int:
        """The largest side this model draws: its family's limit, or less where the model's own tables end there."""
        return self.family.max_size_of(self.denoising_model.config, self.vae_scale_factor)

    @property
    def scaling_factor(self) -> float:
        """The VAE config's ``scaling_factor``, else the family's (Flux.2's VAE has none: its batch norm scales)."""
        scaling = self.pipeline.vae.config.get("scaling_factor")
        return float(self.family.latent.scaling_factor if scaling is None else scaling)

    def to_model_latent(self, vae_latent: torch.Tensor) -> torch.Tensor:
        """The VAE's latent as the model samples it (the family's ``model_latent``)."""
        return self.family.model_latent(vae_latent, self.pipeline.vae, self.scaling_factor, self.latent_shift)

    def to_vae_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """The model's latent as the VAE decodes it (the family's ``vae_latent``)."""
        return self.family.vae_latent(latent, self.pipeline.vae, self.scaling_factor, self.latent_shift)

    @property
    def latent_shift(self) -> float:
        """What the model's latent is shifted by before scaling (SD3, Flux): the VAE config's ``shift_factor``,
        else the family's published one; model latent = (VAE latent − shift) · scaling."""
        shift = self.pipeline.vae.config.get("shift_factor")
        return float(self.family.latent.shift if shift is None else shift)


def _is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def _is_single_file_config(folder: Path) -> bool:
    """``<name>.config/`` configures ``<name>.safetensors`` beside it; it is never a model of its own
    (not even when the checkpoint is gone: it holds no weights)."""
    return folder.name.endswith(CONFIG_SUFFIX)


def file_short_hash(path: Path) -> str:
    """A1111's "Model hash": the first 10 hex digits of the file's SHA-256 (``sd_models.py``, ``sha256[0:10]``)."""
    return file_sha256(path)[:10]


def model_short_hash(entry: ModelEntry) -> str:
    if entry.kind != "diffusers":
        return file_short_hash(entry.path)
    denoiser = entry.path / ("unet" if (entry.path / "unet").is_dir() else "transformer")
    weights = sorted(denoiser.glob("*.safetensors")) or sorted(denoiser.glob("*"))
    digest = hashlib.sha256()
    for weight in weights:
        if weight.is_file():
            digest.update(bytes.fromhex(file_short_hash(weight).ljust(10, "0")))
    return digest.hexdigest()[:10]


def _safetensors_keys(path: Path, what: str) -> list[str]:
    """The tensor names in a safetensors header; a clear ModelError for a corrupt or truncated file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as error:
        raise ModelError(f"{what} is not a readable safetensors file (corrupt or truncated?): {error}") from error


def _safetensors_shape(path: Path, key: str) -> list[int]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.get_slice(key).get_shape())


SHAPE_ERROR = re.compile(r"because (?P<key>\S+) expected shape (?P<expected>.+?), but got (?P<got>.+?)\.")


def _explain(error: Exception) -> str:
    """diffusers' own words, or a plainer sentence where we know what they mean."""
    match = SHAPE_ERROR.search(str(error))
    if match:
        return (f"the weight {match['key']} has shape {match['got']} in the file but the config expects {match['expected']}; "
                "the config describes a different architecture than the weights")
    return f"{type(error).__name__}: {error}"


def _examples(keys: set[str], count: int = 3) -> str:
    return ", ".join(sorted(keys)[:count]) + (", ..." if len(keys) > count else "")


def _mismatch_message(component: str, missing: set[str], unused: set[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} weights the config needs are not in the file ({_examples(missing)})")
    if unused:
        parts.append(f"{len(unused)} weights in the file have no place in the config ({_examples(unused)})")
    return f"{component}: " + "; ".join(parts)


# -- diffusers folders ------------------------------------------------------------------
def _read_model_index(folder: Path) -> dict:
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{folder.name}/model_index.json is not readable JSON: {error}") from error
    if not isinstance(index, dict):
        raise ModelError(f"{folder.name}/model_index.json must be a JSON object")
    return index


def _json_kind(value: object) -> str:
    kinds = {list: "a list", dict: "an object", bool: "true/false", int: "a number", float: "a number", type(None): "missing"}
    return kinds.get(type(value), type(value).__name__)


def _is_scheduler_class(name: str) -> bool:
    import diffusers

    cls = getattr(diffusers, name, None) if isinstance(name, str) and name.endswith("Scheduler") else None
    return isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)


def check_model_index(folder: Path) -> Family:
    """Refuse a diffusers folder whose pipeline or components Sfumato does not run; return the family its
    pipeline class holds (SD 1.x stands for SD 2.x too until the UNet config is read).

    Checked before diffusers imports or instantiates anything the index names.
    """
    index = _read_model_index(folder)
    pipeline = index.get("_class_name")
    if not isinstance(pipeline, str):
        raise ModelError(f"{folder.name}/model_index.json: the key _class_name must be the pipeline's class name as text "
                         f"(like \"StableDiffusionPipeline\"), not {_json_kind(pipeline)}")
    family = families.for_pipeline_class(pipeline)
    if family is None:
        raise ModelError(f"{folder.name} is a {pipeline!r} model; Sfumato runs {families.titles()} "
                         f"pipelines ({', '.join(families.pipeline_classes())})")
    for component in family.components:
        value = index.get(component)
        if not (isinstance(value, list) and len(value) == 2 and value[0] and value[1]):
            hint = family.missing_component_hints.get(component)
            raise ModelError(f"{folder.name} has no {component}" + (f" ({hint})" if hint else ""))
    for component, value in index.items():
        if component.startswith("_") or component in NOT_LOADED or not isinstance(value, list):
            continue
        if len(value) != 2 or not all(part is None or isinstance(part, str) for part in value):
            raise ModelError(f"{folder.name}/model_index.json: the key {component} must be [library, class name] as two "
                             f"texts, not {json.dumps(value)[:80]}")
        library, class_name = value
        if library is None:
            continue
        if component == "scheduler":
            ok = library == "diffusers" and _is_scheduler_class(class_name)
        else:
            expected_library, classes = COMPONENT_CLASSES.get(component, (None, set()))
            ok = library == expected_library and class_name in classes
        if not ok:
            raise ModelError(f"{folder.name}: component {component} is {library}.{class_name}, which Sfumato does not load")
    return family


def _component_weight_keys(folder: Path, component: str, library: str) -> set[str] | None:
    """The weight names a component folder's safetensors files hold (None: a layout not checked here).

    A component whose weights exist only as pickles is refused before diffusers can unpickle them.
    """
    sub = folder / component
    safe = sorted(sub.glob("*.safetensors"))
    if not safe:
        pickles = sorted(p.name for p in sub.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES) if sub.is_dir() else []
        if pickles:
            raise UnsafeModelError(
                f"{folder.name}/{component} has only pickle weights ({', '.join(pickles)}); pickles can run code when "
                f"loaded, so Sfumato does not load them. {CONVERT_HINT}")
        raise ModelError(f"{folder.name}/{component} has no .safetensors weights")
    base = WEIGHT_BASENAMES[library]
    index_file = sub / f"{base}.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ModelError(f"{folder.name}/{component}/{index_file.name} is not a valid shard index: {error}") from error
        for shard in sorted(set(weight_map.values())):
            _safetensors_keys(sub / Path(shard).name, f"{folder.name}/{component}/{shard}")
        return set(weight_map)
    single = sub / f"{base}.safetensors"
    for path in safe:
        _safetensors_keys(path, f"{folder.name}/{component}/{path.name}")  # every file must at least parse
    if single.is_file():
        return set(_safetensors_keys(single, f"{folder.name}/{component}/{single.name}"))
    return None


def _normalise_key(key: str) -> str:
    """One spelling for names that loaders rename silently (transformers 5 drops ``text_model.``)."""
    key = key.removeprefix("text_model.")
    for old, new in LEGACY_ATTENTION_NAMES:
        key = key.replace(old, new)
    return key


def _tied_copies(state: dict[str, torch.Tensor], present: set[str]) -> set[str]:
    """Names of tied weights (one tensor under two names, as T5's ``shared`` and ``encoder.embed_tokens``) whose
    tensor the file holds under another of its names: a file saves a tied tensor once."""
    names_by_tensor: dict[tuple, list[str]] = {}
    for name, tensor in state.items():
        names_by_tensor.setdefault((tensor.data_ptr(), tuple(tensor.shape), tensor.dtype), []).append(_normalise_key(name))
    tied = set()
    for names in names_by_tensor.values():
        if len(names) > 1 and any(name in present for name in names):
            tied.update(name for name in names if name not in present)
    return tied


def _check_folder_weights(pipeline, folder: Path, file_keys: dict[str, set[str] | None]) -> None:
    problems = []
    for component, keys in file_keys.items():
        module = getattr(pipeline, component, None)
        if keys is None or module is None:
            continue
        state = module.state_dict()
        expected = {_normalise_key(k) for k in state if not layout_keys.ignorable(k)}
        present = {_normalise_key(k) for k in keys if not layout_keys.ignorable(k)}
        expected -= _tied_copies(state, present)
        if expected != present:
            problems.append(_mismatch_message(f"{component}/config.json", expected - present, present - expected))
    if problems:
        raise ModelError(f"{folder.name}: the configs do not match the weights: " + "; ".join(problems))


# -- single files -----------------------------------------------------------------------------
def _materialise_config(source: Path, family: Family, target: Path, unet_in_channels: int | None) -> Path:
    """A complete diffusers config folder in ``target``: the source's JSON/text files, the shared CLIP
    tokenizer where a tokenizer folder has no vocabulary, and the UNet's input channels as the file has them."""
    for path in source.rglob("*"):
        if path.is_file() and path.suffix in CONFIG_FILE_SUFFIXES:
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)
    index = _read_model_index(source)
    for component in ("tokenizer", "tokenizer_2"):
        if not isinstance(index.get(component), list) or index[component][0] is None:
            continue
        if "CLIP" not in str(index[component][1]):  # a Qwen tokenizer (Z-Image, Flux.2) comes with the model's files
            continue
        folder = target / component
        folder.mkdir(exist_ok=True)
        if not any((folder / name).is_file() for name in ("vocab.json", "tokenizer.json")):
            for name in ("vocab.json", "merges.txt"):
                shutil.copyfile(SHARED_TOKENIZER / name, folder / name)
        fallback = family.config_folder / component / "tokenizer_config.json"
        if not (folder / "tokenizer_config.json").is_file() and fallback.is_file():
            shutil.copyfile(fallback, folder / "tokenizer_config.json")
    unet_config = target / "unet" / "config.json"
    if unet_in_channels is not None and unet_config.is_file():
        config = json.loads(unet_config.read_text(encoding="utf-8"))
        if config.get("in_channels") != unet_in_channels:  # e.g. a 9-channel inpainting checkpoint
            config["in_channels"] = unet_in_channels
            unet_config.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return target


def _overlay(variant: Path, target: Path) -> None:
    """A shipped variant's config files over the base folder's (SD 3.5 Medium's transformer over Large's)."""
    for path in variant.rglob("*"):
        if path.is_file() and path.suffix in CONFIG_FILE_SUFFIXES:
            destination = target / path.relative_to(variant)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)


def _empty_components(folder: Path, family: Family) -> SimpleNamespace:
    """The pipeline's weighted components built from ``folder``'s configs on the meta device (no memory, no weights)."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from transformers.initialization import no_init_weights

    index = _read_model_index(folder)
    components = {}
    # Only the names are read: the weights' random init, run op by op on meta tensors, was 0.45 s of an SD 1.5 load.
    with torch.device("meta"), no_init_weights():
        components["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        components["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        for _, name in family.text_encoders:
            class_name = (index.get(name) or [None, None])[1]
            if class_name not in TEXT_ENCODERS:
                raise ModelError(f"{folder.name}: {name} is {class_name!r}; expected one of {', '.join(sorted(TEXT_ENCODERS))}")
            cls = getattr(transformers, class_name)
            components[name] = cls(cls.config_class.from_pretrained(folder / name))
    return SimpleNamespace(**components)


def _check_single_file_names(keys: list[str], family: Family, folder: Path, shown: Path) -> None:
    """Before loading: the config must use every weight the file holds and find every weight it needs.

    diffusers' ``from_single_file`` only warns about unused weights and leaves missing ones empty.
    """
    try:
        components = _empty_components(folder, family)
    except ModelError:
        raise
    except Exception as error:
        raise ModelError(f"the config folder {shown} is not a valid diffusers config: {type(error).__name__}: {error}") from error
    try:
        expected_by_component = layout_keys.ldm_key_names(components)
    except (KeyError, ValueError) as error:  # an architecture with no single-file naming here: nothing to compare
        log.warning("weights of the checkpoint using %s not compared with its config: %s", shown, error)
        return
    problems = []
    for component, prefix in family.single_file.prefixes.items():
        expected = expected_by_component.get(component, set())
        present = {key for key in keys if key.startswith(prefix) and not layout_keys.ignorable(key)}
        if expected != present:
            problems.append(_mismatch_message(component, expected - present, present - expected))
    if problems:
        raise ModelError(f"the config folder {shown} does not match this checkpoint: " + "; ".join(problems))


OUT_OF_MEMORY = (MemoryError, torch.OutOfMemoryError)

TITLE_WITH_HASH = re.compile(r"(?P<name>.+) \[(?P<hash>[0-9a-fA-F]{8,64})\]")


def _spellings(relative: Path) -> tuple[str, ...]:
    """A path under a models folder, written with and without its file extension, and as A1111's
    ``model_name`` (folders joined with '_')."""
    posix = relative.as_posix()
    suffix = relative.suffix if relative.suffix.lower() in SAFE_SUFFIXES + PICKLE_SUFFIXES + (GGUF_SUFFIX,) else ""
    bare = posix[: -len(suffix)] if suffix else posix
    return (posix, bare, bare.replace("/", "_"))


def _problem_without_loading(path: Path, kind: str) -> str | None:
    """Why a model cannot be loaded, from what its files say without loading any weights (None: it may load)."""
    try:
        if kind == "pickle":
            return f"{path.suffix} is a pickle format, which can run code when loaded, so Sfumato never loads it. {CONVERT_HINT}"
        if kind == "diffusers":
            check_model_index(path)
            index = _read_model_index(path)
            for component in WEIGHT_COMPONENTS:  # safetensors headers only: cheap, and catches truncated files
                if isinstance(index.get(component), list) and index[component][0]:
                    _component_weight_keys(path, component, index[component][0])
        else:
            families.detect_checkpoint(model_tensors.tensor_names(path))
    except ModelError as error:
        return str(error)
    except ValueError as error:  # detect_checkpoint: not a checkpoint layout Sfumato knows
        return f"{path.name}: {error}"
    except OSError as error:
        return f"{path.name} cannot be read: {error.strerror or error}"
    return None


class ModelRegistry:
    """Knows which checkpoints exist and keeps a few of them loaded."""

    def __init__(self, models_dir: Path | str | None = None, builtin_dir: Path | str | None = BUILTIN_DIR,
                 device: str = "auto", dtype: str = "auto", cache_size: int = 2,
                 performance: PerformanceOptions | None = None):
        self.performance = performance or PerformanceOptions()
        self.models_dir = Path(models_dir) if models_dir else None
        self.builtin_dir = Path(builtin_dir) if builtin_dir else None
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self.cache_size = max(1, cache_size)
        self._entries: dict[str, ModelEntry] = {}
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._names: dict[tuple, list[str]] = {}  # a flow file's tensor names, per (path, size, mtime)
        self._lock = threading.RLock()
        self._loading: dict[str, Future] = {}  # name → the load in progress
        self.free_memory = memory.free_memory  # device -> FreeMemory; replaceable, so tests can pretend memory is short
        # Textual-inversion embeddings and VAE files: used per job, never loaded into the cached models.
        self.embeddings = EmbeddingLibrary(self.models_dir / EMBEDDINGS_SUBDIR if self.models_dir else None)
        self.vaes = VaeLibrary(self.models_dir / VAE_SUBDIR if self.models_dir else None,
                               checkpoints=self.models_dir / CHECKPOINT_SUBDIR if self.models_dir else None,
                               also=tuple(self.models_dir / name for name in model_folders.VAE_DIRS if name != VAE_SUBDIR)
                               if self.models_dir else ())
        # Upscaler model files (hires fix and Extras): loaded on first use, on this registry's device.
        self.upscalers = UpscalerLibrary(self.models_dir, self.device, self.dtype)
        # TAESD decoders for live previews (models/VAE-taesd, models/vae_approx): loaded on first use.
        self.tiny_decoders = TinyDecoderLibrary(self.models_dir, self.device, self.dtype)
        self.refresh()

    # -- discovery ---------------------------------------------------------
    def refresh(self) -> list[ModelEntry]:
        """Scan the folders again. Each model is checked (without loading it) and named as A1111 names it.

        A1111 names a checkpoint by its file's stem and Sfumato names a diffusers folder by the folder's
        name. When two models would share a name, each is named by its path under ``models/`` instead
        (``Stable-diffusion/a/x.safetensors``, ``b/x``), so a name always means one model.
        """
        found: list[tuple[str, Path, str, tuple[str, ...]]] = []  # (short name, path, kind, spellings; the last is the title)
        if self.models_dir and self.models_dir.is_dir():
            folders = {index.parent for index in self.models_dir.rglob("model_index.json")}
            for folder in sorted(folders):
                relative = folder.relative_to(self.models_dir)
                if _is_single_file_config(folder) or any(part.startswith(".") for part in relative.parts):
                    continue
                found.append((folder.name, folder, "diffusers", _spellings(relative)))
            for subdir in model_folders.CHECKPOINT_DIRS:
                checkpoints = self.models_dir / subdir
                if not checkpoints.is_dir():
                    continue
                suffixes = SAFE_SUFFIXES + PICKLE_SUFFIXES + (GGUF_SUFFIX,)
                for path in sorted(checkpoints.rglob("*")):
                    relative = path.relative_to(checkpoints)
                    inside = relative.parts[:-1]
                    if (path.suffix.lower() not in suffixes or not path.is_file()
                            or path.stem.lower().endswith(".vae")  # a VAE kept beside its checkpoint (A1111 skips these too)
                            or any(part.startswith(".") or part.endswith(CONFIG_SUFFIX) for part in inside)
                            or any(parent in folders for parent in path.parents)):  # a diffusers folder's own weights
                        continue
                    if subdir != CHECKPOINT_SUBDIR and path.suffix.lower() in PICKLE_SUFFIXES:
                        continue  # ComfyUI's folders: only the formats Sfumato reads are listed there
                    kind = "pickle" if path.suffix.lower() in PICKLE_SUFFIXES else "single-file"
                    found.append((path.name[: -len(path.suffix)], path, kind,
                                  _spellings(path.relative_to(self.models_dir)) + _spellings(relative) + (relative.as_posix(),)))
        shared = Counter(short for short, _, _, _ in found)
        entries: dict[str, ModelEntry] = {}
        for short, path, kind, spellings in found:
            name = short if shared[short] == 1 else path.relative_to(self.models_dir).as_posix()
            aliases = tuple(dict.fromkeys(alias for alias in (short, *spellings) if alias != name))
            entries[name] = ModelEntry(name, path, kind, problem=_problem_without_loading(path, kind), aliases=aliases,
                                       title=spellings[-1] if kind != "diffusers" else name)
        if self.builtin_dir and self.builtin_dir.is_dir():
            for folder in sorted(self.builtin_dir.iterdir()):
                if _is_diffusers_folder(folder) and folder.name not in entries:  # a user model of that name wins
                    entries[folder.name] = ModelEntry(folder.name, folder, "diffusers", builtin=True,
                                                      problem=_problem_without_loading(folder, "diffusers"))
        for entry in entries.values():
            if entry.problem:
                log.warning("model %s cannot be used: %s", entry.name, entry.problem)
        with self._lock:
            self._entries = entries
        self.vaes.refresh()
        self.upscalers.refresh()
        return self.list()

    def list(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._entries.values())

    def names(self) -> list[str]:
        return [entry.name for entry in self.list()]

    def default_name(self) -> str:
        """The first user model that passed its checks, else the built-in demo model, else any usable model.

        A model found broken (by its checks or a failed load) is never the default.
        """
        entries = self.list()
        usable = [entry for entry in entries if entry.usable]
        user = [entry for entry in usable if not entry.builtin]
        if user:
            return user[0].name
        if any(entry.name == DEFAULT_MODEL_NAME for entry in usable):
            return DEFAULT_MODEL_NAME
        if usable:
            return usable[0].name
        if entries:
            raise ModelError("no usable model: " + "; ".join(f"{entry.name}: {entry.problem}" for entry in entries))
        raise ModelError("no models found: put a checkpoint in models/Stable-diffusion or run `python -m training.demo_model`")

    def get(self, name: str | None) -> ModelEntry:
        """The scanned entry a name refers to. Names are looked up, never opened as paths.

        Accepted spellings: the name, an A1111 title ``name [hash]``, and the model's path under
        ``models/`` or ``models/Stable-diffusion/``, with or without the file's extension. A spelling
        that fits two models is refused with both names, unless the title's hash tells them apart.
        """
        name = name or self.default_name()
        title = TITLE_WITH_HASH.fullmatch(name)
        with self._lock:
            entries = list(self._entries.values())
            exact = self._entries.get(name)
        if exact is not None:
            return exact
        wanted = title["name"] if title else name
        matches = [entry for entry in entries if entry.name == wanted] or [entry for entry in entries if wanted in entry.aliases]
        if len(matches) > 1 and title:
            matches = [entry for entry in matches if self._hash_matches(entry, title["hash"])] or matches
        if len(matches) > 1:
            raise ModelError(f"{name!r} could mean {' or '.join(sorted(repr(entry.name) for entry in matches))}; use one of those names")
        if not matches:
            shown = name if len(name) <= 200 else name[:200] + "..."
            raise ModelError(f"model {shown!r} not found; available: {', '.join(self.names()) or 'none'}")
        return matches[0]

    def _hash_matches(self, entry: ModelEntry, wanted: str) -> bool:
        try:
            return entry.kind != "pickle" and self.short_hash(entry).startswith(wanted.lower()[:10])
        except OSError:
            return False

    def mark_broken(self, entry: ModelEntry, problem: str) -> None:
        """Remember that ``entry`` failed to load, so it is shown as broken and never picked as the default
        (until the next refresh, when its files are checked again)."""
        with self._lock:
            current = self._entries.get(entry.name)
            if current is not None and current.path == entry.path:  # not a model rescanned under that name since
                self._entries[entry.name] = replace(current, problem=problem)

    def short_hash(self, entry: ModelEntry) -> str:
        """The entry's A1111 short hash; ``file_hashes`` remembers each file's digest per (size, mtime), so a reload
        does not rehash gigabytes."""
        return model_short_hash(entry)

    # -- loading -----------------------------------------------------------
    def loaded_names(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def load(self, name: str | None = None, modules: tuple[str, ...] = (), vae: str | None = None) -> LoadedModel:
        """The model, loaded once and cached. ``modules`` name text encoder and VAE files (Forge's "VAE / Text
        Encoder" picks) for a model kept as split files, ``vae`` a VAE file for one that holds none; other models
        ignore both. A failed load leaves the cache (and the model loaded before) as it was."""
        entry = self.get(name)
        picks = self._picks(entry, tuple(modules), vae)
        cached = self._cached(entry, picks)
        if cached is not None:
            return cached
        try:
            return run_on_compute_thread(self._load_and_cache, entry, picks)
        except NotEnoughMemoryError:
            raise  # out of memory says nothing about the model's files
        except ModelError as error:
            # Running out of memory says nothing about the model's files, nor does a wrong or missing module file.
            if not isinstance(error.__cause__, OUT_OF_MEMORY) and not isinstance(error, model_parts.ModuleError):
                self.mark_broken(entry, str(error))
            raise

    # -- memory ------------------------------------------------------------
    def native_size(self, entry: ModelEntry) -> tuple[int, int]:
        """The family's native size for a model, read from its configs without loading it (1024² when unknown)."""
        family = self.family(entry)
        return family.native_size if family is not None else (1024, 1024)

    def family(self, entry: ModelEntry) -> Family | None:
        """The model's family without loading it (the loaded model's when it is loaded): read from a diffusers folder's
        configs or a single file's tensor names, so the model list and the UI can say what each model is. None when
        its files do not say (a pickle, a broken file)."""
        with self._lock:
            loaded = next((model for model in self._loaded.values() if model.entry.path == entry.path), None)
        if loaded is not None:
            return loaded.family
        try:
            if entry.kind == "diffusers":
                family = check_model_index(entry.path)
                denoiser = entry.path / family.denoiser / "config.json"
                return families.detect_family(json.loads(denoiser.read_text(encoding="utf-8")), entry.path)
            if entry.kind == "single-file":
                beside = entry.path.with_suffix(CONFIG_SUFFIX)  # its own config folder's sfumato.json, as loading reads it
                return families.detect_checkpoint(self._tensor_names(entry.path), beside if beside.is_dir() else None)
        except (ModelError, ValueError, OSError, KeyError, TypeError):
            pass
        return None

    def estimate_memory(self, name: str | ModelEntry | None = None, width: int | None = None, height: int | None = None,
                        batch: int = 1, mode: str | None = None) -> memory.MemoryEstimate:
        """What the model needs on this registry's device and dtype, in its memory mode (or ``mode``), at
        ``width``×``height`` (its native size by default); read from its files, nothing is loaded."""
        entry = name if isinstance(name, ModelEntry) else self.get(name)
        if width is None or height is None:
            width, height = self.native_size(entry)
        return memory.estimate_model_memory(entry.path, entry.kind, self.dtype, self.device,
                                            mode or self.performance.memory_mode, width, height, batch, name=entry.name)

    def memory_shortfall(self, entry: ModelEntry, width: int | None = None, height: int | None = None,
                         batch: int = 1) -> str | None:
        """Why the model would not fit in what is free now (the refusal's words), or None when it fits."""
        estimate = self.estimate_memory(entry, width, height, batch)
        free = self.free_memory(self.device)
        if memory.fits(estimate, free):
            return None
        return memory.shortfall_message(estimate, free, self._other_modes(entry, estimate))

    def _other_modes(self, entry: ModelEntry, estimate: memory.MemoryEstimate) -> list[memory.MemoryEstimate]:
        """The same estimate in each memory mode after the current one (they only differ on CUDA)."""
        if self.device.type != "cuda":
            return []
        names = [mode.name for mode in memory.MEMORY_MODES]
        later = names[names.index(estimate.mode) + 1:]
        return [self.estimate_memory(entry, estimate.width, estimate.height, estimate.batch, mode) for mode in later]

    def out_of_memory_message(self, name: str | None, error: BaseException, width: int | None = None,
                              height: int | None = None, batch: int = 1) -> str:
        """An out-of-memory error while loading or drawing, told like the refusal: the estimate, what is free now, and
        which memory mode would fit."""
        try:
            entry = self.get(name)
            estimate = self.estimate_memory(entry, width, height, batch)
            free = self.free_memory(self.device)
            told = memory.shortfall_message(estimate, free, self._other_modes(entry, estimate))
        except Exception as failure:  # noqa: BLE001 - the estimate is advice; the error itself must still be told
            told = f"(no memory estimate: {failure})"
        return f"out of memory ({type(error).__name__}: {str(error)[:200]}); {told}"

    def _picks(self, entry: ModelEntry, modules: tuple[str, ...], vae: str | None) -> "ModulePicks":
        """The picks that matter for this entry: none for a model that is not a flow file; the VAE only for a file
        that holds none (else the job swaps the VAE in, as for any checkpoint)."""
        if entry.kind != "single-file" or not (modules or vae):
            return ModulePicks()
        try:
            keys = set(self._tensor_names(entry.path))
            family = families.detect_checkpoint(keys)
        except (ModelError, ValueError, OSError):
            return ModulePicks(tuple(modules))
        layout = family.file_layout
        if layout is None:
            return ModulePicks()
        holds_vae = layout.vae_prefix + model_parts.VAE_LATENT_WEIGHT in keys
        return ModulePicks(tuple(modules), None if holds_vae else vae)

    def _tensor_names(self, path: Path) -> list[str]:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key not in self._names:
                self._names[key] = model_tensors.tensor_names(path)
            return self._names[key]

    def _cached(self, entry: ModelEntry, picks: "ModulePicks | None" = None) -> LoadedModel | None:
        """The entry's loaded model, marked as the most recently used, or None."""
        key = (picks or ModulePicks()).cache_name(entry.name)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
        return None

    def _load_and_cache(self, entry: ModelEntry, picks: "ModulePicks | None" = None) -> LoadedModel:
        """Load once, cache, evict the least recently used. The lock is not held while loading: a load
        left running by an interrupted job must not block the model list, nor a job that wants
        another model; a job that wants the same one waits for that load (and may be interrupted)."""
        picks = picks or ModulePicks()
        key = picks.cache_name(entry.name)
        with self._lock:
            cached = self._cached(entry, picks)  # it may have been loaded while this call waited for the compute thread
            if cached is not None:
                return cached
            loading = self._loading.get(key)
            if loading is None:
                loading = self._loading[key] = Future()
                loads_here = True
            else:
                loads_here = False
        if not loads_here:
            try:
                return cancellation.wait_for(loading, "waiting for another job's load of the model")
            except Exception:  # noqa: BLE001 - that job reports its own error; this one tries for itself
                cancellation.check("waiting for another job's load of the model")  # unless this job was interrupted
                return self._load_and_cache(entry, picks)
        try:
            loaded = self._load_uncached(entry, picks) if picks.modules or picks.vae else self._load_uncached(entry)
        except BaseException as error:
            with self._lock:
                del self._loading[key]
            loading.set_exception(error)
            raise
        with self._lock:
            del self._loading[key]
            self._loaded[key] = loaded
            evicted = False
            while len(self._loaded) > self.cache_size:
                self._loaded.popitem(last=False)
                evicted = True
        loading.set_result(loaded)
        if evicted:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return loaded

    def _load_uncached(self, entry: ModelEntry, picks: "ModulePicks | None" = None) -> LoadedModel:
        if entry.kind == "pickle":
            raise UnsafeModelError(
                f"{entry.path.name} is a pickle checkpoint ({entry.path.suffix}); pickles can run code when loaded, so "
                f"Sfumato does not load them. {CONVERT_HINT}"
            )
        if not entry.path.exists():
            raise ModelError(f"model {entry.name!r} is gone from disk; refresh the model list")
        if self.performance.memory_check:
            self._refuse_if_short(entry)
        try:
            pipeline, family = self._read_pipeline(entry, picks or ModulePicks())
            place_pipeline(pipeline, self.device, self.performance)
            apply_performance(pipeline, self.device, self.performance, traceable=family.traceable_call)
        except ModelError as error:
            if isinstance(error.__cause__, OUT_OF_MEMORY):
                raise self._ran_out(entry, error.__cause__) from error.__cause__
            raise
        except OUT_OF_MEMORY as error:
            raise self._ran_out(entry, error) from error
        except Exception as error:  # diffusers raises many kinds for broken files
            raise ModelError(f"could not load model {entry.name!r}: {type(error).__name__}: {error}") from error
        for module_name in WEIGHT_COMPONENTS:
            module = getattr(pipeline, module_name, None)
            if module is not None:
                module.eval().requires_grad_(False)
                cancellation.install_checkpoints(module)
        return LoadedModel(
            entry=entry, pipeline=pipeline, family=family, device=self.device, dtype=self.dtype,
            prompt_encoder=family.prompt_encoder(pipeline), short_hash=self.short_hash(entry),
        )

    def _refuse_if_short(self, entry: ModelEntry) -> None:
        """Refuse before loading when the estimate exceeds what is free; the models already loaded stay loaded."""
        try:
            shortfall = self.memory_shortfall(entry)
        except (OSError, ValueError, struct.error, ModelError) as error:  # unreadable headers: the load reports the file's problem
            log.warning("no memory estimate for %s: %s", entry.name, error)
            return
        if shortfall is not None:
            raise NotEnoughMemoryError(shortfall)

    def _ran_out(self, entry: ModelEntry, error: BaseException) -> NotEnoughMemoryError:
        gc.collect()  # free what the failed load held before the next job
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return NotEnoughMemoryError(f"{entry.name}: " + self.out_of_memory_message(entry.name, error))

    def _read_pipeline(self, entry: ModelEntry, picks: "ModulePicks") -> tuple[object, Family]:
        """The pipeline, on the CPU, and its family (as the model's own ``sfumato.json`` adjusts it)."""
        if entry.kind == "diffusers":
            pipeline = self._read_diffusers_folder(entry)
            try:
                return pipeline, families.detect_pipeline(pipeline, entry.path)
            except ValueError as error:
                raise ModelError(f"{entry.name}: {error}") from error
        return self._read_single_file(entry, picks)

    def _read_diffusers_folder(self, entry: ModelEntry):
        from diffusers import DiffusionPipeline

        check_model_index(entry.path)
        index = _read_model_index(entry.path)
        file_keys = {component: _component_weight_keys(entry.path, component, index[component][0])
                     for component in WEIGHT_COMPONENTS if isinstance(index.get(component), list) and index[component][0]}
        skipped = {name: None for name in NOT_LOADED if name in index}
        # A component the index leaves empty ([null, null], as an SD 3.5 folder without T5) is passed as None:
        # diffusers refuses to build a pipeline with one of its components missing.
        skipped.update({name: None for name, value in index.items()
                        if not name.startswith("_") and isinstance(value, list) and not any(value)})
        if "safety_checker" in index:
            skipped["requires_safety_checker"] = False
        try:
            pipeline = DiffusionPipeline.from_pretrained(entry.path, use_safetensors=True, local_files_only=True,
                                                         dtype=self.dtype, **skipped)
        except Exception as error:
            raise ModelError(f"could not load model {entry.name!r}: {_explain(error)}") from error
        _check_folder_weights(pipeline, entry.path, file_keys)
        return pipeline

    def _read_single_file(self, entry: ModelEntry, picks: "ModulePicks") -> tuple[object, Family]:
        keys = model_tensors.tensor_names(entry.path)
        try:
            family = families.detect_checkpoint(keys)
        except ValueError as error:
            raise ModelError(f"{entry.path.name}: {error}") from error
        if family.file_layout is not None:
            return self._read_flow_files(entry, family, set(keys), picks)
        config_dir, beside = self._single_file_config(entry, family)
        in_channels = None
        if layout_keys.UNET_INPUT_CONV in keys:
            in_channels = _safetensors_shape(entry.path, layout_keys.UNET_INPUT_CONV)[1]
        with tempfile.TemporaryDirectory(prefix="sfumato-config-") as scratch:
            try:
                folder = _materialise_config(config_dir, family, Path(scratch), in_channels)
            except (OSError, ValueError) as error:
                raise ModelError(f"the config folder {config_dir} could not be read: {error}") from error
            _check_single_file_names(keys, family, folder, config_dir)
            try:
                pipeline = family.load_single_file(entry.path, folder, self.dtype)
            except Exception as error:
                raise ModelError(f"could not load {entry.path.name} with the config folder {config_dir}: "
                                 f"{_explain(error)}") from error
        if beside:  # the checkpoint's own config folder may carry a sfumato.json
            family = families.detect_checkpoint(keys, config_dir)
        return pipeline, family

    def _read_flow_files(self, entry: ModelEntry, family: Family, keys: set[str], picks: "ModulePicks") -> tuple[object, Family]:
        """A flow model from its original single file, or its transformer alone with split text encoders and VAE."""
        layout = family.file_layout
        beside = entry.path.with_suffix(CONFIG_SUFFIX)
        variant = None
        if _is_diffusers_folder(beside):
            source = beside
        else:
            names, prefix = layout.transformer_names(keys)
            shape_of = model_tensors.shape_reader(entry.path)
            variant = layout.config_variant(names, lambda key: shape_of(prefix + key))
            source = family.config_folder
            if variant is None or not _is_diffusers_folder(source):
                raise ModelError(
                    f"{entry.path.name} is a {family.title} transformer of a shape none of Sfumato's shipped configs fits; "
                    f"put a diffusers config folder (model_index.json, transformer/config.json, ...) at {beside}")
        with tempfile.TemporaryDirectory(prefix="sfumato-config-") as scratch:
            try:
                folder = _materialise_config(source, family, Path(scratch), None)
                if variant:
                    _overlay(family.config_folder / VARIANTS_DIR / variant, folder)
            except (OSError, ValueError) as error:
                raise ModelError(f"the config folder {source} could not be read: {error}") from error
            parts = model_parts.resolve(entry.path, keys, layout, folder, self.models_dir, picks.modules, picks.vae,
                                        model_title=entry.path.name)
            pipeline = model_assemble.build_pipeline(family, layout, parts, folder, self.dtype)
        if source == beside:
            family = families.detect_checkpoint(keys, beside)
        return pipeline, family

    @staticmethod
    def _single_file_config(entry: ModelEntry, family: Family) -> tuple[Path, bool]:
        """Configs live beside the checkpoint (``<name>.config/``) or in engine/configs/<family>.

        Returns the folder and whether it is the checkpoint's own.
        """
        beside = entry.path.with_suffix(CONFIG_SUFFIX)
        if _is_diffusers_folder(beside):
            return beside, True
        shipped = family.config_folder
        if _is_diffusers_folder(shipped):
            return shipped, False
        raise ModelError(
            f"{entry.path.name} is a single-file {family.title} checkpoint and Sfumato ships no config for that family; put "
            f"a diffusers config folder (model_index.json, */config.json, scheduler config, tokenizer files) at {beside}"
        )
