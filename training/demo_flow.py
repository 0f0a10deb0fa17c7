"""Train Sfumato's flow demo model: a tiny Stable Diffusion 3 (MMDiT, rectified flow), from scratch, on CPU.

    python -m training.demo_flow [--out builtin/sfumato-demo-flow] [--smoke] [--fresh] [--until vae|transformer|controlnet]
    python -m training.demo_flow --transformer-from builtin/sfumato-demo-flow --out DIR   # a new ControlNet only

Why the SD3 layout (``engine/families/sd3.py``) and not Flux.1: SD3 conditions on CLIP-L and CLIP-G, both plain
``CLIPTextModelWithProjection`` classes we can shrink and train with the model, T5 is optional (diffusers and the
engine put zeros in its place), and it samples with real classifier-free guidance, which caption dropout teaches.
Flux.1 would need a T5 (or a guidance-distilled transformer) and 2×2 latent packing for nothing the demo needs.

Stages (each checkpointed under ``--work``; a rerun resumes where a run stopped unless ``--fresh``):
  1. tokenizer    the word-level CLIP tokenizer of ``training.demo_model`` (every world word is one token), with a
                  16-token window (``clip_tokens``): the longest caption is 12 tokens with start and end, and the
                  engine, as diffusers' SD3 pipeline, reads CLIP in windows of the tokenizer's ``model_max_length``
                  (77 for every released model, A1111's chunks);
  2. data         the world of the first demo model (``training.world``), held-out combos excluded;
  3. vae          ``AutoencoderKL`` f4 with 16 latent channels (64×64×3 → 16×16×16) and no quant convs, as SD3's
                  VAE; trained with ``demo_model.train_vae`` (L1 + MSE + image-gradient L1 + 1e-5·KL, log-variance
                  bias −8). Its reconstructions of fresh world images are read by ``training.evaluate``; the
                  transformer stage refuses to start unless their shape accuracy reaches ``vae_shape_gate``.
                  The passing VAE is kept as an fp16 diffusers folder (``--vae-dir``) that later runs reuse;
  4. latents      posterior means cached once; ``shift_factor`` = their mean and ``scaling_factor`` = 1 / their
                  std, so the transformer sees (z − shift)·scale with unit variance (as SD3's VAE config says);
  5. transformer  ``SD3Transformer2DModel`` + the two CLIP text encoders trained jointly on the rectified flow
                  x_σ = (1 − σ)·x₀ + σ·ε with the velocity target v = ε − x₀ and timestep σ·1000, σ drawn from a
                  logit-normal (Esser et al. 2024, §3.1 and §3.1's "logit-normal sampling"), with caption dropout for
                  classifier-free guidance (Ho & Salimans 2022);
  6. controlnet   ``SD3ControlNetModel`` (SD 3.5's ControlNet layout) on outline maps read through the VAE, started
                  from the transformer's blocks, transformer and text encoders frozen;
  7. export       fp16 safetensors ``StableDiffusion3Pipeline`` folder (no T5) + ``sfumato.json``, the ControlNet
                  folder beside it, and SD 3.5's all-in-one single file of the model in the run folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

from engine.families.repeated_tokens import RepeatedLastTokenAttention
from engine.families.sd3 import PROMPTS as SD3_PROMPTS

from . import world
from .demo_model import (Budget, Checkpoint, build_tokenizer, build_vae, encode_latents, folder_mb, log, n_params,
                         quick_eval, run_stage, save_model_folder, train_vae, with_settings)

REPO = Path(__file__).resolve().parent.parent
CONTROLNET_NAME = "sfumato-demo-flow-controlnet-outline"
# Without a T5, diffusers and the engine put this many zero tokens in its place (``max_sequence_length``); training
# conditions on the same context so that the zeros' share of every attention row is the one sampling will see.
T5_TOKENS = SD3_PROMPTS.plain.max_tokens  # 256


# --------------------------------------------------------------------------- recipe


@dataclass
class FlowRecipe:
    """Every hyper-parameter of a run. The ``vae_*`` fields, ``seed``, ``bf16``, ``monitor_every`` and
    ``checkpoint_every_s`` are the names ``demo_model.train_vae`` / ``build_vae`` read. A stage stops at whichever
    of ``*_seconds`` / ``*_max_steps`` comes first (cosine learning-rate tail over the used fraction)."""

    seed: int = 0
    n_images: int = 20_000
    # VAE: f4 (three blocks), 16 latent channels, thin full-resolution block
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_latent_channels: int = 16
    vae_quant_conv: bool = False
    vae_norm_groups: int = 1  # per-channel GroupNorm would erase the flat colours these images are made of
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-5
    vae_grad_weight: float = 0.5
    vae_seconds: float = 1800  # the committed VAE passed its gate after 1,531 steps in 1,701 s on a shared CPU
    vae_max_steps: int = 100_000
    vae_bf16: bool = False  # bf16 autocast measured slower than fp32 for this VAE on the CPU
    vae_shape_gate: float = 0.90  # evaluator's shape accuracy on reconstructions needed before the transformer
    vae_eval_images: int = 256
    # text encoders (CLIP-L and CLIP-G slots of the SD3 layout)
    # CLIP's window. Every context token costs as much as an image token in the MMDiT's joint blocks: 16 instead of
    # 77 made a training step 1.75x faster (0.37 vs 0.65 s, batch 32, 2 threads), the text encoders 3.9x
    clip_tokens: int = 16
    te_hidden: int = 64
    te_layers: int = 3  # the penultimate layer conditions the transformer; the last one only feeds the pooled output
    te_heads: int = 4
    te_ffn: int = 256
    # transformer
    patch_size: int = 2
    layers: int = 4
    # 6 heads (width 192) instead of 4 (128): at the same 65 minutes (8.1k against 9.3k steps) shape went 0.73 → 0.90
    # at cfg 5, the small circles and squares the narrower model drew as one rounded square (training/assets/flow-run3)
    heads: int = 6
    head_dim: int = 32
    pos_embed_max_size: int = 32  # patches per side: up to 32×2×4 = 256 px
    # σ shift of training and the saved scheduler: SD3's own 3.0. It moves training toward high σ, where the layout
    # (position) is decided; a 40-minute probe with shift 1 left position at chance (0.25)
    sigma_shift: float = 3.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    batch: int = 32  # twice the steps of batch 64 for the same compute: the context stream makes each token dear
    lr: float = 1e-3
    te_lr: float = 2e-3
    warmup: int = 100
    seconds: float = 3900  # with the VAE's 1,700 s and the ControlNet's, within the 2 h budget
    max_steps: int = 100_000
    caption_drop_p: float = 0.12
    caption_empty_p: float = 0.1
    # outline ControlNet (SD3ControlNetModel: a copy of the transformer's first blocks, frozen base)
    # Two blocks (their residuals spread over the transformer's four): each ControlNet step also runs the frozen
    # transformer forward and backward, so a full copy would leave a 20-minute budget with too few steps
    cn_layers: int = 2
    cn_batch: int = 32
    # 2e-3, not 1e-3: at the same 2,543 steps on run 3's transformer, outline IoU 0.849 → 0.861 (a third block at
    # 1e-3, 2,180 steps in the same time: 0.842; training/assets/flow-run3/controlnet-lr2e-3)
    cn_lr: float = 2e-3
    cn_seconds: float = 1200
    cn_max_steps: int = 100_000
    cn_empty_p: float = 0.3
    # Share of ControlNet captions that name another position than the outline's (the picture is the outline's), so
    # the outline wins where the artist's caption and drawing disagree, as an outline ControlNet should. Without it,
    # a moved outline moved the shape in 16% of pictures; with 0.3, 100%, IoU 0.897 → 0.890 (cfg 3), empty prompt
    # 0.627 → 0.713 (training/assets/flow-run3/controlnet-conflict)
    cn_conflict_p: float = 0.3
    # written to sfumato.json and the card, from the evaluator's CFG table: run 3 peaks at 3 (shape 0.95, size 0.99;
    # at 5: 0.90, 0.97; ControlNet IoU 0.89 against 0.86)
    recommended_cfg: float = 3.0
    # bookkeeping
    bf16: bool = False  # bf16 autocast measured 2.2x slower than fp32 for this transformer on the CPU
    checkpoint_every_s: float = 120
    monitor_every: int = 1000  # VAE: held-out L1 every monitor_every // 5 steps
    caption_monitor_every: int = 250  # transformer: the caption gaps (``CaptionMonitor``)
    sample_every: int = 1000


def smoke_recipe() -> FlowRecipe:
    """A few steps of every stage on a tiny dataset (CI): the VAE gate is not enforced."""
    return replace(FlowRecipe(), n_images=96, vae_seconds=5, vae_max_steps=3, vae_batch=8, vae_shape_gate=0.0,
                   vae_eval_images=16, seconds=8, max_steps=3, batch=8, warmup=1, cn_seconds=8, cn_max_steps=3, cn_batch=8, monitor_every=10**9, caption_monitor_every=10**9,
                   sample_every=10**9, checkpoint_every_s=10**9)


@dataclass
class FlowPaths:
    out: Path  # the final StableDiffusion3Pipeline folder
    controlnet_out: Path  # the outline SD3ControlNetModel folder
    vae_dir: Path  # the VAE stage's product (fp16 diffusers folder + reconstruction report), reused by later runs
    checkpoints: Path
    run: Path

    def make(self) -> "FlowPaths":
        for p in (self.checkpoints, self.run):
            p.mkdir(parents=True, exist_ok=True)
        return self


# --------------------------------------------------------------------------- stage 3: VAE


def reopen_if_budget_raised(ckpt: Checkpoint, seconds: float, max_steps: int) -> None:
    """Mark a finished stage's checkpoint unfinished when this run's budget reaches past it, so that
    ``run_stage`` trains on from it (its cosine tail follows the new budget) instead of skipping the stage."""
    state = ckpt.load()
    if state is not None and state["done"]:
        if not Budget(seconds, max_steps, step=state["step"], elapsed=state["elapsed"]).done:
            log(f"{ckpt.path.stem}: budget raised past step {state['step']}: training on")
            ckpt.save(**{**state, "done": False})


def fp16_round_trip(module: torch.nn.Module) -> torch.nn.Module:
    """The module as its fp16 export will load (weights rounded to fp16, computed in fp32)."""
    return module.half().float()


@torch.no_grad()
def reconstruction_scores(vae, n: int, seed: int = 4242) -> dict[str, float]:
    """``training.evaluate`` accuracy of the VAE's reconstructions (posterior means) of ``n`` fresh world scenes
    (held-out combos included), and their L1 error in 1/255 units."""
    from .demo_lora import vae_round_trip
    from .evaluate import classify, score

    rng = np.random.default_rng([seed, n])
    scenes = [world.sample_scene(rng, exclude_held_out=False) for _ in range(n)]
    images = np.stack([world.render(s) for s in scenes])
    recon = np.concatenate([vae_round_trip(vae, images[i : i + 64]) for i in range(0, n, 64)])
    scores = score([classify(im) for im in recon], scenes)
    scores["l1_255"] = float(np.abs(recon.astype(np.float32) - images.astype(np.float32)).mean())
    return scores


def vae_stage(recipe: FlowRecipe, images: np.ndarray, paths: FlowPaths, resume: bool):
    """The VAE from ``paths.vae_dir`` when one that passes the gate is there, else trained (resumably: a finished
    checkpoint whose budget ``recipe`` raises trains on) and saved there. Returns (vae in eval mode, its report)."""
    from diffusers import AutoencoderKL

    report_path = paths.vae_dir / "reconstruction.json"
    if resume and report_path.exists() and (paths.vae_dir / "config.json").exists():
        report = json.loads(report_path.read_text())
        if report["scores"]["shape"] >= recipe.vae_shape_gate:
            vae = AutoencoderKL.from_pretrained(paths.vae_dir, local_files_only=True, dtype=torch.float32)
            log(f"vae: reusing {paths.vae_dir} (reconstruction shape {report['scores']['shape']:.3f})")
            return vae.eval().requires_grad_(False), report
    if resume:
        reopen_if_budget_raised(Checkpoint(paths.checkpoints, "vae"), recipe.vae_seconds, recipe.vae_max_steps)
    t0 = time.time()
    vae = fp16_round_trip(train_vae(recipe, images, paths, resume))  # checkpoint: <checkpoints>/vae.pt
    state = Checkpoint(paths.checkpoints, "vae").load()
    scores = reconstruction_scores(vae, recipe.vae_eval_images)
    report = {"scores": scores, "steps": state["step"], "train_seconds": round(state["elapsed"]),
              "params": n_params(vae), "eval_images": recipe.vae_eval_images,
              "config": {k: v for k, v in asdict(recipe).items() if k.startswith("vae_")}}
    log(f"vae: reconstructions of {recipe.vae_eval_images} fresh scenes: "
        + json.dumps({k: round(v, 3) for k, v in scores.items()}) + f" ({time.time() - t0:.0f} s with training)")
    tmp = paths.vae_dir.with_name(paths.vae_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    vae.float()
    (tmp / "reconstruction.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(paths.vae_dir, ignore_errors=True)
    tmp.rename(paths.vae_dir)
    return vae, report


def checkpoint_vae_scores(recipe: FlowRecipe, paths: FlowPaths) -> str:
    """The reconstruction scores of the VAE checkpoint as it stands (run beside a training VAE stage to watch it)."""
    state = Checkpoint(paths.checkpoints, "vae").load()
    if state is None:
        return f"no VAE checkpoint in {paths.checkpoints}"
    vae = build_vae(recipe)
    vae.load_state_dict(state["modules"]["vae"])
    scores = reconstruction_scores(fp16_round_trip(vae.eval()), recipe.vae_eval_images)
    return (f"vae checkpoint step {state['step']} ({state['elapsed']:.0f} s): "
            + json.dumps({k: round(v, 3) for k, v in scores.items()}))


def check_vae_gate(report: dict, gate: float) -> None:
    shape = report["scores"]["shape"]
    if shape < gate:
        raise SystemExit(f"vae: reconstructions score shape {shape:.3f} < {gate:.2f}; train the VAE longer "
                         f"(--fresh --set vae_seconds=...) before the transformer stage")


@torch.no_grad()
def cached_latents(vae, images: np.ndarray, paths: FlowPaths, resume: bool) -> torch.Tensor:
    """Posterior means, encoded once; registers ``shift_factor`` (mean) and ``scaling_factor`` (1 / std) on the
    VAE config. Returns the latents as the transformer sees them: (z − shift) · scale."""
    path = paths.checkpoints / "latents.pt"
    weights = paths.vae_dir / "diffusion_pytorch_model.safetensors"
    if resume and path.exists() and path.stat().st_mtime >= weights.stat().st_mtime:
        cache = torch.load(path)
    else:
        t0 = time.time()
        z = encode_latents(vae, images)
        cache = {"latents": z, "shift_factor": float(z.mean()), "scaling_factor": float(1.0 / z.std())}
        torch.save(cache, path)
        log(f"latents: encoded {len(images)} in {time.time() - t0:.0f} s, shift {cache['shift_factor']:.4f}, "
            f"scaling {cache['scaling_factor']:.4f}")
    vae.register_to_config(shift_factor=cache["shift_factor"], scaling_factor=cache["scaling_factor"])
    return (cache["latents"] - cache["shift_factor"]) * cache["scaling_factor"]


# --------------------------------------------------------------------------- stage 5: transformer + text encoders


def build_text_encoder(recipe: FlowRecipe, tok, seed: int):
    """A small ``CLIPTextModelWithProjection`` (the class of SD3's CLIP-L and CLIP-G) with ``clip_tokens`` positions."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tok.get_vocab()), hidden_size=recipe.te_hidden, intermediate_size=recipe.te_ffn,
        num_hidden_layers=recipe.te_layers, num_attention_heads=recipe.te_heads, max_position_embeddings=recipe.clip_tokens,
        projection_dim=recipe.te_hidden, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return CLIPTextModelWithProjection(config)


def joint_width(recipe: FlowRecipe) -> int:
    """CLIP-L and CLIP-G hidden states side by side: the MMDiT's ``joint_attention_dim`` (and pooled width)."""
    return 2 * recipe.te_hidden


def build_transformer(recipe: FlowRecipe, latent_size: int, seed: int):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=latent_size, patch_size=recipe.patch_size, in_channels=recipe.vae_latent_channels,
        out_channels=recipe.vae_latent_channels, num_layers=recipe.layers, attention_head_dim=recipe.head_dim,
        num_attention_heads=recipe.heads, joint_attention_dim=joint_width(recipe),
        caption_projection_dim=recipe.heads * recipe.head_dim, pooled_projection_dim=joint_width(recipe),
        pos_embed_max_size=recipe.pos_embed_max_size, qk_norm="rms_norm",
    )


