"""Train Sfumato's demo model: a tiny Stable Diffusion and an outline ControlNet, from scratch, on CPU.

    python -m training.demo_model [--out builtin/sfumato-demo] [--smoke] [--resume]

Stages (each checkpointed, so ``--resume`` continues where a run stopped):
  1. tokenizer  a word-level CLIP BPE tokenizer built offline: every world word is one token ``word</w>``;
  2. data       ``n_images`` procedurally drawn scenes (``training.world``), held-out combos excluded;
  3. vae        ``AutoencoderKL`` f8 (64×64×3 → 4×8×8), L1 + MSE + image-gradient L1 + small KL
                (Kingma & Welling 2014; log-variance output bias starts at −8 so posterior noise is tiny);
  4. latents    posterior means cached once; ``scaling_factor = 1 / std(latents)`` (Rombach et al. 2022);
  5. unet       ``UNet2DConditionModel`` + ``CLIPTextModel`` trained jointly on the DDPM forward process
                x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (Ho et al. 2020, eq. 4) with the L_simple objective (eq. 14),
                predicting v = √ᾱ_t ε − √(1−ᾱ_t) x_0 (Salimans & Ho 2022, §4) and with caption dropout
                for classifier-free guidance (Ho & Salimans 2022);
  6. controlnet ``ControlNetModel.from_unet`` trained on outline maps with the UNet and text encoder frozen
                (Zhang et al. 2023), captions dropped more often so the outline alone drives layout;
  7. export     fp16 safetensors pipeline + ControlNet, ``sfumato.json`` with least-squares latent→RGB factors.
Evaluation and the model card are written by ``training.evaluate`` / ``write_model_card``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from . import world

REPO = Path(__file__).resolve().parent.parent
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


# --------------------------------------------------------------------------- recipe


@dataclass
class Recipe:
    """Every hyper-parameter of a run. Time budgets are wall seconds; a stage stops at whichever
    of ``*_seconds`` / ``*_max_steps`` comes first, and its cosine learning-rate tail follows
    the fraction of the budget used, so a slower machine trains fewer steps with the same schedule."""

    seed: int = 0
    n_images: int = 20_000
    # VAE
    vae_channels: tuple[int, ...] = (16, 32, 64, 64)  # thin full-resolution blocks: ~2.4x cheaper than 32
    vae_latent_channels: int = 4
    vae_quant_conv: bool = True  # SD 1.x's 1×1 quant/post-quant convs (SD3 and Flux VAEs have none)
    vae_norm_groups: int = 1  # per-channel GroupNorm would erase the flat colours these images are made of
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-5
    vae_grad_weight: float = 0.5
    vae_seconds: float = 1500
    vae_max_steps: int = 100_000
    vae_bf16: bool = False
    # decoder fine-tuning on the cached latents (encoder frozen), in a parallel process during UNet training
    decoder_seconds: float = 2700
    decoder_max_steps: int = 100_000
    decoder_batch: int = 16
    decoder_lr: float = 1e-3
    decoder_latent_noise: float = 0.05  # × latent std: robustness to imperfect generated latents
    decoder_parallel: bool = True
    # text encoder + UNet
    max_tokens: int = 16
    te_hidden: int = 64
    te_layers: int = 2
    te_heads: int = 4
    te_ffn: int = 256
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_norm_groups: int = 8
    unet_heads: int = 4
    prediction_type: str = "v_prediction"
    unet_batch: int = 64
    unet_lr: float = 1e-3
    te_lr: float = 2e-3
    unet_warmup: int = 100
    unet_seconds: float = 2700
    unet_max_steps: int = 100_000
    high_t_prob: float = 0.3  # extra share of timesteps drawn from t ≥ 500, where layout is decided
    caption_drop_p: float = 0.12
    caption_empty_p: float = 0.1
    # ControlNet
    cn_channels: tuple[int, ...] = (16, 32, 64, 64)  # three stride-2 convs: 64 px → 8 latent cells
    cn_batch: int = 64
    cn_lr: float = 1e-3
    cn_seconds: float = 1200
    cn_max_steps: int = 100_000
    cn_empty_p: float = 0.3
    # bookkeeping
    bf16: bool = True
    checkpoint_every_s: float = 120
    monitor_every: int = 250
    sample_every: int = 1000


def smoke_recipe() -> Recipe:
    """A few steps of every stage on a tiny dataset: < 60 s end to end (CI)."""
    return replace(
        Recipe(), n_images=128, vae_seconds=5, vae_max_steps=3, vae_batch=8, unet_seconds=8, unet_max_steps=3,
        unet_batch=8, cn_seconds=8, cn_max_steps=3, cn_batch=8, monitor_every=10**9, sample_every=10**9,
        checkpoint_every_s=10**9, unet_warmup=1, decoder_seconds=5, decoder_max_steps=2, decoder_batch=4, decoder_parallel=False,
    )


@dataclass
class Paths:
    out: Path
    controlnet_out: Path
    checkpoints: Path
    run: Path

    def make(self) -> "Paths":
        for p in (self.checkpoints, self.run):
            p.mkdir(parents=True, exist_ok=True)
        return self


def log(msg: str) -> None:
    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {msg}")
    sys.stdout.flush()


# --------------------------------------------------------------------------- tokenizer


def _apply_merges(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word (Sennrich et al. 2016) with CLIP's ``</w>`` end marker."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
    return parts


def word_level_vocab(words: tuple[str, ...]) -> tuple[dict[str, int], list[str]]:
    """vocab.json / merges.txt contents under which every word encodes to ONE token ``word</w>``.

    Merges are added greedily: while a word still splits, merge its first two pieces."""
    ranks: dict[tuple[str, str], int] = {}
    merges: list[str] = []
    for word in words:
        while len(parts := _apply_merges(word, ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(merges)
            merges.append(f"{parts[0]} {parts[1]}")
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    chars = sorted({c for w in words for c in w})
    for token in chars + [c + "</w>" for c in chars] + [a + b for a, b in (m.split(" ") for m in merges)]:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def build_tokenizer(directory: Path, max_tokens: int):
    """Write vocab.json + merges.txt and load them as a ``CLIPTokenizer`` (no hub involved)."""
    from transformers import CLIPTokenizer

    vocab, merges = word_level_vocab(world.VOCABULARY)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"),
                        model_max_length=max_tokens)
    for word in world.VOCABULARY:
        ids = tok(word, add_special_tokens=False).input_ids
        assert ids == [vocab[word + "</w>"]], f"word {word!r} is not one token: {ids}"
    return tok


def tokenize(tok, captions: list[str]) -> torch.Tensor:
    return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


# --------------------------------------------------------------------------- models


def build_vae(recipe: Recipe):
    """``AutoencoderKL`` downsampling by 2^(len(vae_channels) − 1) to ``vae_latent_channels`` channels."""
    from diffusers import AutoencoderKL

    n, channels = len(recipe.vae_channels), recipe.vae_latent_channels
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=channels, sample_size=64, layers_per_block=1,
        norm_num_groups=recipe.vae_norm_groups, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=recipe.vae_channels,
        use_quant_conv=recipe.vae_quant_conv, use_post_quant_conv=recipe.vae_quant_conv,
    )
    # The encoder's conv_out emits [mean, log-variance]; a log-variance bias of -8 (std ≈ 0.018)
    # keeps the posterior sample close to its mean from the first step.
    with torch.no_grad():
        vae.encoder.conv_out.bias[channels:].fill_(-8.0)
    return vae


def build_text_encoder(recipe: Recipe, tok):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tok.get_vocab()), hidden_size=recipe.te_hidden, intermediate_size=recipe.te_ffn,
        num_hidden_layers=recipe.te_layers, num_attention_heads=recipe.te_heads,
        max_position_embeddings=recipe.max_tokens, projection_dim=recipe.te_hidden,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(recipe: Recipe):
    from diffusers import UNet2DConditionModel

    n = len(recipe.unet_channels)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=recipe.unet_channels, down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n, cross_attention_dim=recipe.te_hidden,
        attention_head_dim=recipe.unet_heads, norm_num_groups=recipe.unet_norm_groups,  # (= number of heads)
    )


def scheduler_config(recipe: Recipe) -> dict:
    """Stable Diffusion's scaled-linear β schedule (β from 0.00085 to 0.012 over 1000 steps)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type=recipe.prediction_type, steps_offset=1)


