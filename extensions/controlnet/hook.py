"""The per-step hook: run each active ControlNet and hand its residuals to the UNet.

For every unit that is enabled, has weight > 0 and whose guidance window
covers the model call (keyed by the fraction of the schedule done at the call's
σ, so both calls of a second-order step agree with σ), the ControlNet runs on the same scaled latents, timestep and
text embeddings as the UNet (only the first 4 channels for 9-channel inpainting
UNets; SDXL's added conditioning passed through). Residuals of several units
are summed. Control modes follow sd-webui-controlnet (``scripts/hook.py``):

- Balanced: every residual × weight;
- My prompt is more important: residual i × weight × 0.825 ** (12 - i)
  ("soft injection": shallow layers weaker, the middle block at full weight);
- ControlNet is more important: soft injection, and control only on the
  conditional half of the CFG batch (the unconditional half gets none), so
  guidance pushes towards the control.

A unit that does nothing (off, weight 0, window outside the run) is dropped
before anything is loaded, and a step where no unit is active returns no
kwargs at all: the UNet call is then exactly the one without ControlNet.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from engine.errors import ValidationError
from engine.models import BUILTIN_DIR, REPO_ROOT

from . import maps, models, preprocessors
from .units import ControlNetUnit

SOFT_INJECTION_BASE = 0.825
SOFT_INJECTION_DEPTH = 12


def soft_injection_scales(count: int) -> list[float]:
    """sd-webui-controlnet's soft weights ``0.825 ** (12 - i)`` for the first ``count`` residuals (the last is the middle block)."""
    return [SOFT_INJECTION_BASE ** float(SOFT_INJECTION_DEPTH - i) for i in range(count)]


def step_window(start: float, end: float, total: int) -> tuple[int, int] | None:
    """First and last step index whose fraction ``i / total`` lies in [start, end] (sd-webui-controlnet's test); None if none."""
    steps = [index for index in range(total) if start <= index / total <= end]
    return (steps[0], steps[-1]) if steps else None


def in_window(start: float, end: float, fraction: float) -> bool:
    """sd-webui-controlnet's guidance test, on the fraction of the schedule done at the model call."""
    return start <= fraction <= end


@dataclass
class ActiveUnit:
    index: int
    unit: ControlNetUnit
    controlnet: torch.nn.Module
    control: torch.Tensor  # (1, 3, H, W) in [0, 1]
    do_cfg: bool  # the batch is [unconditional; conditional]
    _scales: list[float] | None = field(default=None, repr=False)

    def scales(self, count: int) -> list[float]:
        if self._scales is None or len(self._scales) != count:
            base = soft_injection_scales(count) if self.unit.soft_injection else [1.0] * count
            self._scales = [self.unit.weight * scale for scale in base]
        return self._scales


