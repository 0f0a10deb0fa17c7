"""Request and response bodies of the A1111-compatible HTTP API (``/sdapi/v1``).

Field names, types and defaults follow AUTOMATIC1111 1.10 (``modules/api/models.py``
and the ``StableDiffusionProcessing*`` dataclasses it is generated from), so
existing clients work unchanged. Deliberate differences, each documented on
its field:

- ``width``/``height`` default to None: the model's native size for txt2img
  (A1111 always uses 512, which is wrong for SDXL and for the 64x64 demo model)
  and the init image's own size for img2img.
- An unknown sampler or schedule is refused with 422 instead of silently
  falling back to the default.
- JSON true/false is refused with 422 for numeric fields (pydantic alone would
  read ``"steps": true`` as 1).

Unknown fields are ignored (``extra="ignore"``), as A1111 does.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from engine.fields import FIELDS


def _not_a_flag(value: Any) -> Any:
    """JSON true/false is not a number: pydantic would read ``"steps": true`` as 1 step."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not {str(value).lower()}")
    return value


Int = Annotated[int, BeforeValidator(_not_a_flag)]
Float = Annotated[float, BeforeValidator(_not_a_flag)]


class _Lenient(BaseModel):
    """Unknown fields are ignored, and ``null`` means "the default" (many clients send every key, some as null)."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {key: value for key, value in data.items() if value is not None or key not in fields or fields[key].default is None}


class GenerationParams(_Lenient):
    """Fields shared by txt2img and img2img."""

    prompt: str = Field("", description="What to draw; A1111 prompt syntax such as (word:1.2) works.")
    negative_prompt: str = Field("", description="What to avoid.")
    styles: list[str] | None = Field(None, description="Sfumato presets (see /sdapi/v1/prompt-styles) applied by name, in order.")
    seed: Int = Field(-1, description="-1 picks a random seed; image i of the job uses seed + i.")
    subseed: Int = Field(-1, description="Variation seed; -1 picks one.")
    subseed_strength: Float = Field(0.0, description="How far to move towards the variation seed's noise, 0..1.")
    sampler_name: str | None = Field(None, description="Sampler name or alias, any case; a legacy name such as 'DPM++ 2M Karras' also sets the schedule.")
    sampler_index: str = Field("Euler", description="Older clients' sampler field, used when sampler_name is not given.")
    scheduler: str | None = Field(None, description="Schedule type (label or name, e.g. 'Karras' or 'karras'); default Automatic.")
    batch_size: Int = Field(1, description="Images per batch.")
    n_iter: Int = Field(1, description="Number of batches.")
    steps: Int = Field(50, description="Sampling steps.")
    cfg_scale: Float = Field(7.0, description="Classifier-free guidance scale.")
    distilled_cfg_scale: Float = Field(FIELDS["distilled_cfg_scale"].default, description=FIELDS["distilled_cfg_scale"].help)
    width: Int | None = Field(None, description="Output width (multiple of 8). Default: the model's native width (txt2img) or the init image's width (img2img).")
    height: Int | None = Field(None, description="Output height (multiple of 8). Default: the model's native height (txt2img) or the init image's height (img2img).")
    denoising_strength: Float | None = Field(None, description=f"How much to change the init image (img2img) or the upscaled first pass (txt2img with enable_hr), 0..1 (default {FIELDS['denoising_strength'].default}).")
    eta: Float | None = Field(None, description="Noise multiplier of ancestral, SDE and DDIM samplers, 0..1; null: the sampler's own default.")
    shift: Float | None = Field(None, description=FIELDS["shift"].help)
    first_block_cache: Float = Field(FIELDS["first_block_cache"].default, description=FIELDS["first_block_cache"].help)
    override_settings: dict[str, Any] | None = Field(None, description="Per-request settings: 'sd_model_checkpoint' picks the model for this request only; "
                                                     "'CLIP_stop_at_last_layers' (clip skip), 'eta_noise_seed_delta' (ENSD), 'randn_source' "
                                                     "(RNG: CPU, GPU or NV) and 'token_merging_ratio' apply to this request.")
    override_settings_restore_afterwards: bool = Field(True, description="Accepted for compatibility; overrides never outlive the request in Sfumato.")
    send_images: bool = Field(True, description="Return the images as base64 PNG.")
    save_images: bool = Field(False, description="Also save the images to the outputs folder.")
    refiner_checkpoint: str | None = Field(None, description=f"{FIELDS['refiner_checkpoint'].help} A1111's checkpoint title "
                                                              "('name [hash]') or a model name.")
    refiner_switch_at: Float | None = Field(None, description=f"{FIELDS['refiner_switch_at'].help} "
                                                              f"Default {FIELDS['refiner_switch_at'].default}.")
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict, description="Extension arguments, {'<extension name>': {'args': [...]}}; unknown scripts are ignored.")
    script_name: str | None = Field(None, description="'x/y/z plot' runs A1111's X/Y/Z plot with script_args; any other script is a 422.")
    script_args: list[Any] = Field(default_factory=list, description="The X/Y/Z plot's arguments in A1111 1.10's order: x_type, x_values, "
                                   "x_values_dropdown, y_type, ..., z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, "
                                   "no_fixed_seeds, vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode; axis types are "
                                   "indices into A1111's axis list for the tab.")


def _hires(name: str):
    """A hires-fix payload field as A1111 1.10 names it, with the declared default and help (engine/fields.py)."""
    declared = FIELDS[name]
    return Field(declared.default, description=f"{declared.label}: {declared.help}".rstrip(": "))


class Txt2ImgRequest(GenerationParams):
    """POST /sdapi/v1/txt2img; ``enable_hr`` adds A1111's hires fix (first pass, upscale, second pass)."""

    enable_hr: bool = _hires("enable_hr")
    hr_scale: Float = _hires("hr_scale")
    hr_upscaler: str | None = _hires("hr_upscaler")
    hr_second_pass_steps: Int = _hires("hr_second_pass_steps")
    hr_resize_x: Int = _hires("hr_resize_x")
    hr_resize_y: Int = _hires("hr_resize_y")
    hr_sampler_name: str | None = _hires("hr_sampler_name")
    hr_scheduler: str | None = _hires("hr_scheduler")
    hr_prompt: str = _hires("hr_prompt")
    hr_negative_prompt: str = _hires("hr_negative_prompt")
    hr_cfg: Float = _hires("hr_cfg")


