"""One generation tab (txt2img, img2img or inpaint), laid out the way AUTOMATIC1111 users expect.

Prompt and negative prompt on top with Generate / Interrupt / Skip beside
them; sampling controls on the left; live preview, progress, results,
infotext and "send to" buttons on the right. Generate submits a job to the
shared queue, owned by this browser session, and streams its previews.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator

import gradio as gr
from PIL import Image

from engine.sampling import table as samplers
from engine.errors import SfumatoError, ValidationError
from engine.families import Family
from engine.family_settings import family_settings
from engine.infotext import MASK_MODES
from engine.request import EarlyStop, GenerationRequest, GenerationResult

from . import fields as F
from .errors import job_error_text, message_for, ui_error
from .event_inputs import preprocess_values
from .extension_ui import ExtensionControls, all_components, build_extension_controls, read_settings
from .extra_networks import ExtraNetworksPanel, build_extra_networks_panel
from .family_fields import shown
from .image_formats import LOSSLESS, PREVIEW
from .image_inputs import UploadImage, UploadImageEditor, reject_bad_uploads
from .masks import editor_image, inpaint_inputs, mask_preview
from .presets_ui import PresetControls, build_presets_controls
from .runner import follow
from .session import interrupt_own, session_owner, session_user, skip_own
from .streamed_outputs import LivePreview, ResultGallery, postprocess_values
from .style import REMOVE_IMAGE_JS
from .tool_buttons import RANDOM_SEED, RANDOM_SUBSEED, REUSE_SEED, REUSE_SUBSEED, SWAP_SIZE, ToolIcon, tool_button
from .xyz_controls import XyzControls, build_xyz_controls, read_plot

SCRIPT_MODES = ("txt2img", "img2img")  # the tabs with A1111's "Script" dropdown

SESSION_GALLERY_LIMIT = 200
RESULTS_HEIGHT = 400  # px: one result large, nine still whole (ui/style.py fits the rows into it)
TEXT_KEYS = ("prompt", "negative_prompt")


def _optional_keywords(fn, names) -> inspect.Signature:
    """``fn``'s signature with every input as an optional keyword, so API callers may leave any of them out."""
    request = next(iter(inspect.signature(fn).parameters.values()))
    keywords = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in names]
    return inspect.Signature([request, *keywords])


@dataclass
class ResultRecord:
    """One generated image as the UI keeps it for this session."""

    image: Image.Image
    infotext: str
    seed: int
    subseed: int
    path: str | None
    mode: str
    stopped_early: EarlyStop | None = None  # interrupted or skipped before its last step

    def gallery_item(self) -> tuple[Image.Image, str]:
        image = self.image.copy()
        image.info["parameters"] = self.infotext  # kept when Gradio writes the PNG the browser downloads
        caption = f"seed {self.seed}"
        if self.stopped_early is not None:
            caption += f" · {self.stopped_early.description}"
        return image, caption


def records_from(result: GenerationResult) -> list[ResultRecord]:
    return [ResultRecord(image=g.image, infotext=g.infotext, seed=g.seed, subseed=g.subseed, path=g.path,
                         mode=result.request.mode, stopped_early=g.stopped_early) for g in result.images]


def saved_text(records: list[ResultRecord], index: int = 0) -> str:
    if not records:
        return ""
    record = records[min(index, len(records) - 1)]
    if record.path:
        return f"Saved to `{record.path}`"
    if record.stopped_early is not None:
        return (f"Not saved: {record.stopped_early.description.lower()}, so it is unfinished. "
                "Turn on \"Save images when interrupted\" in Settings to keep such images.")
    return "Not saved (saving is off in Settings, or the save failed)."


def finished_preview(records: list[ResultRecord]) -> Image.Image | None:
    """What the live preview shows once a job ends: its first finished image, never a skipped or interrupted one's noise."""
    return next((record.image for record in records if record.stopped_early is None), None)


def selected_texts(records: list[ResultRecord], index: int = 0) -> tuple[str, str]:
    """The infotext and "saved" line shown for the selected record; empty when there are no records."""
    if not records:
        return "", ""
    return records[min(index, len(records) - 1)].infotext, saved_text(records, index)