def encode_text(text_encoders, ids: torch.Tensor, width: int, t5_tokens: int = T5_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, pooled) exactly as ``StableDiffusion3Pipeline.encode_prompt`` builds them without T5: each CLIP's
    penultimate hidden state side by side, zero-padded to ``width``, then ``t5_tokens`` zero tokens in T5's place
    (1 when ``collapsed_zeros`` makes it stand for all of them); the pooled output is both CLIPs' projected
    end-of-text embeddings side by side."""
    hidden, pooled = [], []
    for encoder in text_encoders:
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    clip = F.pad(torch.cat(hidden, dim=-1), (0, width - sum(h.shape[-1] for h in hidden)))
    t5 = clip.new_zeros(clip.shape[0], t5_tokens, width)
    return torch.cat([clip, t5], dim=1), torch.cat(pooled, dim=-1)


@contextmanager
def collapsed_zeros(transformer, repeats: int = T5_TOKENS):
    """The transformer (or ControlNet) with the engine's ``RepeatedLastTokenAttention`` for a context whose LAST token
    stands for ``repeats`` identical ones, then diffusers' own processor again.

    T5's zero tokens enter the MMDiT identical and stay identical to the end (``engine.families.repeated_tokens``).
    Training on one zero token with a ln ``repeats`` bias is therefore the same function as sampling with all
    ``T5_TOKENS`` of them (``test_demo_flow_training`` checks it), at a fraction of the cost: the zeros would
    otherwise be most of the tokens. The engine samples the same way, with the same processor."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer.set_attn_processor(RepeatedLastTokenAttention(repeats))
    try:
        yield transformer
    finally:
        transformer.set_attn_processor(JointAttnProcessor2_0())


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift σ' = s·σ / (1 + (s − 1)·σ) (Esser et al. 2024, §5.3.2), as the scheduler applies it."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(n: int, rng: np.random.Generator, recipe: FlowRecipe) -> torch.Tensor:
    """Logit-normal σ = sigmoid(m + s·u), u ~ N(0, 1) (Esser et al. 2024, §3.1), then shifted."""
    u = rng.normal(recipe.logit_mean, recipe.logit_std, n).astype(np.float32)
    return shift_sigmas(torch.sigmoid(torch.from_numpy(u)), recipe.sigma_shift)


