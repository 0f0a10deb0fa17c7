"""Building a flow pipeline from the files ``engine.model_files.parts`` found, with a local config folder.

- The transformer and the VAE go through diffusers' own single-file converters (``from_single_file`` of the
  component class, fed the weights under their prefix, configured by ``<config>/transformer`` and ``<config>/vae``);
  a GGUF transformer is read by diffusers with ``GGUFQuantizationConfig`` (its weights stay quantized and are
  dequantized layer by layer in the compute dtype).
- Text encoders are Hugging Face models: the weights under the slot's prefix are loaded strictly into the class
  ``model_index.json`` names, built from ``<config>/<component>``.
- Every weight the config needs must come from the file: a weight left unloaded is a ``ModelError`` naming the file,
  never a silently random layer.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import ModelError
from .layout import FileLayout, TextEncoderSlot
from .parts import ModuleError, Parts, Source
from .folders import TOKENIZER_SUFFIX
from .tensors import is_gguf, read_tensors

TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "vocab.json", "tokenizer.model")
REBUILT_BUFFERS = ("position_ids",)  # buffers transformers rebuilds from the config; files may leave them out
# Weights split text encoder files carry that an encoder class may have no place for: CLIP's contrastive scale, its
# projection (kept in clip_l.safetensors, unused by a CLIPTextModel), the position ids older transformers saved.
# An LLM's output head (``lm_head.weight``) is never used by the image pipelines.
EXTRA_WEIGHTS = ("logit_scale", "text_projection.weight", "position_ids", "lm_head.weight")


def _index(config_dir: Path) -> dict:
    return json.loads((config_dir / "model_index.json").read_text(encoding="utf-8"))


def _unloaded(module: torch.nn.Module) -> list[str]:
    return [name for name, tensor in list(module.named_parameters()) + list(module.named_buffers()) if tensor.is_meta]


def _missing_error(what: str, path: Path, missing: list[str]) -> ModelError:
    shown = ", ".join(sorted(missing)[:3]) + (", ..." if len(missing) > 3 else "")
    return ModelError(f"{path.name}: {len(missing)} weights the {what} needs are not in the file ({shown}); "
                      "the file is of another architecture than the config")


def _from_single_file(cls, source: Source, config_dir: Path, subfolder: str, dtype: torch.dtype, keep_prefix: bool,
                      to_diffusers=None):
    """One diffusers component from a file's weights under ``source.prefix``: converted by ``to_diffusers`` when the
    family brings its own converter, else by diffusers' single-file converter for ``cls``."""
    import diffusers

    options = {"config": str(config_dir), "subfolder": subfolder, "local_files_only": True, "torch_dtype": dtype}
    if is_gguf(source.path):
        from diffusers.models.model_loading_utils import load_gguf_checkpoint

        try:
            weights = load_gguf_checkpoint(str(source.path))
        except Exception as error:  # noqa: BLE001 - the gguf reader raises many kinds for a cut or foreign file
            raise ModelError(f"{source.path.name} is not a readable GGUF file (corrupt or truncated?): {error}") from error
        weights = {key[len(source.prefix):]: value for key, value in weights.items() if key.startswith(source.prefix)}
        weights = {key: _plain_unless_weight(key, value, dtype) for key, value in weights.items()}
        options["quantization_config"] = diffusers.GGUFQuantizationConfig(compute_dtype=dtype)
    else:
        weights = read_tensors(source.path, source.prefix, dtype, keep_prefix=keep_prefix)
    if not weights:
        raise ModelError(f"{source.path.name} holds no {subfolder} weights under {source.prefix!r}")
    if to_diffusers is not None:
        weights = to_diffusers(weights, cls.load_config(config_dir / subfolder))
    converted = set(weights) if to_diffusers is not None else None
    try:
        if converted is not None and not _single_file_loadable(cls):
            module = _from_state_dict(cls, weights, config_dir / subfolder, dtype)
        else:
            module = cls.from_single_file(weights, **options)
    except ModelError:
        raise
    except Exception as error:  # noqa: BLE001 - diffusers raises ValueError/KeyError/RuntimeError for foreign weights
        raise ModelError(f"{source.path.name}: its {subfolder} weights do not fit the config "
                         f"{config_dir.name}/{subfolder}: {type(error).__name__}: {error}") from error
    missing = _unloaded(module)
    if missing:
        raise _missing_error(subfolder, source.path, missing)
    if converted is not None:
        unused = sorted(converted - set(module.state_dict()))
        if unused:
            shown = ", ".join(unused[:3]) + (", ..." if len(unused) > 3 else "")
            raise ModelError(f"{source.path.name}: {len(unused)} weights have no place in the {subfolder} ({shown}); "
                             "the file is of another architecture than the config")
    return module