class ControlNetHook:
    """Implements ``engine.sampling.StepHook``."""

    def __init__(self, units: list[ActiveUnit]):
        self.units = units

    def unet_kwargs(self, point, latent_model_input: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    added_cond_kwargs: dict | None) -> dict:
        down_total: list[torch.Tensor] | None = None
        mid_total: torch.Tensor | None = None
        for active in self.units:
            if not in_window(active.unit.guidance_start, active.unit.guidance_end, point.fraction):
                continue
            down, mid = self._run(active, point.timestep, latent_model_input, encoder_hidden_states, added_cond_kwargs)
            if down_total is None:
                down_total, mid_total = list(down), mid
            else:
                down_total = [a + b for a, b in zip(down_total, down)]
                mid_total = mid_total + mid
        if down_total is None:
            return {}
        return {"down_block_additional_residuals": down_total, "mid_block_additional_residual": mid_total}

    @staticmethod
    def _run(active: ActiveUnit, timestep, sample, text, added) -> tuple[list[torch.Tensor], torch.Tensor]:
        controlnet = active.controlnet
        sample = sample[:, :controlnet.config.in_channels]  # 9-channel inpainting UNets: the latents only
        batch = sample.shape[0]
        # The CFG batch is [unconditional; conditional]. "ControlNet is more important" runs on the conditional half only.
        cond_only = active.unit.cfg_injection and active.do_cfg and batch % 2 == 0
        if cond_only:
            half = batch // 2
            sample, text = sample[half:], text[half:]
            timestep = timestep[half:] if timestep.ndim and timestep.shape[0] == batch else timestep
            added = {key: value[half:] for key, value in added.items()} if added else added
        control = active.control.expand(sample.shape[0], -1, -1, -1)
        # The family's extra UNet inputs (None for families with none): a ControlNet fits only its own family.
        down, mid = controlnet(sample, timestep, encoder_hidden_states=text, controlnet_cond=control, conditioning_scale=1.0,
                               return_dict=False, added_cond_kwargs=added)
        scales = active.scales(len(down) + 1)
        down = [residual * scale for residual, scale in zip(down, scales)]
        mid = mid * scales[-1]
        if cond_only:
            down = [torch.cat([torch.zeros_like(residual), residual]) for residual in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return down, mid


class ControlNetRuntime:
    """What the extension keeps while the app runs: where models are, loaded ControlNets, recent maps."""

    def __init__(self, models_dir: Path | None = REPO_ROOT / "models", builtin_dir: Path | None = BUILTIN_DIR, map_cache_size: int = 8):
        self.models_dir = models_dir
        self.builtin_dir = builtin_dir
        self.cache = models.ControlNetCache()
        self._maps: OrderedDict[tuple, Image.Image] = OrderedDict()
        self._map_cache_size = map_cache_size
        self._lock = threading.Lock()

    def configure(self, models_dir: Path | None, builtin_dir: Path | None) -> None:
        self.models_dir, self.builtin_dir = models_dir, builtin_dir
        self.cache.clear()

    def controlnets(self) -> dict[str, models.ControlNetEntry]:
        return models.find_controlnets(self.models_dir, self.builtin_dir)

    def control_map(self, unit: ControlNetUnit, image: Image.Image, width: int, height: int) -> Image.Image:
        """The unit's map, cached: on the CPU each image of a batch asks for it again."""
        digest = hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest()
        key = (digest, image.size, image.mode, unit.module, unit.processor_res, unit.pixel_perfect, unit.threshold_a,
               unit.threshold_b, unit.resize_mode, width, height, str(self.models_dir))
        with self._lock:
            if key in self._maps:
                self._maps.move_to_end(key)
                return self._maps[key]
        control = maps.control_map(unit, image, width, height, self.models_dir)
        with self._lock:
            self._maps[key] = control
            while len(self._maps) > self._map_cache_size:
                self._maps.popitem(last=False)
        return control

    def model_for(self, unit: ControlNetUnit, where: str, denoiser_config) -> models.ControlNetEntry:
        entries = self.controlnets()
        if unit.model is None:
            suggestions = [entry.name for entry in models.fitting(entries, denoiser_config)]
            raise ValidationError(f"{where}.model", "choose a ControlNet model"
                                  + (f"; these fit the current model: {', '.join(suggestions)}" if suggestions
                                     else f"; none is installed: put one in {Path(self.models_dir or 'models') / models.CONTROLNET_SUBDIR}"))
        entry = models.resolve(unit.model, entries)
        if entry is None:
            raise ValidationError(f"{where}.model", f"ControlNet {unit.model!r} not found; installed: {', '.join(entries) or 'none'}")
        if not models.fits(models.read_config(entry), denoiser_config):
            raise ValidationError(f"{where}.model", f"ControlNet {entry.name} was made for another kind of base model "
                                                    "(SD 1.x, SD 2.x, SDXL, SD 3.5 and Flux ControlNets do not mix)")
        return entry

    def step_hooks(self, context, units: list[ControlNetUnit]) -> list[ControlNetHook]:
        """The extension's ``step_hooks``: one hook for all units that do something in this run, or none."""
        from . import transformers

        total = len(context.sigmas) - 1
        model = context.model
        denoiser_config = model.denoising_model.config
        # A flow transformer's ControlNets run their own way (transformers); a UNet's run here.
        control = transformers.control_for(model.family.id) if model.family.denoiser != "unet" else None
        active: list[ActiveUnit] = []
        for index, unit in enumerate(units):
            if not unit.active:
                continue
            if step_window(unit.guidance_start, unit.guidance_end, total) is None:
                continue  # no step of this pass falls in the window
            where = f"units[{index}]"
            if model.family.denoiser != "unet" and control is None:
                raise ValidationError(f"{where}.model", f"ControlNet does not run on {model.family.title} models yet")
            entry = self.model_for(unit, where, denoiser_config)
            image = unit.image if unit.image is not None else context.source_image
            if unit.image is not None and context.crop_box is not None:
                # An image drawn for the whole picture: "Only masked" generates one region of it.
                image = maps.crop_to_region(unit.image, context.full_size, context.crop_box, unit.resize_mode)
            if image is None:
                raise ValidationError(f"{where}.image", "ControlNet needs a control image (txt2img has no source image to fall back on)")
            reason = preprocessors.why_unavailable(unit.module, self.models_dir)
            if reason:
                raise ValidationError(f"{where}.module", reason)
            control_map = self.control_map(unit, image, context.width, context.height)
            controlnet = self.cache.load(entry, model.device, model.dtype)
            control_tensor = maps.map_tensor(control_map, model.device, model.dtype)
            active.append(ActiveUnit(index, unit, controlnet, control_tensor, do_cfg=context.do_cfg))
        if control is not None:
            return transformers.transformer_hooks(context, control, active)
        return [ControlNetHook(active)] if active else []
