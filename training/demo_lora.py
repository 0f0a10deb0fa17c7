"""Train Sfumato's demo LoRA: ``sfumato-outline`` teaches the demo model to draw OUTLINED shapes.

    python -m training.demo_lora [--out builtin/loras] [--smoke] [--threads 1]

The demo model (``builtin/sfumato-demo``) only ever saw filled shapes; this LoRA (Hu et al. 2021,
"LoRA: Low-Rank Adaptation of Large Language Models") on its UNet makes every shape a ring
``world.OUTLINE_WIDTH`` px wide in the shape's colour around a hollow of background, with the usual
captions (no trigger word: the demo vocabulary has none to spare, and the LoRA is the switch).

Stages:
  1. data      ``n_images`` outlined world scenes (``training.world``, held-out combos excluded);
  2. latents   the demo VAE's posterior means, then refined by decoder inversion: gradient descent on
               the latent so that ``decode(z)`` matches the outlined image (L1 + MSE). The f8 VAE's
               encoder never saw rings and returns latents that decode to blurred, miscoloured blobs
               (``measure_vae_round_trip``), while its decoder can draw a ring when given the right
               latent; training on the encoder's latents would teach the UNet the blobs;
  3. lora      rank-``rank`` LoRA (peft) on the UNet's attention projections, transformer in/out and
               feed-forward layers and resnet convolutions (LoCon), text encoder and base weights frozen;
               the demo's own DDPM forward process and v-prediction target (Salimans & Ho 2022, §4),
               L_simple loss (Ho et al. 2020, eq. 14), caption dropout as in the demo's training;
  4. export    kohya's key layout (``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` /
               ``.alpha``) in fp16 safetensors with kohya-style ``ss_*`` metadata, A1111's preview
               image ``<name>.preview.png`` and its sidecar ``<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

from . import world
from .demo_model import Budget, diffusion_target, lr_factor, to_tensor, tokenize

REPO = Path(__file__).resolve().parent.parent
BASE_MODEL = REPO / "builtin" / "sfumato-demo"
NAME = "sfumato-outline"
#: peft ``target_modules`` (matched against the end of each module path): attention projections, the
#: transformer's in/out projections and feed-forward layers, and the resnets' two convolutions.
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2")
KOHYA_PREFIX = "lora_unet_"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- recipe


@dataclass
class Recipe:
    """Every hyper-parameter of a run. A stage stops at whichever of ``*_seconds`` / ``*_steps`` comes first."""

    seed: int = 0
    n_images: int = 256
    outline_width: int = world.OUTLINE_WIDTH
    # decoder inversion
    invert_steps: int = 24
    invert_lr: float = 0.2  # in unscaled latent units (posterior means have std ≈ 5)
    invert_batch: int = 64
    invert_seconds: float = 360
    # LoRA
    rank: int = 8
    alpha: float = 8.0
    batch: int = 16
    lr: float = 4e-3
    warmup: int = 10
    seconds: float = 600
    max_steps: int = 100_000
    caption_drop_p: float = 0.12
    caption_empty_p: float = 0.1
    # preview
    preview_prompts: tuple[str, ...] = (
        "a large red circle, blue background", "a large yellow square, black background",
        "a large white triangle, green background", "a large blue circle, gray background",
    )
    preview_steps: int = 20
    preview_cfg: float = 3.0


def smoke_recipe() -> Recipe:
    """A few steps of every stage: seconds end to end (CI)."""
    return replace(Recipe(), n_images=8, invert_steps=2, invert_batch=8, batch=4, max_steps=3, warmup=1,
                   preview_prompts=("a red circle",), preview_steps=2)


# --------------------------------------------------------------------------- stages


def load_base(base: Path = BASE_MODEL):
    """The demo pipeline (fp32, CPU), every weight frozen."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True, dtype=torch.float32)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def outlined_dataset(recipe: Recipe) -> tuple[np.ndarray, list[world.Scene]]:
    rng = np.random.default_rng(recipe.seed)
    scenes = [replace(world.sample_scene(rng), style="outlined") for _ in range(recipe.n_images)]
    images = np.stack([world.render(s, outline_width=recipe.outline_width) for s in scenes])
    return images, scenes