@dataclass
class GenerationTab:
    """The controls of one tab that other parts of the app talk to."""

    mode: str
    fields: F.FieldMap
    generate: gr.Button
    interrupt: gr.Button
    skip: gr.Button
    preview: gr.Image
    progress: gr.Markdown
    gallery: gr.Gallery
    infotext: gr.Textbox
    saved: gr.Markdown
    results: gr.State
    selected: gr.State
    send_buttons: dict[str, gr.Button]
    image: Any = None  # img2img: gr.Image; inpaint: gr.ImageEditor
    mask_upload: Any = None
    own_size: Any = None  # img2img/inpaint: "use the image's own size" checkbox
    extensions: list[ExtensionControls] = field(default_factory=list)
    presets: PresetControls | None = None
    sampling_note: Any = None
    xyz: XyzControls | None = None
    extra_networks: ExtraNetworksPanel | None = None


def _seed_row(mode: str, name: str, random_icon: ToolIcon, reuse_icon: ToolIcon):
    with gr.Row(equal_height=True):
        number = F.control(name, mode, scale=4)
        random_button = tool_button(random_icon, f"{mode}_{name}_random")
        reuse_button = tool_button(reuse_icon, f"{mode}_{name}_reuse")
    return number, random_button, reuse_button


def build_generation_tab(studio, mode: str, model_dropdown, session_gallery: gr.State, default_size: tuple[int, int],
                         vae_dropdown=None, modules_dropdown=None, family: Family | None = None) -> GenerationTab:
    """Lay out one tab's controls inside the current gr.Tab and wire its own events. ``family``: the family of the
    model shown at start, whose fields are shown (``ui.family_fields``; the model picker updates them after)."""
    fields = F.FieldMap()
    width0, height0 = default_size
    start = family_settings(family)  # what the start model's family draws with (Flux.1 dev: Euler, Simple, CFG 1...)

    with gr.Row(elem_id=f"{mode}_toprow"):
        with gr.Column(scale=6):
            prompt = F.control("prompt", mode, lines=3, placeholder="Prompt (Ctrl+Enter to generate)", info=None)
            negative = F.control("negative_prompt", mode, "negative", lines=2, placeholder="Negative prompt", info=None)
        with gr.Column(scale=1, min_width=200):
            generate = gr.Button("Generate", variant="primary", elem_id=f"{mode}_generate", elem_classes=["sfumato-generate"])
            with gr.Row():
                interrupt = gr.Button("Interrupt", variant="stop", elem_id=f"{mode}_interrupt", min_width=60)
                skip = gr.Button("Skip", elem_id=f"{mode}_skip", min_width=60)
    with gr.Column(elem_id=f"{mode}_presets"):
        presets = build_presets_controls(studio, mode)
    extra_networks = build_extra_networks_panel(studio, mode)
    fields.add(F.simple("prompt", prompt))
    fields.add(F.simple("negative_prompt", negative))

    image = mask_upload = own_size = None
    with gr.Row(equal_height=False, elem_classes=["sfumato-workspace"]):
        with gr.Column(scale=5, elem_id=f"{mode}_settings"):
            if mode == "img2img":
                image = UploadImage(label="Image for img2img", type="pil", image_mode="RGB", sources=["upload", "clipboard"],
                                    format=LOSSLESS, height=360, elem_id="img2img_image")
                reject_bad_uploads(image)
            if mode == "inpaint":
                image, mask_upload, inpaint_bindings, preview_mask = _inpaint_canvas()
            with gr.Row():
                sampler = F.control("sampler", mode, info=None, value=start["sampler"])
                # the schedules the start sampler can use, not every schedule
                schedule = F.control("schedule", mode, choices=samplers.schedules_for(start["sampler"]), value=start["schedule"])
            # Says what picking a sampler changed in the schedule or zero-SNR box, and why; hidden otherwise.
            sampling_note = gr.Markdown("", visible=False, elem_id=f"{mode}_sampling_note")
            zero_snr = F.control("zero_terminal_snr", mode, "zero_snr",
                                 visible=samplers.supports_zero_terminal_snr(start["sampler"]))
            steps = F.control("steps", mode, value=start["steps"])
            if mode != "txt2img":
                own_size = gr.Checkbox(True, label="Keep the image's own size (untick to resize to width × height)", elem_id=f"{mode}_own_size")
            with gr.Row(equal_height=True):
                with gr.Column(scale=4):
                    width = F.control("width", mode, value=width0, info=None)
                    height = F.control("height", mode, value=height0, info=None)
                swap = tool_button(SWAP_SIZE, f"{mode}_swap_size")
                with gr.Column(scale=2):
                    batch_count = F.control("batch_count", mode)
                    batch_size = F.control("batch_size", mode)
            cfg = F.control("cfg_scale", mode, "cfg", info=None, value=start["cfg_scale"])
            with gr.Row():  # a flow model's settings, where Forge users look for them; hidden for models that ignore them
                distilled_cfg = F.control("distilled_cfg_scale", mode, "distilled_cfg", info=None,
                                          visible=shown("distilled_cfg_scale", family), value=start["distilled_cfg_scale"])
                shift = F.control("shift", mode, visible=shown("shift", family), value=start["shift"])
            if mode != "txt2img":
                denoising = F.control("denoising_strength", mode, "denoising", info=None)
                resize_mode = F.control("resize_mode", mode)
            else:
                hires_controls = _hires_accordion(studio, mode)
            refiner_controls = _refiner_accordion(studio, mode)
            seed, seed_random, seed_reuse = _seed_row(mode, "seed", RANDOM_SEED, REUSE_SEED)
            with gr.Accordion(F.FIELDS["subseed"].label, open=False, elem_id=f"{mode}_variation"):
                subseed, subseed_random, subseed_reuse = _seed_row(mode, "subseed", RANDOM_SUBSEED, REUSE_SUBSEED)
                subseed_strength = F.control("subseed_strength", mode, info=None)
            # A1111 keeps these in its Settings; here they belong to the request, so an infotext restores them.
            with gr.Accordion("Advanced sampling: clip skip, eta, ENSD, RNG, speed-ups", open=False,
                              elem_id=f"{mode}_advanced_sampling"):
                with gr.Row():
                    clip_skip = F.control("clip_skip", mode, visible=shown("clip_skip", family))
                    eta = F.control("eta", mode)
                with gr.Row():
                    ensd = F.control("eta_noise_seed_delta", mode, "ensd")
                    rng = F.control("rng", mode)
                token_merging = F.control("token_merging_ratio", mode, visible=shown("token_merging_ratio", family))
                first_block_cache = F.control("first_block_cache", mode, visible=shown("first_block_cache", family))
            if mode == "inpaint":
                preview_mask_button, mask_preview_image = preview_mask
            extensions, _ = build_extension_controls(studio, mode)
            xyz = build_xyz_controls(mode) if mode in SCRIPT_MODES else None

        with gr.Column(scale=6, elem_id=f"{mode}_results", elem_classes=["sfumato-outputs"]):
            preview = LivePreview(label="Live preview", interactive=False, format=PREVIEW, height=320, elem_id=f"{mode}_preview",
                                  buttons=["fullscreen"])
            progress = gr.Markdown("Idle", elem_id=f"{mode}_progress", elem_classes=["sfumato-progress"])
            gallery = ResultGallery(label="Results", format=LOSSLESS, columns=4, height=RESULTS_HEIGHT, object_fit="contain",
                                    elem_id=f"{mode}_gallery", elem_classes=["sfumato-results"], buttons=["download", "fullscreen"],
                                    interactive=False)
            with gr.Row():
                send_buttons = {
                    target: gr.Button(f"Send to {target}", elem_id=f"{mode}_send_to_{target}", size="sm")
                    for target in ("txt2img", "img2img", "inpaint") if target != mode or mode != "txt2img"
                }
            infotext = gr.Textbox(label="Generation parameters (selected image)", lines=4, interactive=False,
                                  elem_id=f"{mode}_infotext", buttons=["copy"])
            saved = gr.Markdown("", elem_id=f"{mode}_saved")
    results = gr.State([])
    selected = gr.State(0)

    fields.add(F.simple("sampler", sampler))
    fields.add(F.schedule(schedule))
    fields.add(F.zero_terminal_snr(zero_snr))
    for name, component in (("steps", steps), ("width", width), ("height", height),
                            ("batch_count", batch_count), ("batch_size", batch_size), ("cfg_scale", cfg),
                            ("distilled_cfg_scale", distilled_cfg), ("seed", seed),
                            ("subseed", subseed), ("subseed_strength", subseed_strength), ("clip_skip", clip_skip), ("eta", eta), ("shift", shift),
                            ("eta_noise_seed_delta", ensd), ("rng", rng), ("token_merging_ratio", token_merging),
                            ("first_block_cache", first_block_cache)):
        fields.add(F.simple(name, component))
    if mode != "txt2img":
        fields.add(F.simple("denoising_strength", denoising))
        fields.add(F.simple("resize_mode", resize_mode))
    else:
        for name, component in hires_controls.items():
            fields.add(F.simple(name, component))
    for name, component in refiner_controls.items():
        fields.add(F.simple(name, component))
    if mode == "inpaint":
        for binding in inpaint_bindings:
            fields.add(binding)

    tab = GenerationTab(mode, fields, generate, interrupt, skip, preview, progress, gallery, infotext, saved, results, selected,
                        send_buttons, image=image, mask_upload=mask_upload, own_size=own_size, extensions=extensions,
                        presets=presets, sampling_note=sampling_note, xyz=xyz, extra_networks=extra_networks)

    # -- small control behaviours ----------------------------------------------------------
    # Only the artist's own pick: presets, PNG Info and "send to" set sampler, schedule and zero SNR together through
    # the field map. A .change listener would also fire for those, reading the schedule before its new value landed.
    # preprocess=False: under load a second pick can arrive carrying the schedule the first pick just took off the
    # list, and Gradio's own check would answer with Error badges; _sampler_picked handles any schedule value itself.
    sampler.input(_sampler_picked, [sampler, schedule, zero_snr], [schedule, zero_snr, sampling_note],
                  api_visibility="private", queue=False, preprocess=False)
    schedule.input(lambda: gr.update(value="", visible=False), None, sampling_note, api_visibility="private", queue=False)
    swap.click(lambda w, h: (h, w), [width, height], [width, height], api_visibility="private", queue=False)
    seed_random.click(lambda: -1, None, seed, api_visibility="private", queue=False)
    subseed_random.click(lambda: -1, None, subseed, api_visibility="private", queue=False)
    seed_reuse.click(_reuse("seed"), [results, selected], seed, api_visibility="private", queue=False)
    subseed_reuse.click(_reuse("subseed"), [results, selected], subseed, api_visibility="private", queue=False)
    if own_size is not None:
        for slider in (width, height):
            slider.input(lambda: False, None, own_size, api_visibility="private", queue=False)
    if mode == "inpaint":
        preview_mask_button.click(_preview_mask_handler,
                                  [image, mask_upload, *fields.components(["invert_mask", "mask_blur", "outpaint"])],
                                  mask_preview_image, api_visibility="private")
    gallery.select(_select_image, [results], [infotext, saved, selected], api_visibility="private", queue=False)

    # -- generate, interrupt, skip -----------------------------------------------------------
    # Keyword inputs give the API readable parameter names: Client.submit(prompt=..., steps=30, api_name="/txt2img").
    keyed = {"model": model_dropdown, **fields.keyed_components()}
    extras = {name: component for name, component in (("own_size", own_size), ("image", image), ("mask_upload", mask_upload),
                                                                    ("vae", vae_dropdown), ("modules", modules_dropdown))
              if component is not None}
    extension_keys = {f"ext_{index}": component for index, component in enumerate(all_components(extensions))}
    script_keys = xyz.keyed() if xyz is not None else {}
    outputs = [preview, progress, gallery, infotext, saved, results, selected, session_gallery]

    def run(request: gr.Request, **values):
        try:
            values = preprocess_values(all_inputs, values)
            values = {key: ("" if value is None and key in TEXT_KEYS else value) for key, value in values.items()}
            generation = _build_request(studio, mode, values["model"], fields.read_keyed(values),
                                        {name: values[name] for name in extras},
                                        read_settings(extensions, [values[key] for key in extension_keys]))
            plot = read_plot(studio, mode, values, generation) if script_keys else None
        except SfumatoError as error:
            not_started = (gr.skip(), f"Not started: {message_for(error)}", *[gr.skip()] * (len(outputs) - 2))
            yield postprocess_values(outputs, not_started)
            raise ui_error(error) from None
        for values_out in _stream(studio, generation, session_owner(request), values["session_gallery"],
                                  values["shown_results"], values["shown_index"], user=session_user(request),
                                  work=plot.run if plot is not None else None):
            yield postprocess_values(outputs, values_out)

    all_inputs = {**keyed, **extras, **extension_keys, **script_keys, "session_gallery": session_gallery, "shown_results": results,
                  "shown_index": selected}
    run.__signature__ = _optional_keywords(run, all_inputs)
    # run() pre- and postprocesses its values itself, in one pass on its own thread (ui/event_inputs.py,
    # ui/streamed_outputs.py), instead of Gradio's worker-thread round trip per input and per output of every step.
    generate.click(run, inputs_kwargs=all_inputs, outputs=outputs, preprocess=False, postprocess=False,
                   api_name=mode, concurrency_limit=None, show_progress="hidden")

    def stop(request: gr.Request):
        if not interrupt_own(studio.jobs, session_owner(request)):
            gr.Info("Nothing of yours is running.")

    def skip_image(request: gr.Request):
        if not skip_own(studio.jobs, session_owner(request)):
            gr.Info("Nothing of yours is running.")

    interrupt.click(stop, None, None, api_name=f"{mode}_interrupt", concurrency_limit=None)
    skip.click(skip_image, None, None, api_name=f"{mode}_skip", concurrency_limit=None)
    return tab


