"""Train Sfumato's flow demo model: a tiny Stable Diffusion 3 (MMDiT, rectified flow), from scratch, on CPU.

    python -m training.demo_flow [--out builtin/sfumato-demo-flow] [--smoke] [--fresh] [--until vae|transformer]

Why the SD3 layout (``engine/families/sd3.py``) and not Flux.1: SD3 conditions on CLIP-L and CLIP-G, both plain
``CLIPTextModelWithProjection`` classes we can shrink and train with the model, T5 is optional (diffusers and the
engine put zeros in its place), and it samples with real classifier-free guidance, which caption dropout teaches.
Flux.1 would need a T5 (or a guidance-distilled transformer) and 2×2 latent packing for nothing the demo needs.

Stages (each checkpointed under ``--work``; a rerun resumes where a run stopped unless ``--fresh``):
  1. tokenizer    the word-level CLIP tokenizer of ``training.demo_model`` (every world word is one token), padded
                  to 77 tokens because the engine feeds CLIP 77-token chunks, as A1111 does;
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
  6. export       fp16 safetensors ``StableDiffusion3Pipeline`` folder (no T5) + ``sfumato.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from . import world
from .demo_model import (Budget, Checkpoint, build_tokenizer, build_vae, folder_mb, log, n_params, run_stage,
                         save_grid, to_tensor, train_vae)

REPO = Path(__file__).resolve().parent.parent
CLIP_TOKENS = 77  # the engine reads CLIP in A1111's 77-token chunks, so position embeddings must reach 77


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
    vae_seconds: float = 2400
    vae_max_steps: int = 100_000
    vae_bf16: bool = False  # bf16 autocast measured slower than fp32 for this VAE on the CPU
    vae_shape_gate: float = 0.90  # evaluator's shape accuracy on reconstructions needed before the transformer
    vae_eval_images: int = 256
    # text encoders (CLIP-L and CLIP-G slots of the SD3 layout)
    te_hidden: int = 64
    te_layers: int = 3  # the penultimate layer conditions the transformer; the last one only feeds the pooled output
    te_heads: int = 4
    te_ffn: int = 256
    # transformer
    patch_size: int = 2
    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    pos_embed_max_size: int = 32  # patches per side: up to 32×2×4 = 256 px
    sigma_shift: float = 1.0  # σ shift of training and the saved scheduler (SD3 uses 3.0 at 1024²)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    batch: int = 64
    lr: float = 1e-3
    te_lr: float = 2e-3
    warmup: int = 100
    seconds: float = 2700
    max_steps: int = 100_000
    caption_drop_p: float = 0.12
    caption_empty_p: float = 0.1
    # bookkeeping
    bf16: bool = True
    checkpoint_every_s: float = 120
    monitor_every: int = 1000  # VAE: held-out L1 every monitor_every // 5 steps
    sample_every: int = 1000


def smoke_recipe() -> FlowRecipe:
    """A few steps of every stage on a tiny dataset (CI): the VAE gate is not enforced."""
    return replace(FlowRecipe(), n_images=96, vae_seconds=5, vae_max_steps=3, vae_batch=8, vae_shape_gate=0.0,
                   vae_eval_images=16, seconds=8, max_steps=3, batch=8, warmup=1, monitor_every=10**9,
                   sample_every=10**9, checkpoint_every_s=10**9)


@dataclass
class FlowPaths:
    out: Path  # the final StableDiffusion3Pipeline folder
    vae_dir: Path  # the VAE stage's product (fp16 diffusers folder + reconstruction report), reused by later runs
    checkpoints: Path
    run: Path

    def make(self) -> "FlowPaths":
        for p in (self.checkpoints, self.run):
            p.mkdir(parents=True, exist_ok=True)
        return self


# --------------------------------------------------------------------------- stage 3: VAE


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
    ckpt = Checkpoint(paths.checkpoints, "vae")
    state = ckpt.load() if resume else None
    if state is not None and state["done"]:
        budget = Budget(recipe.vae_seconds, recipe.vae_max_steps, step=state["step"], elapsed=state["elapsed"])
        if not budget.done:
            log(f"vae: budget raised past step {state['step']}: training on")
            ckpt.save(**{**state, "done": False})
    t0 = time.time()
    vae = fp16_round_trip(train_vae(recipe, images, paths, resume))  # checkpoint: <checkpoints>/vae.pt
    state = ckpt.load()
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
        z = torch.cat([vae.encode(to_tensor(images[i : i + 256])).latent_dist.mean for i in range(0, len(images), 256)])
        cache = {"latents": z, "shift_factor": float(z.mean()), "scaling_factor": float(1.0 / z.std())}
        torch.save(cache, path)
        log(f"latents: encoded {len(images)} in {time.time() - t0:.0f} s, shift {cache['shift_factor']:.4f}, "
            f"scaling {cache['scaling_factor']:.4f}")
    vae.register_to_config(shift_factor=cache["shift_factor"], scaling_factor=cache["scaling_factor"])
    return (cache["latents"] - cache["shift_factor"]) * cache["scaling_factor"]


# --------------------------------------------------------------------------- main


def train(recipe: FlowRecipe, paths: FlowPaths, resume: bool, until: str = "export") -> dict:
    """Run the stages in order; returns wall seconds per stage."""
    torch.manual_seed(recipe.seed)
    times: dict[str, float] = {}
    t0 = time.time()
    tok = build_tokenizer(paths.checkpoints / "tokenizer", CLIP_TOKENS)
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
    raise NotImplementedError("transformer stage")


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
    p.add_argument("--until", choices=("vae", "transformer", "export"), default="export")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override recipe fields (JSON values)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> FlowPaths:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = smoke_recipe() if args.smoke else FlowRecipe()
    for item in args.set:
        key, value = item.split("=", 1)
        kind = type(getattr(recipe, key))
        recipe = replace(recipe, **{key: kind(json.loads(value))})
    defaults = parse_args([])
    if args.smoke:  # everything under one scratch folder (the --out's parent when one is given)
        root = Path(tempfile.mkdtemp(prefix="sfumato-flow-smoke-")) if args.out == defaults.out else args.out.parent
        out = args.out if args.out != defaults.out else root / "sfumato-demo-flow"
        paths = FlowPaths(out, root / "vae", root / "checkpoints", root / "run")
    else:
        paths = FlowPaths(args.out, args.vae_dir, args.work, args.run_dir)
    paths.make()
    t0 = time.time()
    times = train(recipe, paths, not args.fresh, args.until)
    log(f"total {time.time() - t0:.0f} s; stages " + json.dumps({k: round(v) for k, v in times.items()}))
    with open(paths.run / "times.json", "a") as f:
        f.write(json.dumps(times) + "\n")
    print(f"OUT {paths.out}")
    return paths


if __name__ == "__main__":
    main()