def flow_loss(transformer, text_encoders, z0: torch.Tensor, ids: torch.Tensor, sigma: torch.Tensor,
              noise: torch.Tensor, bf16: bool, reduce: bool = True, controlnet=None,
              control: torch.Tensor | None = None) -> torch.Tensor:
    """Rectified-flow loss ‖v − model(x_σ, 1000σ, c)‖² with x_σ = (1 − σ)·x₀ + σ·ε and v = ε − x₀
    (Liu et al. 2022; Esser et al. 2024, eq. 2 with the velocity target). T5's zero tokens are collapsed into one
    (``collapsed_zeros``): the same function, a third of the tokens. With a ``controlnet``, its block
    residuals for the ``control`` latents are added as ``StableDiffusion3ControlNetPipeline`` adds them."""
    s = sigma.view(-1, 1, 1, 1)
    x = (1 - s) * z0 + s * noise
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), collapsed_zeros(transformer):
        with torch.set_grad_enabled(torch.is_grad_enabled() and controlnet is None):  # a ControlNet trains alone
            context, pooled = encode_text(text_encoders, ids, transformer.config.joint_attention_dim, t5_tokens=1)
        residuals = None
        if controlnet is not None:
            with collapsed_zeros(controlnet):
                residuals = controlnet(hidden_states=x, controlnet_cond=control, conditioning_scale=1.0,
                                       encoder_hidden_states=context, pooled_projections=pooled,
                                       timestep=sigma * 1000, return_dict=False)[0]
        pred = transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=context,
                           pooled_projections=pooled, block_controlnet_hidden_states=residuals,
                           return_dict=False)[0].float()
    err = (pred - (noise - z0)) ** 2
    return err.mean() if reduce else err.mean(dim=(1, 2, 3))


