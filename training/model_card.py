"""Write ``builtin/sfumato-demo/MODEL_CARD.md`` from a run's measured numbers.

    python -m training.model_card --eval training/runs/demo/eval.json [--notes "free text"]

Reads the recipe and stage times the training run wrote (``training/runs/demo``), the evaluation
JSON written by ``python -m training.evaluate --json``, and ``sfumato.json`` of the saved model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import world
from .demo_model import folder_mb
from .evaluate import format_table

REPO = Path(__file__).resolve().parent.parent


def vocabulary_section() -> str:
    vocab = ", ".join(f"`{w}`" for w in world.VOCABULARY)
    return f"""## Vocabulary

Prompts are built from these words (each is a single token of a word-level CLIP tokenizer; other
words map to the unknown token and are ignored): {vocab}.

- shapes: {', '.join(world.SHAPES)}; sizes: {', '.join(world.SIZES)}
- colours: {', '.join(world.COLOURS)} (background also: gray)
- positions: {', '.join(world.POSITION_PHRASES.values())}
- word order: `a [size] [colour] [shape] [position], [colour] background`; every part is optional,
  e.g. "a large red circle on the left, blue background", "a green triangle", "purple background".
"""


def evaluation_section(ev: dict, model: str, controlnet: str, sampling: str) -> str:
    cn = ev.get("controlnet", {})
    return f"""## Evaluation

`python -m training.evaluate --model {model} --controlnet {controlnet}`:
a fresh offline load in fp32, {ev['n_prompts']} fixed prompts ({ev['n_prompts'] - 2 * len(world.HELD_OUT_COMBOS)} seen
combinations + each of the {len(world.HELD_OUT_COMBOS)} held-out combos at both sizes) × 2 seeds, {sampling}.
Images are read back by a pixel classifier (`training/evaluate.py`) which scores
{json.dumps({k: round(v, 3) for k, v in ev['ground_truth'].items()})} on ground-truth world images.

{format_table(ev['text'])}

"unseen" rows are the held-out colour×shape×position combos, never seen in training:

{format_table(ev['held_out_combos'], 'held-out combo', row_first=True)}

ControlNet (cfg {ev.get('controlnet_cfg', 5.0):g}, {sampling}, 32 fixed outlines including every held-out combo): mean IoU of the generated
shape against the filled outline **{cn.get('iou', float('nan')):.3f}** with the full caption,
{cn.get('iou_empty_prompt', float('nan')):.3f} with an empty prompt; when the outline is moved away from the
caption's position, the shape follows the outline in **{cn.get('moved', float('nan')):.0%}** of images.
"""


def preview_section(meta: dict, latents: str, block: int) -> str:
    factors = "\n".join(f"    {row}," for row in meta["latent_rgb_factors"])
    return f"""`sfumato.json` holds a least-squares latent→RGB map for cheap previews, fitted on {latents}: each latent
cell against the mean decoded RGB in [-1, 1] of its {block}×{block} pixel block. rgb = latent @ factors + bias.

```
factors = [
{factors}
]
bias = {meta['latent_rgb_bias']}
```
"""


def held_out_section() -> str:
    return f"""## Held-out combinations

{', '.join(' '.join(c) for c in world.HELD_OUT_COMBOS)} (colour, shape, position; any size and background)
never appear in training.
"""


def render_card(meta: dict, recipe: dict, times: dict, ev: dict, sizes: dict[str, float], notes: str) -> str:
    return f"""# sfumato-demo

Sfumato's own tiny Stable Diffusion, trained from scratch on a CPU by `python -m training.demo_model`
(see `training/`). It draws ONE shape on a plain background at 64×64. It exists so that the app
works out of the box, offline, and so that tests have a real model to run. It is not an art model.

- Pipeline: `StableDiffusionPipeline` (diffusers), fp16 safetensors, {sizes['model']:.1f} MB;
  ControlNet `sfumato-demo-controlnet-outline` (outline maps, white on black), {sizes['controlnet']:.1f} MB.
- Native size 64×64. Latents 4×8×8 (f8 VAE), `scaling_factor` {meta.get('scaling_factor', 'see vae/config.json')}.
- Prediction type: `{recipe['prediction_type']}`; scheduler config is SD's scaled-linear β (0.00085 → 0.012),
  saved as `DPMSolverMultistepScheduler` (DPM++ 2M); any diffusers scheduler loads from it with `from_config`.

{vocabulary_section()}
## Recipe

- Data: {recipe['n_images']} procedurally drawn images (`training/world.py`), seed {recipe['seed']}; each caption
  attribute dropped with p={recipe['caption_drop_p']}, empty caption p={recipe['caption_empty_p']} (for CFG).
