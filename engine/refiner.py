"""The refiner (A1111's "Refiner", made for SDXL's refiner checkpoint): another model takes over part way through a pass.

Facts followed (A1111 1.10, modules/sd_samplers_common.py ``apply_refiner``, asked before every model call):
- How far the pass is: the noise table's timestep t nearest the call's σ gives (999 − t) / 1000. (A1111's
  "switch by sampling steps" setting, off by default, is not offered.)
- Once that reaches ``refiner_switch_at``, the refiner checkpoint answers every later call of the pass, with the
  prompts encoded by its own text encoders.
- With hires fix, A1111's default (its ``hires_fix_refiner_pass`` setting, "second pass") refines only the second pass.
- Infotext: ``Refiner: <name> [<short hash>]`` and ``Refiner switch at: 0.8``, written once the refiner has taken over.
The refiner is loaded through the registry's cache, so a job after the first finds it loaded.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import torch

from .errors import ValidationError

_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]$")


def applies(request: Any) -> bool:
    return bool(request.refiner_checkpoint)


def checkpoint_name(title: str) -> str:
    """``name [hash]`` (A1111's checkpoint title, as its infotext writes it) → the name."""
    return _TITLE_HASH.sub("", title)


def check_compatible(base: Any, refiner: Any) -> None:
    """A refiner must sample the base's latents: the same latent format and the same UNet inputs."""
    def latent_format(model: Any) -> tuple:
        # the family's published constants and the loaded VAE's own scaling: both must agree
        latent = model.family.latent
        return latent.channels, latent.scaling_factor, latent.shift, model.scaling_factor

    if latent_format(base) != latent_format(refiner):
        raise ValidationError("refiner_checkpoint", f"{refiner.entry.name} works on another latent format than "
                                                    f"{base.entry.name} ({refiner.family.name} vs {base.family.name}); "
                                                    f"pick a refiner of the same family")
    if base.unet_in_channels != refiner.unet_in_channels:
        raise ValidationError("refiner_checkpoint", f"{refiner.entry.name}'s UNet takes {refiner.unet_in_channels} channels, "
                                                    f"{base.entry.name}'s {base.unet_in_channels}; an inpainting model "
                                                    f"needs an inpainting refiner")


def fraction_done(table_sigmas: torch.Tensor, sigma: torch.Tensor) -> float:
    """A1111's completed ratio: (999 − t) / 1000 for the table timestep t whose σ is nearest the largest σ of the call."""
    timestep = int(torch.argmin((table_sigmas.to(torch.float32) - sigma.max().float().cpu()).abs()))
    return (999 - timestep) / 1000


class RefinerSwitch:
    """``types.Denoiser``: the base model's denoiser until ``fraction_done`` reaches ``switch_at``, then the refiner's.

    ``make_refiner`` builds the refiner's denoiser when the switch comes (never, if it does not). ``switched_at``
    is how many model calls the base answered before the switch (None while it has not switched).
    """

    def __init__(self, base: Any, make_refiner: Callable[[], Any], switch_at: float, table_sigmas: torch.Tensor):
        self._base, self._make_refiner, self._switch_at = base, make_refiner, float(switch_at)
        self._table_sigmas = table_sigmas.detach().cpu()
        self._active = base
        self._calls = 0
        self.switched_at: int | None = None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.switched_at is None and fraction_done(self._table_sigmas, sigma) >= self._switch_at:
            refiner = self._make_refiner()
            refiner.hooks, refiner.schedule = self._base.hooks, self._base.schedule
            self._active, self.switched_at = refiner, self._calls
        self._calls += 1
        return self._active(x, sigma)

    # What samplers, the pass and the engine read or set on a denoiser, from or on the one answering now.
    @property
    def schedule(self) -> torch.Tensor | None:
        return self._active.schedule

    @schedule.setter
    def schedule(self, value: torch.Tensor | None) -> None:
        self._active.schedule = value

    @property
    def hooks(self) -> list:
        return self._active.hooks

    @hooks.setter
    def hooks(self, value: list) -> None:
        self._active.hooks = value

    @property
    def inpaint(self) -> Any:
        return self._active.inpaint

    @property
    def uncond_denoised(self) -> torch.Tensor | None:
        return self._active.uncond_denoised
