"""ControlNet preprocessors: one table from name to what it needs and the function that runs it.

Names and parameters follow sd-webui-controlnet (``scripts/preprocessor/*``,
``preprocessor_compiled.py``) so API clients and infotext from A1111 work:
``threshold_a``/``threshold_b`` are its "slider 1"/"slider 2", ``-1`` meaning
the preprocessor's default. Every function takes and returns an RGB ``uint8``
HxWx3 array; the map comes back at the processing resolution (short side =
``resolution``) or, for those without a resolution, at the input size.

Weight-free preprocessors run anywhere. Those that need a network come from
``controlnet_aux`` and stay unavailable, with a message naming the exact file,
where to get it and where to put it, until their weights are in
``<models_dir>/annotators`` (flat, or in sd-webui-controlnet's
``annotator/downloads`` subfolders such as ``openpose/``). A few can never run
in this build; they say why and what to do instead. :func:`availability` checks
packages and files without running anything, so lists can mark them before
anyone presses Preview. Nothing is ever downloaded.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import threading
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch
from PIL import Image

from engine.compute import on_compute_thread
from engine.errors import ModelError, SfumatoError, ValidationError
from engine.models import REPO_ROOT

from . import torchvision_subset

DEFAULT_RESOLUTION = 512
RESOLUTION_RANGE = (64, 2048)
ANNOTATORS_SUBDIR = "annotators"


@dataclass(frozen=True)
class Param:
    """A slider: sd-webui-controlnet's ``threshold_a``/``threshold_b`` for one preprocessor."""

    label: str
    default: float
    minimum: float
    maximum: float
    step: float = 1.0


Runner = Callable[[np.ndarray, int, float, float, Path], np.ndarray]
"""``run(rgb, resolution, a, b, annotators_dir) -> rgb map``."""


@dataclass(frozen=True)
class Preprocessor:
    name: str
    run: Runner | None = None  # a weight-free preprocessor's function
    resolution: bool = True  # shows a processor-resolution slider
    threshold_a: Param | None = None
    threshold_b: Param | None = None
    network: "Network | None" = None  # a controlnet_aux detector, built from ``weights``
    weights: tuple[str, ...] = ()  # files it reads from <models_dir>/annotators
    requires: tuple[str, ...] = ()  # Python packages it imports
    unavailable: str | None = None  # why it can never run in this build
    fix: str = ""  # what an artist can do instead, when it can never run
    aliases: tuple[str, ...] = ()
    tag: str = ""  # the kind of ControlNet it feeds (canny, depth, ...), for model suggestions


# --- image helpers -------------------------------------------------------------

def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """RGB uint8 HxWx3 from a PIL image or an array (gray, RGB or RGBA)."""
    if isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            # Transparent pixels become black, as a drawn sketch on an empty canvas should.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            image = Image.alpha_composite(background, rgba)
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    if array.shape[2] == 4:
        alpha = array[:, :, 3:4].astype(np.float32) / 255.0
        return (array[:, :, :3].astype(np.float32) * alpha).round().astype(np.uint8)
    return array[:, :, :3].copy()


def resize_short_side(image: np.ndarray, resolution: int) -> np.ndarray:
    """Scale so the short side is ``resolution`` (area filter down, cubic up), as A1111's ``resize_image_with_pad``."""
    height, width = image.shape[:2]
    scale = resolution / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size == (width, height):
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


# --- weight-free preprocessors ----------------------------------------------------

def _none(image, resolution, a, b, annotators):
    return image


def _invert(image, resolution, a, b, annotators):
    """White background and black lines → black background and white lines (what line ControlNets expect)."""
    return 255 - image


def _canny(image, resolution, low, high, annotators):
    """Canny edges, binary (0/255), thresholds as in sd-webui-controlnet (defaults 100/200)."""
    return _gray_to_rgb(cv2.Canny(resize_short_side(image, resolution), int(low), int(high)))


