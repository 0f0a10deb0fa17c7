"""``Engine.generate``: one validated request in, one result out.

Reads top to bottom: pick the model, prepare the pixels for the mode, then for
each batch draw seeded noise, denoise, decode and composite. Previews, progress
and cancellation go through the callback and token the caller passes in.
"""
from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import cancellation, hires, image_ops, networks, refiner, step_cache, token_merging, traced_calls
from .compute import run_until_interrupted
from .errors import GenerationError, Interrupted, ModelError, SfumatoError, ValidationError
from .fields import FIELDS
from .models import LoadedModel, ModelRegistry
from .networks import vae_files
from .networks.embeddings import TI_HASHES_KEY, ti_hashes
from .previews import CheapPreviewer, VaePreviewer, parameter_dtype, pil_to_tensor
from .request import CancelToken, EarlyStop, GeneratedImage, GenerationRequest, GenerationResult, Progress
from .sampling import sample_pass
from .sampling import table as samplers
from .sampling.denoiser import GuidedDenoiser, InpaintInputs, StepHook, noise_table_for
from .sampling.noise import ImageNoise
from .seeds import resolve_seed

ProgressCallback = Callable[[Progress], None]


@dataclass
class HookContext:
    """What an extension sees when it prepares its per-step hook."""

    model: LoadedModel
    request: GenerationRequest
    width: int
    height: int
    batch_size: int
    do_cfg: bool
    sigmas: torch.Tensor  # the σs this pass runs (steps + 1 values, descending); hooks key on σ or on the fraction done
    source_image: Image.Image | None  # the img2img/inpaint image at generation size
    crop_box: tuple[int, int, int, int] | None = None  # "Only masked": the region of the full image being generated
    full_size: tuple[int, int] | None = None  # the full image's size when crop_box is set


class ExtensionHost(Protocol):
    def step_hooks(self, context: HookContext) -> list[StepHook]: ...
    def infotext_fields(self, request: GenerationRequest) -> dict[str, str]: ...


@dataclass
class _Prepared:
    """The pixel-space plan for one request."""

    width: int
    height: int
    source: Image.Image | None = None  # pixels to start from (after fill), at generation size
    original: Image.Image | None = None  # pixels to composite back onto, at output size
    soft_mask: np.ndarray | None = None  # output-size soft mask, 255 = regenerated
    gen_hard_mask: np.ndarray | None = None  # generation-size hard mask
    crop_box: tuple[int, int, int, int] | None = None  # "Only masked": where the generated crop goes
    output_size: tuple[int, int] | None = None  # crop padding away at the end


@dataclass
class _PassPlan:
    """One sample pass of a job: its sampler, σs, size and prompts (hires fix has two)."""

    sampler: str
    schedule: str
    steps: int
    sigmas: torch.Tensor | None  # the σs it runs (pass_sigmas)
    width: int
    height: int
    conditioning: object  # the prompt encoder's output for this pass
    denoising_strength: float | None  # None: from noise (txt2img); else the img2img strength ``sigmas`` were cut for
    cfg_scale: float  # before the sampler's own factor
    full_sigmas: torch.Tensor | None = None  # the whole schedule an img2img pass was cut from (the Brownian tree spans it)
    refiner: "_RefinerPlan | None" = None  # the model that takes over part way through this pass
    # Opt-in speed-ups that change pixels (0: the exact call): the share of tokens merged before full-resolution
    # self-attention (a UNet's), and the first block cache's threshold (a flow transformer's).
    token_merging: float = 0.0
    first_block_cache: float = 0.0

    @property
    def planned(self) -> int:
        return len(self.sigmas) - 1

    @property
    def guided(self) -> bool:
        return _guided(self.cfg_scale)


@contextlib.contextmanager
def _closed_after(call: Callable):
    """Runs ``call.close()`` on leaving, where the model call has one (``Engine._model_call``)."""
    try:
        yield
    finally:
        close = getattr(call, "close", None)
        if close is not None:
            close()


def _guided(cfg_scale: float) -> bool:
    """CFG runs (the negative prompt is evaluated) only above 1, as in A1111."""
    return cfg_scale > 1.0


@dataclass(frozen=True)
class _RefinerPlan:
    """The refiner of one pass: its model, its own encoding of the pass's prompts, its noise table."""

    model: LoadedModel
    conditioning: object
    noise_table: object
    parameterization: str
    switches: list = field(default_factory=list)  # one entry per switch so far in the job (A1111 writes "Refiner" once it has)


@dataclass(frozen=True)
class _HiresStage:
    plan: hires.HiresPlan
    pass_plan: _PassPlan
    noise_table: object  # the second pass's: a family may shift σs by the image size (Flux.1)


@dataclass(frozen=True)
class _GroupProgress:
    """Where one batch group stands in the job, for progress and ETA."""

    group_index: int
    group_size: int
    groups: int
    steps_before: int  # steps run by the groups before it
    steps_per_group: int  # every pass of one group


