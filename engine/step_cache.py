"""First block cache: an opt-in speed-up for the flow transformers that changes pixels.

Every step runs the transformer's first block and measures how far its output moved since the last step that ran
every block: the mean absolute change of the block's residual, relative to that residual's mean. Below the
threshold the step skips the other blocks and adds again the change they made the last time they ran. Late steps,
which change the picture little, are the ones skipped, so a higher threshold skips more and changes more.
diffusers' ``apply_first_block_cache`` does the work (ParaAttention's First Block Cache, which builds on TeaCache),
the same hooks diffusers' own ``enable_cache`` puts on a Flux transformer; ``tests/test_step_cache.py`` holds the
engine's call to that. It is off (0) by default, and the exact path never runs this code.

The hooks are put on the pass's model when the pass's call is made and taken off when the pass ends, leaving each
block as it was (so the exact path is traced again afterwards). SD 3.5's last block writes no text tokens, which
diffusers' cache cannot carry over, so there it always runs. The families it works on carry the ``BLOCK_CACHE``
trait (``engine.fields``): SD 3.5 and Flux.1.
"""
from __future__ import annotations

from typing import Callable

import torch
from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
from diffusers.models.cache_utils import CacheMixin

# The transformers' lists of blocks, in the order they run (Flux.1's double then single blocks).
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


class CachedBlocksCall:
    """A flow family's model call (``Family.model_call``) with first block cache at ``threshold`` for one sample pass;
    ``close`` takes the hooks off again."""

    def __init__(self, call: Callable, transformer: torch.nn.Module, threshold: float):
        self.call = call
        self.blocks = _cached_blocks(transformer)
        apply_first_block_cache(self.blocks, FirstBlockCacheConfig(threshold=threshold))

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, **kwargs):
        # diffusers keeps the cache's state per named context; one call per step holds cond and uncond together.
        with CacheMixin.cache_context(self.blocks, "denoise"):
            return self.call(x, timestep, **kwargs)

    def close(self) -> None:
        registry = HookRegistry.check_if_exists_or_initialize(self.blocks)
        for name in (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK):
            registry.remove_hook(name, recurse=True)
        for block in self.blocks.modules():
            if block is self.blocks:
                continue
            # Taking the hooks off leaves the block's own forward bound on the instance, and its hook registry;
            # without them the block is as it was, so the exact path can be traced again.
            forward = block.__dict__.get("forward")
            if forward is not None and getattr(forward, "__func__", None) is type(block).forward:
                del block.__dict__["forward"]
            block.__dict__.pop("_diffusers_hook", None)


def applies(transformer: torch.nn.Module) -> bool:
    """Whether the cache can skip anything: it needs a first block and at least one more of its own."""
    return sum(len(blocks) for blocks in _cached_blocks(transformer).children()) >= 2


def _cached_blocks(transformer: torch.nn.Module) -> torch.nn.Module:
    """A module holding the transformer's blocks (the same objects) that the cache may skip: every block list, less
    a last block that writes no text tokens (SD 3.5's ``context_pre_only``)."""
    holder = torch.nn.Module()
    lists = [(name, list(child)) for name, child in transformer.named_children()
             if name in BLOCK_LISTS and isinstance(child, torch.nn.ModuleList) and len(child)]
    if lists and getattr(lists[-1][1][-1], "context_pre_only", False):
        lists[-1] = (lists[-1][0], lists[-1][1][:-1])
    for name, blocks in lists:
        holder.add_module(name, torch.nn.ModuleList(blocks))
    return holder