def training_scheduler(recipe: Recipe):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**scheduler_config(recipe), clip_sample=False)


def sampling_scheduler(recipe: Recipe):
    """The saved default: DPM++ 2M (Lu et al. 2022), which every other sampler loads from via from_config."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**scheduler_config(recipe))


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- training loop helpers


def lr_factor(step: int, frac: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine tail over the used fraction of the budget."""
    warm = min(1.0, (step + 1) / max(warmup, 1))
    return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


class Checkpoint:
    """Model + optimizer + progress of one stage, saved atomically to ``<dir>/<stage>.pt``."""

    def __init__(self, directory: Path, stage: str):
        self.path = directory / f"{stage}.pt"

    def load(self) -> dict | None:
        return torch.load(self.path, map_location="cpu", weights_only=False) if self.path.exists() else None

    def save(self, **state) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)


@dataclass
class Budget:
    seconds: float
    max_steps: int
    step: int = 0
    elapsed: float = 0.0
    _t0: float = field(default_factory=time.time)
    _base: float = 0.0

    def start(self) -> "Budget":
        self._t0, self._base = time.time(), self.elapsed
        return self

    def tick(self) -> None:
        self.step += 1
        self.elapsed = self._base + time.time() - self._t0

    @property
    def frac(self) -> float:
        return max(self.elapsed / self.seconds, self.step / self.max_steps)

    @property
    def done(self) -> bool:
        return self.frac >= 1.0