def _threshold(image, resolution, level, b, annotators):
    """White where every channel is brighter than the level (sd-webui-controlnet ``threshold``)."""
    image = resize_short_side(image, resolution)
    return _gray_to_rgb(np.where(image.min(axis=2) > level, 255, 0).astype(np.uint8))


def _binary(image, resolution, level, b, annotators):
    """Legacy A1111 ``binary``: dark lines on light paper → white on black; level 0 or 255 picks it by Otsu."""
    gray = cv2.cvtColor(resize_short_side(image, resolution), cv2.COLOR_RGB2GRAY)
    if level <= 0 or level >= 255:
        _, result = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY_INV | cv2.THRESH_OTSU)
    else:
        _, result = cv2.threshold(gray, int(level), 255, cv2.THRESH_BINARY_INV)
    return _gray_to_rgb(result)


def _scribble_xdog(image, resolution, level, b, annotators):
    """Difference of Gaussians (σ 0.5 and 5) thresholded, sd-webui-controlnet's ``scribble_xdog``."""
    image = resize_short_side(image, resolution).astype(np.float32)
    fine = cv2.GaussianBlur(image, (0, 0), 0.5)
    coarse = cv2.GaussianBlur(image, (0, 0), 5.0)
    dog = (255 - np.min(coarse - fine, axis=2)).clip(0, 255).astype(np.uint8)
    return _gray_to_rgb(np.where(2 * (255 - dog.astype(np.int32)) > level, 255, 0).astype(np.uint8))


