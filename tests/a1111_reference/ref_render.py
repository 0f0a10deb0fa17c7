"""A1111 1.10's txt2img / img2img, from infotext parameters to PIL images, with "RNG: CPU".

The facts followed (read from A1111's modules/processing.py, rng.py, sd_samplers_kdiffusion.py,
sd_samplers_timesteps.py, sd_samplers_common.py, sd_schedulers.py; no code copied):
- k samplers: x = first noise · σ₀ of the schedule; the k-diffusion function runs on A1111's CFG
  denoiser around ``CompVisDenoiser`` / ``CompVisVDenoiser`` (fractional t, unquantized).
- "Automatic" is the sampler's default schedule; without one, k-diffusion's ``get_sigmas`` (Uniform).
- DPM2, DPM2 a and DPM++ 3M SDE build a steps+1 schedule and drop its next-to-last σ.
- DPM fast / DPM adaptive ignore the schedule's σs except σ₀ (which scales the start noise) and run
  between the table's own σ_min and σ_max; they get ``n = steps``.
- ``eta`` goes to every function that takes one: "Eta" (else 1) for k samplers, "Eta DDIM" (else 0) for
  DDIM and DDIM CFG++; the two infotext keys override two separate A1111 settings.
  s_churn, s_tmin, s_tmax, s_noise stay at k-diffusion's defaults, as A1111's settings leave them.
- SDE samplers ("brownian_noise") get k-diffusion's ``BrownianTreeNoiseSampler`` over
  [smallest non-zero σ, largest σ] seeded with the batch's image seeds; every other draw
  (ancestral steps, DPM fast/adaptive, Restart, LCM, DDIM η) comes from the per-image generators.
- img2img: t_enc = int(min(strength, 0.999)·steps); k samplers start at schedule index
  steps − t_enc − 1 with x = init + noise·σ; timestep samplers take the first t_enc timesteps and
  start from √ᾱ·init + √(1−ᾱ)·noise at the t_enc-th.
- Decode: VAE(z / scale), then clamp((x+1)/2, 0, 1)·255 truncated to uint8 (``astype(np.uint8)``).
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .ref_model import CFGDenoiser, CFGTimesteps, LatentModel, TimestepsEps
from .ref_restart_lcm import LCMDenoiser, lcm, restart
from .ref_rng import ImageNoise, TorchWithImageNoise
from .ref_schedules import SCHEDULE_TYPES, SCHEDULES
from . import ref_timesteps


@dataclass(frozen=True)
class SamplerFacts:
    """One row of A1111 1.10's sampler list: the function, the default schedule, and its quirks."""

    name: str
    function: str  # k-diffusion function name, or one of "restart", "lcm", "ddim", "ddim_cfgpp", "plms", "unipc"
    kind: str = "k"  # "k" (σ-space), "timesteps" (DDIM family), "lcm"
    schedule: str | None = None  # what "Automatic" resolves to; None: k-diffusion's get_sigmas
    drop_penultimate: bool = False
    brownian: bool = False
    options: dict = field(default_factory=dict)


SAMPLERS: dict[str, SamplerFacts] = {s.name: s for s in (
    SamplerFacts("DPM++ 2M", "sample_dpmpp_2m", schedule="Karras"),
    SamplerFacts("DPM++ SDE", "sample_dpmpp_sde", schedule="Karras", brownian=True),
    SamplerFacts("DPM++ 2M SDE", "sample_dpmpp_2m_sde", schedule="Exponential", brownian=True),
    SamplerFacts("DPM++ 2M SDE Heun", "sample_dpmpp_2m_sde", schedule="Exponential", brownian=True, options={"solver_type": "heun"}),
    SamplerFacts("DPM++ 2S a", "sample_dpmpp_2s_ancestral", schedule="Karras"),
    SamplerFacts("DPM++ 3M SDE", "sample_dpmpp_3m_sde", schedule="Exponential", drop_penultimate=True, brownian=True),
    SamplerFacts("Euler a", "sample_euler_ancestral"),
    SamplerFacts("Euler", "sample_euler"),
    SamplerFacts("LMS", "sample_lms"),
    SamplerFacts("Heun", "sample_heun"),
    SamplerFacts("DPM2", "sample_dpm_2", schedule="Karras", drop_penultimate=True),
    SamplerFacts("DPM2 a", "sample_dpm_2_ancestral", schedule="Karras", drop_penultimate=True),
    SamplerFacts("DPM fast", "sample_dpm_fast"),
    SamplerFacts("DPM adaptive", "sample_dpm_adaptive"),
    SamplerFacts("Restart", "restart", schedule="Karras"),
    SamplerFacts("DDIM", "ddim", kind="timesteps"),
    SamplerFacts("DDIM CFG++", "ddim_cfgpp", kind="timesteps"),
    SamplerFacts("PLMS", "plms", kind="timesteps"),
    SamplerFacts("UniPC", "unipc", kind="timesteps"),
    SamplerFacts("LCM", "lcm", kind="lcm"),
)}
SCHEDULE_NAMES = SCHEDULE_TYPES


