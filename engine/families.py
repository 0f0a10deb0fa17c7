"""Per-model-family constants, kept in one small object per family.

Like ComfyUI's latent formats: the rest of the engine asks the family for its
preview factors, native size and limits instead of testing the model's name.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ModelFamily:
    name: str
    native_size: tuple[int, int]
    latent_rgb_factors: tuple[tuple[float, float, float], ...]
    latent_rgb_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    is_xl: bool = False
    min_size: int = 64
    max_size: int = 2048

    def latent_to_rgb_matrix(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.latent_rgb_factors, dtype=torch.float32), torch.tensor(self.latent_rgb_bias, dtype=torch.float32)


SD1 = ModelFamily(
    "sd1",
    native_size=(512, 512),
    latent_rgb_factors=((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177)),
)
SD2 = ModelFamily("sd2", native_size=(768, 768), latent_rgb_factors=SD1.latent_rgb_factors)
SDXL = ModelFamily(
    "sdxl",
    native_size=(1024, 1024),
    latent_rgb_factors=((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
    latent_rgb_bias=(0.1084, -0.0175, -0.0011),
    is_xl=True,
    max_size=4096,
)

FAMILY_FILE = "sfumato.json"


def family_from_file(path: Path, base: ModelFamily) -> ModelFamily:
    """A family described by a model's own ``sfumato.json`` (the demo model ships one)."""
    data = json.loads(path.read_text())
    width = int(data.get("native_width", base.native_size[0]))
    height = int(data.get("native_height", base.native_size[1]))
    return ModelFamily(
        name=str(data.get("family", base.name)),
        native_size=(width, height),
        latent_rgb_factors=tuple(tuple(float(v) for v in row) for row in data.get("latent_rgb_factors", base.latent_rgb_factors)),
        latent_rgb_bias=tuple(float(v) for v in data.get("latent_rgb_bias", base.latent_rgb_bias)),
        is_xl=base.is_xl,
        min_size=min(base.min_size, width, height),
        max_size=base.max_size,
    )


def detect_family(unet_config: dict, folder: Path | None = None) -> ModelFamily:
    """Tell SD 1.x, SD 2.x and SDXL apart from the UNet config; honour a shipped sfumato.json."""
    if unet_config.get("addition_embed_type") == "text_time":
        base = SDXL
    elif unet_config.get("cross_attention_dim") == 1024:
        base = SD2
    else:
        base = SD1
    if folder is not None and (folder / FAMILY_FILE).is_file():
        return family_from_file(folder / FAMILY_FILE, base)
    return base
