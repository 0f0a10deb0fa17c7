"""The Gradio studio: it builds, streams previews through a real server, reports bad input by field name,
keeps working after failures, and its helpers (masks, field map, queue ticks) behave."""
from __future__ import annotations

import _ui_fixtures as fx  # noqa: E402  (sets the offline / thread environment first)

import time

import numpy as np
import pytest
from PIL import Image

from engine.errors import ValidationError
from engine.request import GenerationRequest

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    return fx.make_studio(tmp_path_factory.mktemp("ui-studio"))


@pytest.fixture(scope="module")
def app(studio):
    from ui.app import build_app

    return build_app(studio)


@pytest.fixture(scope="module")
def server_url(studio):
    with fx.running_server(studio) as url:
        yield url


@pytest.fixture(scope="module")
def client(server_url):
    from gradio_client import Client

    client = Client(server_url, verbose=False, ssl_verify=False)  # plain http; skips loading the CA bundle per request
    yield client
    client.close()  # ends its event stream, so the server can stop promptly


def _elem_ids(demo) -> set[str]:
    return {block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)}


# --- the app as a whole --------------------------------------------------------------------------

def test_app_has_every_tab_and_the_controls_artists_look_for(app):
    assert app.title == "Sfumato"
    ids = _elem_ids(app)
    for tab in ("txt2img", "img2img", "inpaint", "extras", "pnginfo", "gallery", "extensions", "settings"):
        assert f"tab_{tab}" in ids
    for mode in ("txt2img", "img2img", "inpaint"):
        for control in ("prompt", "negative", "sampler", "schedule", "steps", "cfg", "width", "height", "seed", "seed_random",
                        "seed_reuse", "subseed", "subseed_strength", "batch_count", "batch_size", "generate", "interrupt", "skip",
                        "preview", "progress", "gallery", "infotext", "preset", "preset_load", "style_apply", "preset_save",
                        "preset_delete", "sampling_note"):
            assert f"{mode}_{control}" in ids, f"{mode}_{control} missing"
    for control in ("inpaint_editor", "inpaint_mask_upload", "inpaint_mask_blur", "inpaint_masked_content", "inpaint_area",
                    "inpaint_padding", "inpaint_outpaint_left", "inpaint_preview_mask", "img2img_image", "img2img_denoising",
                    "img2img_resize_mode", "pnginfo_image", "model_dropdown", "model_refresh", "settings_apply"):
        assert control in ids, f"{control} missing"


def test_generate_endpoints_have_stable_api_names(client):
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    for name in ("/txt2img", "/img2img", "/inpaint", "/png_info"):
        assert name in endpoints
    parameters = [p["parameter_name"] for p in endpoints["/txt2img"]["parameters"]]
    assert {"prompt", "sampler", "schedule", "steps", "cfg_scale", "width", "height", "seed"} <= set(parameters)


def test_defaults_follow_the_models_native_size(app, studio):
    from ui.model_info import native_size

    native = native_size(studio, fx.MODEL_NAME)
    width = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "txt2img_width")
    assert (width.value, native) == (native[0], (512, 512))  # the tiny model is SD1-family


# --- generating through the server ----------------------------------------------------------------

def test_txt2img_streams_previews_before_the_final_image(client):
    job = client.submit(prompt="a red circle", negative_prompt="", steps=12, width=fx.SIZE, height=fx.SIZE, seed=7,
                        api_name="/txt2img")
    previews_before_final, progress_texts, final = 0, [], None
    for preview, progress, gallery, *_ in job:
        progress_texts.append(progress)
        if isinstance(gallery, list) and gallery:
            final = gallery
            break
        if isinstance(preview, str) and preview:
            previews_before_final += 1
    outputs = job.outputs()[-1]
    assert previews_before_final >= 1, progress_texts
    assert any(text.startswith("Step ") and "ETA" in text for text in progress_texts)
    final = final or outputs[2]
    assert len(final) == 1
    image = Image.open(final[0]["image"])
    assert image.size == (fx.SIZE, fx.SIZE)
    assert "Seed: 7" in image.info["parameters"] and "Steps: 12" in image.info["parameters"]
    assert outputs[1].startswith("Done: 1 image")
    assert "Seed: 7" in outputs[3] and "Saved to" in outputs[4]


