"""The ControlNet extension: preprocessors, units, the step hook through Engine.generate, infotext, API and CLI."""
from __future__ import annotations

import base64
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from _controlnet_fixtures import (  # noqa: F401 - fixtures
    cn, cn_engine, cn_manager, controlnet_models_dir, outline_image, pixels, square_image,
)
from engine import GenerationRequest, ModelError, SfumatoError, ValidationError
from engine.infotext import parse_infotext as parse_parameters

WEIGHT_FREE = ["none", "invert (from white bg & black line)", "canny", "threshold", "binary", "scribble_xdog", "shuffle",
               "tile_resample", "blur_gaussian", "t2ia_color_grid", "recolor_luminance", "recolor_intensity",
               "lineart_standard (from white bg & black line)"]


def request(model="tiny-sd1", **changes) -> GenerationRequest:
    base = dict(prompt="a red circle", negative_prompt="blurry", model=model, steps=6, cfg_scale=5.0, width=64, height=64, seed=321,
                preview_every=0)
    return GenerationRequest(**{**base, **changes})


def unit(model="tiny-cn-sd1", **changes) -> dict:
    return {"image": square_image(), "module": "canny", "model": model, "processor_res": 64, **changes}


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def gray(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.int16)


# --- preprocessors ------------------------------------------------------------------------------

@pytest.mark.parametrize("module", WEIGHT_FREE)
def test_every_weight_free_preprocessor_gives_an_rgb_map_at_the_processing_size(cn, module):
    pre = cn.preprocessors
    spec = pre.PREPROCESSORS[module]
    source = square_image(80).resize((80, 120))  # portrait, so "short side = resolution" is visible
    result = pre.preprocess(module, source, resolution=64)
    assert result.mode == "RGB"
    expected = (64, 96) if spec.resolution else (80, 120)
    if module == "tile_resample":
        expected = (80, 120)  # rate 1 (default): unchanged
    assert result.size == expected
    assert pre.why_unavailable(module, None) is None


def test_canny_edges_are_binary_and_lie_on_the_square_border(cn):
    edges = gray(cn.preprocessors.preprocess("canny", square_image(), resolution=64))
    assert set(np.unique(edges)) == {0, 255}
    ys, xs = np.nonzero(edges)
    assert ys.min() >= 14 and ys.max() <= 49 and xs.min() >= 14 and xs.max() <= 49  # on the square, not elsewhere
    assert edges[32, 32] == 0 and edges[5, 5] == 0  # not inside, not outside
    assert edges[14:18, 32].max() == 255 and edges[32, 46:50].max() == 255  # top and right borders found


def test_canny_thresholds_matter(cn):
    soft = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))).convert("RGB")
    assert gray(cn.preprocessors.preprocess("canny", soft, 64, 1, 2)).max() == 255
    assert gray(cn.preprocessors.preprocess("canny", soft, 64, 200, 255)).max() == 0


def test_invert_inverts(cn):
    source = square_image()
    assert np.array_equal(gray(cn.preprocessors.preprocess("invert", source)), 255 - gray(source))


def test_threshold_whitens_bright_pixels_and_binary_whitens_dark_lines(cn):
    ramp = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))).convert("RGB")
    bright = gray(cn.preprocessors.preprocess("threshold", ramp, 64, 127))
    assert bright[:, :31].max() == 0 and bright[:, 33:].min() == 255
    dark = gray(cn.preprocessors.preprocess("binary", ramp, 64, 100))
    assert dark[:, :24].min() == 255 and dark[:, 26:].max() == 0


def test_scribble_xdog_turns_dark_strokes_into_white_lines(cn):
    paper = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(paper).line((8, 32, 56, 32), fill="black", width=2)
    lines = gray(cn.preprocessors.preprocess("scribble_xdog", paper, 64))
    assert set(np.unique(lines)) == {0, 255}
    assert lines[32, 32] == 255 and lines[10, 32] == 0 and lines[32, 2] == 0


def test_shuffle_is_repeatable_keeps_colours_and_moves_them(cn):
    source = square_image()
    first, again = (np.asarray(cn.preprocessors.preprocess("shuffle", source, 64)) for _ in range(2))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, np.asarray(source))
    assert first.min() >= 0 and first.max() <= 255 and first.mean() > 10  # the white is still there, elsewhere