def _noise_disk(height: int, width: int, frequency: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise in [0, 1]: coarse uniform noise upsampled by a cubic filter (controlnet_aux ``make_noise_disk``)."""
    noise = rng.uniform(0, 1, size=(height // frequency + 2, width // frequency + 2)).astype(np.float32)
    noise = cv2.resize(noise, (width + 2 * frequency, height + 2 * frequency), interpolation=cv2.INTER_CUBIC)
    noise = noise[frequency:frequency + height, frequency:frequency + width]
    noise -= noise.min()
    return noise / max(float(noise.max()), 1e-6)


def _shuffle(image, resolution, a, b, annotators):
    """Content shuffle: remap pixels along a smooth random flow (controlnet_aux ``ContentShuffleDetector``).

    Its own copy because controlnet_aux draws from NumPy's global generator;
    this one is seeded, so the same image always gives the same map.
    """
    image = resize_short_side(image, resolution)
    height, width = image.shape[:2]
    rng = np.random.default_rng(0)
    flow_x = _noise_disk(height, width, 256, rng) * float(width - 1)
    flow_y = _noise_disk(height, width, 256, rng) * float(height - 1)
    return cv2.remap(image, flow_x, flow_y, cv2.INTER_LINEAR)


def _tile_resample(image, resolution, rate, b, annotators):
    """Downsample by ``rate`` (sd-webui-controlnet ``tile_resample``); the map is later resized to the output."""
    if rate < 1.1:
        return image
    height, width = image.shape[:2]
    size = (max(1, int(width / rate)), max(1, int(height / rate)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _blur_gaussian(image, resolution, sigma, b, annotators):
    return cv2.GaussianBlur(resize_short_side(image, resolution), (0, 0), float(sigma))


def _color_grid(image, resolution, a, b, annotators):
    """A1111 ``t2ia_color_grid``: shrink ×64 (cubic), then blow back up with nearest: flat colour cells."""
    image = resize_short_side(image, resolution)
    height, width = image.shape[:2]
    small = cv2.resize(image, (max(1, width // 64), max(1, height // 64)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST)


def _recolor(channel: Callable[[np.ndarray], np.ndarray]) -> Runner:
    """sd-webui-controlnet ``recolor_*``: one brightness channel, gamma-corrected, as gray."""

    def run(image, resolution, gamma, b, annotators):
        value = channel(image).astype(np.float32) / 255.0
        return _gray_to_rgb((value ** float(gamma) * 255.0).clip(0, 255).astype(np.uint8))

    return run


_luminance = _recolor(lambda rgb: cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[:, :, 0])
_intensity = _recolor(lambda rgb: cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 2])


# --- controlnet_aux, without its package __init__ ------------------------------------

_AUX_PACKAGE = "_sfumato_controlnet_aux"
_aux_lock = threading.Lock()


def aux_module(submodule: str, borrows_torchvision: bool = False) -> types.ModuleType:
    """Import ``controlnet_aux.<submodule>`` without running ``controlnet_aux/__init__.py``.

    That ``__init__`` imports every detector, and some need torchvision, so
    ``import controlnet_aux.canny`` fails here. We register the package folder
    under a private name and import the submodule from it; its relative
    imports (``from ..util import ...``) resolve inside the private name.
    ``borrows_torchvision``: the submodule imports a few ``torchvision.transforms``
    classes, which :mod:`.torchvision_subset` lends it while it is imported.
    """
    with _aux_lock:
        if _AUX_PACKAGE not in sys.modules:
            spec = importlib.util.find_spec("controlnet_aux")  # finds the folder; runs nothing
            if spec is None or not spec.submodule_search_locations:
                raise ModuleNotFoundError("controlnet_aux is not installed (pip install --no-deps controlnet-aux==0.0.10)")
            package = types.ModuleType(_AUX_PACKAGE)
            package.__path__ = list(spec.submodule_search_locations)
            package.__package__ = _AUX_PACKAGE
            sys.modules[_AUX_PACKAGE] = package
        if not borrows_torchvision:
            return importlib.import_module(f"{_AUX_PACKAGE}.{submodule}")
        with torchvision_subset.provided_while_importing():
            return importlib.import_module(f"{_AUX_PACKAGE}.{submodule}")


def _lineart_standard(image, resolution, a, b, annotators):
    """controlnet_aux ``LineartStandardDetector``: dark strokes on light paper → white lines (no weights)."""
    detector = aux_module("lineart_standard").LineartStandardDetector()
    image = resize_short_side(image, resolution)
    return to_rgb_array(detector(image, detect_resolution=min(image.shape[:2]), output_type="np"))


# --- annotator weights -------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Weight:
    """One annotator file: its name, where to download it, and the subfolder sd-webui-controlnet keeps it in."""

    file: str
    source: str  # Hugging Face repository and path
    a1111_folder: str = ""  # sd-webui-controlnet's ``annotator/downloads/<folder>``; also looked for under models/annotators


_ANNOTATORS = "lllyasviel/Annotators"
WEIGHTS: dict[str, Weight] = {w.file: w for w in (
    Weight(file="ControlNetHED.pth", source=_ANNOTATORS, a1111_folder="hed"),
    Weight(file="table5_pidinet.pth", source=_ANNOTATORS, a1111_folder="pidinet"),
    Weight(file="sk_model.pth", source=_ANNOTATORS, a1111_folder="lineart"),
    Weight(file="sk_model2.pth", source=_ANNOTATORS, a1111_folder="lineart"),
    Weight(file="netG.pth", source=_ANNOTATORS, a1111_folder="lineart_anime"),
    Weight(file="mlsd_large_512_fp32.pth", source=_ANNOTATORS, a1111_folder="mlsd"),
    Weight(file="body_pose_model.pth", source=_ANNOTATORS, a1111_folder="openpose"),
    Weight(file="hand_pose_model.pth", source=_ANNOTATORS, a1111_folder="openpose"),
    Weight(file="facenet.pth", source=_ANNOTATORS, a1111_folder="openpose"),
    Weight(file="scannet.pt", source=_ANNOTATORS, a1111_folder="normal_bae"),
    Weight(file="res101.pth", source=_ANNOTATORS, a1111_folder="leres"),
    Weight(file="7_model.pth", source="bdsqlsz/qinglong_controlnet-lllite, file Annotators/7_model.pth"),
    Weight(file="MTEED.pth", source="TheMistoAI/MistoLine, file Anyline/MTEED.pth"),
)}


def find_weight(annotators: Path, file: str) -> Path | None:
    """``<annotators>/<file>``, else sd-webui-controlnet's ``<annotators>/<folder>/<file>``; None when neither exists."""
    candidates = [annotators / file]
    folder = WEIGHTS[file].a1111_folder if file in WEIGHTS else ""
    if folder:
        candidates.append(annotators / folder / file)
    return next((path for path in candidates if path.is_file()), None)


# --- networks from controlnet_aux --------------------------------------------------------

Detector = Any
Builder = Callable[[types.ModuleType, list[Path]], Detector]
"""``build(controlnet_aux submodule, weight paths in the table's order) -> detector``."""
Call = Callable[[Detector, np.ndarray, int, float, float], Any]
"""``call(detector, rgb, resolution, threshold_a, threshold_b) -> map``."""


@dataclass(frozen=True, kw_only=True)
class Network:
    """A controlnet_aux detector built from weights in the annotators folder, loaded once and kept."""

    submodule: str
    build: Builder
    call: Call
    borrows_torchvision: bool = False


def _from_pretrained(class_name: str, *filename_arguments: str) -> Builder:
    """controlnet_aux's own ``from_pretrained``, given a folder that exists and each file as an absolute path.

    ``os.path.join(folder, absolute)`` is the absolute path, so each weight may sit
    flat or in its A1111 subfolder; the folder exists, so its ``hf_hub_download``
    branch is never taken.
    """
    def build(module, paths):
        arguments = {name: str(path) for name, path in zip(filename_arguments, paths)}
        return getattr(module, class_name).from_pretrained(str(paths[0].parent), **arguments)

    return build


@functools.lru_cache(maxsize=None)
def _pose_network(module: types.ModuleType, class_name: str, path: Path) -> Any:
    """One loaded Body, Hand or Face per file, shared by the four openpose variants (the body network alone is 200 MB)."""
    return getattr(module, class_name)(str(path))


def _openpose(hand: bool, face: bool) -> Builder:
    """Only the pose networks this variant draws (``from_pretrained`` would want all three files)."""

    def build(module, paths):
        body_path, *rest = paths
        hand_model = _pose_network(module, "Hand", rest.pop(0)) if hand else None
        face_model = _pose_network(module, "Face", rest.pop(0)) if face else None
        return module.OpenposeDetector(_pose_network(module, "Body", body_path), hand_model, face_model)

    return build


def _leres(module, paths):
    """The depth network only: the pix2pix "boost" network (and its file) serves depth_leres++ alone."""
    checkpoint = torch.load(paths[0], map_location="cpu", weights_only=True)
    model = module.RelDepthModel(backbone="resnext101")
    model.load_state_dict(module.strip_prefix_if_present(checkpoint["depth_model"], "module."), strict=True)
    return module.LeresDetector(model.eval(), None)


def _standard_call(**options: Any) -> Call:
    def call(detector, image, resolution, a, b):
        return detector(image, detect_resolution=resolution, image_resolution=resolution, output_type="np", **options)

    return call


def _mlsd_call(detector, image, resolution, a, b):
    return detector(image, thr_v=a, thr_d=b, detect_resolution=resolution, image_resolution=resolution, output_type="np")


def _teed_call(detector, image, resolution, a, b):
    return detector(image, detect_resolution=resolution, safe_steps=int(a), output_type="np")


def _anyline_call(detector, image, resolution, a, b):
    return detector(image, detect_resolution=resolution, output_type="np")


def _leres_call(detector, image, resolution, a, b):
    return detector(image, thr_a=a, thr_b=b, detect_resolution=resolution, image_resolution=resolution, output_type="np")


def _openpose_call(hand: bool, face: bool) -> Call:
    return _standard_call(include_body=True, include_hand=hand, include_face=face)


_detectors: dict[tuple, Detector] = {}
_detectors_lock = threading.Lock()


@on_compute_thread
def _run_network(spec: Preprocessor, image: np.ndarray, resolution: int, a: float, b: float, annotators: Path) -> np.ndarray:
    """Build the detector on first use (then keep it) and run it. Detectors are torch models: the compute thread runs them."""
    network = spec.network
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        raise ModelError("annotator weights are pickles; refusing to load them while TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set")
    paths = [find_weight(annotators, file) for file in spec.weights]
    if any(path is None for path in paths):
        raise ValidationError("module", why_unavailable(spec.name, annotators.parent) or f"{spec.name}: weights missing")
    key = (network.submodule, network.build, tuple(str(path) for path in paths))
    with _detectors_lock:
        detector = _detectors.get(key)
        if detector is None:
            module = aux_module(network.submodule, network.borrows_torchvision)
            try:
                # torch >= 2.6 loads these .pth files with weights_only=True: tensors only, no code.
                detector = network.build(module, paths)
            except Exception as error:
                files = ", ".join(str(path) for path in paths)
                raise ModelError(f"could not load the {spec.name} annotator from {files}: {type(error).__name__}: {error}") from error
            _detectors[key] = detector
    with torch.inference_mode():
        result = to_rgb_array(np.asarray(network.call(detector, image, resolution, a, b)))
    return _undo_multiple_of_64(result, resize_short_side(image, resolution).shape[:2])


def _undo_multiple_of_64(result: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """controlnet_aux stretches each side to a multiple of 64 (96×64 comes back 128×64); stretch the map back so it
    lies on the picture again. Two-level maps (scribbles, lines) stay two-level."""
    height, width = size
    if result.shape[:2] == (height, width):
        return result
    two_level = len(np.unique(result)) <= 2
    shrinking = width * height < result.shape[0] * result.shape[1]
    interpolation = cv2.INTER_NEAREST if two_level else cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    return cv2.resize(result, (width, height), interpolation=interpolation)


# --- the table ------------------------------------------------------------------------

_NO_RES = False
_MADE_ELSEWHERE = "make the map in another tool and use it as the control image with preprocessor \"none\""
_TIMM = ("its network is built by timm, and timm's PyPI release requires torchvision, "
         "whose PyPI wheel replaces Sfumato's CPU torch")
# One builder per weights file, so variants of a detector (safe, scribble) share one loaded network.
_HED_BUILD = _from_pretrained("HEDdetector", "filename")
_PIDI_BUILD = _from_pretrained("PidiNetDetector", "filename")
_LINEART = ("sk_model.pth", "sk_model2.pth")  # controlnet_aux's LineartDetector loads the fine and the coarse network together
_LINEART_BUILD = _from_pretrained("LineartDetector", "filename", "coarse_filename")


def _pidi(**options: Any) -> Network:
    return Network(submodule="pidi", build=_PIDI_BUILD, call=_standard_call(**options))


def _hed(**options: Any) -> Network:
    return Network(submodule="hed", build=_HED_BUILD, call=_standard_call(**options))


def _lineart(coarse: bool) -> Network:
    return Network(submodule="lineart", build=_LINEART_BUILD, call=_standard_call(coarse=coarse))


def _pose(hand: bool, face: bool) -> Network:
    return Network(submodule="open_pose", build=_openpose(hand, face), call=_openpose_call(hand, face), borrows_torchvision=True)


PREPROCESSORS: dict[str, Preprocessor] = {p.name: p for p in (
    Preprocessor("none", _none, _NO_RES),
    Preprocessor("invert (from white bg & black line)", _invert, _NO_RES, aliases=("invert",), tag="lineart"),
    Preprocessor("canny", _canny, threshold_a=Param("Low Threshold", 100, 1, 255), threshold_b=Param("High Threshold", 200, 1, 255),
                 tag="canny"),
    Preprocessor("threshold", _threshold, threshold_a=Param("Binarization Threshold", 127, 0, 255), tag="scribble"),
    Preprocessor("binary", _binary, threshold_a=Param("Binary Threshold (0 = automatic)", 0, 0, 255), tag="scribble"),
    Preprocessor("scribble_xdog", _scribble_xdog, threshold_a=Param("XDoG Threshold", 32, 1, 64), tag="scribble"),
    Preprocessor("shuffle", _shuffle, tag="shuffle"),
    Preprocessor("tile_resample", _tile_resample, _NO_RES, threshold_a=Param("Down Sampling Rate", 1.0, 1.0, 8.0, 0.01), tag="tile"),
    Preprocessor("blur_gaussian", _blur_gaussian, threshold_a=Param("Sigma", 9.0, 0.01, 64.0, 0.01), tag="tile"),
    Preprocessor("t2ia_color_grid", _color_grid, aliases=("color", "color_grid"), tag="color"),
    Preprocessor("recolor_luminance", _luminance, _NO_RES, threshold_a=Param("Gamma Correction", 1.0, 0.1, 2.0, 0.001), tag="recolor"),
    Preprocessor("recolor_intensity", _intensity, _NO_RES, threshold_a=Param("Gamma Correction", 1.0, 0.1, 2.0, 0.001), tag="recolor"),
    Preprocessor("lineart_standard (from white bg & black line)", _lineart_standard, aliases=("lineart_standard",), tag="lineart"),
    # Networks from controlnet_aux: weights in <models_dir>/annotators (flat, or in sd-webui-controlnet's subfolders).
    Preprocessor("lineart_realistic", network=_lineart(coarse=False), weights=_LINEART, requires=("einops",), aliases=("lineart",),
                 tag="lineart"),
    Preprocessor("lineart_coarse", network=_lineart(coarse=True), weights=_LINEART, requires=("einops",), tag="lineart"),
    Preprocessor("lineart_anime", network=Network(submodule="lineart_anime", build=_from_pretrained("LineartAnimeDetector", "filename"),
                                                  call=_standard_call()),
                 weights=("netG.pth",), requires=("einops",), tag="lineart"),
    Preprocessor("softedge_hed", network=_hed(), weights=("ControlNetHED.pth",), requires=("einops",), aliases=("hed",), tag="softedge"),
    Preprocessor("softedge_hedsafe", network=_hed(safe=True), weights=("ControlNetHED.pth",), requires=("einops",), aliases=("hed_safe",),
                 tag="softedge"),
    Preprocessor("scribble_hed", network=_hed(scribble=True), weights=("ControlNetHED.pth",), requires=("einops",),
                 aliases=("fake_scribble",), tag="scribble"),
    Preprocessor("softedge_pidinet", network=_pidi(), weights=("table5_pidinet.pth",), requires=("einops",), aliases=("pidinet",),
                 tag="softedge"),
    Preprocessor("softedge_pidisafe", network=_pidi(safe=True), weights=("table5_pidinet.pth",), requires=("einops",),
                 aliases=("pidinet_safe",), tag="softedge"),
    Preprocessor("scribble_pidinet", network=_pidi(scribble=True), weights=("table5_pidinet.pth",), requires=("einops",),
                 aliases=("pidinet_scribble",), tag="scribble"),
    Preprocessor("softedge_teed", network=Network(submodule="teed", build=_from_pretrained("TEEDdetector", "filename"), call=_teed_call),
                 weights=("7_model.pth",), threshold_a=Param("Safe Steps", 2, 0, 10), requires=("einops",), aliases=("teed",),
                 tag="softedge"),
    Preprocessor("softedge_anyline", network=Network(submodule="anyline", build=_from_pretrained("AnylineDetector", "filename"),
                                                     call=_anyline_call),
                 weights=("MTEED.pth",), requires=("einops", "skimage"), aliases=("anyline",), tag="lineart"),
    Preprocessor("mlsd", network=Network(submodule="mlsd", build=_from_pretrained("MLSDdetector", "filename"), call=_mlsd_call),
                 weights=("mlsd_large_512_fp32.pth",), threshold_a=Param("MLSD Value Threshold", 0.1, 0.01, 2.0, 0.01),
                 threshold_b=Param("MLSD Distance Threshold", 0.1, 0.01, 20.0, 0.01), tag="mlsd"),
    Preprocessor("depth_leres", network=Network(submodule="leres", build=_leres, call=_leres_call, borrows_torchvision=True),
                 weights=("res101.pth",), threshold_a=Param("Remove Near %", 0, 0, 100, 0.1),
                 threshold_b=Param("Remove Background %", 0, 0, 100, 0.1), tag="depth"),
    Preprocessor("normal_bae", network=Network(submodule="normalbae", build=_from_pretrained("NormalBaeDetector", "filename"),
                                               call=_standard_call(), borrows_torchvision=True),
                 weights=("scannet.pt",), requires=("einops",), tag="normal"),
    Preprocessor("openpose", network=_pose(hand=False, face=False), weights=("body_pose_model.pth",), requires=("skimage",),
                 tag="openpose"),
    Preprocessor("openpose_face", network=_pose(hand=False, face=True), weights=("body_pose_model.pth", "facenet.pth"),
                 requires=("skimage",), tag="openpose"),
    Preprocessor("openpose_hand", network=_pose(hand=True, face=False), weights=("body_pose_model.pth", "hand_pose_model.pth"),
                 requires=("skimage",), tag="openpose"),
    Preprocessor("openpose_full", network=_pose(hand=True, face=True),
                 weights=("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"), requires=("skimage",), tag="openpose"),
    # Never runnable in this build: the reason, and what the artist can do instead.
    Preprocessor("depth_midas", unavailable=f"DPT-Hybrid: {_TIMM}", fix=_MADE_ELSEWHERE, aliases=("depth",), tag="depth"),
    Preprocessor("depth_zoe", unavailable=f"ZoeDepth: {_TIMM}", fix=_MADE_ELSEWHERE, tag="depth"),
    Preprocessor("dw_openpose_full", unavailable="controlnet_aux 0.0.10 runs DWPose on mmpose, mmdet and mmcv, which need their own "
                 "torch builds", fix="use openpose_full (body_pose_model.pth, hand_pose_model.pth and facenet.pth in models/annotators)",
                 tag="openpose"),
    Preprocessor("mediapipe_face", threshold_a=Param("Max Faces", 1, 1, 10),
                 threshold_b=Param("Min Face Confidence", 0.5, 0.01, 1.0, 0.01),
                 unavailable="the mediapipe package pulls opencv-contrib-python, which would overwrite the OpenCV Sfumato uses",
                 fix=f"use openpose_face (body_pose_model.pth and facenet.pth in models/annotators), or {_MADE_ELSEWHERE}", tag="face"),
    Preprocessor("seg_ofade20k", unavailable="controlnet_aux 0.0.10 has no OneFormer segmenter", fix=_MADE_ELSEWHERE,
                 aliases=("oneformer_ade20k",), tag="seg"),
    Preprocessor("seg_ofcoco", unavailable="controlnet_aux 0.0.10 has no OneFormer segmenter", fix=_MADE_ELSEWHERE,
                 aliases=("oneformer_coco",), tag="seg"),
    Preprocessor("seg_ufade20k", unavailable="controlnet_aux 0.0.10 has no UniFormer segmenter", fix=_MADE_ELSEWHERE,
                 aliases=("segmentation",), tag="seg"),
)}

ALIASES: dict[str, str] = {alias.casefold(): p.name for p in PREPROCESSORS.values() for alias in (p.name, *p.aliases)}


# --- lookups ---------------------------------------------------------------------------

def canonical_name(name: Any, field: str = "module") -> str:
    """The table name for a name or alias, any case (``invert`` → ``invert (from white bg & black line)``)."""
    if name is None or (isinstance(name, str) and name.strip() == ""):
        return "none"
    if isinstance(name, str):
        found = ALIASES.get(name.strip().casefold())
        if found:
            return found
    raise ValidationError(field, f"unknown preprocessor {name!r}; known: {', '.join(PREPROCESSORS)}")


def get(name: str) -> Preprocessor:
    return PREPROCESSORS[canonical_name(name)]


def annotators_dir(models_dir: Path | None) -> Path:
    return (Path(models_dir) if models_dir else REPO_ROOT / "models") / ANNOTATORS_SUBDIR


@dataclass(frozen=True, kw_only=True)
class Unavailable:
    """Why a preprocessor cannot run here, and what would make it run."""

    name: str
    reason: str
    fix: str
    missing_weights: tuple[str, ...] = ()  # set when placing these files is all it takes

    @property
    def sentence(self) -> str:
        return f"{self.name} is unavailable: {self.reason}. Fix: {self.fix}."


def availability(name: str, models_dir: Path | None) -> Unavailable | None:
    """None when the preprocessor can run now; else the reason and the fix (checked against packages and files, runs nothing)."""
    spec = get(name)
    if spec.unavailable:
        return Unavailable(name=spec.name, reason=spec.unavailable, fix=spec.fix)
    missing_packages = [package for package in spec.requires if importlib.util.find_spec(package) is None]
    if spec.network and importlib.util.find_spec("controlnet_aux") is None:
        missing_packages.insert(0, "controlnet_aux")
    if missing_packages:
        install = " ".join(_PIP_NAMES.get(package, package) for package in missing_packages)
        return Unavailable(name=spec.name, reason=f"the Python package(s) {', '.join(missing_packages)} are not installed",
                           fix=f"pip install {install}")
    folder = annotators_dir(models_dir)
    missing = [file for file in spec.weights if find_weight(folder, file) is None]
    if missing:
        by_source: dict[str, list[str]] = {}
        for file in missing:
            by_source.setdefault(WEIGHTS[file].source, []).append(file)
        downloads = "; ".join(f"{_listed(files)} from Hugging Face {source}" for source, files in by_source.items())
        files = f"file {missing[0]} is" if len(missing) == 1 else f"files {_listed(missing)} are"
        return Unavailable(name=spec.name, reason=f"its weight {files} not in {folder}", missing_weights=tuple(missing),
                           fix=f"download {downloads}, and put {'it' if len(missing) == 1 else 'them'} in {folder} "
                               "(Sfumato never downloads)")
    return None


def _listed(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


_PIP_NAMES = {"skimage": "scikit-image", "controlnet_aux": "--no-deps controlnet-aux==0.0.10"}


def why_unavailable(name: str, models_dir: Path | None) -> str | None:
    """None when the preprocessor can run now; else one sentence: what is missing, and the fix."""
    problem = availability(name, models_dir)
    return problem.sentence if problem else None


def param_value(param: Param | None, value: float | None) -> float:
    """A slider's value, ``-1``/None meaning its default."""
    if param is None:
        return 0.0
    if value is None or value == -1:
        return float(param.default)
    return float(value)


def preprocess(name: str, image: Image.Image | np.ndarray, resolution: int = DEFAULT_RESOLUTION, threshold_a: float | None = -1,
               threshold_b: float | None = -1, models_dir: Path | None = None) -> Image.Image:
    """Run a preprocessor and return its map as an RGB image.

    Raises ValidationError naming ``module`` when the preprocessor cannot run
    here (the message says what to install or where to put which file).
    """
    spec = get(name)
    reason = why_unavailable(spec.name, models_dir)
    if reason:
        raise ValidationError("module", reason)
    if resolution is None or resolution == -1:
        resolution = DEFAULT_RESOLUTION
    low, high = RESOLUTION_RANGE
    if not low <= int(resolution) <= high:
        raise ValidationError("processor_res", f"must be between {low} and {high}, got {resolution}")
    rgb = to_rgb_array(image)
    a, b = param_value(spec.threshold_a, threshold_a), param_value(spec.threshold_b, threshold_b)
    try:
        if spec.network:
            result = _run_network(spec, rgb, int(resolution), a, b, annotators_dir(models_dir))
        else:
            result = spec.run(rgb, int(resolution), a, b, annotators_dir(models_dir))
    except SfumatoError:
        raise
    except Exception as error:
        raise ModelError(f"preprocessor {spec.name} failed: {type(error).__name__}: {error}") from error
    return Image.fromarray(to_rgb_array(result), "RGB")
