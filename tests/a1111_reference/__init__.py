"""An independent re-implementation of AUTOMATIC1111 1.10's sampling, the oracle for parity tests.

Written from A1111's sources read for facts only (no code copied) and from the papers each module
names; k-diffusion 0.1.1 (the version A1111 pins) supplies ``CompVisDenoiser`` / ``CompVisVDenoiser``,
the k-sampler functions and the Brownian tree. Nothing here imports the engine's sampling code.

Entry point: ``render(model_dir_or_pipeline, infotext_params, conditioning=None, init_image=None)``;
``sample_latents`` gives the latent before decoding. ``ref_parity.compare`` runs one sampler × schedule
against the engine (the parity test and scripts/a1111_parity_table.py use it).

A1111 facts worth knowing, found while writing it: DPM++ 3M SDE drops the next-to-last σ like DPM2;
KL Optimal ends at σ_min, not 0; img2img's Brownian tree spans the whole schedule's σ range, not the
cut one; DPM fast/adaptive scale the start noise by the schedule's σ₀ but solve over the table's range.

Covered: txt2img and img2img with "RNG: CPU"; A1111 1.10's 20 samplers × "Automatic" + 11 schedule
types; seeds, batch seeds (seed + i), variation seed (slerp), ENSD, Eta; SD 1.x eps and v, and SDXL
(size/crop/target ids); VAE decode with A1111's truncating uint8 conversion and a rounding variant.

Prompt encoding: the caller may pass conditioning (the parity tests pass the engine's own prompt
encoder output, since prompt encoding is not what they test); otherwise ``plain_clip_conditioning``
encodes simple unweighted prompts as plain CLIP hidden states (SD 1.x last layer; SDXL penultimate
layers of both encoders + pooled, zeros for an empty negative). No A1111 weighting syntax, no
75-token chunking, no clip skip.

Known deviations from A1111, and why:
- img2img encodes the init image with the VAE posterior's mean; A1111 draws a sample from it with
  the global torch RNG (unseeded state), which no reference can reproduce; the posterior's std is
  tiny for SD VAEs.
- UniPC is written for batch size 1 (its per-step coefficients are scalars there, as in A1111's
  batch-1 arithmetic).
- float32 on the CPU; A1111 usually runs fp16 on a GPU. The pixel target assumes "RNG: CPU" and
  full precision.
- ``render`` resizes an init image of another size with PIL's default filter, not A1111's resize modes:
  give it an image at the target size.
- The plain-CLIP encoder pads with the folder's tokenizer pad token (A1111 pads OpenCLIP with id 0) and
  is not compared against A1111 anywhere; the parity tests do not use it.
- k-diffusion is the installed 0.1.1.post1, not A1111's pinned commit; the sampler functions used here
  are the same algorithms, but a later upstream fix would show here and not in A1111.
- A1111 settings are at their defaults (s_churn 0, no sigma/rho overrides, UniPC bh1 order 3,
  Beta α = β = 0.6, no "always discard penultimate σ", no NGMS, no token merging).
"""
from .ref_render import (SAMPLERS, SCHEDULE_NAMES, Params, decode, make_cond, plain_clip_conditioning, render, resolved_schedule,
                         sample_latents, schedule_sigmas, to_uint8)

__all__ = ["SAMPLERS", "SCHEDULE_NAMES", "Params", "decode", "make_cond", "plain_clip_conditioning", "render", "resolved_schedule",
           "sample_latents", "schedule_sigmas", "to_uint8"]