def test_color_grid_is_flat_cells_of_64_pixels(cn):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    grid = np.asarray(cn.preprocessors.preprocess("t2ia_color_grid", noise, 128))
    for cell in (grid[:64, :64], grid[64:, 64:]):
        assert len(np.unique(cell.reshape(-1, 3), axis=0)) == 1


def test_blur_and_tile_resample_soften(cn):
    source = square_image()
    blurred = gray(cn.preprocessors.preprocess("blur_gaussian", source, 64, 3.0))
    assert 0 < blurred[32, 16] < 255
    small = cn.preprocessors.preprocess("tile_resample", source, 64, 4.0)
    assert small.size == (16, 16)


def test_lineart_standard_finds_dark_strokes_on_paper(cn):
    paper = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(paper).line((8, 32, 56, 32), fill="black", width=2)
    lines = gray(cn.preprocessors.preprocess("lineart_standard", paper, 64))
    assert lines[32, 32] > 100 and lines[8, 32] < 20


@pytest.mark.parametrize("module, needle", [
    ("softedge_hed", "ControlNetHED.pth"), ("lineart_realistic", "sk_model.pth"), ("lineart_anime", "netG.pth"),
    ("mlsd", "mlsd_large_512_fp32.pth"), ("softedge_pidinet", "table5_pidinet.pth"), ("depth_midas", "torchvision"),
    ("openpose", "body_pose_model.pth"), ("normal_bae", "scannet.pt"), ("dw_openpose_full", "mmpose"), ("mediapipe_face", "mediapipe"),
])
def test_preprocessors_needing_weights_say_what_is_missing_and_where(cn, tmp_path, module, needle):
    reason = cn.preprocessors.why_unavailable(module, tmp_path)
    assert reason and needle in reason
    if needle.endswith((".pth", ".pt")):
        assert str(tmp_path / "annotators") in reason
    with pytest.raises(ValidationError) as error:
        cn.preprocessors.preprocess(module, square_image(), 64, models_dir=tmp_path)
    assert error.value.field == "module" and needle in error.value.message


def test_a_broken_annotator_file_fails_cleanly_and_nothing_downloads(cn, tmp_path):
    (tmp_path / "annotators").mkdir()
    (tmp_path / "annotators" / "ControlNetHED.pth").write_bytes(b"not a checkpoint")
    assert cn.preprocessors.why_unavailable("softedge_hed", tmp_path) is None
    with pytest.raises(ModelError, match="hed"):
        cn.preprocessors.preprocess("softedge_hed", square_image(), 64, models_dir=tmp_path)


def test_aliases_resolve_to_a1111_names(cn):
    pre = cn.preprocessors
    assert pre.canonical_name("invert") == "invert (from white bg & black line)"
    assert pre.canonical_name("Depth") == "depth_midas"
    assert pre.canonical_name("lineart") == "lineart_realistic"
    assert pre.canonical_name(None) == "none"
    with pytest.raises(ValidationError, match="unknown preprocessor"):
        pre.canonical_name("sharpen")


def test_pixel_perfect_resolution_follows_the_output_size(cn):
    maps = cn.maps
    assert maps.pixel_perfect_resolution((512, 768), 512, 512, "Crop and Resize") == 512
    assert maps.pixel_perfect_resolution((512, 768), 512, 512, "Resize and Fill") == 341
    assert maps.pixel_perfect_resolution((1024, 1024), 64, 64, "Just Resize") == 64
    pixel_perfect = cn.units.validate_unit({"module": "canny", "pixel_perfect": True, "processor_res": 512})
    assert maps.processing_resolution(pixel_perfect, (1024, 1024), 128, 128) == 128


def test_resize_modes_fit_the_map_as_a1111(cn):
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, :32] = 255  # left half white
    crop = cn.maps.fit_map(wide, 32, 32, "Crop and Resize")
    assert crop.shape == (32, 32, 3) and crop[:, :15].min() == 255 and crop[:, 17:].max() == 0  # centre crop
    fill = cn.maps.fit_map(np.full((32, 64, 3), 200, np.uint8), 64, 64, "Resize and Fill")
    assert fill.shape == (64, 64, 3) and fill[0, 0, 0] == 200  # padded with the border's median colour
    stretch = cn.maps.fit_map(wide, 32, 32, "Just Resize")
    assert stretch[:, :15].min() == 255 and stretch[:, 17:].max() == 0