def run_stage(
    name: str, paths: Paths, resume: bool, budget: Budget, modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer, step_fn: Callable[[int], float], base_lrs: list[float], warmup: int,
    every: Callable[[int], None] | None = None, checkpoint_every_s: float = 120,
) -> bool:
    """Generic resumable loop: call ``step_fn(step) -> loss`` until the budget is used.

    Returns False if the stage had already finished in a resumed checkpoint (nothing to do)."""
    ckpt = Checkpoint(paths.checkpoints, name)
    state = ckpt.load() if resume else None
    if state is not None:
        for key, module in modules.items():
            module.load_state_dict(state["modules"][key])
        optimizer.load_state_dict(state["optimizer"])
        budget.step, budget.elapsed = state["step"], state["elapsed"]
        log(f"{name}: resumed at step {budget.step} ({budget.elapsed:.0f} s)")
        if state["done"]:
            return False

    def save(done: bool) -> None:
        ckpt.save(modules={k: m.state_dict() for k, m in modules.items()}, optimizer=optimizer.state_dict(),
                  step=budget.step, elapsed=budget.elapsed, done=done)

    budget.start()
    last_save, ema = time.time(), None
    bar = tqdm(desc=name, total=budget.max_steps if budget.max_steps < 10**5 else None, initial=budget.step,
               mininterval=30, file=sys.stdout)
    while not budget.done:
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * lr_factor(budget.step, budget.frac, warmup)
        loss = step_fn(budget.step)
        budget.tick()
        bar.update(1)
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        bar.set_postfix(loss=f"{ema:.4f}", t=f"{budget.elapsed:.0f}s", refresh=False)
        if every is not None:
            every(budget.step)
        if time.time() - last_save > checkpoint_every_s:
            save(False)
            last_save = time.time()
    bar.close()
    save(True)
    log(f"{name}: done, {budget.step} steps in {budget.elapsed:.0f} s ({budget.step / max(budget.elapsed, 1e-9):.2f} it/s)")
    return True


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def save_grid(images: np.ndarray, path: Path, cols: int = 8, scale: int = 2) -> None:
    rows = [np.concatenate(list(images[i : i + cols]), axis=1) for i in range(0, len(images), cols)]
    if len(rows) > 1 and rows[-1].shape != rows[0].shape:
        rows = rows[:-1]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(path)


# --------------------------------------------------------------------------- stage 3: VAE