def resolved_schedule(sampler: str, schedule: str) -> str:
    """What A1111 samples with for "Automatic": the sampler's default, else Uniform."""
    if schedule != "Automatic":
        return schedule
    return SAMPLERS[sampler].schedule or "Uniform"


@dataclass
class Params:
    """The infotext fields the reference reads."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "DPM++ 2M"
    schedule: str = "Automatic"
    cfg_scale: float = 7.0
    seed: int = 0
    width: int = 512
    height: int = 512
    batch_size: int = 1
    denoising_strength: float = 0.75
    ensd: int = 0
    eta: float | None = None  # "Eta": A1111's eta_ancestral setting (k samplers), default 1
    eta_ddim: float | None = None  # "Eta DDIM": its eta_ddim setting (DDIM, DDIM CFG++), default 0
    subseed: int | None = None
    subseed_strength: float = 0.0

    @classmethod
    def from_infotext(cls, values: dict[str, Any]) -> "Params":
        p = cls()
        p.prompt = str(values.get("Prompt", ""))
        p.negative_prompt = str(values.get("Negative prompt", ""))
        p.steps = int(values.get("Steps", p.steps))
        sampler = str(values.get("Sampler", p.sampler))
        schedule = values.get("Schedule type")
        if schedule is None:  # infotexts older than 1.9 name the schedule inside the sampler ("DPM++ 2M Karras")
            for label in SCHEDULES:
                if sampler.endswith(" " + label) and sampler[: -len(label) - 1] in SAMPLERS:
                    sampler, schedule = sampler[: -len(label) - 1], label
        p.sampler, p.schedule = sampler, str(schedule or "Automatic")
        if p.sampler not in SAMPLERS:
            raise ValueError(f"A1111 1.10 has no sampler {p.sampler!r}")
        if p.schedule not in SCHEDULE_TYPES:
            raise ValueError(f"A1111 1.10 has no schedule type {p.schedule!r}")
        p.cfg_scale = float(values.get("CFG scale", p.cfg_scale))
        p.seed = int(values.get("Seed", p.seed))
        if "Size" in values:
            p.width, p.height = (int(v) for v in str(values["Size"]).lower().split("x"))
        p.batch_size = int(values.get("Batch size", 1))
        p.denoising_strength = float(values.get("Denoising strength", p.denoising_strength))
        p.ensd = int(values.get("ENSD", 0))
        p.eta = None if values.get("Eta") is None else float(values["Eta"])
        p.eta_ddim = None if values.get("Eta DDIM") is None else float(values["Eta DDIM"])
        if "Variation seed" in values:
            p.subseed = int(values["Variation seed"])
            p.subseed_strength = float(values.get("Variation seed strength", 0.0))
        return p


# -- the model ----------------------------------------------------------------------------------------

def load_pipeline(model_dir_or_pipeline):
    if not isinstance(model_dir_or_pipeline, (str, Path)):
        return model_dir_or_pipeline
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(model_dir_or_pipeline), local_files_only=True, torch_dtype=torch.float32,
                                             safety_checker=None)


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def make_cond(embeds: torch.Tensor, pooled: torch.Tensor | None, width: int, height: int) -> dict:
    """A1111's conditioning dict; for SDXL the vector part is (pooled, [h, w, crop top, crop left, h, w])."""
    cond = {"crossattn": embeds.float(), "vector": None}
    if pooled is not None:
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(embeds.shape[0], 1)
        cond["vector"] = (pooled.float(), time_ids)
    return cond


@torch.no_grad()
def plain_clip_conditioning(pipe, prompt: str, negative: str, width: int, height: int) -> tuple[dict, dict]:
    """Plain CLIP hidden states for simple, unweighted prompts that fit one 75-token window.

    SD 1.x: the last layer's normalised hidden state. SDXL: the penultimate hidden states of both
    encoders side by side, the pooled projection of the second, and zeros for an empty negative prompt
    (A1111 zeroes an all-empty negative batch for SDXL).
    """
    def encode(text: str):
        if not is_sdxl(pipe):
            ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                                 return_tensors="pt").input_ids
            return pipe.text_encoder(ids).last_hidden_state, None
        parts, pooled = [], None
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
            out = encoder(ids, output_hidden_states=True)
            parts.append(out.hidden_states[-2])
            pooled = out[0]
        embeds = torch.cat(parts, dim=-1)
        if text == "":
            embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        return embeds, pooled

    return make_cond(*encode(prompt), width, height), make_cond(*encode(negative), width, height)