def test_binary_maps_stay_binary_when_resized(cn):
    edges = np.asarray(cn.preprocessors.preprocess("canny", square_image(), 64))
    bigger = cn.maps.fit_map(edges, 100, 100, "Just Resize")
    assert set(np.unique(bigger)) <= {0, 255}


# --- unit validation and the API ------------------------------------------------------------------

def test_units_validate_ranges_and_name_the_field(cn):
    validate = cn.units.validate_units
    for bad, field in (({"weight": 2.5}, "units[0].weight"), ({"guidance_end": 1.5}, "units[0].guidance_end"),
                       ({"guidance_start": 0.8, "guidance_end": 0.2}, "units[0].guidance_start"),
                       ({"module": "sharpen"}, "units[0].module"), ({"control_mode": "Loud"}, "units[0].control_mode"),
                       ({"threshold_a": 999, "module": "canny"}, "units[0].threshold_a"), ({"bogus": 1}, "units[0].bogus"),
                       ({"image": "not base64!"}, "units[0].image"), ({"processor_res": 10}, "units[0].processor_res")):
        with pytest.raises(ValidationError) as error:
            validate([bad])
        assert error.value.field == field, bad
    assert validate(None) == [] and len(validate({"module": "canny"})) == 1


def test_validate_accepts_its_own_output(cn):
    units = cn.units.validate_units([unit(weight=0.5)])
    assert cn.units.validate_units(units) == units


def test_api_units_parse_sd_webui_controlnet_payloads(cn):
    source = square_image()
    parsed = cn.units.api_units([
        {"image": b64(source), "module": "canny", "model": "tiny-cn-sd1 [abcd1234]", "weight": 0.6, "guidance_start": 0.1,
         "guidance_end": 0.9, "control_mode": 2, "resize_mode": 0, "pixel_perfect": True, "processor_res": 256,
         "threshold_a": 50, "threshold_b": 150, "low_vram": False, "hr_option": "Both"},
        {"input_image": "data:image/png;base64," + b64(source), "module": "invert", "resize_mode": "Inner Fit (Scale to Fit)",
         "control_mode": "My prompt is more important", "enabled": False},
        {"image": {"image": b64(source), "mask": b64(source)}, "guessmode": True},
    ])
    first, second, third = parsed
    assert first.enabled and np.array_equal(np.asarray(first.image.convert("RGB")), np.asarray(source))
    assert (first.module, first.model, first.weight, first.guidance_start, first.guidance_end) == ("canny", "tiny-cn-sd1 [abcd1234]", 0.6, 0.1, 0.9)
    assert (first.control_mode, first.resize_mode, first.pixel_perfect) == ("ControlNet is more important", "Just Resize", True)
    assert (first.processor_res, first.threshold_a, first.threshold_b) == (256, 50, 150)
    assert (second.enabled, second.module, second.resize_mode) == (False, "invert (from white bg & black line)", "Crop and Resize")
    assert second.control_mode == "My prompt is more important" and second.image is not None
    assert third.mask is not None and third.control_mode == "ControlNet is more important"
    assert cn.units.api_units({"args": []}) == []
    with pytest.raises(ValidationError) as error:
        cn.units.api_units([{"weight": 3}])
    assert error.value.field == "args[0].weight"
    with pytest.raises(ValidationError):
        cn.units.api_units([True, "canny"])  # positional args of old clients


def test_manager_api_args_uses_the_extension(cn_manager):
    parsed = cn_manager.api_args("controlnet", [{"module": "canny", "model": "x"}])
    assert parsed[0].module == "canny"


def test_http_api_shapes(cn_manager):
    api = cn_manager.submodule("controlnet", "api")
    assert set(api.model_list()["model_list"]) == {"tiny-cn-sd1", "tiny-cn-sd1-b", "tiny-cn-sdxl", "tiny-cn-single"}
    modules = api.module_list()
    assert "canny" in modules["module_list"] and "depth_midas" in modules["module_list"]
    canny = modules["module_detail"]["canny"]
    assert not canny["model_free"] and canny["available"]  # A1111: model_free means "needs no ControlNet model"
    assert [slider["name"] for slider in canny["sliders"]] == ["Preprocessor Resolution", "Low Threshold", "High Threshold"]
    assert not modules["module_detail"]["depth_midas"]["available"]
    detected = api.detect({"controlnet_module": "canny", "controlnet_input_images": [b64(square_image())], "controlnet_processor_res": 64})
    assert detected["info"] == "Success" and len(detected["images"]) == 1
    edges = Image.open(io.BytesIO(base64.b64decode(detected["images"][0])))
    assert edges.size == (64, 64) and set(np.unique(gray(edges))) == {0, 255}
    for payload, field in (({"controlnet_module": "nope", "controlnet_input_images": [b64(square_image())]}, "controlnet_module"),
                           ({"controlnet_module": "canny"}, "controlnet_input_images"),
                           ({"controlnet_module": "softedge_hed", "controlnet_input_images": [b64(square_image())]}, "controlnet_module")):
        with pytest.raises(ValidationError) as error:
            api.detect(payload)
        assert error.value.field == field