class CaptionMonitor:
    """Early signals that text conditioning is learned, on a fixed batch with fixed noise at several σ:
    loss(empty) − loss(true), loss(position swapped) − loss(true), loss(colour swapped) − loss(true)."""

    def __init__(self, tok, latents: torch.Tensor, scenes: list[world.Scene], seed: int, n: int = 64):
        from .demo_model import tokenize

        rng = np.random.default_rng([seed, 99])
        idx = rng.choice(len(scenes), min(n, len(scenes)), replace=False)
        self.z0 = latents[idx]
        self.noise = torch.from_numpy(rng.standard_normal(self.z0.shape).astype(np.float32))
        picked = [scenes[i] for i in idx]
        pos = [replace(s, position=str(rng.choice([p for p in world.POSITIONS if p != s.position]))) for s in picked]
        col = [replace(s, colour=str(rng.choice([c for c in world.COLOURS if c not in (s.colour, s.background)])))
               for s in picked]
        self.ids = {"true": tokenize(tok, [world.full_caption(s) for s in picked]), "empty": tokenize(tok, [""] * len(idx)),
                    "pos": tokenize(tok, [world.full_caption(s) for s in pos]),
                    "col": tokenize(tok, [world.full_caption(s) for s in col])}

    @torch.no_grad()
    def __call__(self, transformer, text_encoders, bf16: bool, sigmas: tuple[float, ...] = (0.3, 0.6, 0.9)) -> str:
        parts = []
        for value in sigmas:
            sigma = torch.full((len(self.z0),), value)
            loss = {k: float(flow_loss(transformer, text_encoders, self.z0, ids, sigma, self.noise, bf16))
                    for k, ids in self.ids.items()}
            parts.append(f"σ={value}: true {loss['true']:.4f} empty {loss['empty'] - loss['true']:+.4f} "
                         f"pos {loss['pos'] - loss['true']:+.4f} col {loss['col'] - loss['true']:+.4f}")
        return " | ".join(parts)


