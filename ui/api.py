"""The AUTOMATIC1111-compatible HTTP API (``/sdapi/v1``), served beside the UI.

Each handler turns A1111's JSON into one ``GenerationRequest``, submits it to the
studio's job queue (the same FIFO queue the UI uses) and waits for its result.
Shapes follow A1111 1.10 (``modules/api/api.py``); ``ui/api_models.py`` lists
the fields and the few deliberate differences.

Errors: a bad value gives 422 ``{"error": "ValidationError", "detail", "field"}``
naming the A1111 field; an engine or model failure gives 500
``{"error", "detail"}``; the server keeps serving either way.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import itertools
import json
import logging
import re
import threading
import time
from dataclasses import asdict, replace
from typing import Any

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image

from engine.sampling import table as samplers
from engine.errors import ModelError, SfumatoError, ValidationError
from engine.fields import CORE, FIELDS, INPAINT_AREAS, MASKED_CONTENT, RESIZE_MODES
from engine.request import GenerationRequest, GenerationResult
from engine.untrusted_images import read_untrusted_image
from engine.xyz.axes import installed_in
from engine.xyz.script_args import ScriptPlot, is_xyz_script, read_script_args, response_images

from .api_models import (
    ErrorResponse, ExtrasBaseRequest, ExtrasBatchImagesRequest, ExtrasBatchImagesResponse, ExtrasSingleImageRequest,
    ExtrasSingleImageResponse, GenerationParams, Img2ImgRequest, ImageToImageResponse, LatentUpscaleModeItem, LoraItem,
    OptionsModel, OptionsUpdateResponse, PNGInfoRequest, PNGInfoResponse, ProgressResponse, ProgressState, PromptStyleItem,
    SamplerItem, SchedulerItem, SDModelItem, TextToImageResponse, Txt2ImgRequest, UpscalerItem,
)
from .guard import authenticated_user
from .session import sees_job

log = logging.getLogger("sfumato.api")

OVERRIDES = "override_settings"
# Request fields whose A1111 value is not the request value as sent; each has its own reader below.
_CONVERTED = ("sampler", "schedule", "model", "init_image", "mask", "resize_mode", "masked_content", "inpaint_area",
              "invert_mask", "extensions")


def api_field_names() -> dict[str, str]:
    """Engine field → the A1111 name a client sent (a payload name or ``override_settings.<key>``), from the declarations."""
    names = {field.name: field.api if field.api else f"{OVERRIDES}.{field.override}" for field in FIELDS.with_api() if field.owner == CORE}
    names["preset"] = "styles"
    return names


INPAINT_AREAS_BY_FULL_RES = {False: INPAINT_AREAS[0], True: INPAINT_AREAS[1]}
# A1111 schedulers' internal names and the two per-schedule facts its /schedulers reports.
_SCHEDULER_FACTS = {"Karras": {"default_rho": 7.0}, "SGM Uniform": {"need_inner_model": True}}
_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)
_POLL_START_S, _POLL_MAX_S, _DISCONNECT_CHECK_S = 0.005, 0.1, 0.5
# A1111 option → (Sfumato setting, type) for the options POST /options can change besides the model.
_MODULES_OPTION = FIELDS["modules"].override  # Forge's forge_additional_modules: remembered per model, as the UI's picker
_OPTION_SETTINGS = {"show_progress_every_n_steps": ("preview_every", int), "samples_save": ("save_outputs", bool),
                    "save_incomplete_images": ("save_interrupted_images", bool)}
# Lists A1111 clients fetch while connecting, for features Sfumato does not have: honest empty answers.
_EMPTY_LISTS = ("/hypernetworks", "/face-restorers", "/realesrgan-models")
# A1111's face restoration fields on Extras requests: Sfumato has no face restorers, so only 0 is accepted.
_FACE_RESTORATION_FIELDS = ("gfpgan_visibility", "codeformer_visibility", "codeformer_weight")
_ERROR_RESPONSES = {422: {"model": ErrorResponse}, 500: {"model": ErrorResponse}}


class ApiError(Exception):
    """An error answered as JSON ``{"error", "detail", "field"}`` with an HTTP status."""

    def __init__(self, status: int, error: str, detail: str, field: str | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.field = status, error, detail, field

    def response(self) -> JSONResponse:
        body = {"error": self.error, "detail": self.detail}
        if self.field is not None:
            body["field"] = self.field
        return JSONResponse(status_code=self.status, content=body)


def api_field(engine_field: str) -> str:
    head, _, rest = engine_field.partition(".")
    name = api_field_names().get(head, head)
    return f"{name}.{rest}" if rest else name


def validation_error(error: ValidationError, field: str | None = None) -> ApiError:
    name = field or api_field(error.field)
    return ApiError(422, "ValidationError", f"{name}: {error.message}", name)


# --- images in and out -----------------------------------------------------------

def decode_base64(text: Any, field: str) -> bytes:
    """A client's base64 payload (optionally a data: URL, line breaks and missing padding tolerated) as bytes."""
    if not isinstance(text, str) or not text.strip():
        raise ValidationError(field, "must be a base64-encoded image")
    if text.startswith(("http://", "https://")):
        raise ValidationError(field, "image URLs are not fetched; send the image itself as base64")
    payload = re.sub(r"\s+", "", _DATA_URL.sub("", text.strip(), count=1))
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError(field, "is not valid base64") from None