# A1111's "Hires. fix" rows: upscaler, steps and strength; the target size; the second pass's sampling; its prompts.
_HIRES_ROWS = (("hr_upscaler", "hr_second_pass_steps", "denoising_strength"), ("hr_scale", "hr_resize_x", "hr_resize_y"),
               ("hr_sampler_name", "hr_scheduler", "hr_cfg"), ("hr_prompt", "hr_negative_prompt"))


def _hires_accordion(studio, mode: str) -> dict[str, Any]:
    """txt2img's "Hires. fix": its switch, then every field declared in the hires group (and the shared denoising
    strength), laid out in A1111's rows. The upscaler list is what the registry offers when the tab is built."""
    from engine.fields import HIRES_GROUP
    from engine.hires import upscaler_names

    declared = [field.name for field in F.FIELDS.core() if field.group == HIRES_GROUP]
    laid_out = [name for row in _HIRES_ROWS for name in row]
    missing = [name for name in declared if name not in laid_out and name != "enable_hr"]
    controls: dict[str, Any] = {}
    with gr.Accordion("Hires. fix", open=False, elem_id=f"{mode}_hires"):
        controls["enable_hr"] = F.control("enable_hr", mode)
        for row in (*_HIRES_ROWS, tuple(missing)):
            with gr.Row():
                for name in row:
                    extra = {"choices": upscaler_names(getattr(studio, "registry", None))} if name == "hr_upscaler" else {}
                    controls[name] = F.control(name, mode, info=None, **extra)
    return controls


