"""How much memory a model needs, read from its files before it loads, and where each part lives.

The estimate (``estimate_model_memory``) is made of three terms:

- **Weights**, per component (denoiser, each text encoder, VAE): from the safetensors headers only, the element
  count of every tensor times the byte size of the dtype it will *run* in. Floating-point tensors stored in
  fp8/fp16/bf16 are upcast to the compute dtype when they load, so they count at the compute dtype; integer
  tensors (position ids) keep their own size. A GGUF file counts at its size on disk: its quantized blocks stay
  quantized in memory and are dequantized one layer at a time.
- **Activations** for the chosen size, ``ACTIVATION_COPIES`` copies of the widest activation of each stage
  (denoiser and VAE decode do not overlap, so the larger one counts):

  - denoiser: ``ACTIVATION_COPIES × rows × tokens × width × bytes``, where rows = batch × 2 (the CFG pair),
    tokens = latent pixels (UNet, at its first level) or latent pixels / 4 + text tokens (a transformer's 2×2
    patches), width = the UNet's first block width or the transformer's hidden size;
  - VAE decode: ``ACTIVATION_COPIES × batch × c₀ × H × W × bytes``, c₀ = the decoder's full-resolution width
    (128 in every SD, SDXL, SD3 and Flux VAE).

  Why 16 copies: a residual block keeps its input, the normalised and activated copies and the conv output alive,
  and a 3×3 convolution on the CPU (im2col) unfolds its input into 9 more; a transformer block keeps the residual,
  the normalised input, q, k, v, the attention output and a 4×-wide MLP hidden. Measured on the demo model's VAE
  on this machine's CPU the decode's peak was 14–17 full-resolution feature maps (tests/test_memory_estimate.py).
  Attention scores are not counted: torch's scaled-dot-product attention does not materialise them.
- **Runtime** (RAM only): ``RUNTIME_RAM``, what loading a pipeline and running its first job add beyond tensors
  (pipeline and tokenizer objects, the CPU allocator's pools), measured at about 45–50 MB on the tiny models.
  On a GPU the CUDA context already exists when free memory is read, so it is not counted again.

Where each component lives depends on the memory mode (``MEMORY_MODES``, A1111's ``--medvram`` / ``--lowvram``
names plus Forge's text encoders on the CPU): see ``placement``.
"""
from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

ACTIVATION_COPIES = 16
RUNTIME_RAM = 48 * 2**20
TEXT_TOKENS = 512  # a transformer family's text tokens in the joint sequence (T5's longest; SD3: 77 + 256)
DEFAULT_VAE_WIDTH = 128  # every SD/SDXL/SD3/Flux VAE decoder's full-resolution width
DEFAULT_DENOISER_WIDTH = 320  # SD 1.x's first UNet block, when no config says otherwise
DEFAULT_VAE_SCALE = 8

# safetensors dtype names -> (bytes per element as stored, whether it is a floating-point type that loads as the compute dtype)
SAFETENSORS_DTYPES = {
    "F64": (8, True), "F32": (4, True), "F16": (2, True), "BF16": (2, True), "F8_E4M3": (1, True), "F8_E5M2": (1, True),
    "I64": (8, False), "I32": (4, False), "I16": (2, False), "I8": (1, False), "U8": (1, False), "BOOL": (1, False),
}

# Where a component's weights are while a job runs.
GPU, CPU = "gpu", "cpu"
CPU_MOVED_WHOLE = "cpu, moved to the gpu while it runs"
CPU_STREAMED = "cpu, streamed to the gpu layer by layer"
DENOISER, TEXT_ENCODER, VAE = "denoiser", "text encoder", "vae"


@dataclass(frozen=True)
class MemoryMode:
    """One way of placing a model's parts, declared once: the CLI flag, the placement and the README read it."""

    name: str
    flag: str  # the command-line flag that picks it ("" for the default)
    help: str
    places: dict[str, str]  # role -> where it lives on a CUDA device