def decode_image(text: Any, field: str) -> Image.Image:
    """A base64 image from a client, fully loaded; ValidationError(field) otherwise (a refused format or size is named)."""
    return read_untrusted_image(decode_base64(text, field), field)


def encode_png(image: Image.Image, infotext: str | None) -> str:
    from engine.image_metadata import png_with_infotext

    return base64.b64encode(png_with_infotext(image, infotext)).decode("ascii")


def _decoded(text: Any, field: str) -> bytes:
    try:
        return decode_base64(text, field)
    except ValidationError as error:
        raise validation_error(error, field) from None


def _encode_result(result) -> str:
    """An Extras result as base64 PNG with the source's text chunks and ``postprocessing``, as A1111's API sends it."""
    from engine.image_metadata import png_with_infotext

    chunks = {key: value for key, value in result.chunks.items() if key != "parameters"}
    return base64.b64encode(png_with_infotext(result.image, result.source_infotext, chunks)).decode("ascii")


def _plaintext_html(text: str) -> str:
    """A1111's ``plaintext_to_html``: each line escaped, lines joined with <br>, in one paragraph."""
    import html

    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


def encode_preview(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# --- A1111 JSON → GenerationRequest ----------------------------------------------

def resolve_sampler(body: GenerationParams) -> tuple[str, str]:
    """sampler_name (or sampler_index) and scheduler → our canonical (sampler, schedule).

    As A1111 1.10's ``get_sampler_and_scheduler``: any case, aliases, and a
    legacy combined name ("DPM++ 2M Karras") whose schedule applies unless
    ``scheduler`` names one explicitly.
    """
    name = body.sampler_name or body.sampler_index
    field = "sampler_name" if body.sampler_name else "sampler_index"
    try:
        sampler, legacy_schedule = samplers.split_legacy_name(name)
    except ValidationError as error:
        raise validation_error(error, field) from None
    schedule = legacy_schedule or samplers.DEFAULT_SCHEDULE
    if body.scheduler:
        try:
            explicit = samplers.find_schedule(body.scheduler).name
        except ValidationError as error:
            raise validation_error(error, "scheduler") from None
        if explicit != samplers.DEFAULT_SCHEDULE or not legacy_schedule:
            schedule = explicit
    return sampler, schedule


def resolve_model(studio, body: GenerationParams) -> str:
    wanted = (body.override_settings or {}).get(FIELDS["model"].override)
    if wanted in (None, ""):
        return studio.default_model()
    if not isinstance(wanted, str):
        raise ApiError(422, "ValidationError", "override_settings.sd_model_checkpoint: must be a model title", "override_settings.sd_model_checkpoint")
    try:
        return studio.registry.get(wanted).name
    except ModelError as error:
        raise ApiError(422, "ValidationError", f"override_settings.sd_model_checkpoint: {error}", "override_settings.sd_model_checkpoint") from None


def _apply_styles(studio, body: GenerationParams, fields: dict[str, Any]) -> dict[str, Any]:
    """Presets named in ``styles``, in order; fields the client set explicitly win over a preset's."""
    if not body.styles:
        return fields
    from engine.presets import apply_preset

    explicit = explicit_fields(body)
    for name in body.styles:
        try:
            preset = studio.presets.get(name)
        except ValidationError:
            known = ", ".join(preset.name for preset in studio.presets.list())
            raise ApiError(422, "ValidationError", f"styles: no style (preset) named {name!r}; available: {known}", "styles") from None
        applied = apply_preset(preset, fields)
        for key, value in applied.items():
            if key in ("prompt", "negative_prompt") or key not in explicit:
                fields[key] = value
    for declared in FIELDS.owned_by_extensions():
        fields.pop(declared.name, None)  # a preset's extension settings belong to the UI; API clients send alwayson_scripts
    return fields


def explicit_fields(body: GenerationParams) -> set[str]:
    """Request fields the client set itself (a style never overrides them)."""
    sent = body.model_fields_set
    overrides = body.override_settings or {}
    explicit = {field.name for field in FIELDS.with_api()
                if field.owner == CORE and (field.api in sent or (field.override and field.override in overrides))}
    if "sampler_name" in sent or "sampler_index" in sent:
        explicit.add("sampler")
    if "sampler_name" in sent:
        explicit.add("schedule")  # a legacy name such as "DPM++ 2M Karras" holds the schedule
    return explicit


def copied_fields(body: GenerationParams, mode: str) -> dict[str, Any]:
    """The request fields a client sends under their declared A1111 names as they are: payload names, then overrides.

    A field that does not apply to ``mode`` is left out; a null means the field's default.
    """
    fields: dict[str, Any] = {}
    overrides = body.override_settings or {}
    for field in FIELDS.with_api():
        if field.owner != CORE or field.name in _CONVERTED or mode not in field.modes:
            continue
        if field.api and field.api in type(body).model_fields:
            value = getattr(body, field.api)
        elif field.override and field.override in overrides:
            value = overrides[field.override]
        else:
            continue
        fields[field.name] = field.default if value is None and not field.optional else value
    return fields


def extension_settings(studio, alwayson_scripts: dict[str, Any]) -> dict[str, Any]:
    """``alwayson_scripts`` → ``request.extensions``: each loaded extension parses its own payload.

    Names match case-insensitively (A1111 clients write an extension's name in
    either case); scripts that are not loaded extensions are ignored, as A1111
    ignores unknown always-on scripts.
    """
    manager = getattr(studio, "extensions", None)
    if not alwayson_scripts or manager is None:
        return {}
    loaded = {name.lower(): name for name in manager.loaded}
    settings: dict[str, Any] = {}
    for script, payload in alwayson_scripts.items():
        name = loaded.get(str(script).lower())
        if name is None:
            continue
        args = payload.get("args", []) if isinstance(payload, dict) else payload
        try:
            parsed = manager.api_args(name, args)
        except ValidationError as error:
            field = f"alwayson_scripts.{script}.{error.field}"
            raise ApiError(422, "ValidationError", f"{field}: {error.message}", field) from None
        if parsed is not None:
            settings[name] = parsed
    return settings


def _common_fields(studio, body: GenerationParams, mode: str) -> dict[str, Any]:
    sampler, schedule = resolve_sampler(body)
    fields = copied_fields(body, mode)
    fields.update(sampler=sampler, schedule=schedule, model=resolve_model(studio, body))
    fields = _apply_styles(studio, body, fields)
    if "modules" not in fields:  # Forge keeps its modules as a setting: the picks last posted to /options for the model
        remembered = getattr(studio.settings, "model_modules", {}).get(fields["model"])
        if remembered:
            fields["modules"] = tuple(remembered)
    fields["extensions"] = extension_settings(studio, body.alwayson_scripts)
    previews = studio.settings
    fields.update(preview_every=previews.preview_every, preview_method=previews.preview_method)
    return fields


def _build(fields: dict[str, Any]) -> GenerationRequest:
    try:
        return GenerationRequest(**fields)
    except ValidationError as error:
        raise validation_error(error) from None


def txt2img_request(studio, body: Txt2ImgRequest) -> GenerationRequest:
    return _build(_common_fields(studio, body, "txt2img"))


def _choice(table: tuple[str, ...], value: Any, field: str, meaning: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(table):
        options = ", ".join(f"{index} {name}" for index, name in enumerate(table))
        raise ApiError(422, "ValidationError", f"{field}: must be {meaning} ({options}), got {value!r}", field)
    return table[value]


def _flag(value: Any, field: str) -> bool:
    if value in (0, 1):  # True/False compare equal to 1/0
        return bool(value)
    raise ApiError(422, "ValidationError", f"{field}: must be true/false or 0/1, got {value!r}", field)


def img2img_request(studio, body: Img2ImgRequest) -> GenerationRequest:
    fields = _common_fields(studio, body, "inpaint" if body.mask else "img2img")
    if len(body.init_images) != 1:
        raise ApiError(422, "ValidationError", f"init_images: exactly one image is needed, got {len(body.init_images)}", "init_images")
    try:
        init_image = decode_image(body.init_images[0], "init_images.0")
        mask = decode_image(body.mask, "mask") if body.mask else None
    except ValidationError as error:
        raise validation_error(error, error.field) from None
    if mask is not None and mask.size != init_image.size:
        # A1111 resizes image and mask together to the output size; matching the mask to the image is the same.
        mask = mask.resize(init_image.size, Image.LANCZOS)
    names = api_field_names()
    fields.update(
        init_image=init_image,
        mask=mask,
        resize_mode=_choice(RESIZE_MODES, body.resize_mode, names["resize_mode"], "a resize mode"),
        masked_content=_choice(MASKED_CONTENT, body.inpainting_fill, names["masked_content"], "a masked-content mode"),
        inpaint_area=INPAINT_AREAS_BY_FULL_RES[_flag(body.inpaint_full_res, names["inpaint_area"])],
        invert_mask=_flag(body.inpainting_mask_invert, names["invert_mask"]),
    )
    return _build(fields)


def script_plot(studio, body: GenerationParams, request: GenerationRequest) -> ScriptPlot | None:
    """The X/Y/Z plot ``script_name``/``script_args`` ask for, or None without a script; any other script is a 422."""
    if not body.script_name:
        return None
    if not is_xyz_script(body.script_name):
        raise ApiError(422, "ValidationError", f"script_name: Sfumato has no script {body.script_name!r}; it runs 'x/y/z plot'",
                       "script_name")
    tab = "txt2img" if request.mode == "txt2img" else "img2img"
    try:
        return read_script_args(request, tab, body.script_args, installed_in(studio.registry))
    except ValidationError as error:
        raise validation_error(error, error.field) from None


# --- GenerationResult → A1111 JSON -----------------------------------------------

_STANDARD_INFOTEXT_KEYS = {
    "Prompt", "Negative prompt", "Steps", "Sampler", "CFG scale", "Seed", "Size", "Size-1", "Size-2", "Model hash",
    "Model", "Denoising strength", "Version", "Variation seed", "Variation seed strength",
}


def info_json(result: GenerationResult, body: GenerationParams, job_timestamp: str) -> dict[str, Any]:
    """``info`` as A1111's ``Processed.js()`` writes it."""
    from engine.infotext import parse_infotext

    request = result.request
    images = result.images
    count = len(images)
    infotexts = [image.infotext for image in images]
    parsed = parse_infotext(infotexts[0]) if infotexts else {}
    width, height = images[0].image.size if images else (request.width, request.height)
    seeds = [image.seed for image in images] or [request.seed]
    subseeds = [image.subseed for image in images] if request.subseed_strength > 0 else [request.subseed] * max(1, count)
    return {
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * max(1, count),
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * max(1, count),
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": subseeds[0],
        "all_subseeds": subseeds,
        "subseed_strength": request.subseed_strength,
        "width": width,
        "height": height,
        "sampler_name": request.sampler,
        "scheduler": request.schedule,
        "cfg_scale": request.cfg_scale,
        "steps": request.steps,
        "batch_size": request.batch_size,
        "n_iter": request.batch_count,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": parsed.get("Model", request.model),
        "sd_model_hash": parsed.get("Model hash"),
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": request.denoising_strength if request.mode != "txt2img" or request.enable_hr else None,
        "extra_generation_params": {key: value for key, value in parsed.items() if key not in _STANDARD_INFOTEXT_KEYS},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": list(body.styles or []),
        "job_timestamp": job_timestamp,
        "clip_skip": request.clip_skip,
        "is_using_inpainting_conditioning": request.mode == "inpaint",
        "interrupted": result.interrupted,
        # per image: null when it ran every step, else {"reason": "interrupted"|"skipped", "step", "total_steps"}
        "stopped_early": [asdict(image.stopped_early) if image.stopped_early else None for image in images],
        "warnings": list(result.warnings),
        "version": parsed.get("Version"),
    }


def parameters_json(body: GenerationParams, request: GenerationRequest, result: GenerationResult) -> dict[str, Any]:
    """The request as understood: what was sent, with defaults, the resolved sampler and the size produced."""
    parameters = body.model_dump()
    parameters.update(sampler_name=request.sampler, scheduler=request.schedule)
    if result.images:
        width, height = result.images[0].image.size
        parameters["width"] = parameters["width"] or width
        parameters["height"] = parameters["height"] or height
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        parameters["init_images"] = None
        parameters["mask"] = None
    return parameters


# --- jobs -------------------------------------------------------------------------

def _timestamp(seconds: float) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.localtime(seconds))


def _running_job(jobs, user: str | None):
    """The running job /progress reports: the oldest the caller may see, else the oldest (shown as another user's)."""
    running = jobs.running()
    return next((job for job in running if sees_job(user, job)), running[0] if running else None)


def job_error(job) -> ApiError:
    """A failed job as an HTTP error: the request's fault → 422 naming the field, anything else → 500."""
    exception = getattr(job, "exception", None)
    if isinstance(exception, ValidationError):
        return validation_error(exception)
    message = job.error or "generation failed"
    if exception is None:
        # The queue keeps only the message; engine ValidationErrors read "<field>: <message>".
        head, sep, rest = message.partition(": ")
        if sep and head.split(".")[0] in GenerationRequest.field_names():
            return validation_error(ValidationError(head, rest))
    kind = type(exception).__name__ if exception is not None else "GenerationError"
    return ApiError(500, kind, message)


class SdApi:
    """The /sdapi/v1 endpoints bound to one studio."""

    def __init__(self, studio):
        self.studio = studio
        self._job_numbers = itertools.count(1)
        self._previews: dict[int, Image.Image] = {}  # job id → its latest preview, between steps that have none
        self._options_lock = threading.Lock()

    # -- generation ---------------------------------------------------------------
    async def run(self, http_request: Request, request: GenerationRequest, save: bool,
                  work=None) -> tuple[GenerationResult, str]:
        """Queue the request (or ``work`` on it: a plot) with the UI's jobs and wait for it; a client that goes away cancels its job."""
        host = http_request.client.host if http_request.client else "unknown"
        job = self.studio.jobs.submit(request, owner=f"api:{host}:{next(self._job_numbers)}", save=save,
                                      user=authenticated_user(http_request.scope), work=work)
        await self._wait(http_request, job)
        self._previews.pop(job.id, None)
        try:
            result = job.wait(0)
        except SfumatoError:
            raise job_error(job) from None
        return result, _timestamp(job.submitted_at)

    async def _wait(self, http_request: Request, job) -> None:
        """Wait on the event loop, not in a worker thread, so any number of waiting clients costs no threads.

        The poll starts at 5 ms and backs off to 100 ms, so short jobs return
        at once and long ones cost a few wake-ups a second.
        """
        delay, next_check = _POLL_START_S, time.monotonic() + _DISCONNECT_CHECK_S
        while not job.finished:
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX_S)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + _DISCONNECT_CHECK_S
                if await http_request.is_disconnected():
                    self.studio.jobs.cancel(job)
                    raise ApiError(499, "ClientDisconnected", "the client went away; its job was cancelled")

    async def _generate(self, http_request: Request, body: GenerationParams, build) -> dict[str, Any]:
        request = await anyio.to_thread.run_sync(build, self.studio, body)
        script = await anyio.to_thread.run_sync(script_plot, self.studio, body, request)
        result, stamp = await self.run(http_request, request, save=body.save_images,
                                       work=script.plot.run if script is not None else None)
        if script is not None:  # A1111's order: the grid, then the Z grids and the cells when asked for
            result = replace(result, images=response_images(script, result))
        images = [encode_png(image.image, image.infotext) for image in result.images] if body.send_images else []
        info = info_json(result, body, stamp)
        return {"images": images, "parameters": parameters_json(body, request, result), "info": json.dumps(info)}

    async def txt2img(self, body: Txt2ImgRequest, http_request: Request) -> TextToImageResponse:
        return TextToImageResponse(**await self._generate(http_request, body, txt2img_request))

    async def img2img(self, body: Img2ImgRequest, http_request: Request) -> ImageToImageResponse:
        return ImageToImageResponse(**await self._generate(http_request, body, img2img_request))

    # -- progress -----------------------------------------------------------------
    async def progress(self, http_request: Request, skip_current_image: bool = False) -> ProgressResponse:
        """The running job's progress and preview, when the caller may see it (with logins: only their own)."""
        user = authenticated_user(http_request.scope)
        jobs = self.studio.jobs
        job = _running_job(jobs, user)
        queued = sum(1 for pending in jobs.pending() if sees_job(user, pending))
        if job is None or not sees_job(user, job):
            busy = "another user's job is running" if job is not None else None
            text = "; ".join(part for part in (busy, f"{queued} queued" if queued else None) if part) or None
            return ProgressResponse(state=ProgressState(job_count=queued), textinfo=text)
        request, progress = job.request, job.progress
        preview = None
        if progress is not None and progress.preview is not None:
            preview = progress.preview
            self._previews = {job.id: preview}  # only the running job's preview is kept
        elif job.id in self._previews:
            preview = self._previews[job.id]
        state = ProgressState(
            interrupted=job.cancel.interrupted,
            job=f"{request.mode} job {job.id}",
            job_count=request.batch_count,
            job_timestamp=_timestamp(job.submitted_at),
            job_no=(progress.image_index // request.batch_size) if progress else 0,
            sampling_step=progress.step if progress else 0,
            sampling_steps=progress.total_steps if progress else request.steps,
        )
        textinfo = (f"image {progress.image_index + 1} of {progress.images_total}, step {progress.step} of {progress.total_steps}"
                    if progress else "loading the model")
        if queued:
            textinfo += f"; {queued} queued"
        return ProgressResponse(
            progress=progress.fraction if progress else 0.0,
            eta_relative=progress.eta if progress else 0.0,
            state=state,
            current_image=None if skip_current_image or preview is None else encode_preview(preview),
            textinfo=textinfo,
        )

    def interrupt(self, http_request: Request) -> dict:
        """Stop the running job, as A1111 does; with logins only when it is the caller's own."""
        user = authenticated_user(http_request.scope)
        for job in self.studio.jobs.running():  # with engine replicas several run at once: each one the caller sees
            if sees_job(user, job):
                job.cancel.interrupt()
        return {}

    def skip(self, http_request: Request) -> dict:
        """End the running job's current image; with logins only when it is the caller's own."""
        user = authenticated_user(http_request.scope)
        for job in self.studio.jobs.running():
            if sees_job(user, job):
                job.cancel.skip()
        return {}

    # -- lists ----------------------------------------------------------------------
    def samplers(self) -> list[SamplerItem]:
        # A1111's options: the schedule "Automatic" resolves to, in its internal spelling, and the noise it draws.
        return [
            SamplerItem(name=spec.name, aliases=list(spec.aliases),
                        options={"scheduler": spec.default_schedule.lower().replace(" ", "_"),
                                 **({"brownian_noise": "True"} if spec.noise == samplers.BROWNIAN_NOISE else {}),
                                 **({"discard_next_to_last_sigma": "True"} if spec.discard_next_to_last_sigma else {}),
                                 **{key: str(value) for key, value in spec.options.items()}})
            for spec in samplers.SAMPLERS
        ]

    def schedulers(self) -> list[SchedulerItem]:
        items = []
        for label in samplers.schedule_names():
            spec = samplers.find_schedule(label)
            name = getattr(spec, "a1111_name", None) or label.lower().replace(" ", "_")
            aliases = [alias for alias in getattr(spec, "aliases", ()) if alias != name]
            facts = _SCHEDULER_FACTS.get(label, {})
            items.append(SchedulerItem(name=name, label=label, aliases=aliases or None,
                                       default_rho=facts.get("default_rho", -1.0), need_inner_model=facts.get("need_inner_model", False)))
        return items

    def model_title(self, entry) -> str:
        """A1111's title: the checkpoint's file (a diffusers folder's name) and, once it is loaded, its short hash."""
        loaded = self._loaded_hash(entry.name)
        return f"{entry.title} [{loaded}]" if loaded else entry.title

    def _loaded_hash(self, name: str) -> str | None:
        """A model's short hash when it is loaded; hashing unloaded multi-GB files on a listing would be slow."""
        registry = self.studio.registry
        if name not in registry.loaded_names():
            return None
        try:
            return registry.load(name).short_hash
        except SfumatoError:
            return None

    def _memory_estimate(self, entry) -> dict | None:
        try:
            return self.studio.registry.estimate_memory(entry).as_dict()
        except (SfumatoError, OSError, ValueError):
            return None

    def sd_models(self) -> list[SDModelItem]:
        items = []
        for entry in self.studio.registry.list():
            if entry.kind == "pickle":
                continue  # never loadable here, so not offered
            short = self._loaded_hash(entry.name)
            family = self.studio.registry.family(entry)
            items.append(SDModelItem(title=self.model_title(entry), model_name=entry.name, hash=short, sha256=None,
                                     filename=str(entry.path), config=None, broken=entry.problem,
                                     family=family.title if family is not None else None,
                                     memory=self._memory_estimate(entry)))
        return items

    def refresh_checkpoints(self) -> dict:
        self.studio.registry.refresh()
        return {}

    # -- extra networks: embeddings and VAEs ---------------------------------------------
    def embeddings(self) -> dict:
        """A1111's shape: ``loaded`` (usable with the default model, when it is loaded; else every readable file)
        and ``skipped`` (made for another kind of model), each name → step, checkpoint, shape, vectors."""
        from engine.networks.embeddings import api_listing

        registry = self.studio.registry
        try:
            name = self.studio.default_model()
            model = registry.load(name) if name in registry.loaded_names() else None
        except SfumatoError:
            model = None
        return api_listing(registry.embeddings, model)

    def refresh_embeddings(self) -> dict:
        self.studio.registry.embeddings.refresh()
        return {}

    def sd_vae(self) -> list[dict[str, str]]:
        return [{"model_name": file.name, "filename": str(file.path)} for file in self.studio.registry.vaes.files()
                if file.problem is None]

    def sd_modules(self) -> list[dict[str, str]]:
        """Forge's list of text encoder and VAE files, the names ``forge_additional_modules`` takes."""
        from engine.model_files.folders import module_files

        return [{"model_name": path.name, "filename": str(path)} for path in module_files(self.studio.registry.models_dir)]

    def refresh_vae(self) -> dict:
        self.studio.registry.vaes.refresh()
        return {}

    def prompt_styles(self) -> list[PromptStyleItem]:
        return [
            PromptStyleItem(name=preset.name, prompt=preset.fields.get("prompt", ""), negative_prompt=preset.fields.get("negative_prompt", ""))
            for preset in self.studio.presets.list()
        ]

    # -- options ----------------------------------------------------------------------
    def get_options(self) -> OptionsModel:
        settings = self.studio.settings
        try:
            entry = self.studio.registry.get(self.studio.default_model())
            title, short = self.model_title(entry), self._loaded_hash(entry.name)
        except ModelError:
            title = short = None
        return OptionsModel(
            sd_model_checkpoint=title, sd_checkpoint_hash=short, samples_format="png",
            show_progress_every_n_steps=settings.preview_every, live_previews_enable=settings.preview_every > 0,
            samples_save=settings.save_outputs, save_incomplete_images=settings.save_interrupted_images,
            outdir_samples=str(self.studio.config.outputs_dir),
        )

    def set_options(self, options: dict[str, Any]) -> dict:
        """Apply the options Sfumato knows, and say which were not applied. A model switch loads the model first.

        Answers 200 ``{"applied": [...], "ignored": [...]}``, plus ``"detail"``
        naming the ignored keys when there are any (A1111 answers with no body to
        speak of, so its clients read none of this and keep working). Keys that
        ``GET /options`` reports and that are posted back unchanged count as
        applied: a client may send back what it read.
        """
        current = self.get_options().model_dump()
        applied = [key for key in options if key in ("sd_model_checkpoint", _MODULES_OPTION) or key in _OPTION_SETTINGS
                   or (key in current and options[key] == current[key])]
        ignored = [key for key in options if key not in applied]
        self._apply_options(options)
        answer: dict[str, Any] = {"applied": applied, "ignored": ignored}
        if ignored:
            log.warning("POST /options: not applied (no such Sfumato setting): %s", ", ".join(ignored))
            answer["detail"] = (f"not applied: {', '.join(ignored)}; Sfumato has no such settings, or they cannot be changed "
                                "over the API (GET /sdapi/v1/options lists the ones it has)")
        return answer

    def _apply_options(self, options: dict[str, Any]) -> None:
        with self._options_lock:
            settings = self.studio.settings
            changes: dict[str, Any] = {}
            modules = options.get(_MODULES_OPTION)
            if _MODULES_OPTION in options and (not isinstance(modules, list)
                                              or not all(isinstance(name, str) for name in modules)):
                raise ApiError(422, "ValidationError", f"{_MODULES_OPTION}: must be a list of file names", _MODULES_OPTION)
            wanted = options.get("sd_model_checkpoint")
            if wanted is not None:
                if not isinstance(wanted, str):
                    raise ApiError(422, "ValidationError", "sd_model_checkpoint: must be a model title", "sd_model_checkpoint")
                try:
                    entry = self.studio.registry.get(wanted)
                except ModelError as error:
                    raise ApiError(422, "ValidationError", f"sd_model_checkpoint: {error}", "sd_model_checkpoint") from None
                picks = modules if modules is not None else settings.model_modules.get(entry.name, [])
                try:
                    self.studio.registry.load(entry.name, modules=tuple(picks)) if picks else self.studio.registry.load(entry.name)
                except SfumatoError as error:
                    raise ApiError(500, type(error).__name__, f"could not load {entry.name!r}; the current model stays: {error}") from None
                changes["default_model"] = entry.name
            if modules is not None:
                model = changes.get("default_model") or self.studio.default_model()
                remembered = {**settings.model_modules, model: list(modules)}
                changes["model_modules"] = {name: picks for name, picks in remembered.items() if picks}
            for option, (setting, kind) in _OPTION_SETTINGS.items():
                if option not in options:
                    continue
                value = options[option]
                if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                    raise ApiError(422, "ValidationError", f"{option}: must be {kind.__name__}, got {value!r}", option)
                changes[setting] = value
            if changes:
                try:
                    self.studio.update_settings(replace(settings, **changes))
                except ValidationError as error:
                    option = next((name for name, (setting, _) in _OPTION_SETTINGS.items() if setting == error.field), error.field)
                    raise validation_error(error, option) from None

    # -- networks -----------------------------------------------------------------------
    def loras(self) -> list[LoraItem]:
        from engine.networks import read_metadata

        items = []
        for network in self.studio.engine.networks.list():
            metadata = read_metadata(network.path)
            items.append(LoraItem(name=network.name, alias=network.alias, path=str(network.path), metadata=metadata))
        return items

    def refresh_loras(self) -> dict:
        self.studio.engine.networks.refresh()
        return {}

    # -- png info ---------------------------------------------------------------------
    def png_info(self, body: PNGInfoRequest) -> PNGInfoResponse:
        from engine.image_metadata import read_generation_info
        from engine.infotext import loading_notes, parse_infotext, request_fields_from_infotext

        if not body.image.strip():
            return PNGInfoResponse(info="", items={}, parameters={})
        try:
            info = read_generation_info(decode_base64(body.image, "image"))
        except ValidationError as error:
            raise validation_error(error, "image") from None
        items = dict(info.other_chunks)
        for key, value in (("prompt", info.comfy_prompt), ("workflow", info.comfy_workflow)):
            if value is not None:
                items[key] = value
        text = info.infotext or ""
        parameters = parse_infotext(text) if text else {}
        notes = (loading_notes(parameters, request_fields_from_infotext(parameters), self.studio.engine.networks.short_hash_of)
                 if text else [])
        return PNGInfoResponse(info=text, items=items, parameters=parameters, notes=notes)

    # -- upscalers and Extras ------------------------------------------------------------
    def upscalers(self) -> list[UpscalerItem]:
        """A1111's list: None, Lanczos, Nearest, then the usable model files."""
        from engine.upscalers.library import BUILT_IN

        library = self.studio.registry.upscalers
        items = [UpscalerItem(name=name) for name in BUILT_IN]
        for file in library.files():
            if file.problem is None:
                items.append(UpscalerItem(name=file.name, model_name=file.name, model_path=str(file.path),
                                          scale=file.scale_from_name))
        return items

    def latent_upscale_modes(self) -> list[LatentUpscaleModeItem]:
        from engine.upscalers import LATENT_UPSCALE_MODES

        return [LatentUpscaleModeItem(name=name) for name in LATENT_UPSCALE_MODES]

    async def _extras(self, body: ExtrasBaseRequest, sources: list) -> list:
        from engine.extras import ExtrasRequest

        for name in _FACE_RESTORATION_FIELDS:
            if getattr(body, name):
                raise ApiError(422, "ValidationError", f"{name}: Sfumato has no face restorers; send 0", name)
        request = ExtrasRequest(**{name: getattr(body, name) for name in (
            "resize_mode", "upscaling_resize", "upscaling_resize_w", "upscaling_resize_h", "upscaling_crop",
            "upscaler_1", "upscaler_2", "extras_upscaler_2_visibility")})
        try:
            request.validate()
            self.studio.registry.upscalers.find(request.upscaler_1, "upscaler_1")
            self.studio.registry.upscalers.find(request.upscaler_2, "upscaler_2")
            # A1111's API returns the results without saving them.
            return await anyio.to_thread.run_sync(lambda: self.studio.extras(sources, request, save=False))
        except ValidationError as error:
            raise validation_error(error, error.field) from None

    async def extra_single_image(self, body: ExtrasSingleImageRequest) -> ExtrasSingleImageResponse:
        from engine.extras import ExtrasSource

        source = ExtrasSource(_decoded(body.image, "image"), field="image")
        result = (await self._extras(body, [source]))[0]
        return ExtrasSingleImageResponse(html_info=_plaintext_html(result.infotext), image=_encode_result(result))

    async def extra_batch_images(self, body: ExtrasBatchImagesRequest) -> ExtrasBatchImagesResponse:
        from engine.extras import ExtrasSource

        sources = [ExtrasSource(_decoded(item.data, f"imageList.{index}.data"), name=item.name, field=f"imageList.{index}.data")
                   for index, item in enumerate(body.imageList)]
        results = await self._extras(body, sources)
        return ExtrasBatchImagesResponse(html_info=_plaintext_html(results[-1].infotext if results else ""),
                                         images=[_encode_result(result) for result in results])

    # -- routing ------------------------------------------------------------------------
    def router(self) -> APIRouter:
        router = APIRouter(prefix="/sdapi/v1", tags=["sdapi"], responses=_ERROR_RESPONSES)
        router.add_api_route("/txt2img", self.txt2img, methods=["POST"], response_model=TextToImageResponse)
        router.add_api_route("/img2img", self.img2img, methods=["POST"], response_model=ImageToImageResponse)
        router.add_api_route("/progress", self.progress, methods=["GET"], response_model=ProgressResponse)
        router.add_api_route("/interrupt", self.interrupt, methods=["POST"])
        router.add_api_route("/skip", self.skip, methods=["POST"])
        router.add_api_route("/samplers", self.samplers, methods=["GET"], response_model=list[SamplerItem])
        router.add_api_route("/schedulers", self.schedulers, methods=["GET"], response_model=list[SchedulerItem])
        router.add_api_route("/sd-models", self.sd_models, methods=["GET"], response_model=list[SDModelItem])
        router.add_api_route("/prompt-styles", self.prompt_styles, methods=["GET"], response_model=list[PromptStyleItem])
        router.add_api_route("/options", self.get_options, methods=["GET"], response_model=OptionsModel)
        router.add_api_route("/options", self.set_options, methods=["POST"], response_model=OptionsUpdateResponse,
                             response_model_exclude_none=True)
        router.add_api_route("/refresh-checkpoints", self.refresh_checkpoints, methods=["POST"])
        router.add_api_route("/png-info", self.png_info, methods=["POST"], response_model=PNGInfoResponse)
        router.add_api_route("/loras", self.loras, methods=["GET"], response_model=list[LoraItem])
        router.add_api_route("/refresh-loras", self.refresh_loras, methods=["POST"])
        for path in _EMPTY_LISTS:
            router.add_api_route(path, _empty_list, methods=["GET"], response_model=list[dict[str, Any]])
        router.add_api_route("/embeddings", self.embeddings, methods=["GET"])
        router.add_api_route("/refresh-embeddings", self.refresh_embeddings, methods=["POST"])
        router.add_api_route("/sd-vae", self.sd_vae, methods=["GET"])
        router.add_api_route("/refresh-vae", self.refresh_vae, methods=["POST"])
        router.add_api_route("/sd-modules", self.sd_modules, methods=["GET"])
        router.add_api_route("/upscalers", self.upscalers, methods=["GET"], response_model=list[UpscalerItem])
        router.add_api_route("/latent-upscale-modes", self.latent_upscale_modes, methods=["GET"],
                             response_model=list[LatentUpscaleModeItem])
        router.add_api_route("/extra-single-image", self.extra_single_image, methods=["POST"],
                             response_model=ExtrasSingleImageResponse)
        router.add_api_route("/extra-batch-images", self.extra_batch_images, methods=["POST"],
                             response_model=ExtrasBatchImagesResponse)
        return router


def _empty_list() -> list:
    return []


# --- errors ----------------------------------------------------------------------------

def _pydantic_field(problem: dict) -> str:
    if problem.get("type") == "json_invalid":
        return "body"  # its location is ("body", <character offset>), not a field
    parts = [str(part) for part in problem.get("loc", ()) if part not in ("body", "query")]
    return ".".join(parts) or "body"


def _pydantic_message(problem: dict) -> str:
    if problem.get("type") == "json_invalid":
        offset = next((part for part in problem.get("loc", ())[1:] if isinstance(part, int)), None)
        reason = (problem.get("ctx") or {}).get("error", "")
        where = f" at character {offset}" if offset is not None else ""
        return f"is not valid JSON{where}" + (f" ({reason})" if reason else "")
    return str(problem.get("msg", "")).removeprefix("Value error, ")


async def _request_validation_handler(_request: Request, error: RequestValidationError) -> JSONResponse:
    problems = error.errors() or [{"loc": ("body",), "msg": "invalid request"}]
    errors = [{"field": _pydantic_field(p), "message": _pydantic_message(p), "type": str(p.get("type", ""))} for p in problems]
    first = errors[0]
    return JSONResponse(status_code=422, content={"error": "ValidationError", "detail": f"{first['field']}: {first['message']}",
                                                  "field": first["field"], "errors": errors})


async def _api_error_handler(_request: Request, error: ApiError) -> JSONResponse:
    if error.status >= 500:
        log.warning("API request failed: %s: %s", error.error, error.detail)
    return error.response()


async def _sfumato_error_handler(_request: Request, error: SfumatoError) -> JSONResponse:
    if isinstance(error, ValidationError):
        return validation_error(error).response()
    log.warning("API request failed: %s", error)
    return ApiError(500, type(error).__name__, str(error)).response()


async def _unexpected_error_handler(_request: Request, error: Exception) -> JSONResponse:
    log.exception("API request failed unexpectedly")
    return ApiError(500, type(error).__name__, f"internal error: {error}").response()


def install_api(app: FastAPI, studio) -> SdApi:
    """Add the /sdapi/v1 routes, the extensions' API routes and the JSON error handlers to ``app``."""
    api = SdApi(studio)
    app.include_router(api.router())
    install_extension_routes(app, studio)
    app.add_exception_handler(RequestValidationError, _request_validation_handler)
    app.add_exception_handler(ApiError, _api_error_handler)
    app.add_exception_handler(SfumatoError, _sfumato_error_handler)
    app.add_exception_handler(Exception, _unexpected_error_handler)
    return api


def install_extension_routes(app: FastAPI, studio) -> list[str]:
    """Let each loaded extension that declares ``api_routes(app, studio)`` add its endpoints (under ``/<its name>/``, say).

    A broken extension is logged and skipped; the rest of the API still serves. The first path segments of
    the routes they added go to ``app.state.extension_api_prefixes``, so the request guard protects them as the API.
    """
    manager = getattr(studio, "extensions", None)
    before = {getattr(route, "path", "") for route in app.routes}
    installed = []
    for name, extension in (manager.loaded if manager is not None else {}).items():
        if extension.api_routes is None:
            continue
        try:
            extension.api_routes(app, studio)
        except Exception:  # noqa: BLE001 - an extension must not take the server down
            log.exception("extension %s: could not add its API routes", name)
            continue
        installed.append(name)
    added = {getattr(route, "path", "") for route in app.routes} - before
    app.state.extension_api_prefixes = tuple(sorted({"/" + path.strip("/").split("/")[0] for path in added if path.strip("/")}))
    return installed