def train_vae(recipe: Recipe, images: np.ndarray, paths: Paths, resume: bool):
    """Reconstruction training of the f8 VAE; returns the VAE in eval mode."""
    torch.manual_seed(recipe.seed)
    vae = build_vae(recipe)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    log(f"vae: {n_params(vae) / 1e6:.2f} M params")
    held = to_tensor(images[:64])

    def step(i: int) -> float:
        rng = np.random.default_rng([recipe.seed, 3, i])
        x = to_tensor(images[rng.integers(64, len(images), recipe.vae_batch)])
        with _autocast(recipe.bf16 and recipe.vae_bf16):
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample()).sample.float()
        loss = vae_loss(rec, x, recipe) + recipe.vae_kl_weight * posterior.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return loss.item()

    def every(i: int) -> None:
        if i % max(recipe.monitor_every // 5, 1) == 0:
            with torch.no_grad():
                rec = vae.decode(vae.encode(held).latent_dist.mean).sample.clamp(-1, 1)
            log(f"vae step {i}: held-out L1 {(rec - held).abs().mean() * 127.5:.2f}/255")

    budget = Budget(recipe.vae_seconds, recipe.vae_max_steps)
    run_stage("vae", paths, resume, budget, {"vae": vae}, opt, step, [recipe.vae_lr], 50, every,
              recipe.checkpoint_every_s)
    return vae.eval().requires_grad_(False)


def vae_loss(rec: torch.Tensor, x: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """L1 + MSE, plus L1 between horizontal/vertical image gradients (keeps shape edges sharp)."""
    loss = (rec - x).abs().mean() + F.mse_loss(rec, x)
    if recipe.vae_grad_weight:
        dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
        dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
        loss = loss + recipe.vae_grad_weight * ((dx(rec) - dx(x)).abs().mean() + (dy(rec) - dy(x)).abs().mean())
    return loss


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Posterior means of every image, unscaled, (N, latent channels, h, w)."""
    out = [vae.encode(to_tensor(images[i : i + batch])).latent_dist.mean for i in range(0, len(images), batch)]
    return torch.cat(out)


def cached_latents(recipe: Recipe, vae, images: np.ndarray, paths: Paths, resume: bool) -> torch.Tensor:
    """Encode once; registers ``vae.config.scaling_factor = 1 / std(latents)``. Returns SCALED latents."""
    path = paths.checkpoints / "latents.pt"
    vae_ckpt = paths.checkpoints / "vae.pt"
    if resume and path.exists() and path.stat().st_mtime >= vae_ckpt.stat().st_mtime:
        cache = torch.load(path)
    else:
        t0 = time.time()
        latents = encode_latents(vae, images)
        cache = {"latents": latents, "scaling_factor": float(1.0 / latents.std())}
        torch.save(cache, path)
        log(f"latents: encoded {len(images)} in {time.time() - t0:.0f} s, scaling_factor {cache['scaling_factor']:.4f}")
    vae.register_to_config(scaling_factor=cache["scaling_factor"])
    return cache["latents"] * cache["scaling_factor"]


# --------------------------------------------------------------------------- stage 4b: decoder fine-tuning


def train_decoder(recipe: Recipe, vae, latents: torch.Tensor, images: np.ndarray, paths: Paths, resume: bool):
    """Fine-tune the decoder (and post_quant_conv) on the cached, UNSCALED latents with the encoder
    frozen, so the latent space the UNet learns stays fixed (as SD's ft-MSE VAE decoder was tuned).
    Runs in its own process while the UNet trains (see ``train``)."""
    torch.manual_seed(recipe.seed + 4)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=recipe.decoder_lr, weight_decay=0.0)
    vae.train()
    std = float(latents.std())

    def step(i: int) -> float:
        rng = np.random.default_rng([recipe.seed, 4, i])
        idx = rng.integers(64, len(images), recipe.decoder_batch)
        z = latents[idx] + recipe.decoder_latent_noise * std * torch.from_numpy(
            rng.standard_normal(latents[idx].shape).astype(np.float32))
        x = to_tensor(images[idx])
        loss = vae_loss(vae.decode(z).sample, x, recipe)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    held_z, held_x = latents[:64], to_tensor(images[:64])

    def every(i: int) -> None:
        if i % max(recipe.monitor_every // 5, 1) == 0:
            with torch.no_grad():
                rec = vae.decode(held_z).sample.clamp(-1, 1)
            log(f"decoder step {i}: held-out L1 {(rec - held_x).abs().mean() * 127.5:.2f}/255")

    budget = Budget(recipe.decoder_seconds, recipe.decoder_max_steps)
    run_stage("decoder", paths, resume, budget, {"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv},
              opt, step, [recipe.decoder_lr], 20, every, recipe.checkpoint_every_s)
    return vae.eval().requires_grad_(False)


def load_decoder(vae, paths: Paths) -> bool:
    """Load the newest fine-tuned decoder weights into ``vae`` if a checkpoint exists."""
    state = Checkpoint(paths.checkpoints, "decoder").load()
    if state is None:
        return False
    vae.decoder.load_state_dict(state["modules"]["decoder"])
    vae.post_quant_conv.load_state_dict(state["modules"]["post_quant_conv"])
    return True


def _decoder_worker(recipe: Recipe, paths: Paths, resume: bool, threads: int) -> None:
    """Entry point of the parallel decoder process: rebuilds data and VAE from the checkpoints."""
    torch.set_num_threads(threads)
    images, _ = world.make_dataset(recipe.n_images, recipe.seed)
    vae = build_vae(recipe)
    vae.load_state_dict(Checkpoint(paths.checkpoints, "vae").load()["modules"]["vae"])
    latents = torch.load(paths.checkpoints / "latents.pt")["latents"]
    train_decoder(recipe, vae, latents, images, paths, resume)


# --------------------------------------------------------------------------- stage 5: UNet + text encoder


def sample_timesteps(n: int, rng: np.random.Generator, high_t_prob: float) -> torch.Tensor:
    """Uniform t in [0, 1000), with a ``high_t_prob`` share drawn from [500, 1000) instead."""
    t = rng.integers(0, 1000, n)
    high = rng.random(n) < high_t_prob
    t[high] = rng.integers(500, 1000, int(high.sum()))
    return torch.from_numpy(t).long()


def diffusion_target(scheduler, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ε for epsilon prediction; v = √ᾱ_t ε − √(1−ᾱ_t) x_0 for v-prediction (Salimans & Ho 2022)."""
    if scheduler.config.prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(z0, noise, t)


def denoise_loss(unet, te, scheduler, z0, ids, t, noise, bf16: bool, controlnet=None, control=None,
                 reduce: bool = True) -> torch.Tensor:
    """L_simple (Ho et al. 2020, eq. 14): ‖target − model(x_t, t, c)‖² on the forward-process sample x_t."""
    zt = scheduler.add_noise(z0, noise, t)
    with _autocast(bf16):
        context = te(ids)[0]
        extra = {}
        if controlnet is not None:
            down, mid = controlnet(zt, t, encoder_hidden_states=context, controlnet_cond=control, return_dict=False)
            extra = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        pred = unet(zt, t, encoder_hidden_states=context, **extra).sample.float()
    err = (pred - diffusion_target(scheduler, z0, noise, t)) ** 2
    return err.mean() if reduce else err.mean(dim=(1, 2, 3))


class CaptionMonitor:
    """Early signals that text conditioning is learned, on a fixed batch with fixed noise:
    loss(empty caption) − loss(true caption), and loss(position swapped) − loss(true) at several t.
    A position-swap gap stuck at 0 means position words are ignored."""

    def __init__(self, recipe: Recipe, tok, latents: torch.Tensor, scenes: list[world.Scene], n: int = 64):
        rng = np.random.default_rng([recipe.seed, 99])
        idx = rng.choice(len(scenes), n, replace=False)
        self.z0 = latents[idx]
        self.noise = torch.from_numpy(rng.standard_normal(self.z0.shape).astype(np.float32))
        picked = [scenes[i] for i in idx]
        swapped = [replace(s, position=str(rng.choice([p for p in world.POSITIONS if p != s.position])))
                   for s in picked]
        swapped_colour = [replace(s, colour=str(rng.choice([c for c in world.COLOURS if c not in (s.colour, s.background)])))
                          for s in picked]
        self.ids = {
            "true": tokenize(tok, [world.full_caption(s) for s in picked]),
            "empty": tokenize(tok, [""] * n),
            "pos": tokenize(tok, [world.full_caption(s) for s in swapped]),
            "col": tokenize(tok, [world.full_caption(s) for s in swapped_colour]),
        }
        assert not torch.equal(self.ids["true"], self.ids["pos"]), "position swap did not change the tokens"
        self.bf16 = recipe.bf16

    @torch.no_grad()
    def __call__(self, unet, te, scheduler, ts: tuple[int, ...] = (200, 600, 900)) -> str:
        parts = []
        for t_val in ts:
            t = torch.full((len(self.z0),), t_val, dtype=torch.long)
            loss = {k: float(denoise_loss(unet, te, scheduler, self.z0, ids, t, self.noise, self.bf16))
                    for k, ids in self.ids.items()}
            parts.append(f"t={t_val}: true {loss['true']:.4f} empty {loss['empty'] - loss['true']:+.4f} "
                         f"pos {loss['pos'] - loss['true']:+.4f} col {loss['col'] - loss['true']:+.4f}")
        return " | ".join(parts)


def make_pipeline(vae, te, tok, unet, recipe: Recipe):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=sampling_scheduler(recipe), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def quick_eval(pipe, path: Path, n: int = 32, cfg: float = 5.0) -> dict[str, float]:
    """Sample grid of ``n`` fixed eval prompts (one seed) and their attribute accuracy."""
    from .evaluate import classify, eval_scenes, pipeline_generator, score

    scenes = eval_scenes()[: n - 8] + eval_scenes()[-8:]
    images = pipeline_generator(pipe)([world.full_caption(s) for s in scenes], list(range(n)), cfg)
    save_grid(np.stack(images), path)
    return score([classify(im) for im in images], scenes)


def train_unet(recipe: Recipe, tok, vae, latents: torch.Tensor, scenes: list[world.Scene], paths: Paths,
               resume: bool):
    """Joint UNet + text-encoder training; returns (unet, text_encoder) in eval mode."""
    torch.manual_seed(recipe.seed + 1)
    te, unet, sched = build_text_encoder(recipe, tok), build_unet(recipe), training_scheduler(recipe)
    log(f"unet: {n_params(unet) / 1e6:.2f} M params, text encoder {n_params(te) / 1e3:.0f} k params, "
        f"prediction {recipe.prediction_type}")
    opt = torch.optim.AdamW([{"params": unet.parameters(), "lr": recipe.unet_lr},
                             {"params": te.parameters(), "lr": recipe.te_lr}], weight_decay=0.01)
    monitor = CaptionMonitor(recipe, tok, latents, scenes)

    def step(i: int) -> float:
        rng = np.random.default_rng([recipe.seed, 5, i])
        idx = rng.integers(0, len(scenes), recipe.unet_batch)
        captions = [world.random_caption(scenes[j], rng, recipe.caption_drop_p, recipe.caption_empty_p) for j in idx]
        z0 = latents[idx]
        noise = torch.from_numpy(rng.standard_normal(z0.shape).astype(np.float32))
        t = sample_timesteps(len(idx), rng, recipe.high_t_prob)
        loss = denoise_loss(unet, te, sched, z0, tokenize(tok, captions), t, noise, recipe.bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(te.parameters()), 1.0)
        opt.step()
        return loss.item()

    def every(i: int) -> None:
        if i % recipe.monitor_every == 0:
            unet.eval(), te.eval()
            log(f"unet step {i}: {monitor(unet, te, sched)}")
            if i % recipe.sample_every == 0:
                load_decoder(vae, paths)  # the decoder is being fine-tuned in parallel
                acc = quick_eval(make_pipeline(vae, te, tok, unet, recipe), paths.run / f"unet_{i:06d}.png")
                log(f"unet step {i}: quick eval (32 prompts, cfg 5) " + json.dumps({k: round(v, 2) for k, v in acc.items()}))
            unet.train(), te.train()

    budget = Budget(recipe.unet_seconds, recipe.unet_max_steps)
    unet.train(), te.train()
    run_stage("unet", paths, resume, budget, {"unet": unet, "te": te}, opt, step, [recipe.unet_lr, recipe.te_lr],
              recipe.unet_warmup, every, recipe.checkpoint_every_s)
    unet.eval().requires_grad_(False), te.eval().requires_grad_(False)
    return unet, te


# --------------------------------------------------------------------------- stage 6: ControlNet


def outline_maps(scenes: list[world.Scene]) -> torch.Tensor:
    """Outline conditioning maps for every scene, uint8 (N, 64, 64) (one channel; RGB on use)."""
    return torch.from_numpy(np.stack([world.render_outline(s)[..., 0] for s in scenes]))


def train_controlnet(recipe: Recipe, tok, te, unet, latents: torch.Tensor, scenes: list[world.Scene],
                     paths: Paths, resume: bool):
    """ControlNet on outline maps (values in [0, 1], like the pipeline's control-image processor)."""
    from diffusers import ControlNetModel

    torch.manual_seed(recipe.seed + 2)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=recipe.cn_channels)
    sched = training_scheduler(recipe)
    log(f"controlnet: {n_params(cn) / 1e6:.2f} M params")
    maps = outline_maps(scenes)
    opt = torch.optim.AdamW(cn.parameters(), lr=recipe.cn_lr, weight_decay=0.01)

    def step(i: int) -> float:
        rng = np.random.default_rng([recipe.seed, 6, i])
        idx = rng.integers(0, len(scenes), recipe.cn_batch)
        captions = [world.random_caption(scenes[j], rng, recipe.caption_drop_p, recipe.cn_empty_p) for j in idx]
        z0 = latents[idx]
        control = maps[idx].float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
        noise = torch.from_numpy(rng.standard_normal(z0.shape).astype(np.float32))
        t = sample_timesteps(len(idx), rng, recipe.high_t_prob)
        loss = denoise_loss(unet, te, sched, z0, tokenize(tok, captions), t, noise, recipe.bf16, cn, control)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(cn.parameters(), 1.0)
        opt.step()
        return loss.item()

    def every(i: int) -> None:
        if i % recipe.monitor_every == 0:
            with torch.no_grad():
                rng = np.random.default_rng([recipe.seed, 66])
                idx = rng.choice(len(scenes), 64, replace=False)
                noise = torch.from_numpy(rng.standard_normal(latents[idx].shape).astype(np.float32))
                t = torch.full((64,), 800, dtype=torch.long)
                ids = tokenize(tok, [""] * 64)
                control = maps[idx].float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
                with_cn = denoise_loss(unet, te, sched, latents[idx], ids, t, noise, recipe.bf16, cn, control)
                without = denoise_loss(unet, te, sched, latents[idx], ids, t, noise, recipe.bf16)
            log(f"controlnet step {i}: t=800 empty-caption loss {float(without):.4f} → with outline {float(with_cn):.4f}")

    cn.train()
    budget = Budget(recipe.cn_seconds, recipe.cn_max_steps)
    run_stage("controlnet", paths, resume, budget, {"controlnet": cn}, opt, step, [recipe.cn_lr], 50, every,
              recipe.checkpoint_every_s)
    return cn.eval().requires_grad_(False)


# --------------------------------------------------------------------------- stage 7: export


@torch.no_grad()
def fit_preview_factors(vae, scaled_latents: torch.Tensor, n: int = 2048) -> tuple[list[list[float]], list[float]]:
    """Least-squares latent→RGB map: each SCALED latent cell (as the UNet sees it) against the mean
    decoded RGB in [-1, 1] of its 8×8 pixel block. Returns (4×3 factors, 3 biases)."""
    z = scaled_latents[:n]
    rgb = torch.cat([vae.decode(z[i : i + 256] / vae.config.scaling_factor).sample for i in range(0, len(z), 256)])
    rgb = F.avg_pool2d(rgb.clamp(-1, 1), 8)  # (n, 3, 8, 8)
    x = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, 4), torch.ones(z.numel() // 4, 1)], dim=1)
    y = rgb.permute(0, 2, 3, 1).reshape(-1, 3)
    sol = torch.linalg.lstsq(x.double(), y.double()).solution.float()
    return [[round(float(v), 4) for v in row] for row in sol[:4]], [round(float(v), 4) for v in sol[4]]


def save_model_folder(pipe, out: Path, family: str, factors, bias, latent_note: str, extra_meta: dict) -> None:
    """``pipe`` in fp16 safetensors as the folder ``out``, with its ``sfumato.json`` (family name, native size, preview
    factors, the world's vocabulary) and the model card already there kept; written beside ``out`` and renamed into
    place, so a failed export never leaves half a model where the old one was."""
    pipe.to(dtype=torch.float16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    meta = {
        "family": family, "native_width": 64, "native_height": 64,
        "latent_rgb_factors": factors, "latent_rgb_bias": bias, "latent_rgb_note": latent_note,
        "vocabulary": {
            "shapes": list(world.SHAPES), "colours": {k: list(v) for k, v in world.COLOURS.items()},
            "backgrounds": {k: list(v) for k, v in world.PALETTE.items()}, "sizes": list(world.SIZES),
            "positions": world.POSITION_PHRASES, "words": list(world.VOCABULARY),
            "example": "a large red circle on the left, blue background",
        },
        "held_out_combos": [list(c) for c in world.HELD_OUT_COMBOS],
        **extra_meta,
    }
    (tmp / "sfumato.json").write_text(json.dumps(meta, indent=2) + "\n")
    if (out / "MODEL_CARD.md").exists():
        shutil.copy(out / "MODEL_CARD.md", tmp / "MODEL_CARD.md")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def export(recipe: Recipe, paths: Paths, vae, te, tok, unet, controlnet, latents: torch.Tensor,
           extra_meta: dict | None = None) -> None:
    """fp16 safetensors pipeline (+ ControlNet) in the final layout, plus ``sfumato.json``."""
    import copy

    factors, bias = fit_preview_factors(vae, latents)
    pipe = make_pipeline(copy.deepcopy(vae), copy.deepcopy(te), tok, copy.deepcopy(unet), recipe)
    save_model_folder(pipe, paths.out, "sfumato-demo", factors, bias,
                      "applied to latents as the UNet sees them (multiplied by vae scaling_factor); "
                      "each latent cell maps to the mean RGB in [-1, 1] of its 8x8 pixel block",
                      {"controlnets": [paths.controlnet_out.name] if controlnet is not None else [], **(extra_meta or {})})
    if controlnet is not None:
        cn = copy.deepcopy(controlnet).to(dtype=torch.float16)
        shutil.rmtree(paths.controlnet_out, ignore_errors=True)
        cn.save_pretrained(paths.controlnet_out, safe_serialization=True)
    log(f"export: {paths.out} ({folder_mb(paths.out):.1f} MB)"
        + (f", {paths.controlnet_out} ({folder_mb(paths.controlnet_out):.1f} MB)" if controlnet is not None else ""))


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


# --------------------------------------------------------------------------- main


def train(recipe: Recipe, paths: Paths, resume: bool, until: str = "export") -> dict:
    """Run every stage in order; returns wall times per stage (seconds)."""
    torch.manual_seed(recipe.seed)
    times: dict[str, float] = {}
    t0 = time.time()
    tok = build_tokenizer(paths.checkpoints / "tokenizer", recipe.max_tokens)
    images, scenes = world.make_dataset(recipe.n_images, recipe.seed)
    assert not any(world.is_held_out(s) for s in scenes)
    times["data"] = time.time() - t0
    log(f"data: {len(scenes)} images in {times['data']:.1f} s; vocabulary {len(world.VOCABULARY)} words")

    t0 = time.time()
    vae = train_vae(recipe, images, paths, resume)
    times["vae"] = time.time() - t0
    latents = cached_latents(recipe, vae, images, paths, resume)
    if until == "vae":
        return times
    t0 = time.time()
    if recipe.decoder_parallel:  # one extra process: on a shared machine two processes beat two threads
        decoder = mp.get_context("spawn").Process(target=_decoder_worker, args=(recipe, paths, resume, 1), daemon=True)
        decoder.start()
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads - 1))  # oversubscribed torch threads collapse
    unet, te = train_unet(recipe, tok, vae, latents, scenes, paths, resume)
    times["unet"] = time.time() - t0
    if recipe.decoder_parallel:
        decoder.join()
        torch.set_num_threads(threads)
        if decoder.exitcode != 0:
            raise RuntimeError(f"decoder fine-tuning process failed ({decoder.exitcode})")
    else:
        train_decoder(recipe, vae, latents / vae.config.scaling_factor, images, paths, resume)
    times["decoder"] = time.time() - t0
    load_decoder(vae, paths)
    export(recipe, paths, vae, te, tok, unet, None, latents)  # a usable model before the ControlNet stage
    if until == "unet":
        return times
    t0 = time.time()
    cn = train_controlnet(recipe, tok, te, unet, latents, scenes, paths, resume)
    times["controlnet"] = time.time() - t0
    export(recipe, paths, vae, te, tok, unet, cn, latents)
    (paths.run / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    return times


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "builtin" / "sfumato-demo")
    p.add_argument("--controlnet-out", type=Path, default=None,
                   help="default: <out's parent>/sfumato-demo-controlnet-outline")
    p.add_argument("--smoke", action="store_true", help="a few steps on a tiny dataset, into a temp dir")
    p.add_argument("--resume", action="store_true", help="continue from training/checkpoints")
    p.add_argument("--until", choices=("vae", "unet", "export"), default="export")
    p.add_argument("--checkpoints", type=Path, default=REPO / "training" / "checkpoints")
    p.add_argument("--run-dir", type=Path, default=REPO / "training" / "runs" / "demo")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override recipe fields")
    return p.parse_args(argv)


def with_settings(recipe, items: list[str]):
    """The recipe with ``--set KEY=VALUE`` overrides (JSON values, converted to the field's own type)."""
    for item in items:
        key, value = item.split("=", 1)
        recipe = replace(recipe, **{key: type(getattr(recipe, key))(json.loads(value))})
    return recipe


def main(argv: list[str] | None = None) -> Paths:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = with_settings(smoke_recipe() if args.smoke else Recipe(), args.set)
    if args.smoke:
        root = Path(tempfile.mkdtemp(prefix="sfumato-smoke-")) if args.out == parse_args([]).out else args.out.parent
        out = args.out if args.out != parse_args([]).out else root / "sfumato-demo"
        paths = Paths(out, root / "sfumato-demo-controlnet-outline", root / "checkpoints", root / "run")
    else:
        paths = Paths(args.out, args.controlnet_out or args.out.parent / "sfumato-demo-controlnet-outline",
                      args.checkpoints, args.run_dir)
    paths.make()
    t0 = time.time()
    times = train(recipe, paths, args.resume, args.until)
    log(f"total {time.time() - t0:.0f} s; stages " + json.dumps({k: round(v) for k, v in times.items()}))
    with open(paths.run / "times.json", "a") as f:
        f.write(json.dumps(times) + "\n")
    print(f"OUT {paths.out}")
    return paths


if __name__ == "__main__":
    main()