MEMORY_MODES: tuple[MemoryMode, ...] = (
    MemoryMode("normal", "", "every part on the GPU", {DENOISER: GPU, TEXT_ENCODER: GPU, VAE: GPU}),
    MemoryMode("cpu-text-encoders", "--cpu-text-encoders",
               "GPU: text encoders stay on the CPU, denoiser and VAE on the GPU (Forge's split; T5 alone can be 9 GB)",
               {DENOISER: GPU, TEXT_ENCODER: CPU, VAE: GPU}),
    MemoryMode("medvram", "--medvram", "GPU: each part moves to the GPU only while it runs (diffusers' model CPU offload)",
               {DENOISER: CPU_MOVED_WHOLE, TEXT_ENCODER: CPU_MOVED_WHOLE, VAE: CPU_MOVED_WHOLE}),
    MemoryMode("lowvram", "--lowvram", "GPU: weights stream to the GPU layer by layer (sequential CPU offload; slowest)",
               {DENOISER: CPU_STREAMED, TEXT_ENCODER: CPU_STREAMED, VAE: CPU_STREAMED}),
)
MODES_BY_NAME = {mode.name: mode for mode in MEMORY_MODES}


def role_of(component: str) -> str:
    if component in ("unet", "transformer"):
        return DENOISER
    if component.startswith("text_encoder"):
        return TEXT_ENCODER
    return VAE


def placement(mode: str, device: torch.device | str) -> dict[str, str]:
    """role -> where its weights live for ``mode`` on ``device``; off CUDA every mode keeps everything in RAM
    (the offload hooks only move weights to a CUDA device)."""
    if torch.device(device).type != "cuda":
        return {DENOISER: CPU, TEXT_ENCODER: CPU, VAE: CPU}
    return dict(MODES_BY_NAME[mode].places)


# -- reading the files ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSizes:
    """One weight file's tensors, as sizes: what they take at the compute dtype, and their largest layer's share."""

    total: int
    largest_layer: int

    def __add__(self, other: "TensorSizes") -> "TensorSizes":
        return TensorSizes(self.total + other.total, max(self.largest_layer, other.largest_layer))


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON); no tensor is read."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 100 * 2**20:
            raise ValueError(f"{path.name}: a safetensors header of {length} bytes is not plausible")
        return json.loads(handle.read(length))


def _sizes(entries: Iterable[tuple[str, str, list[int]]], compute_bytes: int) -> dict[str, TensorSizes]:
    """Per key prefix group ("" here: the caller splits), the sizes of (name, dtype, shape) entries."""
    total = 0
    layers: dict[str, int] = {}
    for name, dtype, shape in entries:
        stored, floating = SAFETENSORS_DTYPES.get(dtype, (4, True))
        count = 1
        for dim in shape:
            count *= int(dim)
        size = count * (compute_bytes if floating else stored)
        total += size
        layer = name.rsplit(".", 1)[0]
        layers[layer] = layers.get(layer, 0) + size
    return {"": TensorSizes(total, max(layers.values(), default=0))}


def file_tensor_sizes(path: Path, compute_bytes: int, split: Callable[[str], str] | None = None) -> dict[str, TensorSizes]:
    """The tensors of one weight file, grouped by ``split(name)`` (one group "" without it)."""
    if path.suffix.lower() == ".gguf":
        return {"": TensorSizes(path.stat().st_size, _gguf_largest(path))}
    header = safetensors_header(path)
    groups: dict[str, list[tuple[str, str, list[int]]]] = {}
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        group = split(name) if split else ""
        if group is None:
            continue
        groups.setdefault(group, []).append((name, str(info.get("dtype")), info.get("shape", [])))
    return {group: _sizes(items, compute_bytes)[""] for group, items in groups.items()}


def _gguf_largest(path: Path) -> int:
    """The largest tensor of a GGUF file, as stored (quantized); its file size when the reader cannot say."""
    try:
        from gguf import GGUFReader

        return max(int(tensor.n_bytes) for tensor in GGUFReader(str(path)).tensors)
    except Exception:  # noqa: BLE001 - an unreadable GGUF is the loader's to report; the estimate stays conservative
        return path.stat().st_size


