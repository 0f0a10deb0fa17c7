"""Device-aware speed and memory options, applied to a pipeline once when it loads.

Each option is a named entry with the devices it helps on and why it is off
elsewhere, so ``--help`` and the README can say why an option is left off.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import traced_calls
from .attention_calls import call_processors_directly
from .memory import MEMORY_MODES as MODES
from .memory import placement, role_of

MEMORY_MODES = tuple(mode.name for mode in MODES)  # declared in engine.memory, with their flags and placements


@dataclass(frozen=True)
class PerformanceOptions:
    memory_mode: str = "normal"  # engine.memory.MEMORY_MODES: A1111's medvram/lowvram names, Forge's cpu-text-encoders
    memory_check: bool = True  # refuse a model whose estimate exceeds free memory (--skip-memory-check turns it off)
    vae_tiling: bool = False
    channels_last: bool | None = None  # None: on where it helps (CUDA)
    compile: bool = False
    # Replay the denoiser's call from a TorchScript trace per input shape (engine.traced_calls): the same kernels and
    # pixels without the Python between them. Off under torch.compile and the offload modes, where it cannot apply.
    trace_model_call: bool = True

    def __post_init__(self) -> None:
        if self.memory_mode not in MEMORY_MODES:
            raise ValueError(f"memory mode must be one of {', '.join(MEMORY_MODES)}")


# Why an option is off by default, shown in the README's performance notes.
WHY_OFF = {
    "channels_last on CPU": "no gain measured for these convolution sizes with oneDNN; it only reorders memory",
    "fp16/bf16 on CPU": "CPU half-precision convolutions are slower than float32 and change the pixels",
    "torch.compile": "compilation takes minutes on first use and recompiles per image size; opt in with --compile",
    "VAE tiling": "tiles change pixels near seams; opt in with --vae-tiling for very large images on small GPUs",
    "model CPU offload": "trades speed for memory; opt in with --cpu-text-encoders, --medvram or --lowvram on small GPUs",
}


def place(pipeline, device: torch.device, options: PerformanceOptions) -> None:
    """Move a freshly read pipeline (on the CPU) to where its memory mode keeps each part while jobs run.

    The offload modes leave everything on the CPU here: ``apply`` installs diffusers' hooks, which move each part
    (or layer) to the GPU when it runs. Text encoders on the CPU stay in the pipeline's dtype; their embeddings are
    moved to the device by the engine (``Engine._guided_denoiser``, ``ModelInputs.batched``).
    """
    places = placement(options.memory_mode, device)
    if options.memory_mode == "normal" or device.type != "cuda":
        pipeline.to(device)
        return
    if options.memory_mode != "cpu-text-encoders":
        return  # medvram / lowvram: the hooks move weights per call
    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module):
            component.to("cpu" if places[role_of(name)] == "cpu" else device)


def apply(pipeline, device: torch.device, options: PerformanceOptions, traceable: bool = True) -> None:
    """Apply the options to a freshly loaded pipeline (already moved to ``device`` unless offloading). ``traceable``:
    whether the model's family allows its denoiser call to be replayed from a trace (``Family.traceable_call``)."""
    # Always on, and first: offload hooks and torch.compile then wrap the patched layers.
    denoiser = "unet" if getattr(pipeline, "unet", None) is not None else "transformer"  # the flow families' is a transformer
    for component in (getattr(pipeline, denoiser), pipeline.vae):
        call_processors_directly(component)
    channels_last = options.channels_last if options.channels_last is not None else device.type == "cuda"
    if channels_last and denoiser == "unet":  # a transformer has no convolutions to reorder
        pipeline.unet.to(memory_format=torch.channels_last)
    if options.vae_tiling:
        pipeline.vae.enable_tiling()
    if options.memory_mode == "medvram" and device.type == "cuda":  # after place(): the pipeline is still on the CPU
        pipeline.enable_model_cpu_offload(device=device)
    elif options.memory_mode == "lowvram" and device.type == "cuda":
        pipeline.enable_sequential_cpu_offload(device=device)
    if options.compile:
        setattr(pipeline, denoiser, torch.compile(getattr(pipeline, denoiser)))
    elif traceable and options.trace_model_call and (options.memory_mode in ("normal", "cpu-text-encoders") or device.type != "cuda"):
        traced_calls.enable(getattr(pipeline, denoiser))