class Img2ImgRequest(GenerationParams):
    """POST /sdapi/v1/img2img: img2img, or inpainting when a mask is given."""

    init_images: list[str] = Field(default_factory=list, description="Exactly one base64 image (PNG/JPEG/WebP; a data: URL prefix is accepted).")
    resize_mode: Int = Field(0, description="0 just resize, 1 crop and resize, 2 resize and fill.")
    denoising_strength: Float | None = Field(FIELDS["denoising_strength"].default, description="How much to change the init image, 0..1.")
    mask: str | None = Field(None, description="Base64 mask image, white = regenerate. Makes the request an inpaint.")
    mask_blur: Int | None = Field(FIELDS["mask_blur"].default, description="Blur of the mask edge in pixels.")
    inpainting_fill: Int = Field(0, description="Masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing.")
    inpaint_full_res: bool | int = Field(True, description="Inpaint area: true/1 only masked (at full resolution), false/0 whole picture.")
    inpaint_full_res_padding: Int = Field(0, description="Only masked: padding around the mask in pixels.")
    inpainting_mask_invert: bool | int = Field(0, description="0 inpaint masked, 1 inpaint not masked.")
    include_init_images: bool = Field(False, description="Echo init_images and mask back in 'parameters'.")


class ImageResponse(BaseModel):
    images: list[str] = Field(default_factory=list, description="Base64 PNGs, each with its generation parameters in the 'parameters' text chunk.")
    parameters: dict[str, Any] = Field(default_factory=dict, description="The request as understood, with defaults filled in.")
    info: str = Field("", description="JSON text: prompt, all_prompts, seed, all_seeds, infotexts, ... as A1111 returns it.")


class TextToImageResponse(ImageResponse):
    pass


class ImageToImageResponse(ImageResponse):
    pass


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float = Field(0.0, description="0..1 of the running job.")
    eta_relative: float = Field(0.0, description="Estimated seconds left for the running job.")
    state: ProgressState = Field(default_factory=ProgressState)
    current_image: str | None = Field(None, description="Base64 PNG of the live preview, or null.")
    textinfo: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None
    broken: str | None = Field(None, description="Why this model cannot be loaded (found by checking its files or by a failed load); null when it can.")
    family: str | None = Field(None, description="The model's family as the UI names it (\"SD 1.x\", \"SDXL\", \"Flux.1\"...), read "
                               "from its files; null when they do not say. Sfumato's own key: A1111 clients ignore it.")
    memory: dict | None = Field(None, description="Sfumato's estimate of the memory the model needs at its native size, read "
                                "from its files before loading: per component its bytes and where it lives, and the peak RAM "
                                "and GPU bytes (engine.memory.MemoryEstimate); null when its files cannot be read.")


class LoraItem(BaseModel):
    """One file of ``/sdapi/v1/loras``, in A1111's shape."""

    name: str
    alias: str = Field(description="The name the file's training metadata gives it (ss_output_name), else its name.")
    path: str
    metadata: dict[str, Any] = Field(default_factory=dict, description="The safetensors header's training metadata (kohya's ss_*).")


class PromptStyleItem(BaseModel):
    name: str
    prompt: str | None = None
    negative_prompt: str | None = None