- VAE: `AutoencoderKL` f8, channels {tuple(recipe['vae_channels'])}, 1 layer/block, log-variance bias init −8;
  loss L1 + MSE + image-gradient L1 + {recipe['vae_kl_weight']}·KL, AdamW lr {recipe['vae_lr']} cosine, batch {recipe['vae_batch']}, {'bf16 autocast' if recipe.get('vae_bf16') else 'fp32'}, GroupNorm groups {recipe.get('vae_norm_groups', '?')}.
- Decoder fine-tune: encoder frozen (the UNet's latent space stays fixed), decoder trained on the cached latents
  plus {recipe.get('decoder_latent_noise', 0)}×std latent noise, AdamW lr {recipe.get('decoder_lr')}, batch {recipe.get('decoder_batch')},
  in a second process beside the UNet stage (one thread each).
- Text encoder: `CLIPTextModel`, hidden {recipe['te_hidden']}, {recipe['te_layers']} layers, {recipe['te_heads']} heads, {recipe['max_tokens']} positions.
- UNet: `UNet2DConditionModel`, channels {tuple(recipe['unet_channels'])}, cross-attention in every block.
  Trained jointly with the text encoder on the DDPM forward process with the L_simple loss on
  `{recipe['prediction_type']}` targets; AdamW lr {recipe['unet_lr']} (text encoder {recipe['te_lr']}), batch {recipe['unet_batch']},
  {recipe['unet_warmup']} warm-up steps then cosine; {recipe['high_t_prob']:.0%} of timesteps drawn from t ≥ 500 (layout is decided there).
- ControlNet: `ControlNetModel.from_unet`, conditioning channels {tuple(recipe['cn_channels'])} (÷8),
  UNet and text encoder frozen; empty captions p={recipe['cn_empty_p']}; AdamW lr {recipe['cn_lr']}, batch {recipe['cn_batch']}.

Wall times on 2 CPU cores: {', '.join(f'{k} {v / 60:.1f} min' for k, v in times.items())} (the decoder stage runs during the UNet stage, not after it).

{evaluation_section(ev, 'builtin/sfumato-demo', 'builtin/sfumato-demo-controlnet-outline', '20 steps of DPM++ 2M')}
## Live preview factors

{preview_section(meta, 'the training latents as the UNet sees them (multiplied by `scaling_factor`)', 8)}
{held_out_section()}
## Notes and limitations

{notes}
"""


def render_flow_card(meta: dict, recipe: dict, times: dict, ev: dict, sizes: dict[str, float], notes: str) -> str:
    """The card of ``sfumato-demo-flow`` (``training.demo_flow``)."""
    vae = meta.get("vae_reconstruction", {})
    return f"""# sfumato-demo-flow

Sfumato's own tiny rectified-flow transformer in Stable Diffusion 3's exact layout, trained from scratch on a CPU by
`python launch.py train-demo --flow` (`python -m training.demo_flow`). It draws ONE shape on a plain background at
64×64, in the same world and vocabulary as `sfumato-demo`, so one evaluator judges both. It proves the flow-family path
(SD 3.5's loader, prompt encoding, samplers on σ = t, ControlNet) end to end with real prompt following, offline.

- Pipeline: `StableDiffusion3Pipeline` (diffusers) without T5, fp16 safetensors, {sizes['model']:.1f} MB;
  ControlNet `sfumato-demo-flow-controlnet-outline` (`SD3ControlNetModel`, outline maps, white on black),
  {sizes['controlnet']:.1f} MB. The same model exports to SD 3.5's all-in-one single file
  (`training/runs/flow/sfumato-demo-flow.safetensors` with its `.config/` folder), which the engine loads to the
  same pixels.
- Why SD3's layout and not Flux.1's: SD3 conditions on two CLIPs we can shrink and train with the model, its T5 is
  optional (the pipeline and the engine put {recipe.get('t5_tokens', 256)} zero tokens in its place), and it samples
  with real classifier-free guidance, which caption dropout teaches. Flux.1 would need a T5 or a guidance-distilled
  transformer and 2×2 latent packing for nothing this world needs.
- Native size 64×64. Latents 16×16×16 (f4 VAE, 16 channels as SD3's), `scaling_factor` {meta.get('scaling_factor')},
  `shift_factor` {meta.get('shift_factor')} (the training latents' 1/std and mean).
- Scheduler: `FlowMatchEulerDiscreteScheduler`, shift {recipe['sigma_shift']} (SD3's own). Recommended: {meta['recommended_sampler']},
  {meta['recommended_schedule']}, {meta['recommended_steps']} steps, CFG {meta['recommended_cfg']}.

{vocabulary_section()}
## Recipe

- Data: {recipe['n_images']} procedurally drawn images (`training/world.py`), seed {recipe['seed']}; each caption
  attribute dropped with p={recipe['caption_drop_p']}, empty caption p={recipe['caption_empty_p']} (for CFG).
- VAE: `AutoencoderKL` f4, channels {tuple(recipe['vae_channels'])}, {recipe['vae_latent_channels']} latent channels, no quant convs
  (as SD3's), GroupNorm groups {recipe['vae_norm_groups']}, log-variance bias init −8; L1 + MSE + {recipe['vae_grad_weight']}·image-gradient L1
  + {recipe['vae_kl_weight']}·KL, AdamW lr {recipe['vae_lr']} cosine, batch {recipe['vae_batch']}. Gate before the transformer: the
  evaluator reads its reconstructions of fresh scenes at shape ≥ {recipe['vae_shape_gate']}; it scored
  {json.dumps(vae)}.
- Text encoders: two `CLIPTextModelWithProjection` (the CLIP-L and CLIP-G slots), hidden {recipe['te_hidden']},
  {recipe['te_layers']} layers, {recipe['te_heads']} heads, {recipe['clip_tokens']} positions (the engine reads CLIP in windows of the tokenizer's length).
- Transformer: `SD3Transformer2DModel`, {recipe['layers']} joint blocks, {recipe['heads']} heads × {recipe['head_dim']}, patch {recipe['patch_size']},
  RMS q/k norm. Trained jointly with the text encoders on the rectified flow x_σ = (1 − σ)·x₀ + σ·ε, velocity
  target ε − x₀, timestep 1000·σ, σ logit-normal(m={recipe['logit_mean']}, s={recipe['logit_std']}) then shifted by
  {recipe['sigma_shift']} (Esser et al. 2024); AdamW lr {recipe['lr']} (text encoders {recipe['te_lr']}), batch {recipe['batch']},
  {recipe['warmup']} warm-up steps then cosine. T5's zero tokens are trained as one key with a ln 256 attention bias:
  the same function as 256 zeros, a third of the tokens.
- ControlNet: `SD3ControlNetModel` with {recipe['cn_layers']} blocks started from the transformer's, reading the outline
  map through the VAE ((mean − shift)·scale) with the real pooled text; transformer and text encoders frozen;
  empty captions p={recipe['cn_empty_p']}, captions naming another position than the outline's
  p={recipe.get('cn_conflict_p', 0.0)}; AdamW lr {recipe['cn_lr']}, batch {recipe['cn_batch']}.

Wall times on 2 CPU cores: {', '.join(f'{k} {v / 60:.1f} min' for k, v in times.items())}.

{evaluation_section(ev, 'builtin/sfumato-demo-flow', 'builtin/sfumato-demo-flow-controlnet-outline', '20 steps of Euler')}
## Live preview factors

{preview_section(meta, 'the training latents as the transformer sees them ((z − shift_factor)·scaling_factor)', 4)}
{held_out_section()}
## Notes and limitations

{notes}
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, default=REPO / "builtin" / "sfumato-demo")
    p.add_argument("--controlnet", type=Path, default=REPO / "builtin" / "sfumato-demo-controlnet-outline")
    p.add_argument("--run-dir", type=Path, default=REPO / "training" / "runs" / "demo")
    p.add_argument("--eval", type=Path, required=True)
    p.add_argument("--times", default=None, help="JSON of stage wall seconds (default: the run's last times.json line)")
    p.add_argument("--notes", default="")
    p.add_argument("--flow", action="store_true", help="the card of sfumato-demo-flow (default paths follow)")
    args = p.parse_args()
    if args.flow:
        defaults = p.parse_args(["--eval", str(args.eval)])
        if args.model == defaults.model:
            args.model = REPO / "builtin" / "sfumato-demo-flow"
        if args.controlnet == defaults.controlnet:
            args.controlnet = REPO / "builtin" / "sfumato-demo-flow-controlnet-outline"
        if args.run_dir == defaults.run_dir:
            args.run_dir = REPO / "training" / "runs" / "flow"
    meta = json.loads((args.model / "sfumato.json").read_text())
    vae_config = json.loads((args.model / "vae" / "config.json").read_text())
    meta["scaling_factor"], meta["shift_factor"] = vae_config["scaling_factor"], vae_config.get("shift_factor")
    recipe = json.loads((args.run_dir / "recipe.json").read_text())
    times = json.loads(args.times) if args.times else json.loads((args.run_dir / "times.json").read_text().splitlines()[-1])
    ev = json.loads(args.eval.read_text())
    sizes = {"model": folder_mb(args.model), "controlnet": folder_mb(args.controlnet) if args.controlnet.exists() else 0.0}
    render = render_flow_card if args.flow else render_card
    (args.model / "MODEL_CARD.md").write_text(render(meta, recipe, times, ev, sizes, args.notes))
    print(f"wrote {args.model / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    main()