def _plain_unless_weight(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A quantized GGUF tensor that is no layer's ``weight`` (Z-Image's learned pad tokens) dequantized: diffusers
    dequantizes only inside its GGUF linear layers, and would hand such a parameter over as raw blocks."""
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    if isinstance(tensor, GGUFParameter) and not key.endswith(".weight"):
        return dequantize_gguf_tensor(tensor).to(dtype)
    return tensor


def _single_file_loadable(cls) -> bool:
    """Whether diffusers' ``from_single_file`` takes this class (it refuses AutoencoderKLFlux2, for one)."""
    import diffusers
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    return any(issubclass(cls, getattr(diffusers, name)) for name in SINGLE_FILE_LOADABLE_CLASSES if hasattr(diffusers, name))


def _from_state_dict(cls, weights: dict, config_dir: Path, dtype: torch.dtype):
    """A diffusers model built from its config on the meta device and given ``weights`` (already in its names)."""
    with torch.device("meta"):
        module = cls.from_config(cls.load_config(config_dir))
    expected = module.state_dict()
    for name, tensor in weights.items():
        if name in expected and tuple(expected[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, the config wants {tuple(expected[name].shape)}")
    module.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items() if k in expected},
                           strict=False, assign=True)
    for name, buffer in list(module.named_buffers()):
        if buffer.is_meta and name.endswith("num_batches_tracked"):  # a counter for training; files leave it out
            owner = module.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
    return module.eval()


def load_text_encoder(slot: TextEncoderSlot, source: Source, class_name: str, config_dir: Path, dtype: torch.dtype):
    """A Hugging Face text encoder from a file's weights under ``source.prefix`` (a wrapper prefix stripped too)."""
    import transformers

    cls = getattr(transformers, class_name)
    config = cls.config_class.from_pretrained(config_dir / slot.component)
    weights = read_tensors(source.path, source.prefix, dtype)
    for wrapper in slot.wrappers:  # an all-in-one file wraps some encoders once more ("...clip_l.transformer.")
        if slot.marker not in weights and any(key.startswith(wrapper) for key in weights):
            weights = {key[len(wrapper):]: value for key, value in weights.items() if key.startswith(wrapper)}
    with torch.device("meta"):
        model = cls(config)
    expected = model.state_dict()
    # Files keep Hugging Face's published names (``text_model.*``); transformers 5 drops that level in some classes.
    weights = {_as_expected(name, expected): value for name, value in weights.items()}
    if slot.identity_projection and "text_projection.weight" in expected and "text_projection.weight" not in weights:
        out_features, in_features = expected["text_projection.weight"].shape
        if out_features == in_features:
            weights["text_projection.weight"] = torch.eye(in_features)
    for name, tensor in weights.items():
        if name in expected and tuple(expected[name].shape) != tuple(tensor.shape):
            raise ModelError(f"{source.path.name}: the {slot.title} weight {name} has shape {tuple(tensor.shape)} but the "
                             f"config {config_dir.name}/{slot.component} expects {tuple(expected[name].shape)}")
    unused = sorted(name for name in set(weights) - set(expected) if not name.endswith(EXTRA_WEIGHTS))
    weights = {name: value for name, value in weights.items() if name in expected}
    if unused:
        shown = ", ".join(unused[:3]) + (", ..." if len(unused) > 3 else "")
        raise ModelError(f"{source.path.name}: {len(unused)} weights have no place in a {slot.title} text encoder ({shown})")
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}, strict=False,
                          assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # T5: the encoder's embedding is the shared one
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta and name.rsplit(".", 1)[-1] in REBUILT_BUFFERS:
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer("position_ids", torch.arange(buffer.shape[-1]).expand((1, -1)), persistent=False)
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta and name not in expected and name.rsplit(".", 1)[0].endswith("rotary_emb"):
            # Rotary frequencies are not saved: an LLM's rotary embedding is rebuilt from the config, off the meta device.
            owner_name = name.rsplit(".", 1)[0]
            parent, _, child = owner_name.rpartition(".")
            owner = model.get_submodule(owner_name)
            setattr(model.get_submodule(parent) if parent else model, child, type(owner)(config=model.config))
    head = getattr(model, "lm_head", None)
    if head is not None and head.weight.is_meta:
        # An LLM's output head: the image pipelines read its hidden states only, and Qwen3 files leave the head out
        # (Qwen3-4B ties it to the embedding); the embedding stands in, costing no memory.
        head.weight = model.get_input_embeddings().weight
    missing = _unloaded(model)
    if missing:
        raise _missing_error(f"{slot.title} text encoder", source.path, missing)
    return model.to(dtype)