def sampling_scheduler(recipe: FlowRecipe):
    """Euler on the flow σs, SD3's shipped sampler; the engine reads ``shift`` from this config."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=recipe.sigma_shift)


def make_pipeline(vae, text_encoders, tok, transformer, recipe: FlowRecipe):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=sampling_scheduler(recipe), vae=vae, text_encoder=text_encoders[0],
        tokenizer=tok, text_encoder_2=text_encoders[1], tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_transformer(recipe: FlowRecipe, tok, vae, latents: torch.Tensor, scenes: list[world.Scene],
                      paths: FlowPaths, resume: bool):
    """Joint transformer + CLIP-L/CLIP-G training; returns (transformer, (te_l, te_g)) in eval mode."""
    from .demo_model import tokenize

    text_encoders = (build_text_encoder(recipe, tok, recipe.seed + 10), build_text_encoder(recipe, tok, recipe.seed + 11))
    transformer = build_transformer(recipe, latents.shape[-1], recipe.seed + 12)
    te_params = [p for te in text_encoders for p in te.parameters()]
    log(f"transformer: {n_params(transformer) / 1e6:.2f} M params, text encoders 2 × "
        f"{n_params(text_encoders[0]) / 1e3:.0f} k params, {latents.shape[-1] // recipe.patch_size}² image tokens")
    opt = torch.optim.AdamW([{"params": transformer.parameters(), "lr": recipe.lr},
                             {"params": te_params, "lr": recipe.te_lr}], weight_decay=0.01)
    monitor = CaptionMonitor(tok, latents, scenes, recipe.seed)

    def train_mode(on: bool) -> None:
        for module in (transformer, *text_encoders):
            module.train(on)

    def step(i: int) -> float:
        rng = np.random.default_rng([recipe.seed, 5, i])
        idx = rng.integers(0, len(scenes), recipe.batch)
        captions = [world.random_caption(scenes[j], rng, recipe.caption_drop_p, recipe.caption_empty_p) for j in idx]
        z0 = latents[idx]
        noise = torch.from_numpy(rng.standard_normal(z0.shape).astype(np.float32))
        loss = flow_loss(transformer, text_encoders, z0, tokenize(tok, captions), sample_sigmas(len(idx), rng, recipe),
                         noise, recipe.bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(transformer.parameters()) + te_params, 1.0)
        opt.step()
        return loss.item()

    def every(i: int) -> None:
        if i % recipe.caption_monitor_every == 0:
            train_mode(False)
            log(f"transformer step {i}: {monitor(transformer, text_encoders, recipe.bf16)}")
            if i % recipe.sample_every == 0:
                acc = quick_eval(make_pipeline(vae, text_encoders, tok, transformer, recipe),
                                 paths.run / f"transformer_{i:06d}.png")
                log(f"transformer step {i}: quick eval (32 prompts, cfg 5) "
                    + json.dumps({k: round(v, 2) for k, v in acc.items()}))
            train_mode(True)

    budget = Budget(recipe.seconds, recipe.max_steps)
    if resume:
        reopen_if_budget_raised(Checkpoint(paths.checkpoints, "transformer"), recipe.seconds, recipe.max_steps)
    train_mode(True)
    run_stage("transformer", paths, resume, budget,
              {"transformer": transformer, "text_encoder": text_encoders[0], "text_encoder_2": text_encoders[1]},
              opt, step, [recipe.lr, recipe.te_lr], recipe.warmup, every, recipe.checkpoint_every_s)
    for module in (transformer, *text_encoders):
        module.eval().requires_grad_(False)
    return transformer, text_encoders


# --------------------------------------------------------------------------- stage 6: outline ControlNet


def build_controlnet(recipe: FlowRecipe, transformer):
    """An ``SD3ControlNetModel`` in the transformer's shape, started from its first ``cn_layers`` blocks, patch and
    text embeddings (as diffusers' ``from_transformer``), with the zero-initialised control patch embedding. It reads
    the real pooled text and the VAE's shift (``force_zeros_for_pooled_projection`` off: that flag is for InstantX's
    models), so the engine and diffusers' ControlNet pipeline feed it exactly what training did."""
    from diffusers import SD3ControlNetModel

    torch.manual_seed(recipe.seed + 13)
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    controlnet = SD3ControlNetModel.from_config({**config, "num_layers": recipe.cn_layers,
                                                 "extra_conditioning_channels": 0,
                                                 "force_zeros_for_pooled_projection": False})
    for part in ("pos_embed", "time_text_embed", "context_embedder"):
        getattr(controlnet, part).load_state_dict(getattr(transformer, part).state_dict())
    # The transformer's last block only reads the text (``context_pre_only``), so some of its weights have other
    # shapes than the ControlNet's full block: those start fresh.
    ours = controlnet.transformer_blocks.state_dict()
    controlnet.transformer_blocks.load_state_dict(
        {k: v for k, v in transformer.transformer_blocks.state_dict().items() if k in ours and ours[k].shape == v.shape},
        strict=False)
    return controlnet


