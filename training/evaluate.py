"""Pixel-based evaluation of the demo model.

``classify`` reads a 64×64 image back into world attributes with no learned parts:
  * background = most common nearest-palette colour of the 1-px border ring;
  * shape pixels = pixels whose nearest palette colour is not the background
    (largest 8-connected component, so stray pixels are ignored);
  * shape colour = most common nearest-palette colour of those pixels;
  * position = nearest anchor to the centroid of the shape pixels (for a triangle the
    area centroid sits h/6 below its box centre, so it is corrected by that);
  * size = longest side of the bounding box (small ≈ 18 px, large ≈ 28 px);
  * shape = the template (circle / square / up-triangle fitted to the bounding box)
    with the highest IoU against the shape pixels;
  * fill = how solid the shape is: of the pixels deep inside the convex hull of the shape
    pixels (every world shape is convex, so the hull of an outline's ring is the whole shape,
    even when the ring has a gap), the fraction in the shape colour rather than the background
    colour; ``style`` is "filled" at ``FILL_THRESHOLD`` or above, else "outlined".
    The geometric readings above use the shape pixels as before, so they are unchanged.
``evaluate_model`` scores a text-to-image model on a FIXED set of prompts and seeds,
``evaluate_controlnet`` scores an outline ControlNet by IoU.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from PIL import Image

from . import world
from .world import COLOURS, HELD_OUT_COMBOS, PALETTE, POSITION_ANCHORS, Scene

ATTRIBUTES = ("colour", "background", "position", "shape", "size")
_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32)
SIZE_THRESHOLD_PX = (2 * world.SIZE_RADIUS["small"] + 2 * world.SIZE_RADIUS["large"]) / 2
#: A fill reading at or above this is "filled", below it "outlined" (ground truth reads ~1 and ~0).
FILL_THRESHOLD = 0.5
#: The interior the fill reading looks at: the hull eroded by this many px (the outline's ring width).
FILL_INSET_PX = world.OUTLINE_WIDTH
#: ... unless that leaves fewer pixels than this; then the inset shrinks until enough remain.
FILL_MIN_PIXELS = 4


@dataclass
class Reading:
    """What ``classify`` read from an image (``None`` when no shape was found)."""

    colour: str | None
    background: str
    position: str | None
    shape: str | None
    size: str | None
    mask: np.ndarray
    fill: float | None = None  # share of the shape's interior in the shape colour (None: no shape)

    @property
    def style(self) -> str | None:
        """"filled" or "outlined" (world.STYLES), from the fill reading."""
        if self.fill is None:
            return None
        return "filled" if self.fill >= FILL_THRESHOLD else "outlined"

    def as_dict(self) -> dict[str, str | None]:
        return {a: getattr(self, a) for a in ATTRIBUTES}


def palette_labels(image: np.ndarray) -> np.ndarray:
    """Index into ``PALETTE`` of the nearest palette colour of every pixel, (H, W)."""
    px = image.astype(np.float32)[..., None, :]
    return np.argmin(((px - _RGB) ** 2).sum(-1), axis=-1)


def _mode(values: np.ndarray) -> int:
    return int(np.bincount(values.ravel(), minlength=len(_NAMES)).argmax())


def _largest_component(mask: np.ndarray) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(mask, dtype=bool)
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == best


def _templates(x0: int, y0: int, x1: int, y1: int, size: int) -> dict[str, np.ndarray]:
    """Circle, square and up-triangle masks filling the box [x0, x1) × [y0, y1)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
    inside = (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
    circle = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    frac = (yy - y0) / max(y1 - y0, 1)  # 0 at the apex row, 1 at the base
    triangle = inside & (np.abs(xx - cx) <= frac * rx)
    return {"circle": circle, "square": inside, "triangle": triangle}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def convex_hull_mask(mask: np.ndarray) -> np.ndarray:
    """The filled convex hull of a pixel mask, as a mask of the same size."""
    ys, xs = np.nonzero(mask)
    points = np.stack([xs, ys], axis=1).astype(np.int32)
    hull = np.zeros(mask.shape, dtype=np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(points), 1)
    return hull.astype(bool) | mask


def fill_reading(labels: np.ndarray, mask: np.ndarray, colour: int, background: int) -> float:
    """Share of the shape's interior (its hull inset by ``FILL_INSET_PX``) labelled with the shape colour,
    counting only shape-colour and background pixels; 1.0 for a solid shape, ~0 for a hollow outline."""
    hull = convex_hull_mask(mask)
    for inset in range(FILL_INSET_PX, -1, -1):
        interior = world.erode(hull, inset)
        if interior.sum() >= FILL_MIN_PIXELS:
            break
    solid = int((labels[interior] == colour).sum())
    hollow = int((labels[interior] == background).sum())
    return solid / (solid + hollow) if solid + hollow else 1.0


def classify(image: np.ndarray | Image.Image) -> Reading:
    """Read shape colour, background, position, shape and size from a 64×64 RGB image."""
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    labels = palette_labels(img)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    bg = _mode(border)
    mask = _largest_component(labels != bg)
    if mask.sum() < 6:
        return Reading(None, _NAMES[bg], None, None, None, mask)
    colour = _NAMES[_mode(labels[mask])]
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    templates = _templates(x0, y0, x1, y1, img.shape[0])
    shape = max(templates, key=lambda k: _iou(mask, templates[k]))
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    if shape == "triangle":
        cy -= (y1 - y0) / 6
    position = min(POSITION_ANCHORS, key=lambda p: (POSITION_ANCHORS[p][0] - cx) ** 2 + (POSITION_ANCHORS[p][1] - cy) ** 2)
    size = "large" if max(x1 - x0, y1 - y0) > SIZE_THRESHOLD_PX else "small"
    fill = fill_reading(labels, mask, _NAMES.index(colour), bg)
    return Reading(colour, _NAMES[bg], position, shape, size, mask, fill)


def score(readings: Sequence[Reading], scenes: Sequence[Scene]) -> dict[str, float]:
    """Fraction of images whose read attribute equals the scene's, per attribute."""
    out = {}
    for attr in ATTRIBUTES:
        out[attr] = float(np.mean([getattr(r, attr) == getattr(s, attr) for r, s in zip(readings, scenes)]))
    return out


def score_ground_truth(n: int = 2000, seed: int = 123) -> dict[str, float]:
    """Accuracy of ``classify`` on rendered world images (should be ~1.0 everywhere)."""
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng, exclude_held_out=False) for _ in range(n)]
    return score([classify(world.render(s)) for s in scenes], scenes)