def _as_expected(name: str, expected: dict) -> str:
    if name in expected:
        return name
    for old, new in (("text_model.", ""), ("", "text_model."), ("", "model.")):  # "model.": an LLM inside its LM head
        if name.startswith(old) and new + name[len(old):] in expected:
            return new + name[len(old):]
    return name


def _tokenizer(component: str, class_name: str, config_dir: Path, beside: Path | None, slot: TextEncoderSlot,
               encoder_file: Path | None = None, model: Path | None = None):
    import transformers

    folder = config_dir / component
    if beside is not None:
        folder = beside
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        files = slot.tokenizer_files or f"{' or '.join(TOKENIZER_FILES[:2])} with tokenizer_config.json"
        here = ""
        if encoder_file is not None and model is not None and encoder_file != model:
            here = (f" (here: {encoder_file.with_name(encoder_file.stem + TOKENIZER_SUFFIX)}/ or "
                    f"{model.with_suffix('.config') / component}/)")
        raise ModelError(
            f"the {slot.title} text encoder needs its tokenizer, which weight files do not hold and Sfumato cannot "
            f"download: put its tokenizer files ({files}) in "
            f"models/text_encoder/<encoder file name>.tokenizer/ or in the model's <name>.config/{component}/{here}")
    tokenizer = getattr(transformers, class_name).from_pretrained(folder)
    if slot.tokenizer_files and not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"the {slot.title} tokenizer in {folder} has no chat template, which the model's prompts are "
                         "written in: copy its tokenizer_config.json (or chat_template.jinja) there too")
    return tokenizer


@contextmanager
def _blamed(source: Source, model: Path):
    """A module file's failure is the module's (``ModuleError``), not the model's own file's."""
    try:
        yield
    except ModuleError:
        raise
    except ModelError as error:
        if source.path == model:
            raise
        raise ModuleError(str(error)) from error


def build_pipeline(family, layout: FileLayout, parts: Parts, config_dir: Path, dtype: torch.dtype):
    """The family's pipeline from ``parts`` and the diffusers config folder ``config_dir``, on the CPU."""
    import diffusers

    index = _index(config_dir)
    components = {}
    transformer_cls = getattr(diffusers, index[family.denoiser][1])
    components[family.denoiser] = _from_single_file(transformer_cls, parts.transformer, config_dir, family.denoiser, dtype,
                                                    keep_prefix=False, to_diffusers=layout.to_diffusers)
    own = parts.transformer.path
    vae_cls = getattr(diffusers, index["vae"][1])
    with _blamed(parts.vae, own):
        components["vae"] = _from_single_file(vae_cls, parts.vae, config_dir, "vae", dtype,
                                              keep_prefix=layout.vae_to_diffusers is None, to_diffusers=layout.vae_to_diffusers)
    for slot in layout.text_encoders:
        source = parts.text_encoders.get(slot.component)
        if source is None:
            components[slot.component] = components[slot.tokenizer] = None
            continue
        with _blamed(source, own):
            components[slot.component] = load_text_encoder(slot, source, index[slot.component][1], config_dir, dtype)
            components[slot.tokenizer] = _tokenizer(slot.tokenizer, index[slot.tokenizer][1], config_dir,
                                                    parts.tokenizer_folders.get(slot.tokenizer), slot, source.path, own)
    scheduler_cls = getattr(diffusers, index["scheduler"][1])
    components["scheduler"] = scheduler_cls.from_pretrained(config_dir / "scheduler")
    return family.pipeline_class()(**components)