def _refiner_accordion(studio, mode: str) -> dict[str, Any]:
    """A1111's "Refiner": a checkpoint (empty: none) and the fraction of the pass where it takes over, from the
    fields declared in the refiner group."""
    from engine.fields import REFINER_GROUP

    names = [""]
    registry = getattr(studio, "registry", None)
    if registry is not None and hasattr(registry, "names"):
        try:
            names += list(registry.names())
        except Exception:  # noqa: BLE001 - a model folder that cannot be listed leaves the choice empty
            pass
    controls: dict[str, Any] = {}
    with gr.Accordion("Refiner", open=False, elem_id=f"{mode}_refiner"):
        with gr.Row():
            for field in F.FIELDS.core():
                if field.group == REFINER_GROUP:
                    extra = {"choices": names} if field.name == "refiner_checkpoint" else {}
                    controls[field.name] = F.control(field.name, mode, info=None, **extra)
    return controls


def _inpaint_canvas():
    """The ImageEditor, optional mask upload and the inpaint-only controls."""
    editor = UploadImageEditor(
        label="Image to inpaint: paint over what to change", type="pil", image_mode="RGBA", sources=["upload", "clipboard"],
        brush=gr.Brush(default_size=8, colors=["#ffffff"], default_color="#ffffff", color_mode="fixed"),
        eraser=gr.Eraser(default_size=8), layers=False, transforms=(), format=LOSSLESS, height=420, elem_id="inpaint_editor",
    )
    # The editor's own trash button would throw the picture away with the mask: ui/style.py makes it click
    # "Clear mask", and "Remove image" is the one action that removes the picture.
    with gr.Row():
        clear_mask = gr.Button("Clear mask", size="sm", elem_id="inpaint_clear_mask")
        remove_image = gr.Button("Remove image", size="sm", elem_id="inpaint_remove_image")
    with gr.Accordion("Upload a mask instead (white = repaint)", open=False):
        mask_upload = UploadImage(label="Mask", type="pil", image_mode=None, sources=["upload", "clipboard"], format=LOSSLESS,
                                  height=200, elem_id="inpaint_mask_upload")
    reject_bad_uploads(editor, mask_upload)
    clear_mask.click(_without_mask, editor, [editor, mask_upload], api_visibility="private", queue=False)
    # Done in the browser by the editor's own clear: an empty value sent from the server leaves the editor stuck "pending".
    remove_image.click(None, None, mask_upload, js=REMOVE_IMAGE_JS, api_visibility="private", queue=False)
    with gr.Row():
        mask_mode = F.control("invert_mask", "inpaint", "mask_mode", info=None)
        mask_blur = F.control("mask_blur", "inpaint")
    masked_content = F.control("masked_content", "inpaint")
    with gr.Row():
        inpaint_area = F.control("inpaint_area", "inpaint", "area")
        padding = F.control("inpaint_padding", "inpaint", "padding")
    with gr.Accordion("Outpainting: extend the canvas", open=False, elem_id="inpaint_outpaint"):
        with gr.Row():
            sides = F.outpaint_controls("inpaint")
    with gr.Accordion("Preview the effective mask", open=False, elem_id="inpaint_mask_preview_box"):
        preview_button = gr.Button("Preview mask", size="sm", elem_id="inpaint_preview_mask")
        mask_image = gr.Image(label="Effective mask (red: repainted, after blur, mode and outpainting)", interactive=False,
                              format=LOSSLESS, height=240, elem_id="inpaint_mask_preview")
    bindings = [
        F.mask_mode(mask_mode), F.simple("mask_blur", mask_blur), F.simple("masked_content", masked_content),
        F.simple("inpaint_area", inpaint_area), F.simple("inpaint_padding", padding), F.outpaint(sides),
    ]
    return editor, mask_upload, bindings, (preview_button, mask_image)