# -- sampling -----------------------------------------------------------------------------------------

def k_wrapper(model: LatentModel):
    from tests._kdiffusion import load

    _, external = load()
    kind = external.CompVisVDenoiser if model.parameterization == "v" else external.CompVisDenoiser
    return kind(model, quantize=False)


def schedule_sigmas(facts: SamplerFacts, schedule: str, steps: int, wrap, sdxl: bool) -> torch.Tensor:
    """``KDiffusionSampler.get_sigmas``: the resolved schedule over the table's σ range, penultimate σ dropped for some."""
    n = steps + (1 if facts.drop_penultimate else 0)
    name = resolved_schedule(facts.name, schedule)
    sigma_min, sigma_max = wrap.sigmas[0].item(), wrap.sigmas[-1].item()
    sigmas = SCHEDULES[name](n, sigma_min, sigma_max, wrap, is_sdxl=sdxl)
    if facts.drop_penultimate:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


@contextmanager
def image_noise_in_k_diffusion(noise: ImageNoise):
    """A1111's hijack: k-diffusion's ``torch.randn_like`` draws from the image noise stream."""
    from tests._kdiffusion import load

    sampling, _ = load()
    original = sampling.torch
    sampling.torch = TorchWithImageNoise(noise)
    try:
        yield sampling
    finally:
        sampling.torch = original


def _k_sample(facts, p, model, wrap, cond, uncond, noise, sdxl, init_latent=None):
    from tests._kdiffusion import load

    sampling, _ = load()
    denoiser = CFGDenoiser(wrap, cond, uncond, p.cfg_scale)
    sigmas = schedule_sigmas(facts, p.schedule, p.steps, wrap, sdxl)
    start = noise.next()
    steps = p.steps
    if init_latent is None:
        x = start * sigmas[0]
        sigma_min, sigma_max = wrap.sigmas[0].item(), wrap.sigmas[-1].item()
    else:
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
        sigmas_all, sigmas = sigmas, sigmas[steps - t_enc - 1:]
        x = init_latent + start * sigmas[0]
        sigma_min, sigma_max, steps = sigmas[-2], sigmas[0], len(sigmas) - 1
    kwargs: dict[str, Any] = {}
    if facts.function == "restart":
        function = lambda model_, x_, sigmas: restart(model_, x_, sigmas, noise)  # noqa: E731
        kwargs["sigmas"] = sigmas
    else:
        function = getattr(sampling, facts.function)
        parameters = inspect.signature(function).parameters
        if "eta" in parameters:
            kwargs["eta"] = 1.0 if p.eta is None else p.eta
        if "n" in parameters:
            kwargs["n"] = steps
        if "sigma_min" in parameters:
            kwargs["sigma_min"], kwargs["sigma_max"] = sigma_min, sigma_max
        if "sigmas" in parameters:
            kwargs["sigmas"] = sigmas
        if facts.brownian:
            tree_sigmas = sigmas if init_latent is None else sigmas_all
            kwargs["noise_sampler"] = sampling.BrownianTreeNoiseSampler(
                x, tree_sigmas[tree_sigmas > 0].min(), tree_sigmas.max(), seed=list(noise.seeds))
        kwargs.update(facts.options)
        kwargs["disable"] = True
    with image_noise_in_k_diffusion(noise):
        return function(denoiser, x, **kwargs)


def _lcm_sample(facts, p, model, cond, uncond, noise, sdxl, init_latent=None):
    wrap = LCMDenoiser(model)
    denoiser = CFGDenoiser(wrap, cond, uncond, p.cfg_scale)
    sigmas = schedule_sigmas(facts, p.schedule, p.steps, wrap, sdxl)
    start = noise.next()
    if init_latent is None:
        x = start * sigmas[0]
    else:
        t_enc = int(min(p.denoising_strength, 0.999) * p.steps)
        sigmas = sigmas[p.steps - t_enc - 1:]
        x = init_latent + start * sigmas[0]
    return lcm(denoiser, x, sigmas, noise)