def test_the_shown_infotext_stays_while_the_next_generation_streams(client):
    """Progress ticks send the infotext and "saved" line as they already read, not gr.skip() (which makes
    Gradio rebuild those components on every step); they must still be the previous result's."""
    first = client.predict(prompt="a red circle", negative_prompt="", steps=3, width=fx.SIZE, height=fx.SIZE, seed=11,
                           api_name="/txt2img")
    assert "Seed: 11" in first[3]
    job = client.submit(prompt="a blue square", negative_prompt="", steps=6, width=fx.SIZE, height=fx.SIZE, seed=12,
                        api_name="/txt2img")
    during = [(outputs[1], outputs[3], outputs[4]) for outputs in job if str(outputs[1]).startswith("Step ")]
    last = job.outputs()[-1]
    assert during, "no progress tick was streamed"
    assert all(infotext == first[3] and saved == first[4] for _, infotext, saved in during), during
    assert "Seed: 12" in last[3]


def test_invalid_field_is_reported_by_name_and_the_server_keeps_working(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as raised:
        client.predict(prompt="x", negative_prompt="", steps=4, width=100, height=fx.SIZE, api_name="/txt2img")
    assert "Width (width)" in str(raised.value) and "multiple of 8" in str(raised.value)
    assert "Traceback" not in str(raised.value)
    outputs = client.predict(prompt="x", negative_prompt="", steps=3, width=fx.SIZE, height=fx.SIZE, seed=1, api_name="/txt2img")
    assert outputs[1].startswith("Done")


def test_img2img_keeps_the_images_own_size(client, tmp_path):
    from gradio_client import handle_file

    source = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(source)
    outputs = client.predict(prompt="blue", negative_prompt="", image=handle_file(str(source)), steps=4, seed=3,
                             denoising_strength=0.5, api_name="/img2img")
    result = Image.open(outputs[2][0]["image"])
    assert result.size == (96, 72)
    assert "Denoising strength: 0.5" in result.info["parameters"]


def test_inpaint_repaints_only_under_the_painted_layer(client, tmp_path):
    from gradio_client import handle_file

    rng = np.random.default_rng(1)
    source = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(source).save(tmp_path / "source.png")
    layer = np.zeros((64, 64, 4), np.uint8)
    layer[24:40, 24:40] = (255, 0, 0, 255)  # any colour: the layer's alpha is the mask
    Image.fromarray(layer, "RGBA").save(tmp_path / "layer.png")
    editor = {"background": handle_file(str(tmp_path / "source.png")), "layers": [handle_file(str(tmp_path / "layer.png"))],
              "composite": None}
    outputs = client.predict(prompt="", negative_prompt="", image=editor, steps=4, seed=5, denoising_strength=1.0,
                             mask_blur=2, api_name="/inpaint")
    result = np.asarray(Image.open(outputs[2][0]["image"]).convert("RGB"))
    assert not np.array_equal(result[28:36, 28:36], source[28:36, 28:36])
    assert np.array_equal(result[:16], source[:16])  # far from the stroke: bit-exact
    assert "Mask blur: 2" in outputs[3]


def test_inpaint_without_a_mask_says_what_to_do(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    Image.new("RGB", (64, 64), "gray").save(tmp_path / "plain.png")
    editor = {"background": handle_file(str(tmp_path / "plain.png")), "layers": [], "composite": None}
    with pytest.raises(AppError, match=r"Mask \(mask\): paint over the area"):
        client.predict(prompt="", negative_prompt="", image=editor, steps=2, api_name="/inpaint")


# --- queue, ownership, interrupt ------------------------------------------------------------------------

def test_a_waiting_job_shows_how_many_are_ahead_and_interrupt_reaches_only_its_owner(studio):
    from ui.runner import follow
    from ui.session import interrupt_own, skip_own

    long = GenerationRequest(prompt="long", steps=150, width=fx.SIZE, height=fx.SIZE, batch_count=20, preview_every=0)
    first = studio.jobs.submit(long, owner="ui-a", save=False)
    deadline = time.monotonic() + 60
    while first.progress is None and time.monotonic() < deadline:  # running, and past the model load
        time.sleep(0.02)
    second = studio.jobs.submit(long.with_changes(batch_count=1), owner="ui-b", save=False)
    ticks = follow(studio.jobs, second, poll=0.05)
    assert next(ticks).text == "Queued: 1 ahead"
    assert not interrupt_own(studio.jobs, "ui-nobody") and not skip_own(studio.jobs, "ui-nobody")
    assert interrupt_own(studio.jobs, "ui-b")  # drops b's queued job, leaves a's alone
    assert [tick.kind for tick in ticks][-1] == "error"
    assert not first.finished
    assert interrupt_own(studio.jobs, "ui-a")
    result = first.wait(timeout=120)
    assert result.interrupted and len(result.images) < 20


# --- pieces ----------------------------------------------------------------------------------------------

class _SteppingEngine:
    """Reports ``steps`` steps ``step_s`` apart, each with its own one-pixel preview, then a result."""

    def __init__(self, steps: int, step_s: float):
        self.steps, self.step_s = steps, step_s

    def generate(self, request, on_progress=None, cancel=None):
        from engine.request import GenerationResult, Progress

        for step in range(1, self.steps + 1):
            time.sleep(self.step_s)
            on_progress(Progress(step, self.steps, 0, 1, step * self.step_s, 0.0, Image.new("L", (1, 1), step)))
        return GenerationResult(request=request, images=[], interrupted=False, timings={"total": 0.0})


def test_fast_steps_are_shown_at_most_once_a_frame_newest_first():
    from engine.jobs import JobQueue
    from ui.runner import follow

    jobs = JobQueue(_SteppingEngine(steps=30, step_s=0.005))
    ticks = [(time.monotonic(), tick) for tick in follow(jobs, jobs.submit(GenerationRequest(prompt="x"), save=False),
                                                         poll=1.0, frame=0.05)]
    progress = [(at, tick) for at, tick in ticks if tick.kind == "progress"]
    steps = [tick.preview.getpixel((0, 0)) for _, tick in progress]
    assert ticks[-1][1].kind == "result"
    assert steps[0] == 1 and steps == sorted(steps) and 2 <= len(steps) <= 8, steps  # 30 steps in about 0.15 s
    # a frame apart, except the last, sent with the result as soon as the job ends
    assert all(later - earlier >= 0.045 for (earlier, _), (later, _) in zip(progress[:-1], progress[1:-1]))


def test_the_result_is_not_held_back_by_the_frame_wait():
    from engine.jobs import JobQueue
    from ui.runner import follow

    jobs = JobQueue(_SteppingEngine(steps=10, step_s=0.01))
    job = jobs.submit(GenerationRequest(prompt="x"), save=False)
    ticks = [(time.time(), tick) for tick in follow(jobs, job, poll=1.0, frame=5.0)]
    assert [tick.kind for _, tick in ticks] == ["progress", "progress", "result"]  # step 1, then the newest and the result
    assert ticks[1][1].text.startswith("Step 10/10")
    assert ticks[-1][0] - job.finished_at < 0.5  # the job's end cut the 5 s frame short


def test_mask_is_the_union_of_the_brush_layers_alpha():
    from ui.masks import inpaint_inputs

    background = Image.new("RGBA", (32, 32), (10, 20, 30, 255))
    left, right = np.zeros((32, 32, 4), np.uint8), np.zeros((32, 32, 4), np.uint8)
    left[:, :8] = (0, 0, 0, 255)  # black paint counts too
    right[:, -8:] = (255, 255, 255, 128)
    image, mask = inpaint_inputs({"background": background, "layers": [Image.fromarray(left), Image.fromarray(right)],
                                  "composite": None}, None)
    mask = np.asarray(mask)
    assert image.mode == "RGB" and image.size == (32, 32)
    assert mask[:, :8].min() == 255 and mask[:, -8:].min() == 255 and mask[:, 8:-8].max() == 0


def test_an_uploaded_mask_wins_over_painted_layers_and_is_fitted_to_the_image():
    from ui.masks import inpaint_inputs

    layer = np.zeros((32, 32, 4), np.uint8)
    layer[:4] = 255
    upload = Image.new("L", (16, 16), 0)
    upload.paste(255, (8, 0, 16, 16))
    _, mask = inpaint_inputs({"background": Image.new("RGB", (32, 32)), "layers": [Image.fromarray(layer)]}, upload)
    mask = np.asarray(mask)
    assert mask.shape == (32, 32) and mask[:, 16:].min() == 255 and mask[:, :16].max() == 0


def test_mask_preview_shows_blur_and_inversion():
    from ui.masks import effective_mask

    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    sharp, blurred, inverted = (np.asarray(effective_mask(mask, invert, blur)) for invert, blur in ((False, 0), (False, 4), (True, 0)))
    assert sharp[4, 16] == 0 and blurred[6, 16] > 0
    assert inverted[0, 0] == 255 and inverted[16, 16] == 0


def test_field_map_turns_controls_into_request_fields_and_back():
    import gradio as gr

    from ui import fields as F

    with gr.Blocks():
        steps, mode = gr.Slider(), gr.Radio(["Inpaint masked", "Inpaint not masked"])
        sides = [gr.Slider() for _ in range(4)]
    fields = F.FieldMap()
    fields.add(F.simple("steps", steps))
    fields.add(F.mask_mode(mode))
    fields.add(F.outpaint(sides))
    read = fields.read([20.0, "Inpaint not masked", 8, 0, 16.0, 0])
    assert read == {"steps": 20, "invert_mask": True, "outpaint": (8, 0, 16, 0)}
    assert isinstance(read["steps"], int)
    assert fields.updates({"invert_mask": False, "outpaint": (1, 2, 3, 4)})[1:] == ["Inpaint masked", 1, 2, 3, 4]
    assert set(fields.keyed_components()) == {"steps", "mask_mode", "outpaint_left", "outpaint_right", "outpaint_up", "outpaint_down"}


def test_progress_text_reads_like_a1111():
    from engine.request import Progress
    from ui.runner import progress_text, queued_text

    assert progress_text(Progress(5, 20, 0, 1, 1.0, 1.23)) == "Step 5/20 · ETA 1.2 s"
    assert progress_text(Progress(5, 20, 2, 4, 1.0, 3.0)) == "Image 3/4 · Step 5/20 · ETA 3.0 s"
    assert queued_text(2) == "Queued: 2 ahead"


def test_errors_name_the_control_and_the_field():
    from ui.errors import job_error_text, message_for

    assert job_error_text("zero_terminal_snr: needs a v-prediction model") == "Zero terminal SNR (zero_terminal_snr): needs a v-prediction model"
    assert job_error_text("GenerationError: out of memory") == "GenerationError: out of memory"

    assert message_for(ValidationError("cfg_scale", "must be between 0 and 30")) == "CFG Scale (cfg_scale): must be between 0 and 30"
    assert message_for(ValidationError("extensions.controlnet.units[0].weight", "too big")).startswith("Extensions (")


def test_settings_with_a_bad_output_pattern_are_refused_before_anything_is_saved(studio):
    from ui.settings_tab import checked_settings

    before = studio.settings
    with pytest.raises(ValidationError) as raised:
        checked_settings(studio, {"output_pattern": "{nonsense}/{seed}"})
    assert raised.value.field == "output_pattern"
    assert studio.settings == before and not studio.settings_store.path.exists()


def test_png_info_reads_parameters_and_what_they_restore(tmp_path):
    from engine.image_metadata import png_with_infotext
    from ui.png_info import read_image_info

    text = "a cat\nNegative prompt: dog\nSteps: 9, Sampler: Euler, Schedule type: Karras, CFG scale: 5, Seed: 42, Size: 64x64"
    path = tmp_path / "a.png"
    path.write_bytes(png_with_infotext(Image.new("RGB", (64, 64)), text, {"workflow": '{"nodes": []}'}))
    infotext, parsed, comfy_prompt, workflow, summary = read_image_info(str(path))
    assert infotext == text
    assert parsed["restores"]["seed"] == 42 and parsed["restores"]["schedule"] == "Karras"
    assert '"nodes"' in workflow and comfy_prompt == ""
    assert "generation parameters" in summary and "ComfyUI workflow" in summary
    assert read_image_info(str(tmp_path / "missing.png"))[4].startswith("⚠️")


def test_a_broken_extension_ui_is_reported_and_the_app_still_builds(studio, monkeypatch):
    import gradio as gr

    from ui.app import build_app

    class BrokenManager:
        def ui_builders(self, tab):
            def broken(tab):
                raise RuntimeError("boom")

            def fine(tab):
                box = gr.Checkbox(label="fine")
                return [box], lambda values: {"on": values[0]}, None
            return [("broken", broken), ("fine", fine)]

        def statuses(self):
            raise RuntimeError("cannot list")

    monkeypatch.setattr(studio, "extensions", BrokenManager())
    demo = build_app(studio)
    texts = [getattr(block, "value", "") for block in demo.blocks.values() if isinstance(block, gr.Markdown)]
    assert any("broken: RuntimeError: boom" in str(text) for text in texts)
    assert any("Could not list extensions" in str(text) for text in texts)
    assert any(getattr(block, "label", None) == "fine" for block in demo.blocks.values())


def test_the_shipped_extensions_add_their_controls(tmp_path):
    if not (fx.REPO / "extensions" / "controlnet" / "__init__.py").is_file():
        pytest.skip("extensions/controlnet is not present")
    from ui.app import build_app

    studio = fx.make_studio(tmp_path, extensions_dir=fx.REPO / "extensions")
    ids = _elem_ids(build_app(studio))
    assert {"txt2img_controlnet", "img2img_controlnet", "inpaint_controlnet"} <= ids


def test_a_model_that_fails_to_load_is_reported_and_the_previous_one_stays(studio):
    import shutil

    from ui.app import switch_model

    broken = studio.config.models_dir / "Stable-diffusion" / "broken"
    broken.mkdir(parents=True)
    (broken / "model_index.json").write_text("{not json")
    studio.registry.refresh()
    try:
        steps = list(switch_model(studio, "Stable-diffusion/broken", fx.MODEL_NAME, [512, 512, 64, 64]))
    finally:
        shutil.rmtree(broken)
        studio.registry.refresh()
    assert steps[0][0].startswith("⏳ Loading")
    status, dropdown, current = steps[-1][:3]
    assert "Could not load" in status and dropdown == current == fx.MODEL_NAME

    loaded = list(switch_model(studio, fx.MODEL_NAME, "Stable-diffusion/gone", [512, 512, 64, 64]))[-1]
    assert loaded[1] == fx.MODEL_NAME and "native size 512×512" in loaded[0]


def test_eta_comes_from_the_pace_of_sampling_not_the_model_load():
    from engine.request import Progress
    from ui.runner import EtaClock

    clock = EtaClock()
    first = Progress(1, 10, 0, 1, elapsed=30.0, eta=270.0)  # the engine counts a 29 s load as sampling time
    assert clock.eta(first, now=100.0) == 270.0
    assert clock.eta(Progress(3, 10, 0, 1, elapsed=30.2, eta=70.0), now=100.2) == pytest.approx(0.7)


def test_saving_a_preset_keeps_what_the_artist_chose_and_leaves_out_defaults():
    from ui.presets_ui import saved_fields

    values = {"prompt": "a {prompt}", "negative_prompt": "", "sampler": "Euler", "schedule": "Karras", "steps": 13,
              "cfg_scale": 4.5, "seed": -1, "zero_terminal_snr": False, "denoising_strength": 0.75, "width": 64, "height": 64}
    saved = saved_fields("txt2img", values, "some-model", include_model=False)
    # txt2img holds the denoising strength too: hires fix's second pass uses it
    assert saved == {"prompt": "a {prompt}", "sampler": "Euler", "schedule": "Karras", "steps": 13, "cfg_scale": 4.5,
                     "width": 64, "height": 64, "denoising_strength": 0.75}
    assert saved_fields("img2img", {**values, "seed": 3}, "m", include_model=True)["model"] == "m"


def test_preset_import_problems_are_listed_by_field():
    from engine.presets import PresetError
    from ui.presets_ui import _problems_text

    text = _problems_text(PresetError([("fields.steps", "must be between 1 and 150"), ("fields.colour", "unknown field")]))
    assert text == "Sampling steps (fields.steps): must be between 1 and 150; fields.colour: unknown field"