# Original-layout (CompVis/SGM/SD3) single files: key prefix -> component. Keys matching none belong to the denoiser
# (a Flux or Z-Image transformer-only file has bare keys).
SINGLE_FILE_PREFIXES = (
    ("model_ema.", None),  # EMA copies some SD 1.x files carry; diffusers does not load them
    ("first_stage_model.", "vae"), ("vae.", "vae"),
    ("cond_stage_model.", "text_encoder"), ("conditioner.embedders.0.", "text_encoder"),
    ("conditioner.embedders.1.", "text_encoder_2"),
    ("text_encoders.clip_l.", "text_encoder"), ("text_encoders.clip_g.", "text_encoder_2"),
    ("text_encoders.t5xxl.", "text_encoder_3"),
)


def single_file_component(key: str) -> str | None:
    for prefix, component in SINGLE_FILE_PREFIXES:
        if key.startswith(prefix):
            return component
    return "denoiser"


def _component_weight_files(folder: Path) -> list[Path]:
    """The files diffusers loads for one component folder: the shards its index lists, else its unsuffixed
    ``*.safetensors`` (a folder may also hold ``.fp16`` variants, which are not loaded), else a GGUF file."""
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            return [folder / Path(shard).name for shard in shards]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    plain = [path for path in sorted(folder.glob("*.safetensors")) if path.stem.count(".") == 0]
    return plain or sorted(folder.glob("*.safetensors"))[:1] or sorted(folder.glob("*.gguf"))[:1]


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        return config if isinstance(config, dict) else {}
    except (OSError, ValueError):
        return {}


# -- the estimate ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComponentMemory:
    name: str  # the pipeline's attribute: unet, transformer, text_encoder_2, vae...
    role: str  # DENOISER, TEXT_ENCODER or VAE
    weight_bytes: int
    activation_bytes: int  # its working set at the chosen size (0 for text encoders: 77–512 tokens are negligible)
    largest_layer_bytes: int  # what sequential offload holds on the GPU at once
    place: str


@dataclass(frozen=True)
class MemoryEstimate:
    model: str
    mode: str
    device: str
    dtype: str
    width: int
    height: int
    batch: int
    components: tuple[ComponentMemory, ...]
    ram_bytes: int  # peak RAM: every weight passes through RAM while loading, plus the runtime, plus CPU-side activations
    gpu_bytes: int  # peak GPU memory (0 off CUDA)

    @property
    def weight_bytes(self) -> int:
        return sum(component.weight_bytes for component in self.components)

    @property
    def activation_bytes(self) -> int:
        return max((component.activation_bytes for component in self.components), default=0)

    def summary(self) -> str:
        """One line for the artist: the need on each memory, then each part's share."""
        parts = ", ".join(f"{c.name} {format_bytes(c.weight_bytes)} ({c.place})" for c in self.components)
        need = f"RAM {format_bytes(self.ram_bytes)}"
        if self.gpu_bytes:
            need = f"GPU {format_bytes(self.gpu_bytes)}, " + need
        return (f"needs {need} at {self.width}×{self.height} in {self.dtype} ({self.mode}): weights {parts}; "
                f"activations {format_bytes(self.activation_bytes)}")

    def as_dict(self) -> dict:
        data = asdict(self)
        data["components"] = [asdict(component) for component in self.components]
        return data