def test_http_routes_mount_on_fastapi(cn):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    cn.EXTENSION.api_routes(app, None)
    client = TestClient(app)
    assert client.get("/controlnet/model_list").json()["model_list"]
    assert client.get("/controlnet/version").json() == {"version": 2}
    response = client.post("/controlnet/detect", json={"controlnet_module": "invert", "controlnet_input_images": [b64(square_image())]})
    assert response.status_code == 200 and response.json()["info"] == "Success"


# --- through Engine.generate ---------------------------------------------------------------------------

@pytest.mark.parametrize("units", [
    [unit(weight=0)],
    [unit(enabled=False)],
    [unit(guidance_start=1.0, guidance_end=1.0)],
    [unit(enabled=False), unit(weight=0.0), unit(guidance_start=1.0, guidance_end=1.0)],
    [],
], ids=["weight-0", "disabled", "window-after-the-run", "three-inactive", "empty"])
def test_units_that_do_nothing_give_pixel_identical_output_and_load_nothing(cn_engine, cn, units):
    plain = pixels(cn_engine.generate(request()))
    cn.runtime.cache.clear()
    controlled = pixels(cn_engine.generate(request(extensions={"controlnet": units})))
    assert np.array_equal(plain, controlled)
    assert not cn.runtime.cache._loaded  # no ControlNet was even loaded


def test_inactive_unit_is_identical_on_sdxl_and_inpaint_too(cn_engine):
    init = square_image().convert("RGB")
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((8, 8, 40, 40), fill=255)
    for req in (request("tiny-sdxl"), request(init_image=init, mask=mask, denoising_strength=0.8)):
        off = req.with_changes(extensions={"controlnet": [unit("tiny-cn-sdxl" if req.model == "tiny-sdxl" else "tiny-cn-sd1", weight=0)]})
        assert np.array_equal(pixels(cn_engine.generate(req)), pixels(cn_engine.generate(off)))


def _sources():
    init = Image.fromarray(np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 56, 56), fill=255)
    return init, mask


MODES = {
    "txt2img": lambda model: request(model),
    "img2img": lambda model: request(model, init_image=_sources()[0], denoising_strength=0.9),
    "inpaint": lambda model: request(model, init_image=_sources()[0], mask=_sources()[1], mask_blur=0, denoising_strength=1.0),
}
FAMILIES = {"sd1": ("tiny-sd1", "tiny-cn-sd1", "tiny-cn-sd1-b"), "sdxl": ("tiny-sdxl", "tiny-cn-sdxl", "tiny-cn-sdxl"),
            "sd1-inpainting-unet": ("tiny-sd1-inpainting", "tiny-cn-sd1", "tiny-cn-sd1-b")}
CASES = [(mode, family) for family in FAMILIES for mode in MODES if family != "sd1-inpainting-unet" or mode == "inpaint"]


@pytest.mark.parametrize("mode, family", CASES, ids=[f"{mode}-{family}" for mode, family in CASES])
def test_two_units_change_the_output_in_every_mode(cn_engine, mode, family):
    model, first, second = FAMILIES[family]
    base = MODES[mode](model)
    units = [unit(first), unit(second, module="invert", image=outline_image(), weight=0.7, control_mode="My prompt is more important")]
    plain = pixels(cn_engine.generate(base))
    both = pixels(cn_engine.generate(base.with_changes(extensions={"controlnet": units})))
    one = pixels(cn_engine.generate(base.with_changes(extensions={"controlnet": units[:1]})))
    assert np.abs(both - plain).mean() > 1.0
    assert not np.array_equal(both, one)
    if mode == "inpaint":
        _, mask = _sources()
        kept = np.asarray(mask) == 0
        assert np.array_equal(both[kept], plain[kept]), "ControlNet must not touch unmasked pixels"