class Engine:
    def __init__(self, registry: ModelRegistry, extensions: ExtensionHost | None = None):
        self.registry = registry
        self.extensions = extensions
        builtin_networks = registry.builtin_dir / networks.BUILTIN_NETWORKS_SUBDIR if registry.builtin_dir else None
        self.networks = networks.NetworkLibrary(registry.models_dir, builtin_networks)  # models/Lora, models/LyCORIS, builtin/loras

    def generate(self, request: GenerationRequest, on_progress: ProgressCallback | None = None,
                 cancel: CancelToken | None = None) -> GenerationResult:
        """Runs on the compute thread (see ``engine.compute``); ``on_progress`` is called from there.

        An interrupt stops the job in any phase: between steps the sampler ends and the image so far
        is decoded; elsewhere (model load, prompt encoding, decoding) it stops at the next checkpoint
        and the result holds the images finished before. If the work cannot stop within the compute
        thread's grace period, the result comes back at once, empty, and the next job runs.
        """
        cancel = cancel or CancelToken()
        started = time.perf_counter()
        try:
            return run_until_interrupted(cancel, self._generate_safely, request, on_progress, cancel)
        except Interrupted as stopped:
            return GenerationResult(request=request, images=[], interrupted=True,
                                    timings={"total": time.perf_counter() - started}, warnings=[str(stopped)])

    def _generate_safely(self, request: GenerationRequest, on_progress: ProgressCallback | None,
                         cancel: CancelToken) -> GenerationResult:
        # No lock: jobs reach the engine one at a time through the compute thread, and a lock held by
        # a job left behind on a retired compute thread would hold every later job too.
        try:
            with cancellation.running(cancel):
                return self._generate(request, on_progress, cancel)
        except SfumatoError:
            raise
        except (torch.OutOfMemoryError, MemoryError) as error:
            gc.collect()  # free what the failed job held before the next one starts
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            advice = self.registry.out_of_memory_message(request.model, error, request.width, request.height,
                                                         request.batch_size)
            raise GenerationError(f"{advice}; a smaller size or batch also helps") from error
        except Exception as error:
            raise GenerationError(f"generation failed: {type(error).__name__}: {error}") from error

    # -- the whole job -------------------------------------------------------
    def _generate(self, request: GenerationRequest, on_progress: ProgressCallback | None, cancel: CancelToken) -> GenerationResult:
        started = time.perf_counter()
        timings: dict[str, float] = {}
        images: list[GeneratedImage] = []
        try:
            with contextlib.ExitStack() as job_scope:  # undoes the job's swaps (its VAE, its LoRAs) however the job ends
                return self._generate_images(request, on_progress, cancel, started, timings, images, job_scope)
        except Interrupted as stopped:
            timings["total"] = time.perf_counter() - started
            return GenerationResult(request=request, images=images, interrupted=True, timings=timings, warnings=[str(stopped)])

    def _generate_images(self, request: GenerationRequest, on_progress: ProgressCallback | None, cancel: CancelToken,
                         started: float, timings: dict[str, float], images: list[GeneratedImage],
                         job_scope: contextlib.ExitStack) -> GenerationResult:
        """The job itself; ``timings`` and ``images`` fill as it goes, so an interrupt keeps what was finished."""
        cancellation.entering("loading the model")
        job_networks = networks.prepare(self.networks, request.prompt)  # <lora:…> tags out of the text to encode
        model = self._load_model(request)
        vae = self._job_vae(request, model, job_scope)
        job_scope.enter_context(networks.active(model, job_networks))
        refiner_model = self._job_refiner(request, model)
        timings["load"] = time.perf_counter() - started
        prepared = self._prepare_pixels(request, model)
        self._check_size(model, request, prepared.width, prepared.height)
        if request.mode not in model.family.modes:
            raise ValidationError("mode", f"{model.entry.name} draws only {', '.join(model.family.modes)}")
        seed = resolve_seed(request.seed)
        subseed = resolve_seed(request.subseed) if request.subseed_strength > 0 else request.subseed
        # The model's name, however it was asked for; the VAE file's name when one decodes (an Automatic match included).
        request = request.with_changes(seed=seed, subseed=subseed, model=model.entry.name,
                                       vae=vae.file.name if vae.file is not None else request.vae,
                                       refiner_checkpoint=refiner_model.entry.name if refiner_model is not None else "")
        noise_table, parameterization = noise_table_for(model, request.zero_terminal_snr, prepared.width, prepared.height,
                                                        shift=request.shift, steps=request.steps)
        if request.shift is not None and not noise_table.flow:
            request = request.with_changes(shift=None)  # Shift is a flow model's: ignored, and not written, elsewhere
        if request.first_block_cache and not step_cache.applies(getattr(model.pipeline, model.family.denoiser)):
            request = request.with_changes(first_block_cache=0.0)  # too few blocks to skip any: exact, and not written

        tick = time.perf_counter()
        cancellation.entering("encoding the prompt")
        conditioning = model.prompt_encoder.encode(job_networks.prompt, request.negative_prompt, request.clip_skip,
                                                   getattr(self.registry, "embeddings", None), job_networks.text_encoder_key,
                                                   need_negative=_guided(request.cfg_scale))
        timings["encode"] = time.perf_counter() - tick
        previewer = self._previewer(request, model)
        extension_info = self.extensions.infotext_fields(request) if self.extensions else {}
        if (hashes := ti_hashes(conditioning.embeddings)) is not None:
            extension_info = {TI_HASHES_KEY: hashes, **extension_info}
        extension_info = {**extension_info, **job_networks.infotext_fields()}
        first = _PassPlan(sampler=request.sampler, schedule=request.schedule, steps=request.steps,
                          sigmas=self._pass_sigmas(request, noise_table, prepared), width=prepared.width, height=prepared.height,
                          conditioning=conditioning, denoising_strength=None if prepared.source is None else request.denoising_strength,
                          cfg_scale=request.cfg_scale, token_merging=token_merging.pass_ratio(request, model.family.traits),
                          first_block_cache=FIELDS["first_block_cache"].value_for(request, model.family.traits))
        do_cfg = first.guided
        # img2img cuts the schedule; A1111 still spans the SDE samplers' Brownian tree over the whole of it.
        if prepared.source is not None:
            first.full_sigmas = sample_pass.schedule_sigmas(samplers.find_sampler(request.sampler), noise_table, request.schedule,
                                                            request.steps)
        second = None
        if hires.applies(request):
            second = self._plan_hires(request, model, first, job_networks)
        refined = None  # the refiner's part in the pass it refines
        if refiner_model is not None and second is None:
            refined = first.refiner = self._refiner_plan(request, refiner_model, job_networks.prompt, request.negative_prompt,
                                                         first.guided)
        elif refiner_model is not None:  # A1111's default: with hires fix, the refiner takes part in the second pass only
            refined = second.pass_plan.refiner = self._refiner_plan(
                request, refiner_model, networks.prepare(self.networks, second.plan.prompt).prompt, second.plan.negative_prompt,
                second.pass_plan.guided)
        # What the encoders had to report (a prompt cut at an encoder's limit), once each, in the order met.
        plans = [first, *([second.pass_plan] if second is not None else []), *([refined] if refined is not None else [])]
        warnings = list(dict.fromkeys(warning for plan in plans for warning in getattr(plan.conditioning, "warnings", ())))

        interrupted = False
        denoise_time = decode_time = 0.0
        steps_done_before = 0
        # On the CPU, batched convolutions round differently from single ones, so each image runs
        # alone there: image i of a batch is then bit-identical to a single run at seed + i.
        group_size = request.batch_size if model.device.type != "cpu" else 1
        groups = request.images_total // group_size
        steps_per_group = first.planned + (second.pass_plan.planned if second is not None else 0)
        for batch_index in range(groups):
            seeds = [seed + batch_index * group_size + i for i in range(group_size)]
            subseeds = [subseed + s - seed for s in seeds]
            stops: list[EarlyStop] = []
            progress = _GroupProgress(batch_index, group_size, groups, steps_done_before, steps_per_group)

            tick = time.perf_counter()
            cancellation.entering("sampling")
            image_noise = self._image_noise(request, model, first, seeds, subseeds)
            noise = image_noise.first()
            denoiser, init_latents = self._build_denoiser(request, model, prepared, first, noise_table, parameterization, noise)
            if denoiser is None:
                latents = init_latents
            else:
                on_step = self._step_callback(request, previewer, on_progress, cancel, started, progress, 0, stops)
                latents, steps_done = self._sample(request, model, first, denoiser, init_latents, image_noise, noise, seeds,
                                                   prepared, noise_table, do_cfg, on_step, stops, cancel)
                steps_done_before += steps_done
                if second is not None:
                    latents, steps_done = self._hires_stage(request, model, second, latents, seeds, subseeds, noise_table,
                                                            parameterization, previewer, on_progress, cancel, started,
                                                            progress, first.planned, stops)
                    steps_done_before += steps_done
            interrupted = any(stop.reason == "interrupted" for stop in stops)
            # A stop after the last step leaves a finished image.
            stopped_early = next((stop for stop in stops if stop.step < stop.total_steps), None)
            denoise_time += time.perf_counter() - tick

            tick = time.perf_counter()
            cancellation.entering("decoding")
            decoded = self._decode(model, latents)
            decode_time += time.perf_counter() - tick
            cancellation.check()
            # A1111 writes the refiner once it has taken over (a pass that never reached the switch does not name it).
            written = request if refined is None or refined.switches else request.with_changes(refiner_checkpoint="")
            for image_seed, image in zip(seeds, decoded):
                image_subseed = subseed + image_seed - seed
                image = self._finish_image(image, prepared)
                info = self._infotext(written, model, image_seed, image_subseed, prepared, extension_info, stopped_early,
                                      vae_hash=vae.short_hash, refiner_hash=refined.model.short_hash if refined else None)
                images.append(GeneratedImage(image=image, seed=image_seed, subseed=image_subseed, infotext=info,
                                             stopped_early=stopped_early))
            if interrupted:
                break
        timings.update(denoise=denoise_time, decode=decode_time, total=time.perf_counter() - started)
        return GenerationResult(request=request, images=images, interrupted=interrupted, timings=timings, warnings=warnings)

    # -- the passes ------------------------------------------------------------------
    def _job_refiner(self, request: GenerationRequest, model: LoadedModel) -> LoadedModel | None:
        """The refiner checkpoint, loaded through the registry's cache and checked against the model it refines."""
        if not refiner.applies(request):
            return None
        cancellation.entering("loading the refiner")
        try:
            refiner_model = self.registry.load(refiner.checkpoint_name(request.refiner_checkpoint))
        except ModelError as error:
            raise ValidationError("refiner_checkpoint", str(error)) from None
        refiner.check_compatible(model, refiner_model)
        return refiner_model

    def _refiner_plan(self, request: GenerationRequest, refiner_model: LoadedModel, prompt: str, negative: str,
                      guided: bool) -> "_RefinerPlan":
        """The refiner's part in a pass: the pass's prompts (``prompt`` without its <lora:…> tags) encoded by the
        refiner's text encoders (the negative only when the pass is ``guided``), and its noise table."""
        cancellation.entering("encoding the prompt for the refiner")
        conditioning = refiner_model.prompt_encoder.encode(prompt, negative, request.clip_skip,
                                                           getattr(self.registry, "embeddings", None), need_negative=guided)
        noise_table, parameterization = noise_table_for(refiner_model, request.zero_terminal_snr, shift=request.shift)
        return _RefinerPlan(refiner_model, conditioning, noise_table, parameterization)

    def _plan_hires(self, request: GenerationRequest, model: LoadedModel, first: "_PassPlan", job_networks) -> "_HiresStage":
        """The upscale and second pass of hires fix: sizes and upscaler checked, σs cut (from the noise table at the
        new size), hires prompts encoded."""
        family = model.family
        plan = hires.plan(request, first.width, first.height, model.vae_scale_factor, (family.min_size, model.max_size),
                          self.registry)
        conditioning = first.conditioning
        guided = _guided(plan.cfg_scale)
        # A hires CFG of its own above 1 needs the negative that a first pass at CFG 1 did not encode.
        if (plan.prompt, plan.negative_prompt) != (request.prompt, request.negative_prompt) or (
                guided and conditioning.negative_embeds is None):
            cancellation.entering("encoding the hires prompt")
            # The hires prompt's own <lora:…> tags are taken out; the first prompt's networks stay active for both passes.
            conditioning = model.prompt_encoder.encode(networks.prepare(self.networks, plan.prompt).prompt, plan.negative_prompt,
                                                       request.clip_skip, getattr(self.registry, "embeddings", None),
                                                       job_networks.text_encoder_key, need_negative=guided)
        spec = samplers.find_sampler(plan.sampler)
        noise_table, _ = noise_table_for(model, request.zero_terminal_snr, plan.width, plan.height, shift=request.shift,
                                         steps=plan.steps)
        sigmas = sample_pass.pass_sigmas(spec, noise_table, plan.schedule, plan.steps, request.denoising_strength)
        full = sample_pass.schedule_sigmas(spec, noise_table, plan.schedule, plan.steps)
        second = _PassPlan(sampler=plan.sampler, schedule=plan.schedule, steps=plan.steps, sigmas=sigmas, width=plan.width,
                           height=plan.height, conditioning=conditioning, denoising_strength=request.denoising_strength,
                           cfg_scale=plan.cfg_scale, full_sigmas=full,
                           token_merging=token_merging.pass_ratio(request, family.traits, second_pass=True),
                           first_block_cache=first.first_block_cache)
        return _HiresStage(plan, second, noise_table)

    def _hires_stage(self, request: GenerationRequest, model: LoadedModel, second: "_HiresStage", latents: torch.Tensor,
                     seeds: list[int], subseeds: list[int], noise_table, parameterization: str, previewer,
                     on_progress, cancel: CancelToken, started: float, progress: "_GroupProgress", offset: int,
                     stops: list[EarlyStop]) -> tuple[torch.Tensor, int]:
        """Upscale the first pass's latents, then sample them again as img2img: the latents and the steps run.

        As A1111: an interrupted first pass is the picture (no upscale); a skipped one is still upscaled, and its
        second pass stops before its first step."""
        if any(stop.reason == "interrupted" for stop in stops):
            return latents, 0
        cancellation.entering("upscaling")
        latents = hires.upscale(second.plan, latents, model.vae_scale_factor, lambda batch: self._decode_unit(model, batch),
                                lambda picture: self._encode(model, picture))
        if stops:
            return latents, 0
        cancellation.entering("sampling")
        image_noise = self._image_noise(request, model, second.pass_plan, seeds, subseeds)  # new noise for the new shape
        noise = image_noise.first()
        do_cfg = second.pass_plan.guided  # a hires CFG of its own may turn guidance on or off for this pass
        noise_table = second.noise_table
        denoiser = self._guided_denoiser(request, model, second.pass_plan, noise_table, parameterization, noise, do_cfg)
        on_step = self._step_callback(request, previewer, on_progress, cancel, started, progress, offset, stops)
        return self._sample(request, model, second.pass_plan, denoiser, latents, image_noise, noise, seeds, None, noise_table,
                            do_cfg, on_step, stops, cancel)

    def _with_refiner(self, request: GenerationRequest, plan: "_PassPlan", denoiser: GuidedDenoiser, noise: torch.Tensor,
                      do_cfg: bool, noise_table) -> refiner.RefinerSwitch:
        """``denoiser`` until the pass is ``refiner_switch_at`` done, then the refiner's (same prompts, size and inpaint inputs)."""
        part = plan.refiner

        def make_refiner() -> GuidedDenoiser:
            part.switches.append(plan.steps)
            # The refiner's call is exact: a first block cache would outlive the pass (``_sample`` closes the first call).
            refined = replace(plan, conditioning=part.conditioning, refiner=None, first_block_cache=0.0)
            return self._guided_denoiser(request, part.model, refined,
                                         part.noise_table, part.parameterization, noise, do_cfg, inpaint=denoiser.inpaint,
                                         whole_image=False)

        return refiner.RefinerSwitch(denoiser, make_refiner, request.refiner_switch_at, noise_table.sigmas)

    @staticmethod
    def _image_noise(request: GenerationRequest, model: LoadedModel, plan: "_PassPlan", seeds: list[int],
                     subseeds: list[int]) -> ImageNoise:
        """A1111's per-image noise for one pass: a new ImageRNG for the pass's latent shape from the same seeds."""
        shape = (model.latent_channels, plan.height // model.vae_scale_factor, plan.width // model.vae_scale_factor)
        # Sampling runs in float32 whatever the model's dtype (see sampling/denoiser.py).
        return ImageNoise(shape, seeds, subseeds, request.subseed_strength, source=request.rng,
                          eta_noise_seed_delta=request.eta_noise_seed_delta, device=model.device)

    def _sample(self, request: GenerationRequest, model: LoadedModel, plan: "_PassPlan", denoiser: GuidedDenoiser,
                init_latents: torch.Tensor | None, image_noise: ImageNoise, noise: torch.Tensor, seeds: list[int],
                prepared: _Prepared | None, noise_table, do_cfg: bool, on_step, stops: list[EarlyStop],
                cancel: CancelToken) -> tuple[torch.Tensor, int]:
        """One sample pass (either of hires fix's, or the only one): the latents it ends with and the steps it ran.

        ``stops`` gets an EarlyStop when the pass ended early; an interrupt is honoured here, so the picture so far
        is still decoded (a second interrupt stops that too).
        """
        with _closed_after(denoiser.unet):  # an opt-in speed-up's hooks come off the model however the pass ends
            if self.extensions:
                source = prepared.source if prepared is not None else None
                crop_box = prepared.crop_box if prepared is not None else None
                full_size = prepared.original.size if crop_box is not None else None
                context = HookContext(model, request, plan.width, plan.height, len(seeds), do_cfg, plan.sigmas, source, crop_box,
                                      full_size)
                denoiser.hooks = self.extensions.step_hooks(context)
            if plan.refiner is not None:
                denoiser = self._with_refiner(request, plan, denoiser, noise, do_cfg, noise_table)
            before = len(stops)
            try:
                result = sample_pass.run(sampler=plan.sampler, denoiser=denoiser, noise_table=noise_table, sigmas=plan.sigmas,
                                         first_noise=noise, image_noise=image_noise, seeds=seeds, steps=plan.steps,
                                         init_latents=init_latents, denoising_strength=plan.denoising_strength,
                                         eta=request.eta, prediction_type=model.pipeline.scheduler.config.get("prediction_type"),
                                         full_sigmas=plan.full_sigmas, on_step=on_step)
            except Interrupted:
                if init_latents is None or prepared is not None:
                    raise  # nothing denoised in this job's image yet
                # Interrupted inside the second pass's first step: A1111 returns the pass's start, the upscaled picture.
                cancel.honour_interrupt()
                stops.append(EarlyStop(reason="interrupted", step=on_step.offset, total_steps=on_step.total))
                return init_latents, 0
            latents = result.latents
            if denoiser.inpaint is not None and denoiser.inpaint.blend:
                # The known region ends exactly on the original latents (A1111 blends the samples once more).
                latents = latents * denoiser.inpaint.mask + denoiser.inpaint.image_latents * (1 - denoiser.inpaint.mask)
            if cancel.interrupt_pending and len(stops) == before:  # interrupted inside a step: the image is the last finished step's
                stops.append(EarlyStop(reason="interrupted", step=on_step.offset + result.steps_done, total_steps=on_step.total))
            if any(stop.reason == "interrupted" for stop in stops):
                cancel.honour_interrupt()  # the image so far is still decoded; a second interrupt stops that too
            return latents, result.steps_done

    # -- pieces ------------------------------------------------------------------
    def _load_model(self, request: GenerationRequest) -> LoadedModel:
        """The request's model; its module picks, and its VAE file, matter to a model kept as split files."""
        vae = request.vae if request.vae not in (vae_files.AUTOMATIC, vae_files.NONE) else None
        if not request.modules and vae is None:
            return self.registry.load(request.model)
        return self.registry.load(request.model, modules=request.modules, vae=vae)

    def _job_vae(self, request: GenerationRequest, model: LoadedModel, job_scope: contextlib.ExitStack) -> vae_files.VaeChoice:
        """The VAE the request asks for, swapped into the model until the job ends (the checkpoint's own after)."""
        vaes = getattr(self.registry, "vaes", None)
        if vaes is None:
            return vae_files.VaeChoice()
        cancellation.entering("loading the VAE")
        own = model.extras.setdefault("checkpoint_vae", model.pipeline.vae)  # remembered before any swap
        choice = vaes.choose(request.vae, model)
        job_scope.enter_context(vae_files.swapped(model.pipeline, choice.module or own, own))
        return choice

    @staticmethod
    def _check_size(model: LoadedModel, request: GenerationRequest, width: int, height: int) -> None:
        """Refuse a size the model cannot draw, blaming what set it: width/height, or the init image when they were left out."""
        smallest, largest = model.family.min_size, model.max_size
        for name, value in (("width", width), ("height", height)):
            if not smallest <= value <= largest:
                if getattr(request, name) is None and request.init_image is not None:
                    image_w, image_h = request.init_image.size
                    raise ValidationError("init_image", f"the image is {image_w}x{image_h}; {model.entry.name} draws {smallest} to "
                                                        f"{largest} pixels a side; send a larger image or set width and height to resize it")
                raise ValidationError(name, f"{value} is outside what {model.entry.name} supports ({smallest}..{largest})")
            if value % model.vae_scale_factor:
                raise ValidationError(name, f"must be a multiple of {model.vae_scale_factor} for this model, got {value}")

    def _prepare_pixels(self, request: GenerationRequest, model: LoadedModel) -> _Prepared:
        native_w, native_h = model.family.native_size
        if request.mode == "txt2img":
            return _Prepared(request.width or native_w, request.height or native_h)
        image = request.init_image.convert("RGB")
        if request.mode == "img2img":
            if request.width and request.height:
                source = image_ops.resize_image(image, request.width, request.height, request.resize_mode)
                return _Prepared(request.width, request.height, source=source)
            padded, size = image_ops.pad_to_multiple(image, model.vae_scale_factor)
            return _Prepared(padded.width, padded.height, source=padded, output_size=size)
        return self._prepare_inpaint(request, image, model)

    def _prepare_inpaint(self, request: GenerationRequest, image: Image.Image, model: LoadedModel) -> _Prepared:
        canvas = image_ops.inpaint_canvas(image, request.mask, request.invert_mask, request.mask_blur, request.outpaint,
                                          seed=max(0, request.seed))
        image, backdrop, hard, soft = canvas.image, canvas.backdrop, canvas.hard_mask, canvas.soft_mask
        if request.width and request.height and request.inpaint_area == "Whole picture" and image.size != (request.width, request.height):
            image = image_ops.resize_image(image, request.width, request.height, request.resize_mode)
            backdrop = image_ops.resize_image(backdrop, request.width, request.height, request.resize_mode)
            hard = np.array(Image.fromarray(hard).resize(image.size, Image.NEAREST))
            soft = np.array(Image.fromarray(soft).resize(image.size, Image.BILINEAR))
        original = backdrop  # what the result is blended onto: outside the mask, these pixels are kept exactly
        if request.inpaint_area == "Only masked":
            gen_w, gen_h = request.width or model.family.native_size[0], request.height or model.family.native_size[1]
            box = image_ops.masked_region(np.maximum(hard, soft), request.inpaint_padding, gen_w / gen_h)
            crop = image.crop(box).resize((gen_w, gen_h), image_ops.RESAMPLE)
            crop_hard = np.asarray(Image.fromarray(hard).crop(box).resize((gen_w, gen_h), Image.NEAREST))
            source = image_ops.fill_masked(crop, crop_hard) if request.masked_content == "fill" else crop
            return _Prepared(gen_w, gen_h, source=source, original=original, soft_mask=soft, gen_hard_mask=crop_hard, crop_box=box)
        padded, size = image_ops.pad_to_multiple(image, model.vae_scale_factor)
        pad_w, pad_h = padded.width - image.width, padded.height - image.height
        gen_hard = np.pad(hard, ((0, pad_h), (0, pad_w)))
        source = image_ops.fill_masked(padded, gen_hard) if request.masked_content == "fill" else padded
        return _Prepared(padded.width, padded.height, source=source, original=original, soft_mask=soft, gen_hard_mask=gen_hard,
                         output_size=size)

    @staticmethod
    def _pass_sigmas(request: GenerationRequest, noise_table, prepared: _Prepared) -> torch.Tensor:
        """The σs the sample pass runs: the whole schedule in txt2img, A1111's img2img tail otherwise."""
        spec = samplers.find_sampler(request.sampler)
        strength = None if prepared.source is None else request.denoising_strength
        return sample_pass.pass_sigmas(spec, noise_table, request.schedule, request.steps, strength)

    def _guided_denoiser(self, request: GenerationRequest, model: LoadedModel, plan: "_PassPlan", noise_table, parameterization: str,
                         noise: torch.Tensor, do_cfg: bool, inpaint: InpaintInputs | None = None, whole_image: bool = True) -> GuidedDenoiser:
        """The CFG denoiser of one pass: its prompts, its sampler's CFG factor and its size's conditioning (SDXL's size ids).

        ``whole_image``: a 9-channel inpainting model without ``inpaint`` gets A1111's blank-mask conditioning."""
        batch = noise.shape[0]
        conditioning = plan.conditioning
        cond = conditioning.prompt_embeds.repeat(batch, 1, 1)
        embeds = torch.cat([conditioning.negative_embeds.repeat(batch, 1, 1), cond]) if do_cfg else cond
        added = model.family.unet_kwargs(conditioning, plan.width, plan.height).batched(batch, do_cfg, model.device, model.dtype)
        if inputs := {name: getattr(request, name) for name in model.family.request_inputs()}:
            added = {**(added or {}), **inputs}  # e.g. Flux.1 dev's distilled CFG scale
        if inpaint is None and whole_image:
            inpaint = self._whole_image_conditioning(model, plan.width, plan.height, noise)
        cfg_scale = plan.cfg_scale * samplers.find_sampler(plan.sampler).cfg_scale_factor
        return GuidedDenoiser(self._model_call(model, plan), noise_table, parameterization,
                              embeds.to(model.device, model.dtype), cfg_scale, do_cfg, added, inpaint)

    @staticmethod
    def _model_call(model: LoadedModel, plan: "_PassPlan") -> Callable:
        """The pass's model call: exact (replayed from traces where it can be), or with an opt-in speed-up that changes
        pixels (``_PassPlan``), which ``_sample`` closes when the pass ends."""
        call, module = model.family.model_call(model.pipeline), getattr(model.pipeline, model.family.denoiser)
        if plan.token_merging:
            return token_merging.MergedTokensCall(call, module, plan.token_merging)
        if plan.first_block_cache:
            return step_cache.CachedBlocksCall(call, module, plan.first_block_cache)
        return traced_calls.replayed(call, module)

    def _build_denoiser(self, request, model: LoadedModel, prepared: _Prepared, first: _PassPlan, noise_table,
                        parameterization: str, noise) -> tuple[GuidedDenoiser | None, torch.Tensor | None]:
        """The first pass's denoiser for one batch and the init latents (None in txt2img); no denoiser when strength 0 leaves nothing to do."""
        batch = noise.shape[0]

        def denoiser(inpaint: InpaintInputs | None) -> GuidedDenoiser:
            return self._guided_denoiser(request, model, first, noise_table, parameterization, noise, first.guided, inpaint,
                                         whole_image=False)

        if prepared.source is None:
            return denoiser(self._whole_image_conditioning(model, prepared.width, prepared.height, noise)), None

        image_latents = self._encode(model, prepared.source).repeat(batch, 1, 1, 1).float()
        latent_mask = None
        if prepared.gen_hard_mask is not None:
            mask = torch.from_numpy(prepared.gen_hard_mask.astype(np.float32) / 255.0)[None, None]
            latent_mask = F.max_pool2d(mask, model.vae_scale_factor).to(model.device).repeat(batch, 1, 1, 1)
            if request.masked_content == "latent noise":
                image_latents = image_latents * (1 - latent_mask) + noise * latent_mask
            elif request.masked_content == "latent nothing":
                image_latents = image_latents * (1 - latent_mask)
        if request.denoising_strength == 0:
            return None, image_latents
        inpaint = None if latent_mask is not None else self._whole_image_conditioning(model, prepared.width, prepared.height, noise)
        if latent_mask is not None:
            masked_latents = None
            if model.is_inpainting_model:
                hard = torch.from_numpy(prepared.gen_hard_mask < 128)[None, None].to(torch.float32)
                masked_pixels = pil_to_tensor(prepared.source) * hard
                masked_latents = self._encode_tensor(model, masked_pixels).repeat(batch, 1, 1, 1)
            inpaint = InpaintInputs(latent_mask, image_latents, masked_latents)
        return denoiser(inpaint), image_latents

    def _whole_image_conditioning(self, model: LoadedModel, width: int, height: int, noise: torch.Tensor) -> InpaintInputs | None:
        """A 9-channel inpainting UNet used without a mask: everything is "masked" and the masked
        image is blank, the conditioning A1111 gives such models in txt2img and img2img."""
        if not model.is_inpainting_model:
            return None
        batch, _, latent_height, latent_width = noise.shape
        blank = self._encode_tensor(model, torch.zeros(1, 3, height, width)).repeat(batch, 1, 1, 1)
        ones = torch.ones(batch, 1, latent_height, latent_width, device=model.device, dtype=model.dtype)
        return InpaintInputs(mask=ones, image_latents=blank, masked_image_latents=blank, blend=False)

    def _encode(self, model: LoadedModel, image: Image.Image) -> torch.Tensor:
        return self._encode_tensor(model, pil_to_tensor(image))

    @staticmethod
    @torch.inference_mode()
    def _encode_tensor(model: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
        vae = model.pipeline.vae
        # The posterior mean, not a sample: deterministic and identical on every device.
        mean = vae.encode(pixels.to(model.device, parameter_dtype(vae))).latent_dist.mean
        return model.to_model_latent(mean)

    @staticmethod
    def _decode(model: LoadedModel, latents: torch.Tensor) -> list[Image.Image]:
        # Same arithmetic as diffusers' VaeImageProcessor.postprocess, so pixels match the plain pipeline.
        array = (Engine._decode_unit(model, latents) * 255).round().astype("uint8")
        return [Image.fromarray(a, "RGB") for a in array]

    @staticmethod
    @torch.inference_mode()
    def _decode_unit(model: LoadedModel, latents: torch.Tensor) -> np.ndarray:
        """The VAE's pictures as (N, H, W, 3) floats in [0, 1]."""
        vae = model.pipeline.vae
        if not torch.isfinite(latents).all():
            raise GenerationError("the sampler produced non-finite values (NaN/inf); try another sampler or schedule")
        decoded = vae.decode(model.to_vae_latent(latents.to(parameter_dtype(vae))), return_dict=False)[0]
        return (decoded / 2 + 0.5).clamp(0, 1).float().cpu().permute(0, 2, 3, 1).numpy()

    @staticmethod
    def _finish_image(image: Image.Image, prepared: _Prepared) -> Image.Image:
        if prepared.soft_mask is not None:
            if prepared.crop_box is not None:
                left, top, right, bottom = prepared.crop_box
                full = prepared.original.copy()
                full.paste(image.resize((right - left, bottom - top), image_ops.RESAMPLE), (left, top))
                image = full
            elif prepared.output_size is not None:
                image = image.crop((0, 0, *prepared.output_size))
            return image_ops.composite(prepared.original, image, prepared.soft_mask)
        if prepared.output_size is not None and image.size != prepared.output_size:
            return image.crop((0, 0, *prepared.output_size))
        return image

    def _previewer(self, request: GenerationRequest, model: LoadedModel):
        if request.preview_every == 0 or request.preview_method == "none":
            return None
        if request.preview_method == "full":
            return VaePreviewer(model.pipeline.vae, model.scaling_factor, model.latent_shift, to_vae_latent=model.to_vae_latent)
        if request.preview_method == "taesd":
            # The family's TAESD variant decodes the latent as the model sees it; without its file, the cheap
            # previews stand in (the library says so once).
            library = getattr(self.registry, "tiny_decoders", None)
            tiny = library.get(model.family.latent.tiny_decoder) if library is not None else None
            if tiny is not None:
                return VaePreviewer(tiny, 1.0)
        return CheapPreviewer(model.family)

    @staticmethod
    def _step_callback(request, previewer, on_progress, cancel: CancelToken, started, progress: "_GroupProgress", offset: int,
                       stops: list[EarlyStop]):
        """The step callback of one pass; ``offset`` is the steps of this image's earlier passes, so progress and
        early stops count every pass of the image (hires fix's first and second)."""
        total = progress.steps_per_group
        total_all = progress.steps_before + total * (progress.groups - progress.group_index)

        def on_step(step: int, planned: int, info) -> bool:
            done_here = offset + step
            if cancel.interrupted:
                stops.append(EarlyStop(reason="interrupted", step=done_here, total_steps=total))
                return True
            if cancel.take_skip():
                stops.append(EarlyStop(reason="skipped", step=done_here, total_steps=total))
                return True
            if on_progress is not None:
                elapsed = time.perf_counter() - started
                done = progress.steps_before + done_here
                eta = elapsed / done * (total_all - done) if done else 0.0
                preview = None
                if previewer is not None and (step % request.preview_every == 0 or step == planned):
                    # x̂₀ while sampling, as A1111 previews; the last step's latent is the finished pass itself.
                    preview = previewer.deferred(info.x if step == planned else info.denoised)
                on_progress(Progress(done_here, total, progress.group_index * progress.group_size, request.images_total,
                                     elapsed, eta, preview))
            return False

        on_step.offset, on_step.total = offset, total
        return on_step

    @staticmethod
    def _infotext(request: GenerationRequest, model: LoadedModel, seed: int, subseed: int, prepared: _Prepared, extension_info: dict,
                  stopped_early: EarlyStop | None = None, vae_hash: str | None = None, refiner_hash: str | None = None) -> str:
        from .infotext import build_infotext

        size = prepared.output_size or (prepared.width, prepared.height)
        if prepared.original is not None and prepared.crop_box is not None:
            size = prepared.original.size
        return build_infotext(request, seed=seed, model_name=model.entry.name, model_hash=model.short_hash,
                              extra=extension_info or None, subseed=subseed if request.subseed_strength > 0 else None, size=size,
                              stopped_early=stopped_early, vae_hash=vae_hash, refiner_hash=refiner_hash,
                              traits=model.family.traits)