def decode_to_uint8(vae, latents: torch.Tensor) -> np.ndarray:
    """Unscaled latents → uint8 (N, 64, 64, 3)."""
    with torch.no_grad():
        y = vae.decode(latents).sample
    return ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def invert_decoder(vae, images: np.ndarray, recipe: Recipe) -> torch.Tensor:
    """Unscaled latents whose decoding matches ``images``: the encoder's posterior means refined by
    ``invert_steps`` Adam steps on L1 + MSE of ``vae.decode(z)`` against the image (decoder frozen)."""
    x_all = to_tensor(images)
    out = []
    budget = Budget(recipe.invert_seconds, recipe.invert_steps * math.ceil(len(images) / recipe.invert_batch)).start()
    steps = recipe.invert_steps
    for start in range(0, len(images), recipe.invert_batch):
        x = x_all[start : start + recipe.invert_batch]
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean.clone()
        z.requires_grad_(True)
        opt = torch.optim.Adam([z], lr=recipe.invert_lr)
        for _ in range(steps):
            y = vae.decode(z).sample
            loss = F.l1_loss(y, x) + F.mse_loss(y, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            budget.tick()
        out.append(z.detach())
        log(f"latents: {start + len(x)}/{len(images)} inverted, loss {loss.item():.4f}, {budget.elapsed:.0f} s")
        if budget.done and start + len(x) < len(images):  # keep the images inverted so far
            log("latents: time budget used; training on the inverted part only")
            break
    return torch.cat(out)


def vae_round_trip(vae, images: np.ndarray, latents: torch.Tensor | None = None) -> np.ndarray:
    """Decoded images from ``latents`` (default: the encoder's posterior means of ``images``)."""
    if latents is None:
        with torch.no_grad():
            latents = vae.encode(to_tensor(images)).latent_dist.mean
    return decode_to_uint8(vae, latents)


def measure_vae_round_trip(vae, images: np.ndarray, scenes: list[world.Scene], latents: torch.Tensor | None = None) -> dict:
    """How much of the outline survives the VAE: share read as the scenes' style per size, and colour accuracy."""
    from .evaluate import classify

    readings = [classify(im) for im in vae_round_trip(vae, images, latents)]
    out = {f"style_right_{size}": float(np.mean([r.style == s.style for r, s in zip(readings, scenes) if s.size == size]))
           for size in world.SIZES}
    out["colour"] = float(np.mean([r.colour == s.colour for r, s in zip(readings, scenes)]))
    return out


def vae_width_table(vae, widths: tuple[int, ...] = (3, 4, 5), n: int = 192, seed: int = 7) -> dict:
    """``measure_vae_round_trip`` of ``n`` random scenes, filled and outlined at each ring width (encoder means)."""
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng, exclude_held_out=False) for _ in range(n)]
    table = {}
    for width in widths:
        for style in world.STYLES:
            styled = [replace(s, style=style) for s in scenes]
            images = np.stack([world.render(s, outline_width=width) for s in styled])
            table[f"{style} {width}px"] = measure_vae_round_trip(vae, images, styled)
    return table


