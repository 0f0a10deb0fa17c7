"""The A1111-compatible HTTP API, driven through plain HTTP JSON against a real server on 127.0.0.1."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from _api_fixtures import (
    CONTROLNET, INPAINT_MODEL, MODEL, OTHER_MODEL, build_models, centre_mask, check_against_schema, controlnet_available, decode_b64,
    gradient, make_studio, png_b64, response_schema, running_server,
)

FAST = {"steps": 3, "width": 64, "height": 64, "cfg_scale": 5.0}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = build_models(tmp_path_factory.mktemp("api-models"))
    (root / "Stable-diffusion" / "unsafe.ckpt").write_bytes(b"not loadable")  # loading it fails: an engine-side error
    return root


@pytest.fixture(scope="module")
def studio(models_dir, tmp_path_factory):
    return make_studio(tmp_path_factory.mktemp("api-studio"), models_dir)


@pytest.fixture(scope="module")
def server(studio):
    with running_server(studio, api=True) as handle:
        yield handle


@pytest.fixture(scope="module")
def openapi(server):
    response = requests.get(server.url + "/openapi.json", timeout=10)
    assert response.status_code == 200
    return response.json()


def post(server, path: str, payload: dict, timeout: float = 120) -> requests.Response:
    return requests.post(server.url + path, json=payload, timeout=timeout)


def generate(server, path: str = "/sdapi/v1/txt2img", **payload) -> tuple[dict, dict, list]:
    response = post(server, path, {**FAST, **payload})
    assert response.status_code == 200, response.text
    body = response.json()
    return body, json.loads(body["info"]), [decode_b64(image) for image in body["images"]]


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# --- txt2img / img2img / inpaint --------------------------------------------------

def test_txt2img_returns_pngs_whose_seed_and_parameters_match_the_request(server, openapi):
    body, info, images = generate(server, prompt="a red circle", negative_prompt="blurry", seed=1234, batch_size=2,
                                  sampler_name="Euler a", cfg_scale=6.5)
    assert len(images) == 2 and all(image.size == (64, 64) for image in images)
    assert info["seed"] == 1234 and info["all_seeds"] == [1234, 1235]
    assert info["prompt"] == "a red circle" and info["negative_prompt"] == "blurry"
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (64, 64, 3, 6.5)
    assert info["sampler_name"] == "Euler a" and info["sd_model_name"] == MODEL and info["sd_model_hash"]
    for image, seed, infotext in zip(images, info["all_seeds"], info["infotexts"]):
        chunk = image.info["parameters"]
        assert chunk == infotext
        assert chunk.startswith("a red circle\nNegative prompt: blurry\n")
        assert f"Seed: {seed}," in chunk and "Steps: 3," in chunk and "Sampler: Euler a," in chunk and "CFG scale: 6.5," in chunk
    assert body["parameters"]["seed"] == 1234 and body["parameters"]["sampler_name"] == "Euler a"
    check_against_schema(body, response_schema(openapi, "/sdapi/v1/txt2img", "post", 200))


def test_same_seed_gives_the_same_image_and_unknown_fields_are_ignored(server):
    _, _, first = generate(server, prompt="a square", seed=77)
    _, _, second = generate(server, prompt="a square", seed=77, restore_faces=False, enable_hr=False, not_a_field={"x": 1})
    assert np.array_equal(pixels(first[0]), pixels(second[0]))


def test_size_defaults_to_the_models_native_size_when_not_sent(server, studio):
    response = post(server, "/sdapi/v1/txt2img", {"steps": 1, "cfg_scale": 1.0, "seed": 1})
    assert response.status_code == 200, response.text
    native = studio.registry.load(MODEL).family.native_size
    assert decode_b64(response.json()["images"][0]).size == native
    assert (response.json()["parameters"]["width"], response.json()["parameters"]["height"]) == native


def test_img2img_round_trip_keeps_the_init_size_and_reports_denoising(server, openapi):
    init = gradient(64, 64)
    body, info, images = generate(server, "/sdapi/v1/img2img", init_images=[png_b64(init)], denoising_strength=0.5, seed=9,
                                  width=None, height=None)
    assert images[0].size == (64, 64)
    assert info["seed"] == 9 and info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in images[0].info["parameters"]
    assert body["parameters"]["init_images"] is None  # not echoed back unless include_init_images
    check_against_schema(body, response_schema(openapi, "/sdapi/v1/img2img", "post", 200))


@pytest.mark.parametrize("model", [MODEL, INPAINT_MODEL])
def test_inpaint_changes_only_the_masked_area(server, model):
    init, mask = gradient(64, 64), centre_mask(64, 64)
    _, info, images = generate(
        server, "/sdapi/v1/img2img", init_images=[png_b64(init)], mask=png_b64(mask), mask_blur=0, inpainting_fill=1,
        inpaint_full_res=0, denoising_strength=1.0, seed=5, override_settings={"sd_model_checkpoint": model},
    )
    result, original = pixels(images[0]), pixels(init)
    outside = np.asarray(mask) == 0
    assert np.abs(result[outside] - original[outside]).max() <= 1
    assert np.abs(result[~outside] - original[~outside]).mean() > 5
    assert info["sd_model_name"] == model and info["is_using_inpainting_conditioning"]
    infotext = images[0].info["parameters"]
    assert "Mask blur: 0" in infotext and "Inpaint area: Whole picture" in infotext and "Masked content: original" in infotext


def test_only_masked_inpainting_from_a1111_defaults(server):
    init, mask = gradient(64, 64), centre_mask(64, 64)
    _, _, images = generate(server, "/sdapi/v1/img2img", init_images=[png_b64(init)], mask=png_b64(mask), seed=3)
    assert "Inpaint area: Only masked" in images[0].info["parameters"]  # A1111's inpaint_full_res defaults to true
    assert "Masked content: fill" in images[0].info["parameters"]  # and inpainting_fill to 0


# --- samplers, validation, errors -------------------------------------------------

@pytest.mark.parametrize("payload, sampler, schedule", [
    ({"sampler_name": "DPM++ 2M Karras"}, "DPM++ 2M", "Karras"),
    ({"sampler_name": "k_euler_a"}, "Euler a", "Uniform"),  # "Automatic" is written resolved, as A1111 writes it
    ({"sampler_index": "euler"}, "Euler", "Uniform"),
    ({"sampler_name": "dpm++ 2m", "scheduler": "karras"}, "DPM++ 2M", "Karras"),
])
def test_sampler_names_match_as_a1111_matches_them(server, payload, sampler, schedule):
    _, info, images = generate(server, seed=1, **payload)
    assert info["sampler_name"] == sampler
    assert f"Sampler: {sampler}, Schedule type: {schedule}," in images[0].info["parameters"]


@pytest.mark.parametrize("path, payload, field", [
    ("/sdapi/v1/txt2img", {"sampler_name": "Not A Sampler"}, "sampler_name"),
    ("/sdapi/v1/txt2img", {"scheduler": "nonsense"}, "scheduler"),
    ("/sdapi/v1/txt2img", {"width": 1_000_000, "height": 64}, "width"),
    ("/sdapi/v1/txt2img", {"width": 2048, "height": 4096}, "height"),
    ("/sdapi/v1/txt2img", {"steps": "many"}, "steps"),
    ("/sdapi/v1/txt2img", {"n_iter": 0}, "n_iter"),
    ("/sdapi/v1/txt2img", {"styles": ["no such style"]}, "styles"),
    ("/sdapi/v1/txt2img", {"override_settings": {"sd_model_checkpoint": "missing-model"}}, "override_settings.sd_model_checkpoint"),
    ("/sdapi/v1/img2img", {"init_images": ["this is not base64!"]}, "init_images.0"),
    ("/sdapi/v1/img2img", {"init_images": ["aGVsbG8gd29ybGQ="]}, "init_images.0"),  # valid base64, not an image
    ("/sdapi/v1/img2img", {"init_images": []}, "init_images"),
    ("/sdapi/v1/img2img", {"inpainting_fill": 7}, "inpainting_fill"),
])
def test_invalid_values_get_422_naming_the_field(server, openapi, path, payload, field):
    if path.endswith("img2img"):
        payload = {"init_images": [png_b64(gradient())], **payload}
    response = post(server, path, {**FAST, **payload})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "ValidationError" and body["field"] == field and field in body["detail"]
    check_against_schema(body, response_schema(openapi, path, "post", 422))


def test_engine_error_gives_500_json_and_the_server_keeps_serving(server, openapi):
    response = post(server, "/sdapi/v1/txt2img", {**FAST, "override_settings": {"sd_model_checkpoint": "unsafe.ckpt"}})
    assert response.status_code == 500
    body = response.json()
    assert body["error"] and "pickle" in body["detail"]
    check_against_schema(body, response_schema(openapi, "/sdapi/v1/txt2img", "post", 500))
    generate(server, seed=2)  # still serving


# --- progress, interrupt, queue ------------------------------------------------------

def test_progress_shows_a_live_preview_and_interrupt_ends_the_job(server, openapi):
    outcome: dict = {}
    started = time.monotonic()

    def long_job():
        outcome["response"] = post(server, "/sdapi/v1/txt2img", {**FAST, "steps": 150, "n_iter": 4, "seed": 11})

    worker = threading.Thread(target=long_job)
    worker.start()
    seen = None
    while time.monotonic() - started < 60 and worker.is_alive():
        progress = requests.get(server.url + "/sdapi/v1/progress", timeout=10).json()
        if progress["current_image"] and progress["state"]["sampling_step"] > 0:
            seen = progress
            break
        time.sleep(0.02)
    assert seen is not None, "no live preview was reported while the job ran"
    check_against_schema(seen, response_schema(openapi, "/sdapi/v1/progress", "get", 200))
    assert 0 < seen["progress"] < 1 and seen["state"]["sampling_steps"] == 150 and seen["state"]["job_count"] == 4
    assert decode_b64(seen["current_image"]).size[0] > 0
    assert requests.get(server.url + "/sdapi/v1/progress?skip_current_image=true", timeout=10).json()["current_image"] is None

    assert requests.post(server.url + "/sdapi/v1/interrupt", timeout=10).status_code == 200
    worker.join(60)
    assert not worker.is_alive()
    response = outcome["response"]
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["interrupted"] and len(response.json()["images"]) < 4
    idle = requests.get(server.url + "/sdapi/v1/progress", timeout=10).json()
    assert idle["progress"] == 0 and idle["current_image"] is None


def test_a_client_that_goes_away_cancels_its_job(server):
    with pytest.raises(requests.exceptions.ReadTimeout):
        post(server, "/sdapi/v1/txt2img", {**FAST, "steps": 150, "n_iter": 100, "seed": 12}, timeout=1.0)
    deadline = time.monotonic() + 20  # the whole job would take minutes
    while time.monotonic() < deadline:
        if requests.get(server.url + "/sdapi/v1/progress", timeout=10).json()["state"]["job_count"] == 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the abandoned job kept running")
    generate(server, seed=13)


def test_four_concurrent_clients_each_get_their_own_images(server):
    seeds = [4101, 4102, 4103, 4104]
    responses: dict[int, requests.Response] = {}

    def client(seed: int) -> None:
        responses[seed] = post(server, "/sdapi/v1/txt2img", {**FAST, "seed": seed, "prompt": f"shape {seed}"})

    threads = [threading.Thread(target=client, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for seed in seeds:
        body = responses[seed].json()
        info = json.loads(body["info"])
        assert info["seed"] == seed and info["prompt"] == f"shape {seed}"
        assert f"Seed: {seed}," in decode_b64(body["images"][0]).info["parameters"]
    # each image is exactly what that client's request makes on its own
    _, _, alone = generate(server, seed=seeds[2], prompt=f"shape {seeds[2]}")
    assert np.array_equal(pixels(alone[0]), pixels(decode_b64(responses[seeds[2]].json()["images"][0])))


# --- the other endpoints ---------------------------------------------------------------

def test_listing_endpoints_match_their_published_schemas(server, openapi):
    for path, check in (
        ("/sdapi/v1/samplers", lambda items: {"DPM++ 2M", "Euler a"} <= {item["name"] for item in items}),
        ("/sdapi/v1/schedulers", lambda items: {"karras", "automatic"} <= {item["name"] for item in items}),
        ("/sdapi/v1/sd-models", lambda items: {MODEL, INPAINT_MODEL} <= {item["model_name"] for item in items}),
        ("/sdapi/v1/prompt-styles", lambda items: isinstance(items, list)),
        ("/sdapi/v1/options", lambda options: options["sd_model_checkpoint"].startswith(MODEL)),
        ("/sdapi/v1/progress", lambda progress: "state" in progress),
    ):
        response = requests.get(server.url + path, timeout=10)
        assert response.status_code == 200, path
        assert check(response.json()), path
        check_against_schema(response.json(), response_schema(openapi, path, "get", 200))
    assert requests.get(server.url + "/docs", timeout=10).status_code == 200


def test_options_switch_the_default_model_and_a_failed_switch_keeps_the_old_one(server, studio):
    url = server.url + "/sdapi/v1/options"
    try:
        assert requests.post(url, json={"sd_model_checkpoint": OTHER_MODEL}, timeout=60).status_code == 200
        assert requests.get(url, timeout=10).json()["sd_model_checkpoint"].startswith(OTHER_MODEL)
        _, info, _ = generate(server, seed=1)
        assert info["sd_model_name"] == OTHER_MODEL

        failed = requests.post(url, json={"sd_model_checkpoint": "unsafe.ckpt"}, timeout=60)
        assert failed.status_code == 500 and "pickle" in failed.json()["detail"]
        missing = requests.post(url, json={"sd_model_checkpoint": "nope"}, timeout=60)
        assert missing.status_code == 422 and missing.json()["field"] == "sd_model_checkpoint"
        negative = requests.post(url, json={"show_progress_every_n_steps": -5}, timeout=60)
        assert negative.status_code == 422 and negative.json()["field"] == "show_progress_every_n_steps"
        assert requests.get(url, timeout=10).json()["sd_model_checkpoint"].startswith(OTHER_MODEL)
    finally:
        requests.post(url, json={"sd_model_checkpoint": MODEL}, timeout=60)


def test_refresh_checkpoints_finds_a_new_model(server, models_dir):
    from engine.tiny_models import build_sd1

    build_sd1(models_dir / "Stable-diffusion" / "added-later")
    before = {item["model_name"] for item in requests.get(server.url + "/sdapi/v1/sd-models", timeout=10).json()}
    assert requests.post(server.url + "/sdapi/v1/refresh-checkpoints", timeout=10).status_code == 200
    after = {item["model_name"] for item in requests.get(server.url + "/sdapi/v1/sd-models", timeout=10).json()}
    assert "added-later" in after - before


def test_styles_apply_presets_by_name_and_explicit_fields_win(server, studio):
    from engine.presets import validate_preset

    studio.presets.save(validate_preset({"name": "API style", "fields": {"prompt": "{prompt}, on a gray background", "steps": 2, "cfg_scale": 3}}))
    response = post(server, "/sdapi/v1/txt2img", {"width": 64, "height": 64, "prompt": "a blue square", "styles": ["API style"], "seed": 4, "steps": 4})
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["prompt"] == "a blue square, on a gray background"
    assert info["steps"] == 4  # sent explicitly: the client's value wins
    assert info["cfg_scale"] == 3  # not sent: the preset's value applies
    styles = requests.get(server.url + "/sdapi/v1/prompt-styles", timeout=10).json()
    assert {"name": "API style", "prompt": "{prompt}, on a gray background", "negative_prompt": ""} in styles


def test_save_images_writes_to_the_outputs_folder_only_when_asked(server, studio):
    outputs = studio.config.outputs_dir
    before = set(outputs.rglob("*.png")) if outputs.exists() else set()
    generate(server, seed=21)
    assert (set(outputs.rglob("*.png")) if outputs.exists() else set()) == before
    generate(server, seed=22, save_images=True)
    new = set(outputs.rglob("*.png")) - before
    assert len(new) == 1
    with Image.open(new.pop()) as saved:
        assert "Seed: 22," in saved.info["parameters"]


def test_send_images_false_returns_info_without_images(server):
    body, info, images = generate(server, seed=31, send_images=False)
    assert images == [] and info["seed"] == 31 and len(info["infotexts"]) == 1


def test_png_info_reads_back_the_parameters_of_a_generated_image(server, openapi):
    body, info, _ = generate(server, prompt="a green triangle", seed=55)
    response = post(server, "/sdapi/v1/png-info", {"image": body["images"][0]})
    assert response.status_code == 200
    result = response.json()
    assert result["info"] == info["infotexts"][0]
    assert result["parameters"]["Seed"] == "55" and result["parameters"]["Prompt"] == "a green triangle"
    check_against_schema(result, response_schema(openapi, "/sdapi/v1/png-info", "post", 200))
    bad = post(server, "/sdapi/v1/png-info", {"image": "%%%"})
    assert bad.status_code == 422 and bad.json()["field"] == "image"


# --- ControlNet ----------------------------------------------------------------------------

def test_controlnet_unit_in_alwayson_scripts_changes_the_result(server, studio):
    if not controlnet_available(studio):
        pytest.skip("the controlnet extension is not available")
    control = png_b64(centre_mask(64, 64).convert("RGB"))
    unit = {"enabled": True, "image": control, "module": "none", "model": CONTROLNET, "weight": 2.0,
            "guidance_start": 0.0, "guidance_end": 1.0, "control_mode": 0, "resize_mode": 1, "pixel_perfect": False}
    _, _, plain = generate(server, seed=8, prompt="a circle")
    _, info, controlled = generate(server, seed=8, prompt="a circle", alwayson_scripts={"controlnet": {"args": [unit]}})
    assert not np.array_equal(pixels(plain[0]), pixels(controlled[0]))
    assert "ControlNet 0" in controlled[0].info["parameters"]
    _, _, ignored = generate(server, seed=8, prompt="a circle", alwayson_scripts={"some other script": {"args": [1, 2]}})
    assert np.array_equal(pixels(plain[0]), pixels(ignored[0]))
    bad = post(server, "/sdapi/v1/txt2img", {**FAST, "alwayson_scripts": {"ControlNet": {"args": [{**unit, "weight": 9}]}}})
    assert bad.status_code == 422 and bad.json()["field"].startswith("alwayson_scripts.ControlNet.") and "weight" in bad.json()["field"]
    assert CONTROLNET in requests.get(server.url + "/controlnet/model_list", timeout=10).json()["model_list"]
    assert "canny" in requests.get(server.url + "/controlnet/module_list", timeout=10).json()["module_list"]
    detected = post(server, "/controlnet/detect", {"controlnet_module": "canny", "controlnet_input_images": [png_b64(gradient())]})
    assert detected.status_code == 200 and decode_b64(detected.json()["images"][0]).size[0] > 0
    refused = post(server, "/controlnet/detect", {"controlnet_module": "canny", "controlnet_input_images": ["%%%"]})
    assert refused.status_code == 422 and refused.json()["field"].startswith("controlnet_input_images")


def test_txt2img_with_enable_hr_comes_back_at_the_hires_size_with_the_hires_keys(server):
    body, info, images = generate(server, prompt="a red circle", seed=7, enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos",
                                  hr_second_pass_steps=2, denoising_strength=0.5, hr_sampler_name=None)
    assert [image.size for image in images] == [(96, 96)]
    assert (info["width"], info["height"], info["denoising_strength"]) == (96, 96, 0.5)
    infotext = info["infotexts"][0]
    assert "Size: 64x64," in infotext  # the first pass's, as A1111 writes it
    for entry in ("Denoising strength: 0.5", "Hires upscale: 1.5", "Hires steps: 2", "Hires upscaler: Lanczos"):
        assert entry in infotext
    assert "Hires sampler" not in infotext  # null: the first pass's sampler
    refused = post(server, "/sdapi/v1/txt2img", {**FAST, "enable_hr": True, "hr_upscaler": "4x-Nothing"})
    assert refused.status_code == 422 and "hr_upscaler" in refused.text
    modes = requests.get(server.url + "/sdapi/v1/latent-upscale-modes", timeout=10).json()
    assert modes[0] == {"name": "Latent"} and {"name": "Latent (nearest-exact)"} in modes