@torch.no_grad()
def outline_latents(vae, scenes: list[world.Scene], paths: FlowPaths, resume: bool) -> torch.Tensor:
    """Every scene's outline map (white on black) as the ControlNet reads it: (VAE posterior mean − shift)·scale, the
    engine's and diffusers' SD3 ControlNet conditioning; encoded once and cached."""
    path = paths.checkpoints / "outline_latents.pt"
    weights = paths.vae_dir / "diffusion_pytorch_model.safetensors"
    if resume and path.exists() and path.stat().st_mtime >= weights.stat().st_mtime:
        return torch.load(path)
    t0 = time.time()
    maps = np.stack([world.render_outline(s) for s in scenes])
    latents = (encode_latents(vae, maps) - vae.config.shift_factor) * vae.config.scaling_factor
    torch.save(latents, path)
    log(f"controlnet: encoded {len(scenes)} outline maps in {time.time() - t0:.0f} s")
    return latents


def caption_scene(scene: world.Scene, rng: np.random.Generator, conflict_p: float) -> world.Scene:
    """The scene a ControlNet training caption describes: with probability ``conflict_p`` the same shape at another
    position than the picture and its outline, otherwise the scene itself. Draws from ``rng`` only when
    ``conflict_p`` > 0, so recipes without conflicts keep their exact training stream."""
    if conflict_p <= 0 or rng.random() >= conflict_p:
        return scene
    return scene.moved(str(rng.choice([p for p in world.POSITIONS if p != scene.position])))