# -- handlers ---------------------------------------------------------------------------------

def _without_mask(editor_value):
    """The editor with its picture and no painted strokes; an uploaded mask is cleared too."""
    picture = editor_image(editor_value)
    if picture is None:
        return gr.skip(), None
    # one transparent layer, as the editor (layers=False) keeps one: with none it stops taking new values
    return {"background": picture, "layers": [Image.new("RGBA", picture.size, (0, 0, 0, 0))], "composite": picture}, None


def _sampler_picked(sampler: str, schedule: str | None, zero_snr: bool):
    """Keep the schedule and zero SNR when the new sampler honours them; otherwise reset them and say why."""
    try:
        choices = samplers.schedules_for(sampler)
        fit = samplers.fit_to_sampler(sampler, schedule if schedule in samplers.schedule_names() else None, bool(zero_snr))
        supports_zero = samplers.supports_zero_terminal_snr(sampler)
    except ValidationError:
        return gr.skip(), gr.skip(), gr.skip()
    return (gr.update(choices=choices, value=fit.schedule),
            gr.update(visible=supports_zero, value=fit.zero_terminal_snr),
            F.sampling_note(fit.changes))


def _reuse(attribute: str):
    def reuse(records: list[ResultRecord], index: int):
        if not records:
            gr.Info("Generate something first: this button reuses the seed of the selected result.")
            return gr.skip()
        return getattr(records[min(index or 0, len(records) - 1)], attribute)
    return reuse