def test_a_unit_without_image_uses_the_img2img_source_and_txt2img_refuses(cn_engine):
    base = MODES["img2img"]("tiny-sd1")
    with_source = pixels(cn_engine.generate(base.with_changes(extensions={"controlnet": [unit(image=None, module="none")]})))
    explicit = pixels(cn_engine.generate(base.with_changes(extensions={"controlnet": [unit(image=base.init_image, module="none")]})))
    assert np.array_equal(with_source, explicit)
    with pytest.raises(ValidationError) as error:
        cn_engine.generate(request(extensions={"controlnet": [unit(image=None)]}))
    assert error.value.field == "extensions.controlnet.units[0].image"


def test_control_modes_and_windows_each_change_the_result(cn_engine):
    results = {}
    for name, changes in (("balanced", {}), ("prompt", {"control_mode": "My prompt is more important"}),
                          ("control", {"control_mode": "ControlNet is more important"}),
                          ("early", {"guidance_end": 0.5}), ("late", {"guidance_start": 0.5})):
        results[name] = pixels(cn_engine.generate(request(extensions={"controlnet": [unit(**changes)]}))).tobytes()
    assert len(set(results.values())) == len(results)


def test_soft_injection_scales_are_a1111s(cn):
    scales = cn.hook.soft_injection_scales(13)
    assert scales[-1] == 1.0 and scales[0] == pytest.approx(0.825 ** 12)
    assert cn.hook.step_window(0.0, 0.5, 20) == (0, 10)
    assert cn.hook.step_window(1.0, 1.0, 20) is None


def test_the_guidance_window_is_keyed_by_the_schedule_fraction_for_samplers_that_call_twice_per_step(cn_engine, cn, monkeypatch):
    """Heun calls the model at σ_i and σ_(i+1): each call counts where its own σ lies in the schedule, so a unit
    guided over [0.2, 0.5] of 6 steps runs at the calls made at fractions 2/6 and 3/6, and at no other."""
    seen: list[tuple[float, bool]] = []
    original = cn.hook.ControlNetHook.unet_kwargs

    def recording(self, point, *args):
        kwargs = original(self, point, *args)
        seen.append((point.fraction, bool(kwargs)))
        return kwargs

    monkeypatch.setattr(cn.hook.ControlNetHook, "unet_kwargs", recording)
    cn_engine.generate(request(sampler="Heun", schedule="Karras", extensions={"controlnet": [unit(guidance_start=0.2, guidance_end=0.5)]}))
    assert len(seen) == 2 * 6 - 1  # Heun's last step, to σ = 0, is a single Euler call
    assert sorted({round(fraction * 6) for fraction, active in seen if active}) == [2, 3]
    assert all(active == (0.2 <= fraction <= 0.5) for fraction, active in seen)


def test_single_file_controlnet_matches_its_folder(cn_engine):
    folder = pixels(cn_engine.generate(request(extensions={"controlnet": [unit("tiny-cn-sd1")]})))
    single = pixels(cn_engine.generate(request(extensions={"controlnet": [unit("tiny-cn-single")]})))
    assert np.array_equal(folder, single)


def test_model_problems_are_named(cn_engine):
    for model, units, needle in (("tiny-sdxl", [unit("tiny-cn-sd1")], "another kind of base model"),
                                 ("tiny-sd1", [unit("missing-cn")], "not found; installed: tiny-cn-sd1"),
                                 ("tiny-sd1", [unit(None)], "these fit the current model: tiny-cn-sd1")):
        with pytest.raises(ValidationError) as error:
            cn_engine.generate(request(model, extensions={"controlnet": units}))
        assert error.value.field == "extensions.controlnet.units[0].model" and needle in error.value.message


def test_controlnets_are_found_in_the_a1111_folder_and_builtin_and_pickles_are_skipped(cn, tmp_path, controlnet_models_dir):
    models = cn.models
    builtin = tmp_path / "builtin"
    (builtin / "demo-controlnet-outline").mkdir(parents=True)
    (builtin / "demo-controlnet-outline" / "config.json").write_text('{"_class_name": "ControlNetModel", "cross_attention_dim": 32}')
    (builtin / "demo-model").mkdir()
    (builtin / "demo-model" / "config.json").write_text('{"_class_name": "ControlNetModel"}')  # not named *controlnet*
    found = models.find_controlnets(controlnet_models_dir, builtin)
    assert list(found) == ["tiny-cn-sd1", "tiny-cn-sd1-b", "tiny-cn-sdxl", "tiny-cn-single", "demo-controlnet-outline"]
    assert found["tiny-cn-single"].kind == "single-file" and found["demo-controlnet-outline"].builtin
    assert models.resolve("tiny-cn-sd1 [0123abcd]", found).name == "tiny-cn-sd1"
    pickles = tmp_path / "models" / "ControlNet"
    pickles.mkdir(parents=True)
    (pickles / "control_sd15_canny.pth").write_bytes(b"pickle")
    assert models.find_controlnets(tmp_path / "models", None) == {}
    assert models.skipped_pickles(tmp_path / "models") == [pickles / "control_sd15_canny.pth"]


