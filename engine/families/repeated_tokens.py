"""An MMDiT context ending in identical tokens, computed with one of them: SD 3.5 without T5.

With no T5 in an SD 3.5 model, diffusers (and so the engine, to draw diffusers' pictures) puts 256 zero tokens in
T5's place after the CLIP tokens. They enter the transformer identical and stay identical through every block:
context tokens carry no position, every block treats them alike (the same modulation, norms and MLP), and in joint
attention identical queries meet the same keys. Only the image tokens' output is read at the end. In attention, n
keys equal in key and value weigh exactly as one key whose logit is raised by ln n. So the transformer computes the
same function from the CLIP tokens plus ONE zero token with that bias on it, at a fraction of the cost where the
zeros are most of the tokens: on the 64² flow demo they are 256 of 336 (16 CLIP, 64 image), on a 1024² SD 3.5 picture
256 of 4,429. The flow demo was trained this way, with this processor (``training.demo_flow``).

The sums inside attention's softmax are taken over other terms, so the output differs from the 256-token call in the
last bits of a float; ``tests/test_repeated_tokens.py`` bounds the pixel difference against diffusers' pipeline.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

REPEATS_KEY = "last_token_repeats"  # the transformer's ``joint_attention_kwargs`` entry the processor reads


class RepeatedLastTokenAttention:
    """diffusers' ``JointAttnProcessor2_0``, the same ops in the same order, where the context's last token may
    stand for several identical ones: its attention logit is raised by ln of their count. The count is the call's
    ``last_token_repeats`` (the engine passes it through ``joint_attention_kwargs``), else the processor's own
    ``repeats`` (training sets it, for a model class that does not pass those kwargs on to its blocks). At 1 it is
    ``JointAttnProcessor2_0`` exactly; image-only attention (SD 3.5 Medium's second attention) is unchanged."""

    def __init__(self, repeats: int = 1):
        self.repeats = repeats

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, last_token_repeats: int | None = None, **kwargs):
        repeats = last_token_repeats or self.repeats
        residual = hidden_states
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        bias = None
        if encoder_hidden_states is not None:
            c_query = heads(attn.add_q_proj(encoder_hidden_states))
            c_key = heads(attn.add_k_proj(encoder_hidden_states))
            c_value = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                c_query = attn.norm_added_q(c_query)
            if attn.norm_added_k is not None:
                c_key = attn.norm_added_k(c_key)
            query = torch.cat([query, c_query], dim=2)
            key = torch.cat([key, c_key], dim=2)
            value = torch.cat([value, c_value], dim=2)
            if repeats > 1:
                bias = query.new_zeros((1, key.shape[2]))  # (queries, keys), broadcast over batch, heads and queries
                bias[:, -1] = math.log(repeats)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :residual.shape[1]], hidden_states[:, residual.shape[1]:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return (hidden_states, encoder_hidden_states) if encoder_hidden_states is not None else hidden_states


def install(transformer: torch.nn.Module) -> None:
    """Give every attention layer of an SD3 transformer ``RepeatedLastTokenAttention``, once; a later call keeps them
    (so the traced model call, keyed by the processors, is not made again)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    processors = transformer.attn_processors
    if all(isinstance(processor, RepeatedLastTokenAttention) and processor.repeats == 1 for processor in processors.values()):
        return
    if not all(type(processor) is JointAttnProcessor2_0 for processor in processors.values()):
        raise TypeError("not diffusers' joint attention processors")  # someone else's: the caller keeps the full context
    transformer.set_attn_processor(RepeatedLastTokenAttention())


def collapse(encoder_hidden_states: torch.Tensor, repeats: int) -> torch.Tensor:
    """The context with its last ``repeats`` tokens (identical) kept as one."""
    return encoder_hidden_states[:, : encoder_hidden_states.shape[1] - repeats + 1]