def score_styles_ground_truth(n: int = 600, seed: int = 321) -> dict[str, float]:
    """Share of rendered world images whose ``style`` reads right, per drawing style (should be ~1.0)."""
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng, exclude_held_out=False) for _ in range(n)]
    out = {}
    for style in world.STYLES:
        styled = [replace(s, style=style) for s in scenes]
        out[style] = float(np.mean([classify(world.render(s)).style == style for s in styled]))
    return out


# --------------------------------------------------------------------------- model evaluation

#: A text-to-image callable: (prompts, seeds, guidance_scale) -> list of 64×64 images.
Generator = Callable[[list[str], list[int], float], list[np.ndarray]]


def eval_scenes(n_seen: int = 64, seed: int = 2024) -> list[Scene]:
    """The FIXED evaluation set: ``n_seen`` random training-distribution scenes plus every
    held-out combo twice (once per size), all at their anchor position (no jitter)."""
    rng = np.random.default_rng(seed)
    seen = [world.sample_scene(rng) for _ in range(n_seen)]
    seen = [s.moved(s.position) for s in seen]
    unseen = []
    for colour, shape, position in HELD_OUT_COMBOS:
        for size in world.SIZES:
            bg = str(rng.choice(world.backgrounds_for(colour)))
            x, y = POSITION_ANCHORS[position]
            unseen.append(Scene(shape, colour, size, position, bg, x, y))
    return seen + unseen