@pytest.mark.parametrize("family, cross_attention", [("sd1", 768), ("sd2", 1024), ("sdxl", 2048)])
def test_shipped_single_file_configs_build_and_are_picked_by_the_file_keys(cn, tmp_path, family, cross_attention):
    import torch
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    config = ControlNetModel.load_config(cn.models.CONFIGS_DIR / family)
    with torch.device("meta"):
        ControlNetModel.from_config(config)
    assert config["cross_attention_dim"] == cross_attention
    keys = {"control_model.input_hint_block.0.weight": torch.zeros(1)}
    if family == "sdxl":
        keys["control_model.label_emb.0.0.weight"] = torch.zeros(1)
    keys["control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = torch.zeros(4, 1024 if family == "sd2" else 768)
    path = tmp_path / "original.safetensors"
    save_file(keys, path)
    assert cn.models.single_file_config(path) == cn.models.CONFIGS_DIR / family


# --- infotext ------------------------------------------------------------------------------------------

def test_infotext_has_one_controlnet_line_per_enabled_unit_and_reads_back(cn_engine, cn_manager):
    units = [unit(enabled=False), unit(weight=0.75, guidance_end=0.8, control_mode="My prompt is more important")]
    result = cn_engine.generate(request(extensions={"controlnet": units}))
    text = result.images[0].infotext
    assert ('ControlNet 1: "Module: canny, Model: tiny-cn-sd1, Weight: 0.75, Resize Mode: Crop and Resize, Guidance Start: 0, '
            'Guidance End: 0.8, Pixel Perfect: False, Control Mode: My prompt is more important') in text
    assert "ControlNet 0" not in text
    restored = cn_manager.parse_infotext(parse_parameters(text))["controlnet"]
    assert [u.enabled for u in restored] == [False, True, False]
    back = restored[1]
    assert (back.module, back.model, back.weight, back.guidance_end, back.control_mode, back.processor_res) == (
        "canny", "tiny-cn-sd1", 0.75, 0.8, "My prompt is more important", 64)
    assert cn_manager.parse_infotext({"Steps": "20"}) == {}


# --- CLI -----------------------------------------------------------------------------------------------------

def test_control_arg_parses_and_picks_a_fitting_model(cn_manager, registry, controlnet_models_dir, tmp_path):
    cli = cn_manager.submodule("controlnet", "cli")
    path = tmp_path / "square.png"
    square_image().save(path)
    studio = SimpleNamespace(registry=registry, config=SimpleNamespace(models_dir=controlnet_models_dir, builtin_models_dir=None),
                             default_model=lambda: "tiny-sd1")
    parsed = cli.parse_control_arg(f"{path},canny,tiny-cn-sd1-b,0.5,0.1,0.9", studio=studio)
    assert (parsed["module"], parsed["model"], parsed["weight"], parsed["guidance_start"], parsed["guidance_end"]) == (
        "canny", "tiny-cn-sd1-b", 0.5, 0.1, 0.9)
    assert parsed["image"].size == (64, 64)
    assert cli.parse_control_arg(f"{path},invert", studio=studio, model="tiny-sdxl")["model"] == "tiny-cn-sdxl"
    assert cli.parse_control_arg(f"{path},invert", studio=studio)["model"] in ("tiny-cn-sd1", "tiny-cn-sd1-b", "tiny-cn-single")
    for bad, needle in ((f"{path}", "expected IMAGE,MODULE"), (f"{path},canny,m,1,0.5", "expected"), (f"{tmp_path}/no.png,canny,m", "not found"),
                        (f"{path},sharpen,m", "unknown preprocessor"), (f"{path},canny,m,heavy", "must be numbers"),
                        (f"{path},canny,m,5", "weight")):
        with pytest.raises(ValidationError, match=needle):
            cli.parse_control_arg(bad, studio=studio)


def test_preprocess_command_writes_the_map(cn_manager, tmp_path):
    cli = cn_manager.submodule("controlnet", "cli")
    source, out = tmp_path / "in.png", tmp_path / "deep" / "edges.png"
    square_image().save(source)
    assert cli.run_preprocess("canny", source, out, 64) == out
    assert set(np.unique(gray(Image.open(out)))) == {0, 255}
    with pytest.raises(SfumatoError):
        cli.run_preprocess("depth_midas", source, out, 64, models_dir=tmp_path)


# --- UI --------------------------------------------------------------------------------------------------------

def test_ui_controls_round_trip_settings(cn_manager):
    gr = pytest.importorskip("gradio")
    (name, builder), = cn_manager.ui_builders("img2img")
    with gr.Blocks():
        components, to_settings, from_settings = builder("img2img")
    assert name == "controlnet" and len(components) == 3 * 13
    values = from_settings([unit(weight=0.5)])
    assert len(values) == len(components)
    settings = to_settings(values)
    assert settings[0].weight == 0.5 and settings[0].module == "canny" and not settings[1].enabled
    assert to_settings(from_settings([])) is None  # nothing enabled: no settings at all


# --- the demo model -------------------------------------------------------------------------------------------

DEMO = Path(__file__).resolve().parent.parent / "builtin"


@pytest.mark.slow
def test_demo_outline_controls_where_the_shape_appears(tmp_path):
    if not (DEMO / "sfumato-demo" / "model_index.json").is_file() or not (DEMO / "sfumato-demo-controlnet-outline" / "config.json").is_file():
        pytest.skip("builtin/sfumato-demo and its outline ControlNet are not present")
    from engine import Engine, ModelRegistry
    from engine.extensions import ExtensionManager
    from training import evaluate, world

    manager = ExtensionManager(DEMO.parent / "extensions", tmp_path / "ext.json", models_dir=tmp_path, builtin_dir=DEMO)
    engine = Engine(ModelRegistry(None, builtin_dir=DEMO), manager)

    def generate(caption: str, outline: np.ndarray) -> np.ndarray:
        unit = {"image": Image.fromarray(outline), "module": "none", "model": "sfumato-demo-controlnet-outline"}
        result = engine.generate(GenerationRequest(prompt=caption, model="sfumato-demo", steps=20, cfg_scale=5.0, width=64, height=64,
                                                   seed=1, preview_every=0, extensions={"controlnet": [unit]}))
        return np.asarray(result.images[0].image)

    scene = world.sample_scene(np.random.default_rng(3))
    # Where the outline is drawn, the shape appears...
    reading = evaluate.classify(generate(world.full_caption(scene), world.render_outline(scene)))
    assert evaluate._iou(reading.mask, world.shape_mask(scene)) > 0.5
    # ...and moving the outline moves the shape, even against the caption.
    targets = [position for position in world.POSITIONS if position != scene.position][:3]
    followed = [evaluate.classify(generate(world.full_caption(scene), world.render_outline(scene.moved(p)))).position == p for p in targets]
    assert sum(followed) >= 2, dict(zip(targets, followed))


def test_only_masked_inpaint_cuts_an_explicit_control_image_to_the_masked_region(cn_engine, cn, monkeypatch):
    init = Image.new("RGB", (128, 128), "gray")
    control = Image.new("RGB", (128, 128), "black")
    ImageDraw.Draw(control).rectangle((72, 72, 127, 127), fill="white")  # white only around the masked corner
    mask = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(mask).rectangle((88, 88, 112, 112), fill=255)
    seen: list[Image.Image] = []
    control_map = cn.runtime.control_map
    monkeypatch.setattr(cn.runtime, "control_map", lambda unit, image, w, h: seen.append(image) or control_map(unit, image, w, h))
    base = request(init_image=init, mask=mask, denoising_strength=0.8, inpaint_area="Only masked", inpaint_padding=8,
                   extensions={"controlnet": [unit(image=control, module="none")]})
    cn_engine.generate(base)
    assert (np.asarray(seen[-1].convert("L")) > 128).mean() > 0.9, "the control image was not cut to the masked region"
    cn_engine.generate(base.with_changes(inpaint_area="Whole picture"))
    assert (np.asarray(seen[-1].convert("L")) > 128).mean() < 0.3, "whole-picture inpainting uses the whole control image"
