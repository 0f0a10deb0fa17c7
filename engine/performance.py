"""Device-aware speed and memory options, applied to a pipeline once when it loads.

Each option is a named entry with the devices it helps on and why it is off
elsewhere, so ``--help`` and the README can say why an option is left off.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_calls import call_processors_directly

MEMORY_MODES = ("normal", "medvram", "lowvram")


@dataclass(frozen=True)
class PerformanceOptions:
    memory_mode: str = "normal"  # A1111's names: medvram = model CPU offload, lowvram = sequential offload
    vae_tiling: bool = False
    channels_last: bool | None = None  # None: on where it helps (CUDA)
    compile: bool = False

    def __post_init__(self) -> None:
        if self.memory_mode not in MEMORY_MODES:
            raise ValueError(f"memory mode must be one of {', '.join(MEMORY_MODES)}")


# Why an option is off by default, shown in the README's performance notes.
WHY_OFF = {
    "channels_last on CPU": "no gain measured for these convolution sizes with oneDNN; it only reorders memory",
    "fp16/bf16 on CPU": "CPU half-precision convolutions are slower than float32 and change the pixels",
    "torch.compile": "compilation takes minutes on first use and recompiles per image size; opt in with --compile",
    "VAE tiling": "tiles change pixels near seams; opt in with --vae-tiling for very large images on small GPUs",
    "model CPU offload": "trades speed for memory; opt in with --medvram / --lowvram on small GPUs",
}


def apply(pipeline, device: torch.device, options: PerformanceOptions) -> None:
    """Apply the options to a freshly loaded pipeline (already moved to ``device`` unless offloading)."""
    # Always on, and first: offload hooks and torch.compile then wrap the patched layers.
    denoiser = "unet" if getattr(pipeline, "unet", None) is not None else "transformer"  # the flow families' is a transformer
    for component in (getattr(pipeline, denoiser), pipeline.vae):
        call_processors_directly(component)
    channels_last = options.channels_last if options.channels_last is not None else device.type == "cuda"
    if channels_last and denoiser == "unet":  # a transformer has no convolutions to reorder
        pipeline.unet.to(memory_format=torch.channels_last)
    if options.vae_tiling:
        pipeline.vae.enable_tiling()
    if options.memory_mode == "medvram" and device.type == "cuda":
        pipeline.enable_model_cpu_offload(device=device)
    elif options.memory_mode == "lowvram" and device.type == "cuda":
        pipeline.enable_sequential_cpu_offload(device=device)
    if options.compile:
        setattr(pipeline, denoiser, torch.compile(getattr(pipeline, denoiser)))