def train_controlnet(recipe: FlowRecipe, tok, vae, text_encoders, transformer, latents: torch.Tensor,
                     scenes: list[world.Scene], paths: FlowPaths, resume: bool):
    """The outline ControlNet, trained on the flow loss with the transformer and text encoders frozen."""
    from .demo_model import tokenize

    controlnet = build_controlnet(recipe, transformer)
    controls = outline_latents(vae, scenes, paths, resume)
    log(f"controlnet: {n_params(controlnet) / 1e6:.2f} M params, {recipe.cn_layers} blocks")
    opt = torch.optim.AdamW(controlnet.parameters(), lr=recipe.cn_lr, weight_decay=0.01)

    def step(i: int) -> float:
        rng = np.random.default_rng([recipe.seed, 6, i])
        idx = rng.integers(0, len(scenes), recipe.cn_batch)
        captions = [world.random_caption(caption_scene(scenes[j], rng, recipe.cn_conflict_p), rng,
                                         recipe.caption_drop_p, recipe.cn_empty_p) for j in idx]
        z0 = latents[idx]
        noise = torch.from_numpy(rng.standard_normal(z0.shape).astype(np.float32))
        loss = flow_loss(transformer, text_encoders, z0, tokenize(tok, captions), sample_sigmas(len(idx), rng, recipe),
                         noise, recipe.bf16, controlnet=controlnet, control=controls[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        return loss.item()

    def every(i: int) -> None:
        if i % recipe.caption_monitor_every == 0:
            with torch.no_grad():
                rng = np.random.default_rng([recipe.seed, 66])
                idx = rng.choice(len(scenes), 64, replace=False)
                noise = torch.from_numpy(rng.standard_normal(latents[idx].shape).astype(np.float32))
                sigma, ids = torch.full((64,), 0.9), tokenize(tok, [""] * 64)
                args = (transformer, text_encoders, latents[idx], ids, sigma, noise, recipe.bf16)
                with_outline = flow_loss(*args, controlnet=controlnet, control=controls[idx])
                without = flow_loss(*args)
            log(f"controlnet step {i}: σ=0.9 empty-caption loss {float(without):.4f} → with outline "
                f"{float(with_outline):.4f}")

    if resume:
        reopen_if_budget_raised(Checkpoint(paths.checkpoints, "controlnet"), recipe.cn_seconds, recipe.cn_max_steps)
    controlnet.train()
    run_stage("controlnet", paths, resume, Budget(recipe.cn_seconds, recipe.cn_max_steps), {"controlnet": controlnet},
              opt, step, [recipe.cn_lr], 50, every, recipe.checkpoint_every_s)
    return controlnet.eval().requires_grad_(False)


# --------------------------------------------------------------------------- stage 7: export


@torch.no_grad()
def fit_preview_factors(vae, latents: torch.Tensor, n: int = 2048) -> tuple[list[list[float]], list[float]]:
    """Least-squares latent→RGB map: each latent cell as the transformer sees it against the mean decoded RGB in
    [-1, 1] of its pixel block. Returns (16×3 factors, 3 biases)."""
    z = latents[:n]
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    rgb = torch.cat([vae.decode(z[i : i + 256] / scale + shift).sample for i in range(0, len(z), 256)])
    rgb = F.avg_pool2d(rgb.clamp(-1, 1), rgb.shape[-1] // z.shape[-1])
    channels = z.shape[1]
    x = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, channels), torch.ones(z.numel() // channels, 1)], dim=1)
    y = rgb.permute(0, 2, 3, 1).reshape(-1, 3)
    sol = torch.linalg.lstsq(x.double(), y.double()).solution.float()
    return [[round(float(v), 4) for v in row] for row in sol[:channels]], [round(float(v), 4) for v in sol[channels]]


def export(recipe: FlowRecipe, paths: FlowPaths, vae, text_encoders, tok, transformer, controlnet,
           latents: torch.Tensor, extra_meta: dict | None = None) -> Path:
    """fp16 safetensors ``StableDiffusion3Pipeline`` folder (no T5) in its final place, plus ``sfumato.json``; the
    outline ControlNet beside it; and the same model as SD 3.5's all-in-one single file (with its ``.config/``
    folder, as the engine reads single files whose shapes no shipped config has) in the run folder.
    Returns the single file's path."""
    import copy

    from .sd3_single_file import sd3_all_in_one

    factors, bias = fit_preview_factors(vae, latents)
    pipe = make_pipeline(copy.deepcopy(vae), tuple(copy.deepcopy(te) for te in text_encoders), tok,
                         copy.deepcopy(transformer), recipe)
    save_model_folder(pipe, paths.out, "sfumato-demo-flow", factors, bias,
                      "applied to latents as the transformer sees them ((z - shift_factor) * scaling_factor); "
                      "each latent cell maps to the mean RGB in [-1, 1] of its pixel block",
                      {"controlnets": [paths.controlnet_out.name], "recommended_cfg": recipe.recommended_cfg,
                       "recommended_sampler": "Euler", "recommended_schedule": "Simple", "recommended_steps": 20,
                       **(extra_meta or {})})
    cn = copy.deepcopy(controlnet).to(dtype=torch.float16)
    shutil.rmtree(paths.controlnet_out, ignore_errors=True)
    cn.save_pretrained(paths.controlnet_out, safe_serialization=True)
    single = paths.run / f"{paths.out.name}.safetensors"
    shutil.rmtree(single.with_suffix(".config"), ignore_errors=True)
    sd3_all_in_one(pipe, single, with_config_from=paths.out)
    log(f"export: {paths.out} ({folder_mb(paths.out):.1f} MB), {paths.controlnet_out} "
        f"({folder_mb(paths.controlnet_out):.1f} MB), single file {single} ({single.stat().st_size / 2**20:.1f} MB)")
    return single


# --------------------------------------------------------------------------- main


def load_transformer(model_dir: Path):
    """The transformer and the two text encoders of a saved ``sfumato-demo-flow`` folder, in fp32 and frozen: the
    weights a new ControlNet trains against when only that stage is rerun (``--transformer-from``). They are the
    fp16-rounded weights that ship, so the ControlNet learns exactly the base it will be used with."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    transformer = SD3Transformer2DModel.from_pretrained(model_dir, subfolder="transformer", local_files_only=True,
                                                        dtype=torch.float32)
    text_encoders = tuple(CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder=sub, local_files_only=True,
                                                                      dtype=torch.float32)
                          for sub in ("text_encoder", "text_encoder_2"))
    for module in (transformer, *text_encoders):
        module.eval().requires_grad_(False)
    log(f"transformer: {n_params(transformer) / 1e6:.2f} M params, loaded with its text encoders from {model_dir}")
    return transformer, text_encoders


def train(recipe: FlowRecipe, paths: FlowPaths, resume: bool, until: str = "export",
          transformer_from: Path | None = None) -> dict:
    """Run the stages in order; returns wall seconds per stage. With ``transformer_from``, the transformer stage
    is skipped and that saved model's transformer and text encoders are used instead."""
    torch.manual_seed(recipe.seed)
    times: dict[str, float] = {}
    t0 = time.time()
    tok = build_tokenizer(paths.checkpoints / "tokenizer", recipe.clip_tokens)
    images, scenes = world.make_dataset(recipe.n_images, recipe.seed)
    times["data"] = time.time() - t0
    log(f"data: {len(scenes)} images in {times['data']:.1f} s")
    t0 = time.time()
    vae, report = vae_stage(recipe, images, paths, resume)
    times["vae"] = time.time() - t0
    if until == "vae":
        return times
    check_vae_gate(report, recipe.vae_shape_gate)
    latents = cached_latents(vae, images, paths, resume)
    t0 = time.time()
    if transformer_from is None:
        transformer, text_encoders = train_transformer(recipe, tok, vae, latents, scenes, paths, resume)
    else:
        transformer, text_encoders = load_transformer(transformer_from)
    times["transformer"] = time.time() - t0
    if until == "transformer":
        return times
    t0 = time.time()
    controlnet = train_controlnet(recipe, tok, vae, text_encoders, transformer, latents, scenes, paths, resume)
    times["controlnet"] = time.time() - t0
    if until == "controlnet":
        return times
    export(recipe, paths, vae, text_encoders, tok, transformer, controlnet, latents,
           {"vae_reconstruction": {k: round(v, 3) for k, v in report["scores"].items()}})
    (paths.run / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    return times


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "builtin" / "sfumato-demo-flow")
    p.add_argument("--vae-dir", type=Path, default=REPO / "training" / "assets" / "sfumato-demo-flow-vae",
                   help="where the VAE stage keeps its product; a passing VAE there is reused")
    p.add_argument("--work", type=Path, default=REPO / "training" / "checkpoints" / "flow",
                   help="checkpoints of the stages (resumed on rerun)")
    p.add_argument("--run-dir", type=Path, default=REPO / "training" / "runs" / "flow")
    p.add_argument("--smoke", action="store_true", help="a few steps on a tiny dataset, into a temp dir")
    p.add_argument("--fresh", action="store_true", help="ignore checkpoints and the saved VAE: start over")
    p.add_argument("--until", choices=("vae", "transformer", "controlnet", "export"), default="export")
    p.add_argument("--controlnet-out", type=Path, default=None,
                   help=f"default: <out's parent>/{CONTROLNET_NAME}")
    p.add_argument("--transformer-from", type=Path, default=None, metavar="MODEL_DIR",
                   help="skip the transformer stage: train the ControlNet against this saved model's transformer "
                        "and text encoders (they are exported again unchanged)")
    p.add_argument("--vae-report", action="store_true", help="only score the VAE checkpoint's reconstructions")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override recipe fields (JSON values)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> FlowPaths:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = with_settings(smoke_recipe() if args.smoke else FlowRecipe(), args.set)
    defaults = parse_args([])
    if args.smoke:  # everything under one scratch folder (the --out's parent when one is given)
        root = Path(tempfile.mkdtemp(prefix="sfumato-flow-smoke-")) if args.out == defaults.out else args.out.parent
        out = args.out if args.out != defaults.out else root / "sfumato-demo-flow"
        paths = FlowPaths(out, args.controlnet_out or root / CONTROLNET_NAME, root / "vae", root / "checkpoints",
                          root / "run")
    else:
        paths = FlowPaths(args.out, args.controlnet_out or args.out.parent / CONTROLNET_NAME, args.vae_dir, args.work,
                          args.run_dir)
    paths.make()
    if args.vae_report:
        log(checkpoint_vae_scores(recipe, paths))
        return paths
    t0 = time.time()
    times = train(recipe, paths, not args.fresh, args.until, args.transformer_from)
    log(f"total {time.time() - t0:.0f} s; stages " + json.dumps({k: round(v) for k, v in times.items()}))
    with open(paths.run / "times.json", "a") as f:
        f.write(json.dumps(times) + "\n")
    print(f"OUT {paths.out}")
    return paths


if __name__ == "__main__":
    main()