def _select_image(records: list[ResultRecord], event: gr.SelectData):
    index = event.index if isinstance(event.index, int) else 0
    if not records or index >= len(records):
        return gr.skip(), gr.skip(), gr.skip()
    return *selected_texts(records, index), index


def _preview_mask_handler(editor_value, mask_upload, mask_mode: str, blur: int, *outpaint_sides):
    image, mask = inpaint_inputs(editor_value, mask_upload)
    if image is None:
        raise gr.Error("Upload an image to inpaint first.", print_exception=False)
    outpaint = tuple(int(pixels or 0) for pixels in outpaint_sides)
    if mask is None and not any(outpaint):
        raise gr.Error("Paint over the area to repaint, upload a mask, or set an outpainting amount first.", print_exception=False)
    try:
        return mask_preview(image, mask, mask_mode == MASK_MODES[1], int(blur), outpaint)
    except SfumatoError as error:
        raise ui_error(error, "Cannot preview the mask") from None


def _build_request(studio, mode: str, model: str | None, values: dict[str, Any], extras: dict[str, Any],
                   extension_settings: dict[str, Any]) -> GenerationRequest:
    """The request for one click of Generate; raises ValidationError naming the field."""
    settings = studio.settings
    values = dict(values)
    if extras.get("vae"):  # the "SD VAE" picker beside the checkpoint
        values["vae"] = extras["vae"]
    if extras.get("modules"):  # the "VAE / Text Encoder" picker: files for a model kept as split files
        values["modules"] = tuple(extras["modules"])
    if mode != "txt2img":
        if extras.get("own_size"):
            values["width"] = values["height"] = None
        if mode == "img2img":
            image = extras.get("image")
            if image is None:
                raise ValidationError("init_image", "upload an image to start from")
            values["init_image"] = image.convert("RGB")
        else:
            image, mask = inpaint_inputs(extras.get("image"), extras.get("mask_upload"))
            if image is None:
                raise ValidationError("init_image", "upload the image to inpaint")
            if mask is None and not any(values.get("outpaint", (0, 0, 0, 0))):
                raise ValidationError("mask", "paint over the area to repaint, upload a mask, or set an outpainting amount")
            values["init_image"], values["mask"] = image, mask
    return GenerationRequest(
        model=model or None, preview_every=settings.preview_every, preview_method=settings.preview_method,
        extensions=extension_settings, **values,
    )


