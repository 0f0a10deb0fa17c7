"""A diffusers UNet seen the way A1111's samplers see an LDM/SGM model, and A1111's CFG denoisers.

``LatentModel`` exposes what k-diffusion's ``CompVisDenoiser`` / ``CompVisVDenoiser`` read from an LDM
model: ``alphas_cumprod``, ``parameterization`` and ``apply_model(x, t, cond)`` with a fractional t.
``cond`` is a dict: ``crossattn`` (text hidden states) and, for SDXL, ``vector`` = (pooled text
embedding, size/crop/target ids), the two parts of SGM's "vector" conditioning that diffusers' UNet
embeds itself.

CFG (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance") as A1111 combines it: cond and uncond
run as one batch, cond first, and the guided output is uncond + (cond − uncond)·scale.
"""
from __future__ import annotations

import torch

from .ref_noise_table import table_for


class LatentModel:
    """``apply_model(x, t, cond)`` over a diffusers ``UNet2DConditionModel``."""

    def __init__(self, unet, scheduler_config, calls: list | None = None):
        self.unet = unet
        self.alphas_cumprod = table_for(scheduler_config)
        prediction = scheduler_config.get("prediction_type", "epsilon")
        self.parameterization = "v" if prediction == "v_prediction" else "eps"
        self.calls = calls if calls is not None else []  # every timestep the UNet was given, for tests

    @torch.no_grad()
    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        self.calls.append(t.detach().clone())
        dtype = next(self.unet.parameters()).dtype
        added = None
        if cond.get("vector") is not None:
            pooled, time_ids = cond["vector"]
            added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}
        out = self.unet(x.to(dtype), t, encoder_hidden_states=cond["crossattn"].to(dtype), added_cond_kwargs=added,
                        return_dict=False)[0]
        return out.float()


def _cat_conds(first: dict, second: dict) -> dict:
    joined = {"crossattn": torch.cat([first["crossattn"], second["crossattn"]])}
    if first.get("vector") is not None:
        joined["vector"] = tuple(torch.cat([a, b]) for a, b in zip(first["vector"], second["vector"]))
    return joined


class CFGDenoiser:
    """A1111's CFG over k-diffusion's σ-space denoiser: x̂₀ = D_u + (D_c − D_u)·scale."""

    def __init__(self, inner, cond: dict, uncond: dict, scale: float):
        self.inner, self.cond, self.uncond, self.scale = inner, cond, uncond, scale

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
        batch = x.shape[0]
        out = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=_cat_conds(self.cond, self.uncond))
        uncond = out[batch:]
        return uncond + (out[:batch] - uncond) * self.scale


class TimestepsEps:
    """A1111's ``CompVisTimestepsDenoiser`` / ``...VDenoiser``: the UNet at integer-or-fractional t, as ε.

    For a v model ε = √ᾱ_t·v + √(1−ᾱ_t)·x with ᾱ read at int(t) (truncation), as A1111 does.
    """

    def __init__(self, model: LatentModel):
        self.inner_model = model

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        out = self.inner_model.apply_model(x, t, cond)
        if self.inner_model.parameterization != "v":
            return out
        table = self.inner_model.alphas_cumprod
        index = t.to(torch.int)
        return torch.sqrt(table)[index, None, None, None] * out + torch.sqrt(1 - table)[index, None, None, None] * x


class CFGTimesteps:
    """CFG over ε for A1111's timestep samplers; remembers ε_uncond and scales CFG for DDIM CFG++."""

    def __init__(self, inner: TimestepsEps, cond: dict, uncond: dict, scale: float):
        self.inner, self.cond, self.uncond, self.scale = inner, cond, uncond, scale
        self.scale_multiplier = 1.0
        self.last_noise_uncond: torch.Tensor | None = None

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.inner.inner_model.alphas_cumprod

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        out = self.inner(torch.cat([x, x]), torch.cat([t, t]), cond=_cat_conds(self.cond, self.uncond))
        uncond = out[batch:]
        self.last_noise_uncond = uncond.clone()
        return uncond + (out[:batch] - uncond) * (self.scale * self.scale_multiplier)