def add_lora(unet, recipe: Recipe) -> list[torch.nn.Parameter]:
    """peft LoRA layers (B = 0 at start, so the model begins as the base) on ``TARGET_MODULES``."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, init_lora_weights=True,
                                target_modules=list(TARGET_MODULES)))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def train_lora(pipe, latents: torch.Tensor, scenes: list[world.Scene], recipe: Recipe) -> dict:
    """The LoRA on the UNet: the demo's DDPM forward process, v-prediction L_simple, caption dropout."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    unet, te, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    params = add_lora(unet, recipe)
    unet.train()
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    rng = np.random.default_rng(recipe.seed + 1)
    z_all = latents * pipe.vae.config.scaling_factor
    budget = Budget(recipe.seconds, recipe.max_steps).start()
    ema = None
    while not budget.done:
        for group in opt.param_groups:
            group["lr"] = recipe.lr * lr_factor(budget.step, budget.frac, recipe.warmup)
        idx = rng.integers(0, len(z_all), recipe.batch)
        captions = [world.random_caption(scenes[i], rng, recipe.caption_drop_p, recipe.caption_empty_p) for i in idx]
        z0 = z_all[torch.from_numpy(idx)]
        noise = torch.from_numpy(rng.standard_normal(z0.shape).astype(np.float32))
        t = torch.from_numpy(rng.integers(0, scheduler.config.num_train_timesteps, recipe.batch)).long()
        with torch.no_grad():
            context = te(tokenize(tok, captions))[0]
        pred = unet(scheduler.add_noise(z0, noise, t), t, encoder_hidden_states=context).sample
        loss = F.mse_loss(pred, diffusion_target(scheduler, z0, noise, t))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        budget.tick()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if budget.step % 50 == 0:
            log(f"lora: step {budget.step}, loss {ema:.4f}, {budget.elapsed:.0f} s")
    unet.eval()
    log(f"lora: done, {budget.step} steps in {budget.elapsed:.0f} s ({budget.step / max(budget.elapsed, 1e-9):.2f} it/s)")
    return {"steps": budget.step, "seconds": round(budget.elapsed, 1), "final_loss": ema}


# --------------------------------------------------------------------------- export


def kohya_state_dict(unet, recipe: Recipe) -> dict[str, torch.Tensor]:
    """The peft adapter in kohya's layout: ``lora_unet_<module path, '.'→'_'>.lora_down/.lora_up/.alpha`` (fp16)."""
    state: dict[str, torch.Tensor] = {}
    for path, module in unet.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        name = KOHYA_PREFIX + path.replace(".", "_")
        state[f"{name}.lora_down.weight"] = module.lora_A["default"].weight.detach().half().contiguous()
        state[f"{name}.lora_up.weight"] = module.lora_B["default"].weight.detach().half().contiguous()
        state[f"{name}.alpha"] = torch.tensor(recipe.alpha, dtype=torch.float16)
    return state


def kohya_metadata(recipe: Recipe, stats: dict, scenes: list[world.Scene]) -> dict[str, str]:
    """kohya sd-scripts' ``ss_*`` training notes (all values strings, JSON where structured)."""
    tags: dict[str, int] = {}
    for scene in scenes:
        for tag in ("outline", "outlined", "hollow", scene.shape, scene.colour):
            tags[tag] = tags.get(tag, 0) + 1
    return {
        "ss_output_name": NAME,
        "ss_sd_model_name": "sfumato-demo",
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(recipe.rank),
        "ss_network_alpha": str(recipe.alpha),
        "ss_network_args": json.dumps({"conv_dim": recipe.rank, "conv_alpha": recipe.alpha}),
        "ss_training_comment": "Outlined shapes for Sfumato's demo model (training/demo_lora.py)",
        "ss_num_train_images": str(len(scenes)),
        "ss_steps": str(stats["steps"]),
        "ss_max_train_steps": str(stats["steps"]),
        "ss_learning_rate": str(recipe.lr),
        "ss_unet_lr": str(recipe.lr),
        "ss_text_encoder_lr": "0",
        "ss_batch_size_per_device": str(recipe.batch),
        "ss_resolution": "(64, 64)",
        "ss_seed": str(recipe.seed),
        "ss_v_parameterization": "True",
        "ss_mixed_precision": "no",
        "ss_save_precision": "fp16",
        "ss_tag_frequency": json.dumps({"outlined_world": tags}),
        "ss_training_seconds": str(stats["seconds"]),
    }


