"""Every listed ControlNet preprocessor either runs offline from files in models/annotators, or is marked unavailable
with its reason and fix wherever preprocessors are listed (dropdown, /controlnet/module_list), before anyone presses Preview.

Annotator networks are tested with random weights saved in the key layout of the real files (the prefixes and
wrapping each ``from_pretrained`` expects), so controlnet_aux's own loading code runs, offline.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from _annotator_weights import write_random_weights
from _controlnet_fixtures import cn, cn_manager, controlnet_models_dir, square_image  # noqa: F401 - fixtures
from engine import ValidationError

LIGHT_NETWORKS = ["lineart_realistic", "lineart_coarse", "lineart_anime", "softedge_hed", "softedge_hedsafe", "scribble_hed",
                  "softedge_pidinet", "softedge_pidisafe", "scribble_pidinet", "softedge_teed", "softedge_anyline", "mlsd"]
HEAVY_NETWORKS = ["openpose", "normal_bae", "depth_leres"]  # 200-460 MB of random weights each
NEVER_HERE = {"depth_midas": "timm", "depth_zoe": "timm", "dw_openpose_full": "mmpose", "mediapipe_face": "mediapipe",
              "seg_ofade20k": "OneFormer", "seg_ofcoco": "OneFormer", "seg_ufade20k": "UniFormer"}


@pytest.fixture(autouse=True)
def nothing_downloads(monkeypatch):
    """Any reach for the hub fails the test: HF offline, and hf_hub_download itself raising."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"a preprocessor tried to download {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    for name, module in list(sys.modules.items()):
        if "controlnet_aux" in name and hasattr(module, "hf_hub_download"):
            monkeypatch.setattr(module, "hf_hub_download", refuse)


@pytest.fixture(scope="module")
def light_models_dir(cn, tmp_path_factory) -> Path:
    """A models folder whose annotators folder holds random weights for every network except the three heavy ones."""
    root = tmp_path_factory.mktemp("annotator-models")
    files = sorted({file for name in LIGHT_NETWORKS for file in cn.preprocessors.PREPROCESSORS[name].weights})
    write_random_weights(cn.preprocessors, root / "annotators", *files)
    return root


def two_pictures() -> tuple[Image.Image, Image.Image]:
    """A 96×64 picture with a square and one with a circle and lines: different content, same size."""
    square = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(square).rectangle((20, 12, 60, 52), fill="black")
    circle = Image.new("RGB", (96, 64), "white")
    draw = ImageDraw.Draw(circle)
    draw.ellipse((40, 6, 90, 56), fill=(200, 30, 30))
    draw.line((0, 60, 95, 0), fill="blue", width=3)
    return square, circle


# --- the whole list --------------------------------------------------------------------------------------------

def test_every_listed_module_works_or_is_marked_unavailable_with_a_reason_and_a_fix(cn, tmp_path):
    """With an empty models folder: weight-free ones run, the rest say what is missing and how to get it."""
    pre = cn.preprocessors
    assert len(pre.PREPROCESSORS) == 38
    picture = square_image()
    for name, spec in pre.PREPROCESSORS.items():
        problem = pre.availability(name, tmp_path)
        if problem is None:
            assert spec.run is not None and not spec.weights, name
            assert pre.preprocess(name, picture, 64, models_dir=tmp_path).mode == "RGB"
            continue
        assert problem.reason and problem.fix, name
        if spec.weights:
            assert problem.missing_weights == spec.weights
            assert all(file in problem.fix for file in spec.weights) and str(tmp_path / "annotators") in problem.fix
        else:
            assert NEVER_HERE[name] in problem.reason
        with pytest.raises(ValidationError) as error:
            pre.preprocess(name, picture, 64, models_dir=tmp_path)
        assert error.value.field == "module" and error.value.message == problem.sentence


def test_counts_of_working_needing_weights_and_never_available(cn, tmp_path):
    pre = cn.preprocessors
    problems = {name: pre.availability(name, tmp_path) for name in pre.PREPROCESSORS}
    works = [name for name, problem in problems.items() if problem is None]
    weights = [name for name, problem in problems.items() if problem and problem.missing_weights]
    never = [name for name, problem in problems.items() if problem and not problem.missing_weights]
    assert (len(works), len(weights), len(never)) == (13, 18, 7)
    assert sorted(weights) == sorted(LIGHT_NETWORKS + HEAVY_NETWORKS + ["openpose_face", "openpose_hand", "openpose_full"])
    assert sorted(never) == sorted(NEVER_HERE)


# --- networks from random weights, offline ---------------------------------------------------------------------

@pytest.mark.parametrize("name", LIGHT_NETWORKS)
def test_network_preprocessor_runs_offline_from_its_file_in_models_annotators(cn, light_models_dir, name):
    pre = cn.preprocessors
    assert pre.availability(name, light_models_dir) is None
    square, circle = two_pictures()
    first = pre.preprocess(name, square, 64, models_dir=light_models_dir)
    second = pre.preprocess(name, circle, 64, models_dir=light_models_dir)
    assert first.mode == "RGB" and first.size == (96, 64)  # short side at the processing resolution
    if name != "softedge_pidisafe":  # random PiDiNet answers 0.5 everywhere, which the "safe" quantisation flattens to one grey
        assert not np.array_equal(np.asarray(first), np.asarray(second)), "the map does not depend on the picture"


@pytest.mark.slow
@pytest.mark.parametrize("name", HEAVY_NETWORKS)
def test_heavy_network_preprocessor_runs_offline_from_its_file_in_models_annotators(cn, tmp_path, name):
    """openpose, normal_bae and depth_leres: controlnet_aux imports torchvision for them; the subset we lend suffices."""
    pre = cn.preprocessors
    write_random_weights(pre, tmp_path / "annotators", *pre.PREPROCESSORS[name].weights)
    assert pre.availability(name, tmp_path) is None
    result = pre.preprocess(name, two_pictures()[1], 64, models_dir=tmp_path)
    assert result.mode == "RGB" and result.size == (96, 64)
    assert "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None


def test_weights_in_sd_webui_controlnet_subfolders_are_found(cn, tmp_path):
    """An artist can copy A1111's ``annotator/downloads`` folders as they are (``hed/ControlNetHED.pth``)."""
    pre = cn.preprocessors
    write_random_weights(pre, tmp_path / "annotators" / "hed", "ControlNetHED.pth")
    assert pre.availability("softedge_hed", tmp_path) is None
    assert pre.preprocess("softedge_hed", square_image(), 64, models_dir=tmp_path).size == (64, 64)


def test_the_torchvision_subset_is_lent_only_while_importing(cn, cn_manager):
    pre = cn.preprocessors
    pose = pre.aux_module("open_pose", borrows_torchvision=True)
    assert pose.Face is not None
    assert "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None
    subset = cn_manager.submodule("controlnet", "torchvision_subset")
    as_bytes = subset.ToTensor()(np.full((2, 3, 3), 255, np.uint8))
    as_floats = subset.ToTensor()(np.full((2, 3, 3), 255, np.float32))
    assert as_bytes.shape == (3, 2, 3) and float(as_bytes.max()) == 1.0 and float(as_floats.max()) == 255.0  # torchvision's rule
    normalized = subset.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(torch.ones(3, 2, 2))
    assert torch.allclose(normalized, torch.full((3, 2, 2), 2.0))


# --- where preprocessors are listed ------------------------------------------------------------------------------

def test_module_list_keeps_a1111_shape_and_marks_unavailable_ones_with_reason_and_fix(cn, cn_manager, tmp_path):
    runtime = cn_manager.submodule("controlnet", "hook").ControlNetRuntime(models_dir=tmp_path, builtin_dir=None)
    listed = cn_manager.submodule("controlnet", "api").module_list(runtime)
    assert listed["module_list"] == list(cn.preprocessors.PREPROCESSORS)  # plain names, as A1111 clients expect
    hed = listed["module_detail"]["softedge_hed"]
    assert hed["available"] is False and hed["missing_weights"] == ["ControlNetHED.pth"]
    assert "lllyasviel/Annotators" in hed["fix"] and str(tmp_path / "annotators") in hed["fix"]
    midas = listed["module_detail"]["depth_midas"]
    assert midas["available"] is False and "timm" in midas["unavailable_reason"] and "none" in midas["fix"]
    assert listed["module_detail"]["canny"]["available"] is True and listed["module_detail"]["canny"]["fix"] is None

    write_random_weights(cn.preprocessors, tmp_path / "annotators", "ControlNetHED.pth")  # placed while running
    assert cn_manager.submodule("controlnet", "api").module_list(runtime)["module_detail"]["softedge_hed"]["available"] is True


def test_detect_on_an_unavailable_module_is_a_422_sentence_naming_the_fix(cn, cn_manager, tmp_path):
    runtime = cn_manager.submodule("controlnet", "hook").ControlNetRuntime(models_dir=tmp_path, builtin_dir=None)
    with pytest.raises(ValidationError) as error:
        cn_manager.submodule("controlnet", "api").detect({"controlnet_module": "mlsd", "controlnet_input_images": ["iVBORw0KGgo="]}, runtime)
    assert error.value.field == "controlnet_module"
    assert "mlsd_large_512_fp32.pth" in error.value.message and "Fix:" in error.value.message


def test_dropdown_marks_unavailable_preprocessors_when_built_and_preview_says_why(cn, cn_manager, tmp_path):
    gr = pytest.importorskip("gradio")
    runtime = cn_manager.submodule("controlnet", "hook").ControlNetRuntime(models_dir=tmp_path, builtin_dir=None)
    with gr.Blocks():
        cn_manager.submodule("controlnet", "ui").build("txt2img", runtime, unit_count=1)
        dropdown = next(block for block in gr.context.Context.root_block.blocks.values()
                        if getattr(block, "elem_id", None) == "txt2img_controlnet_0_module")
    labels = {value: label for label, value in dropdown.choices}
    assert labels["canny"] == "canny"
    assert labels["softedge_hed"] == "softedge_hed (needs weights)"
    assert labels["depth_midas"] == "depth_midas (unavailable)"

    preview = cn_manager.submodule("controlnet", "ui")._preview(runtime)
    with pytest.raises(gr.Error) as error:
        preview(square_image(), "depth_midas", 512, -1, -1)
    assert error.value.message == cn.preprocessors.availability("depth_midas", tmp_path).sentence

    write_random_weights(cn.preprocessors, tmp_path / "annotators", "ControlNetHED.pth")  # then Refresh
    assert ("softedge_hed", "softedge_hed") in cn_manager.submodule("controlnet", "ui").module_choices(tmp_path)