def _timestep_sample(facts, p, model, cond, uncond, noise, init_latent=None):
    denoiser = CFGTimesteps(TimestepsEps(model), cond, uncond, p.cfg_scale)
    timesteps = ref_timesteps.timesteps_for(p.steps)
    start = noise.next()
    extra = {}
    if init_latent is None:
        x = start
    else:
        t_enc = int(min(p.denoising_strength, 0.999) * p.steps)
        a = model.alphas_cumprod[timesteps[t_enc]]
        x = init_latent * torch.sqrt(a) + start * torch.sqrt(1 - a)
        timesteps = timesteps[:t_enc]
        if facts.function == "unipc":
            extra["t_start"] = float(timesteps[-1] / 1000 + 1 / 1000)
    function = getattr(ref_timesteps, facts.function)
    if facts.function in ("ddim", "ddim_cfgpp"):
        extra["eta"] = 0.0 if p.eta_ddim is None else p.eta_ddim
    return function(denoiser, x, timesteps, noise, **extra)


def _repeat_cond(cond: dict, batch: int) -> dict:
    """One prompt's conditioning for every image of the batch."""
    def repeat(t: torch.Tensor) -> torch.Tensor:
        return t.repeat(batch, *[1] * (t.dim() - 1))

    return {key: None if value is None else tuple(map(repeat, value)) if isinstance(value, tuple) else repeat(value)
            for key, value in cond.items()}


@torch.no_grad()
def sample_latents(pipe, p: Params, conditioning: tuple[dict, dict] | None = None, init_latent: torch.Tensor | None = None,
                   calls: list | None = None) -> torch.Tensor:
    """The latents A1111 would decode for ``p`` (one batch)."""
    sdxl = is_sdxl(pipe)
    model = LatentModel(pipe.unet, pipe.scheduler.config, calls)
    cond, uncond = conditioning or plain_clip_conditioning(pipe, p.prompt, p.negative_prompt, p.width, p.height)
    batch = p.batch_size
    cond, uncond = _repeat_cond(cond, batch), _repeat_cond(uncond, batch)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape = (pipe.unet.config.in_channels, p.height // factor, p.width // factor)
    seeds = [p.seed + i for i in range(batch)]
    subseeds = None if p.subseed is None else [p.subseed + i for i in range(batch)]
    noise = ImageNoise(shape, seeds, subseeds, p.subseed_strength, p.ensd)
    facts = SAMPLERS[p.sampler]
    if facts.kind == "timesteps":
        return _timestep_sample(facts, p, model, cond, uncond, noise, init_latent)
    if facts.kind == "lcm":
        return _lcm_sample(facts, p, model, cond, uncond, noise, sdxl, init_latent)
    return _k_sample(facts, p, model, k_wrapper(model), cond, uncond, noise, sdxl, init_latent)


@torch.no_grad()
def encode_image(pipe, image: Image.Image) -> torch.Tensor:
    """init latent: pixels to [−1, 1], the VAE posterior's mean (A1111 samples it; see the package notes), × scale."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    pixels = torch.from_numpy(2.0 * array - 1.0).permute(2, 0, 1)[None]
    return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE output in [0, 1] as A1111 computes it: clamp((x + 1) / 2)."""
    x = pipe.vae.decode(1.0 / pipe.vae.config.scaling_factor * latents, return_dict=False)[0]
    return torch.clamp((x.float() + 1.0) / 2.0, min=0.0, max=1.0)


def to_uint8(decoded: torch.Tensor, rounding: bool = False) -> list[np.ndarray]:
    """A1111 truncates 255·x to uint8; ``rounding`` gives the round-to-nearest variant (diffusers' choice)."""
    arrays = []
    for x in decoded:
        scaled = 255.0 * np.moveaxis(x.cpu().numpy(), 0, 2)
        arrays.append((np.round(scaled) if rounding else scaled).astype(np.uint8))
    return arrays


def render(model_dir_or_pipeline, infotext_params: dict, conditioning: tuple[dict, dict] | None = None,
           init_image: Image.Image | None = None, rounding: bool = False) -> list[Image.Image]:
    """A1111 1.10's pictures for these infotext parameters (txt2img, or img2img with ``init_image``)."""
    pipe = load_pipeline(model_dir_or_pipeline)
    p = Params.from_infotext(infotext_params)
    init = None if init_image is None else encode_image(pipe, init_image.resize((p.width, p.height)))
    latents = sample_latents(pipe, p, conditioning, init)
    return [Image.fromarray(a, "RGB") for a in to_uint8(decode(pipe, latents), rounding)]