def sidecar(recipe: Recipe, stats: dict) -> dict:
    """A1111's per-network user metadata file (``<name>.json`` beside the network)."""
    return {
        "description": "Draws the demo model's shapes as outlines: a ring in the shape's colour around a hollow of background.",
        "activation text": "",
        "preferred weight": 1.0,
        "sd version": "SD1",
        "notes": (f"Trained by training/demo_lora.py on the base model sfumato-demo: rank {recipe.rank}, alpha {recipe.alpha}, "
                  f"{stats['steps']} steps in {stats['seconds']:.0f} s on CPU. No trigger word: the usual captions work, "
                  "e.g. \"a large red circle, blue background <lora:sfumato-outline:1>\"."),
    }


def preview(pipe, recipe: Recipe) -> np.ndarray:
    """A 2-column grid of the preview prompts drawn with the LoRA at weight 1 (uint8)."""
    from diffusers import DPMSolverMultistepScheduler

    sampler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    original, pipe.scheduler = pipe.scheduler, sampler
    try:
        gens = [torch.Generator("cpu").manual_seed(i) for i in range(len(recipe.preview_prompts))]
        images = pipe(list(recipe.preview_prompts), num_inference_steps=recipe.preview_steps, guidance_scale=recipe.preview_cfg,
                      generator=gens, height=64, width=64, output_type="np").images
    finally:
        pipe.scheduler = original
    images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    cols = min(2, len(images))
    rows = math.ceil(len(images) / cols)
    grid = np.zeros((rows * 64, cols * 64, 3), np.uint8)
    for i, im in enumerate(images):
        grid[(i // cols) * 64 : (i // cols + 1) * 64, (i % cols) * 64 : (i % cols + 1) * 64] = im
    return grid


def export(pipe, recipe: Recipe, stats: dict, scenes: list[world.Scene], out_dir: Path) -> Path:
    from PIL import Image
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{NAME}.safetensors"
    save_file(kohya_state_dict(pipe.unet, recipe), str(path), metadata=kohya_metadata(recipe, stats, scenes))
    Image.fromarray(preview(pipe, recipe)).resize((256, 256), Image.NEAREST).save(out_dir / f"{NAME}.preview.png")
    (out_dir / f"{NAME}.json").write_text(json.dumps(sidecar(recipe, stats), indent=2) + "\n")
    log(f"export: {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return path


# --------------------------------------------------------------------------- evaluation through the engine


def lora_scenes(n: int = 32) -> list[world.Scene]:
    """The evaluator's fixed scenes (``evaluate.eval_scenes``), first ``n``."""
    from .evaluate import eval_scenes

    return eval_scenes()[:n]


def evaluate_lora(engine, weights: tuple[float, ...] = (0.0, 0.5, 1.0), n: int = 32, seeds: tuple[int, ...] = (1, 2),
                  steps: int = 20, cfg: float = 5.0, name: str = NAME) -> dict:
    """Fill reading and accuracies of the demo model with ``<lora:name:w>`` for each weight, through the Engine.

    Full captions of ``n`` fixed scenes × ``seeds``, DPM++ 2M (the engine's default), ``steps`` steps.
    Returns ``{weight: {"fill", "outlined", "outlined_large", "outlined_small", "colour", "background", ...}}``."""
    from engine import GenerationRequest

    from .evaluate import ATTRIBUTES, classify

    scenes = lora_scenes(n)
    out: dict = {}
    for weight in weights:
        readings, targets = [], []
        for scene in scenes:
            tag = f" <lora:{name}:{weight:g}>" if weight else ""
            for seed in seeds:
                request = GenerationRequest(prompt=world.full_caption(scene) + tag, model="sfumato-demo", steps=steps,
                                            cfg_scale=cfg, seed=seed, width=64, height=64)
                readings.append(classify(engine.generate(request).images[0].image))
                targets.append(scene)
        row = {"fill": float(np.mean([r.fill if r.fill is not None else 1.0 for r in readings])),
               "outlined": float(np.mean([r.style == "outlined" for r in readings]))}
        for size in world.SIZES:
            row[f"outlined_{size}"] = float(np.mean([r.style == "outlined" for r, s in zip(readings, targets) if s.size == size]))
        for attribute in ATTRIBUTES:
            row[attribute] = float(np.mean([getattr(r, attribute) == getattr(s, attribute) for r, s in zip(readings, targets)]))
        out[f"{weight:g}"] = row
        log(f"eval weight {weight:g}: " + json.dumps({k: round(v, 3) for k, v in row.items()}))
    return out


# --------------------------------------------------------------------------- main


def cached_latents(pipe, images: np.ndarray, recipe: Recipe, cache: Path | None) -> torch.Tensor:
    """``invert_decoder``'s latents, kept in ``cache`` for the next run of the same data recipe."""
    key = {k: getattr(recipe, k) for k in ("seed", "n_images", "outline_width", "invert_steps", "invert_lr", "invert_batch")}
    if cache is not None and cache.is_file():
        saved = torch.load(cache, map_location="cpu")
        if saved["key"] == key:
            log(f"latents: {len(saved['latents'])} from {cache}")
            return saved["latents"]
    latents = invert_decoder(pipe.vae, images, recipe)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "latents": latents}, cache)
    return latents


def train(recipe: Recipe, out_dir: Path, base: Path = BASE_MODEL, cache: Path | None = None) -> dict:
    """Every stage; returns the run's figures (wall seconds, steps, the file's path)."""
    torch.manual_seed(recipe.seed)
    figures: dict = {"recipe": asdict(recipe)}
    t_all = time.time()
    pipe = load_base(base)
    images, scenes = outlined_dataset(recipe)
    t0 = time.time()
    latents = cached_latents(pipe, images, recipe, cache)
    figures["invert_seconds"] = round(time.time() - t0, 1)
    scenes, images = scenes[: len(latents)], images[: len(latents)]
    log(f"latents: {len(latents)} in {figures['invert_seconds']} s")
    t0 = time.time()
    figures["lora"] = train_lora(pipe, latents, scenes, recipe)
    figures["path"] = str(export(pipe, recipe, figures["lora"], scenes, out_dir))
    figures["wall_seconds"] = round(time.time() - t_all, 1)
    log(f"total {figures['wall_seconds']} s")
    return figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "builtin" / "loras")
    p.add_argument("--base", type=Path, default=BASE_MODEL)
    p.add_argument("--smoke", action="store_true", help="a few steps, into a temp dir unless --out is given")
    # One thread: on a shared, loaded machine two torch threads ran ~5x slower per step than one (measured).
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--latents-cache", type=Path, default=REPO / "training" / "runs" / "demo_lora" / "latents.pt",
                   help="inverted latents kept between runs (not used by --smoke)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override recipe fields")
    p.add_argument("--evaluate", action="store_true",
                   help="only evaluate the installed builtin LoRA through the Engine (weights 0, 0.5, 1; 32 prompts × 2 seeds)")
    p.add_argument("--measure-vae", action="store_true",
                   help="only measure how outlines of 3/4/5 px survive the demo VAE's round trip")
    p.add_argument("--json", type=Path, default=None, help="write the evaluation here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.measure_vae:
        table = vae_width_table(load_base(args.base).vae)
        print(json.dumps(table, indent=1))
        return table
    if args.evaluate:
        from engine import Engine
        from engine.models import ModelRegistry

        t0 = time.time()
        figures = evaluate_lora(Engine(ModelRegistry(None, builtin_dir=args.out.parent)))
        figures["eval_seconds"] = round(time.time() - t0, 1)
        print(json.dumps(figures, indent=1))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1) + "\n")
        return figures
    recipe = smoke_recipe() if args.smoke else Recipe()
    for item in args.set:
        key, value = item.split("=", 1)
        recipe = replace(recipe, **{key: type(getattr(recipe, key))(json.loads(value))})
    out = args.out
    if args.smoke and out == parse_args([]).out:
        out = Path(tempfile.mkdtemp(prefix="sfumato-lora-smoke-"))
    figures = train(recipe, out, args.base, None if args.smoke else args.latents_cache)
    print(f"OUT {figures['path']}")
    print("FIGURES " + json.dumps({k: v for k, v in figures.items() if k != "recipe"}))
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