class OptionsModel(BaseModel):
    """The settings Sfumato exposes under A1111's option names; POST accepts other keys and lists them as ignored."""

    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str | None = Field(None, description="Title of the default model; POST loads it first and keeps the old one on failure.")
    sd_checkpoint_hash: str | None = None
    samples_format: str = "png"
    show_progress_every_n_steps: int = Field(1, description="Live preview every N steps (0 = off).")
    live_previews_enable: bool = True
    samples_save: bool = True
    save_incomplete_images: bool = Field(False, description="Also save images stopped early by interrupt or skip.")
    outdir_samples: str = ""


class PNGInfoRequest(_Lenient):
    image: str = Field(..., description="Base64 image (PNG, JPEG or WebP).")


class PNGInfoResponse(BaseModel):
    info: str = Field("", description="The A1111 infotext found in the image, or ''.")
    items: dict[str, Any] = Field(default_factory=dict, description="Other text chunks (ComfyUI 'prompt'/'workflow' JSON, ...).")
    parameters: dict[str, Any] = Field(default_factory=dict, description="The infotext parsed into 'Key: value' pairs.")
    notes: list[str] = Field(default_factory=list, description="What generating from this infotext cannot reproduce: keys Sfumato "
                                                               "cannot apply, and A1111's GPU noise when the infotext has no 'RNG' key.")


class ErrorResponse(BaseModel):
    error: str = Field(..., description="Error kind: ValidationError, ModelError, GenerationError, ...")
    detail: str = Field(..., description="What went wrong, for a person to read.")
    field: str | None = Field(None, description="The request field at fault, for a 422.")


class OptionsUpdateResponse(BaseModel):
    """What POST /options did. A1111 answers with no useful body, so its clients ignore this one."""

    applied: list[str] = Field(default_factory=list, description="Keys applied (or posted back unchanged).")
    ignored: list[str] = Field(default_factory=list, description="Keys Sfumato has no setting for, or cannot change over the API.")
    detail: str | None = Field(None, description="A sentence naming the ignored keys; absent when none were ignored.")


# --- upscalers and Extras (A1111's /upscalers, /latent-upscale-modes, /extra-single-image, /extra-batch-images) ---

class UpscalerItem(BaseModel):
    name: str
    model_name: str | None = Field(None, description="The model's name (the file's stem); null for the built-in resamplers.")
    model_path: str | None = Field(None, description="The model file's path; null for the built-in resamplers.")
    model_url: str | None = Field(None, description="Always null: Sfumato never downloads upscalers.")
    scale: float | None = Field(None, description="The factor the file's name announces (4x-…, …_x4), read without loading "
                                                   "the model; null when the name says none.")


class LatentUpscaleModeItem(BaseModel):
    name: str


class ExtrasBaseRequest(_Lenient):
    """A1111 1.10's fields; the range checks are the engine's (``engine.extras.ExtrasRequest``), which name the field.

    ``gfpgan_visibility``, ``codeformer_visibility``, ``codeformer_weight`` and ``upscale_first`` are accepted and
    must stay 0/false: Sfumato has no face restorers (a non-zero value is refused, not ignored)."""

    resize_mode: Int = Field(0, description="0: upscale by upscaling_resize; 1: upscale to upscaling_resize_w × upscaling_resize_h.")
    show_extras_results: bool = Field(True, description="Accepted; as in A1111 it matters only for folder batches, which the API has not.")
    gfpgan_visibility: Float = 0
    codeformer_visibility: Float = 0
    codeformer_weight: Float = 0
    upscaling_resize: Float = Field(2, description="By how much to upscale (1 to 8), when resize_mode is 0.")
    upscaling_resize_w: Int = Field(512, description="Target width, when resize_mode is 1.")
    upscaling_resize_h: Int = Field(512, description="Target height, when resize_mode is 1.")
    upscaling_crop: bool = Field(True, description="Crop to fit the target size, when resize_mode is 1.")
    upscaler_1: str = Field("None", description="The main upscaler's name (GET /sdapi/v1/upscalers).")
    upscaler_2: str = Field("None", description="The secondary upscaler's name.")
    extras_upscaler_2_visibility: Float = Field(0, description="How much of the secondary upscaler's result is blended in (0 to 1).")
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasBaseRequest):
    image: str = Field("", description="Base64 image (PNG, JPEG or WebP).")


class ExtrasSingleImageResponse(BaseModel):
    html_info: str = Field("", description="The Postprocess infotext as HTML.")
    image: str | None = Field(None, description="The result as base64 PNG, keeping the source's text chunks.")


class FileData(BaseModel):
    data: str = Field(..., description="Base64 image.")
    name: str = Field("", description="The file's name.")


class ExtrasBatchImagesRequest(ExtrasBaseRequest):
    imageList: list[FileData] = Field(default_factory=list, description="The images to work on.")


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str = Field("", description="The last image's Postprocess infotext as HTML.")
    images: list[str] = Field(default_factory=list, description="The results as base64 PNG.")
