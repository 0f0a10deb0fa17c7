"""Token merging (ToMe for SD, A1111's "Token merging ratio"): an opt-in speed-up that changes pixels.

Before each full-resolution self-attention of a UNet, the most alike tokens are averaged into one (bipartite soft
matching, from the ``tomesd`` library), attention runs on the tokens left, and its output is copied back to every
token that was merged. At ratio r self-attention sees (1 − r) of the tokens, so it costs about (1 − r)² as much: on a
large picture that is most of a step. The picture changes (``bench speed`` reports its PSNR against the exact
one), so it is off (0) by default, and the exact path never runs this code.

It is applied as A1111 applies tomesd (``use_rand=False``, merging for self-attention only, ``max_downsample=1``,
2×2 strides), so an A1111 infotext with "Token merging ratio" draws A1111's picture: the matching is computed from
each transformer block's input, only in blocks at the latent's full resolution, with the top-left token of every
2×2 cell as a merge target. SDXL's UNet has no attention at full resolution, so there, as in A1111, it changes
nothing. The flow transformers ignore it (``Field.only_for``).

Instead of swapping the blocks' classes (tomesd's way, which replaces diffusers' block ``forward`` with an older
copy of it), hooks around each block's ``attn1`` do the merging for the length of one model call.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from tomesd.merge import bipartite_soft_matching_random2d

from .fields import FIELDS

STRIDE = 2  # one merge target per 2×2 cell (tomesd's sx, sy)
MAX_DOWNSAMPLE = 1  # only blocks at the latent's full resolution (tomesd's default, which A1111 keeps)


def pass_ratio(request, family_traits: frozenset[str], second_pass: bool = False) -> float:
    """The share of tokens a sample pass merges, as A1111 resolves it (hires fix's second pass: its own ratio, else
    the first pass's); 0 for a model that ignores token merging."""
    first = FIELDS["token_merging_ratio"].value_for(request, family_traits)
    return (second_pass and FIELDS["token_merging_ratio_hr"].value_for(request, family_traits)) or first


class MergedTokensCall:
    """A UNet-style model call (``Family.model_call``) whose full-resolution self-attention merges ``ratio`` of its
    tokens."""

    def __init__(self, call: Callable, unet: torch.nn.Module, ratio: float):
        self.call, self.ratio = call, ratio
        self.blocks = [module for module in unet.modules() if type(module).__name__ == "BasicTransformerBlock"]

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, **kwargs):
        with _merging(self.blocks, self.ratio, x.shape[-2], x.shape[-1]):
            return self.call(x, timestep, **kwargs)


def _merge_functions(hidden: torch.Tensor, ratio: float, latent_height: int, latent_width: int):
    """tomesd's merge and unmerge for one block's input ``hidden`` (batch, tokens, channels); None where the block
    works below full resolution or nothing is merged."""
    tokens = hidden.shape[1]
    downsample = math.ceil(math.sqrt(latent_height * latent_width // tokens))
    merged = int(tokens * ratio)
    if downsample > MAX_DOWNSAMPLE or merged <= 0:
        return None
    width, height = math.ceil(latent_width / downsample), math.ceil(latent_height / downsample)
    return bipartite_soft_matching_random2d(hidden, width, height, STRIDE, STRIDE, merged, no_rand=True)


@contextmanager
def _merging(blocks: list[torch.nn.Module], ratio: float, latent_height: int, latent_width: int) -> Iterator[None]:
    handles = []
    try:
        for block in blocks:
            handles += _hook_block(block, ratio, latent_height, latent_width)
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hook_block(block: torch.nn.Module, ratio: float, latent_height: int, latent_width: int) -> list:
    current: list = [None]  # the (merge, unmerge) of the block's present input

    def before_block(_block, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        current[0] = _merge_functions(hidden, ratio, latent_height, latent_width)

    def before_attention(_attention, args, kwargs):
        if current[0] is None:
            return None
        if args:
            return (current[0][0](args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": current[0][0](kwargs["hidden_states"])}

    def after_attention(_attention, _args, output):
        return output if current[0] is None else current[0][1](output)

    return [block.register_forward_pre_hook(before_block, with_kwargs=True),
            block.attn1.register_forward_pre_hook(before_attention, with_kwargs=True),
            block.attn1.register_forward_hook(after_attention)]