def format_bytes(count: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _denoiser_activation(config: dict, latent_h: int, latent_w: int, rows: int, compute_bytes: int) -> int:
    """``ACTIVATION_COPIES × rows × tokens × width × bytes`` (see the module docstring)."""
    if "block_out_channels" in config:  # a UNet: its first level runs at the latent's full size
        width = int(config["block_out_channels"][0])
        tokens = latent_h * latent_w
    else:
        heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim")
        width = int(heads * head_dim) if isinstance(heads, int) and isinstance(head_dim, int) else int(
            config.get("dim") or config.get("hidden_size") or 3072)
        tokens = (latent_h // 2) * (latent_w // 2) + TEXT_TOKENS
    return ACTIVATION_COPIES * rows * tokens * width * compute_bytes


def _vae_activation(config: dict, width: int, height: int, batch: int, compute_bytes: int) -> int:
    channels = int((config.get("block_out_channels") or [DEFAULT_VAE_WIDTH])[0])
    return ACTIVATION_COPIES * batch * channels * width * height * compute_bytes


def estimate_components(weights: dict[str, TensorSizes], configs: dict[str, dict], width: int, height: int, batch: int,
                        compute_bytes: int, places: dict[str, str]) -> tuple[ComponentMemory, ...]:
    """Each component's share, from its weight sizes and its config (``configs``: component -> config.json)."""
    vae_config = configs.get("vae", {})
    scale = 2 ** (len(vae_config["block_out_channels"]) - 1) if vae_config.get("block_out_channels") else DEFAULT_VAE_SCALE
    components = []
    for name, sizes in weights.items():
        role = role_of(name)
        activation = 0
        if role == DENOISER:
            config = configs.get(name) or {"block_out_channels": [DEFAULT_DENOISER_WIDTH]}
            activation = _denoiser_activation(config, height // scale, width // scale, 2 * batch, compute_bytes)
        elif role == VAE:
            activation = _vae_activation(vae_config, width, height, batch, compute_bytes)
        components.append(ComponentMemory(name, role, sizes.total, activation, sizes.largest_layer, places[role]))
    order = {DENOISER: 0, TEXT_ENCODER: 1, VAE: 2}
    return tuple(sorted(components, key=lambda c: (order[c.role], c.name)))


def peaks(components: tuple[ComponentMemory, ...], device: torch.device | str) -> tuple[int, int]:
    """(peak RAM, peak GPU) for components placed as their ``place`` says.

    RAM: every weight passes through RAM while loading (diffusers builds the pipeline on the CPU first), so RAM
    holds at least all weights; on the CPU the activations come on top. GPU: what stays there, plus the largest of
    what moves there while it runs (a whole component, or one layer), plus the larger stage's activations.
    """
    weights = sum(c.weight_bytes for c in components)
    activation = max((c.activation_bytes for c in components), default=0)
    if torch.device(device).type != "cuda":
        return weights + activation + RUNTIME_RAM, 0
    resident = sum(c.weight_bytes for c in components if c.place == GPU)
    visiting = max([c.weight_bytes + c.activation_bytes - activation for c in components if c.place == CPU_MOVED_WHOLE]
                   + [c.largest_layer_bytes for c in components if c.place == CPU_STREAMED] + [0])
    gpu_used = any(c.place != CPU for c in components)
    return weights + RUNTIME_RAM, (resident + max(visiting, 0) + activation) if gpu_used else 0


def model_files(path: Path, kind: str, compute_bytes: int) -> tuple[dict[str, TensorSizes], dict[str, dict]]:
    """(component -> weight sizes, component -> config) of a diffusers folder or a single file."""
    weights: dict[str, TensorSizes] = {}
    configs: dict[str, dict] = {}
    if kind == "diffusers":
        index = _read_config(path / "model_index.json")
        for component, value in index.items():
            if component.startswith("_") or not isinstance(value, list) or not value or value[0] is None:
                continue
            if role_of(component) == VAE and component != "vae":
                continue  # tokenizers, schedulers, safety checkers: no weights that load
            files = _component_weight_files(path / component)
            if not files:
                continue
            sizes = TensorSizes(0, 0)
            for file in files:
                sizes = sizes + file_tensor_sizes(file, compute_bytes)[""]
            weights[component] = sizes
            configs[component] = _read_config(path / component / "config.json")
        return weights, configs
    if path.suffix.lower() == ".gguf":
        return {"transformer": file_tensor_sizes(path, compute_bytes)[""]}, {}
    for component, sizes in file_tensor_sizes(path, compute_bytes, single_file_component).items():
        weights["transformer" if component == "denoiser" else component] = sizes
    beside = path.with_suffix(".config")
    for component in weights:
        for folder in (beside, *_shipped_config_folders(path)):
            name = "unet" if component == "transformer" and (folder / "unet").is_dir() else component
            if (folder / name / "config.json").is_file():
                configs[component] = _read_config(folder / name / "config.json")
                break
    return weights, configs


def _shipped_config_folders(path: Path) -> list[Path]:
    """The shipped config folder of the single file's family (engine/configs/<family>), when its keys tell it."""
    from . import families

    try:
        keys = [key for key in safetensors_header(path) if key != "__metadata__"]
        return [families.detect_checkpoint(keys).config_folder]
    except (OSError, ValueError):  # not a layout with a shipped config: the defaults stand in
        return []


def estimate_model_memory(path: Path, kind: str, dtype: torch.dtype, device: torch.device | str, mode: str = "normal",
                          width: int = 1024, height: int = 1024, batch: int = 1, name: str = "") -> MemoryEstimate:
    """What loading the model at ``path`` (a diffusers folder, or a single file) and drawing one batch of
    ``width``×``height`` needs, in ``dtype``, on ``device``, placed by memory ``mode`` (the module docstring gives the
    formula). Reads only file headers and configs."""
    if mode not in MODES_BY_NAME:
        raise ValueError(f"memory mode must be one of {', '.join(MODES_BY_NAME)}")
    compute_bytes = dtype_bytes(dtype)
    weights, configs = model_files(Path(path), kind, compute_bytes)
    # The UNet's first-level name when the file is a single-file UNet checkpoint.
    if "transformer" in weights and "block_out_channels" in configs.get("transformer", {}):
        weights["unet"] = weights.pop("transformer")
        configs["unet"] = configs.pop("transformer")
    components = estimate_components(weights, configs, width, height, batch, compute_bytes, placement(mode, device))
    ram, gpu = peaks(components, device)
    return MemoryEstimate(name or Path(path).stem, mode, torch.device(device).type, str(dtype).removeprefix("torch."),
                          width, height, batch, components, ram, gpu)


# -- what is free, and the refusal ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FreeMemory:
    ram_bytes: int
    gpu_bytes: int | None = None  # None off CUDA


def free_memory(device: torch.device | str) -> FreeMemory:
    """What the machine has free now: available RAM (psutil) and, on CUDA, the device's free memory."""
    import psutil

    ram = int(psutil.virtual_memory().available)
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return FreeMemory(ram, int(free))
    return FreeMemory(ram)


def fits(estimate: MemoryEstimate, free: FreeMemory) -> bool:
    return estimate.ram_bytes <= free.ram_bytes and (free.gpu_bytes is None or estimate.gpu_bytes <= free.gpu_bytes)


def shortfall_message(estimate: MemoryEstimate, free: FreeMemory, alternatives: Iterable[MemoryEstimate] = ()) -> str:
    """The refusal: the model, what it needs, what is free, and which memory mode would fit (if one does)."""
    free_text = f"RAM {format_bytes(free.ram_bytes)}"
    if free.gpu_bytes is not None:
        free_text = f"GPU {format_bytes(free.gpu_bytes)}, " + free_text
    fitting = next((alternative for alternative in alternatives if fits(alternative, free)), None)
    if fitting is not None:
        mode = MODES_BY_NAME[fitting.mode]
        advice = f"start with {mode.flag} ({mode.help}; it needs {_need(fitting)})"
    else:
        advice = "no memory mode fits: try a smaller size or batch, or close other programs"
    return (f"not enough memory for {estimate.model}: it {estimate.summary()}; free: {free_text}. {advice}. "
            "The memory check can be turned off in Settings or with --skip-memory-check.")


def _need(estimate: MemoryEstimate) -> str:
    need = f"RAM {format_bytes(estimate.ram_bytes)}"
    return (f"GPU {format_bytes(estimate.gpu_bytes)}, " + need) if estimate.gpu_bytes else need