def pipeline_generator(pipe, steps: int = 20, batch: int = 32) -> Generator:
    """Wrap a diffusers StableDiffusionPipeline (its configured scheduler) as a ``Generator``."""
    import torch

    def generate(prompts: list[str], seeds: list[int], guidance_scale: float) -> list[np.ndarray]:
        images: list[np.ndarray] = []
        for i in range(0, len(prompts), batch):
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i : i + batch]]
            out = pipe(
                prompts[i : i + batch], num_inference_steps=steps, guidance_scale=guidance_scale,
                generator=gens, height=64, width=64, output_type="np",
            ).images
            images.extend((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
        return images

    return generate


def _as_generator(pipe_or_callable, steps: int) -> Generator:
    """A UNet pipeline samples with DPM++ 2M; a flow-transformer pipeline (the flow demo) with its own flow scheduler."""
    if hasattr(pipe_or_callable, "unet"):
        from diffusers import DPMSolverMultistepScheduler

        pipe_or_callable.scheduler = DPMSolverMultistepScheduler.from_config(pipe_or_callable.scheduler.config)
        pipe_or_callable.set_progress_bar_config(disable=True)
        return pipeline_generator(pipe_or_callable, steps)
    if hasattr(pipe_or_callable, "transformer"):
        pipe_or_callable.set_progress_bar_config(disable=True)
        return pipeline_generator(pipe_or_callable, steps)
    return pipe_or_callable


def evaluate_model(
    pipe_or_callable,
    cfgs: Sequence[float] = (1.0, 5.0),
    seeds: Sequence[int] = (0, 1),
    steps: int = 20,
    n_seen: int = 64,
) -> tuple[dict, dict]:
    """Attribute accuracy of a text-to-image model on the fixed evaluation set.

    A pipeline is sampled with DPM++ 2M (``DPMSolverMultistepScheduler``) for ``steps`` steps.
    Returns ``({f"cfg{c:g}": {"seen": {...}, "unseen": {...}, "all": {...}}},
    {f"cfg{c:g}": {"colour shape position": {...}}})``: the second maps each held-out combo to its accuracies.
    """
    generate = _as_generator(pipe_or_callable, steps)
    scenes = eval_scenes(n_seen)
    prompts = [world.full_caption(s) for s in scenes]
    results: dict[str, dict[str, dict[str, float]]] = {}
    per_combo: dict[str, dict[str, dict[str, float]]] = {}
    for cfg in cfgs:
        readings, targets = [], []
        for seed in seeds:
            images = generate(prompts, [seed * 1000 + i for i in range(len(prompts))], cfg)
            readings += [classify(im) for im in images]
            targets += scenes
        held = [world.is_held_out(s) for s in targets]
        results[f"cfg{cfg:g}"] = {
            "seen": score([r for r, h in zip(readings, held) if not h], [s for s, h in zip(targets, held) if not h]),
            "unseen": score([r for r, h in zip(readings, held) if h], [s for s, h in zip(targets, held) if h]),
            "all": score(readings, targets),
        }
        per_combo[f"cfg{cfg:g}"] = {
            " ".join(combo): score([r for r, s in zip(readings, targets) if s.combo == combo],
                                   [s for s in targets if s.combo == combo])
            for combo in HELD_OUT_COMBOS
        }
    return results, per_combo


def controlnet_scenes(n: int = 32, seed: int = 77) -> list[Scene]:
    """Fixed outlines for the ControlNet eval: every held-out combo, then random scenes."""
    rng = np.random.default_rng(seed)
    scenes = world.held_out_scenes(rng)
    while len(scenes) < n:
        scenes.append(world.sample_scene(rng, exclude_held_out=False))
    return scenes


def evaluate_controlnet(
    control_generate: Callable[[list[str], list[np.ndarray], list[int]], list[np.ndarray]],
    n: int = 32,
) -> dict[str, float]:
    """IoU of the generated shape's mask against the filled outline, and a move test.

    ``control_generate(prompts, outline_maps, seeds)`` returns 64×64 RGB images.
    * ``iou``: mean over ``n`` fixed outlines (the held-out combos included), caption = full caption;
    * ``iou_empty_prompt``: the same outlines with an empty prompt;
    * ``moved``: the same caption, outline moved to each of the other positions:
      fraction of images whose read position follows the outline (not the caption).
    """
    scenes = controlnet_scenes(n)
    maps = [world.render_outline(s) for s in scenes]
    seeds = list(range(len(scenes)))
    out: dict[str, float] = {}
    for key, prompts in (("iou", [world.full_caption(s) for s in scenes]), ("iou_empty_prompt", [""] * len(scenes))):
        images = control_generate(prompts, maps, seeds)
        out[key] = float(np.mean([_iou(classify(im).mask, world.shape_mask(s)) for im, s in zip(images, scenes)]))
    moved_prompts, moved_maps, moved_targets = [], [], []
    for s in scenes[:8]:
        for p in world.POSITIONS:
            if p != s.position:
                moved_prompts.append(world.full_caption(s))
                moved_maps.append(world.render_outline(s.moved(p)))
                moved_targets.append(p)
    images = control_generate(moved_prompts, moved_maps, list(range(len(moved_prompts))))
    out["moved"] = float(np.mean([classify(im).position == p for im, p in zip(images, moved_targets)]))
    return out


def controlnet_generator(pipe, steps: int = 20, guidance_scale: float = 5.0, batch: int = 32):
    """Wrap a diffusers ControlNet pipeline as the callable ``evaluate_controlnet`` wants: a UNet's
    (``StableDiffusionControlNetPipeline``) samples with DPM++ 2M, a flow transformer's
    (``StableDiffusion3ControlNetPipeline``) with its own flow scheduler, as ``evaluate_model`` does."""
    import torch
    from diffusers import DPMSolverMultistepScheduler

    unet = hasattr(pipe, "unet")
    if unet:
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def generate(prompts: list[str], maps: list[np.ndarray], seeds: list[int]) -> list[np.ndarray]:
        images: list[np.ndarray] = []
        for i in range(0, len(prompts), batch):
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i : i + batch]]
            control = {"image" if unet else "control_image": [Image.fromarray(m) for m in maps[i : i + batch]]}
            out = pipe(
                prompts[i : i + batch], num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens,
                height=64, width=64, output_type="np", **control,
            ).images
            images.extend((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
        return images

    return generate


def format_table(results: dict[str, dict[str, dict[str, float]]], row_header: str = "split", row_first: bool = False) -> str:
    """Markdown table of ``evaluate_model`` results: ``{"cfg5": {row: {attribute: accuracy}}}``.

    Rows are splits by default; with ``row_first`` the row label (e.g. a held-out combo) comes before the cfg column."""
    headers = [row_header, "cfg"] if row_first else ["cfg", row_header]
    lines = ["| " + " | ".join(headers + list(ATTRIBUTES)) + " |", "|---|---|" + "---|" * len(ATTRIBUTES)]
    for cfg, rows in results.items():
        for row, accs in rows.items():
            labels = [row, cfg[3:]] if row_first else [cfg[3:], row]
            lines.append("| " + " | ".join(labels + [f"{accs[a]:.2f}" for a in ATTRIBUTES]) + " |")
    return "\n".join(lines)


def load_and_evaluate(model_dir: str, controlnet_dir: str | None, threads: int = 2, text: bool = True,
                      cfgs: Sequence[float] = (1.0, 3.0, 5.0), controlnet_cfg: float = 5.0) -> dict:
    """Fresh offline load of a saved pipeline (fp32 on CPU) and the full evaluation
    (``text=False``: only the ControlNet part)."""
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    torch.set_num_threads(threads)
    out: dict = {"ground_truth": score_ground_truth()}
    t0 = time.time()
    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    if index["_class_name"] == "StableDiffusion3Pipeline":  # the flow demo: SD3 layout without T5
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, text_encoder_3=None, tokenizer_3=None,
                                                        local_files_only=True, dtype=torch.float32)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    out["load_s"] = round(time.time() - t0, 2)
    if text:
        t0 = time.time()
        out["text"], out["held_out_combos"] = evaluate_model(pipe, cfgs=cfgs)
        out["text_eval_s"] = round(time.time() - t0, 1)
        out["n_prompts"] = len(eval_scenes())
    if controlnet_dir:
        if index["_class_name"] == "StableDiffusion3Pipeline":
            from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

            cn = SD3ControlNetModel.from_pretrained(controlnet_dir, local_files_only=True, dtype=torch.float32)
            cpipe = StableDiffusion3ControlNetPipeline.from_pipe(pipe, controlnet=cn)
        else:
            cn = ControlNetModel.from_pretrained(controlnet_dir, local_files_only=True, dtype=torch.float32)
            cpipe = StableDiffusionControlNetPipeline.from_pipe(pipe, controlnet=cn)
        t0 = time.time()
        out["controlnet"] = evaluate_controlnet(controlnet_generator(cpipe, guidance_scale=controlnet_cfg))
        out["controlnet_cfg"] = controlnet_cfg
        out["controlnet_eval_s"] = round(time.time() - t0, 1)
    return out


if __name__ == "__main__":
    import argparse
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description="Evaluate the world reader, and a saved demo model if given.")
    parser.add_argument("--model", default=None)
    parser.add_argument("--controlnet", default=None)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-text", action="store_true", help="only evaluate the ControlNet")
    parser.add_argument("--cfgs", type=float, nargs="+", default=[1.0, 3.0, 5.0], help="guidance scales to score")
    parser.add_argument("--controlnet-cfg", type=float, default=5.0,
                        help="guidance scale of the ControlNet part (the model card's recommended CFG)")
    args = parser.parse_args()
    t0 = time.time()
    if args.model is None:
        print("ground-truth accuracy:", json.dumps(score_ground_truth()), f"({time.time() - t0:.1f} s)")
    else:
        res = load_and_evaluate(args.model, args.controlnet, args.threads, text=not args.no_text, cfgs=args.cfgs,
                                controlnet_cfg=args.controlnet_cfg)
        print(json.dumps(res, indent=1))
        if "text" in res:
            print(format_table(res["text"]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