def _stream(studio, generation: GenerationRequest, owner: str, gallery_so_far: list, shown: list[ResultRecord],
            shown_index: int, user: str | None = None, work=None) -> Iterator[tuple]:
    """Submit the job (``work``: an X/Y/Z plot's run, with ``generation`` its base) and yield (preview, progress, gallery,
    infotext, saved, results, selected, session gallery).

    Until the result, the infotext and "saved" lines are sent as they already read (from the records shown and
    the selected index) rather than skipped: Gradio rebuilds every skipped output component on every yield, which
    costs several milliseconds per step of web-server work while the sampler needs the same cores.
    """
    skip = gr.skip()
    shown_infotext, shown_saved = selected_texts(shown or [], shown_index or 0)
    job = studio.jobs.submit(generation, owner=owner, save=studio.settings.save_outputs, user=user, work=work)
    try:
        for tick in follow(studio.jobs, job):
            if tick.kind in ("queued", "progress"):
                preview = tick.preview
                if preview is None and not tick.clear_preview:
                    preview = skip  # keep what is shown
                yield preview, tick.text, skip, shown_infotext, shown_saved, skip, skip, skip
            elif tick.kind == "error":
                message = job_error_text(tick.error)
                yield skip, f"Failed: {message}", skip, shown_infotext, shown_saved, skip, skip, skip
                raise gr.Error(message, title="Generation failed", print_exception=False)
            else:
                result = tick.result
                for warning in result.warnings:
                    gr.Warning(warning)
                records = records_from(result)
                session = (list(gallery_so_far or []) + records)[-SESSION_GALLERY_LIMIT:]
                gallery = [record.gallery_item() for record in records]
                yield (finished_preview(records), tick.text, gallery, *selected_texts(records), records, 0, session)
    finally:
        if not job.finished:
            studio.jobs.cancel(job)  # the browser went away: don't keep computing for nobody
