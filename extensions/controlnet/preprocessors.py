"""ControlNet preprocessors: one table from name to what it needs and the function that runs it.

Names and parameters follow sd-webui-controlnet (``scripts/preprocessor/*``,
``preprocessor_compiled.py``) so API clients and infotext from A1111 work:
``threshold_a``/``threshold_b`` are its "slider 1"/"slider 2", ``-1`` meaning
the preprocessor's default. Every function takes and returns an RGB ``uint8``
HxWx3 array; the map comes back at the processing resolution (short side =
``resolution``) or, for those without a resolution, at the input size.

Weight-free preprocessors run anywhere. Those that need a network come from
``controlnet_aux`` and stay unavailable, with a message naming the exact file to
put where, until their weights are in ``<models_dir>/annotators`` (the flat
folder ``controlnet_aux``'s ``from_pretrained(local_dir)`` reads). Nothing is
ever downloaded.
"""
from __future__ import annotations

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
from PIL import Image

from engine.compute import on_compute_thread
from engine.errors import ModelError, SfumatoError, ValidationError
from engine.models import REPO_ROOT

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
    run: Runner | None
    resolution: bool = True  # shows a processor-resolution slider
    threshold_a: Param | None = None
    threshold_b: Param | None = None
    weights: tuple[str, ...] = ()  # files it reads from <models_dir>/annotators
    requires: tuple[str, ...] = ()  # Python packages it imports
    unavailable: str | None = None  # why it can never run in this build
    aliases: tuple[str, ...] = ()
    tag: str = ""  # the kind of ControlNet it feeds (canny, depth, ...), for model suggestions

    @property
    def needs_weights(self) -> bool:
        return bool(self.weights)


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


def aux_module(submodule: str) -> types.ModuleType:
    """Import ``controlnet_aux.<submodule>`` without running ``controlnet_aux/__init__.py``.

    That ``__init__`` imports every detector, and some need torchvision, so
    ``import controlnet_aux.canny`` fails here. We register the package folder
    under a private name and import the submodule from it; its relative
    imports (``from ..util import ...``) resolve inside the private name.
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
    return importlib.import_module(f"{_AUX_PACKAGE}.{submodule}")


def _lineart_standard(image, resolution, a, b, annotators):
    """controlnet_aux ``LineartStandardDetector``: dark strokes on light paper → white lines (no weights)."""
    detector = aux_module("lineart_standard").LineartStandardDetector()
    image = resize_short_side(image, resolution)
    return to_rgb_array(detector(image, detect_resolution=min(image.shape[:2]), output_type="np"))


_detectors: dict[tuple, Any] = {}
_detectors_lock = threading.Lock()


def _aux_detector(submodule: str, class_name: str, call: Callable[[Any, np.ndarray, int, float, float], Any],
                  **from_pretrained: Any) -> Runner:
    """A runner for a controlnet_aux detector with weights in the annotators folder (loaded once, then cached).
    Detectors are torch models, so they run on the engine's compute thread."""

    @on_compute_thread
    def run(image, resolution, a, b, annotators: Path):
        if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
            raise ModelError("annotator weights are pickles; refusing to load them while TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set")
        key = (submodule, class_name, str(annotators), tuple(sorted(from_pretrained.items())))
        with _detectors_lock:
            detector = _detectors.get(key)
            if detector is None:
                cls = getattr(aux_module(submodule), class_name)
                try:
                    # torch >= 2.6 loads these .pth files with weights_only=True: tensors only, no code.
                    detector = cls.from_pretrained(str(annotators), **from_pretrained)
                except Exception as error:
                    raise ModelError(f"could not load the {submodule} annotator from {annotators}: {type(error).__name__}: {error}") from error
                _detectors[key] = detector
        result = call(detector, image, resolution, a, b)
        return to_rgb_array(np.asarray(result))

    return run


def _standard_call(**options: Any):
    def call(detector, image, resolution, a, b):
        return detector(image, detect_resolution=resolution, image_resolution=resolution, output_type="np", **options)

    return call


def _mlsd_call(detector, image, resolution, a, b):
    return detector(image, thr_v=a, thr_d=b, detect_resolution=resolution, image_resolution=resolution, output_type="np")


def _teed_call(detector, image, resolution, a, b):
    return detector(image, detect_resolution=resolution, safe_steps=int(a), output_type="np")


def _anyline_call(detector, image, resolution, a, b):
    return detector(image, detect_resolution=resolution, output_type="np")


# --- the table ------------------------------------------------------------------------

_RES = True
_NO_RES = False
_TORCHVISION = "controlnet_aux's version of this detector imports torchvision, which Sfumato does not install (it would replace the CPU torch build)"

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
    # Networks from controlnet_aux: weights in <models_dir>/annotators.
    Preprocessor("lineart_realistic", _aux_detector("lineart", "LineartDetector", _standard_call(coarse=False)),
                 weights=("sk_model.pth", "sk_model2.pth"), requires=("einops",), aliases=("lineart",), tag="lineart"),
    Preprocessor("lineart_coarse", _aux_detector("lineart", "LineartDetector", _standard_call(coarse=True)),
                 weights=("sk_model.pth", "sk_model2.pth"), requires=("einops",), tag="lineart"),
    Preprocessor("lineart_anime", _aux_detector("lineart_anime", "LineartAnimeDetector", _standard_call()),
                 weights=("netG.pth",), requires=("einops",), tag="lineart"),
    Preprocessor("softedge_hed", _aux_detector("hed", "HEDdetector", _standard_call()), weights=("ControlNetHED.pth",),
                 requires=("einops",), aliases=("hed",), tag="softedge"),
    Preprocessor("softedge_hedsafe", _aux_detector("hed", "HEDdetector", _standard_call(safe=True)), weights=("ControlNetHED.pth",),
                 requires=("einops",), aliases=("hed_safe",), tag="softedge"),
    Preprocessor("scribble_hed", _aux_detector("hed", "HEDdetector", _standard_call(scribble=True)), weights=("ControlNetHED.pth",),
                 requires=("einops",), aliases=("fake_scribble",), tag="scribble"),
    Preprocessor("softedge_pidinet", _aux_detector("pidi", "PidiNetDetector", _standard_call()), weights=("table5_pidinet.pth",),
                 requires=("einops",), aliases=("pidinet",), tag="softedge"),
    Preprocessor("softedge_pidisafe", _aux_detector("pidi", "PidiNetDetector", _standard_call(safe=True)), weights=("table5_pidinet.pth",),
                 requires=("einops",), aliases=("pidinet_safe",), tag="softedge"),
    Preprocessor("scribble_pidinet", _aux_detector("pidi", "PidiNetDetector", _standard_call(scribble=True)),
                 weights=("table5_pidinet.pth",), requires=("einops",), aliases=("pidinet_scribble",), tag="scribble"),
    Preprocessor("softedge_teed", _aux_detector("teed", "TEEDdetector", _teed_call, filename="7_model.pth"), weights=("7_model.pth",),
                 threshold_a=Param("Safe Steps", 2, 0, 10), requires=("einops",), aliases=("teed",), tag="softedge"),
    Preprocessor("softedge_anyline", _aux_detector("anyline", "AnylineDetector", _anyline_call, filename="MTEED.pth"),
                 weights=("MTEED.pth",), requires=("einops", "skimage"), aliases=("anyline",), tag="lineart"),
    Preprocessor("mlsd", _aux_detector("mlsd", "MLSDdetector", _mlsd_call), weights=("mlsd_large_512_fp32.pth",),
                 threshold_a=Param("MLSD Value Threshold", 0.1, 0.01, 2.0, 0.01),
                 threshold_b=Param("MLSD Distance Threshold", 0.1, 0.01, 20.0, 0.01), tag="mlsd"),
    Preprocessor("depth_midas", None, weights=("dpt_hybrid-midas-501f0c75.pt",), requires=("torchvision", "timm"),
                 unavailable=_TORCHVISION, aliases=("depth",), tag="depth"),
    Preprocessor("depth_leres", None, weights=("res101.pth", "latest_net_G.pth"), requires=("torchvision",),
                 unavailable=_TORCHVISION, tag="depth"),
    Preprocessor("depth_zoe", None, weights=("ZoeD_M12_N.pt",), requires=("torchvision", "timm"), unavailable=_TORCHVISION, tag="depth"),
    Preprocessor("normal_bae", None, weights=("scannet.pt",), requires=("torchvision",), unavailable=_TORCHVISION, tag="normal"),
    Preprocessor("openpose", None, weights=("body_pose_model.pth",), requires=("torchvision",), unavailable=_TORCHVISION, tag="openpose"),
    Preprocessor("openpose_face", None, weights=("body_pose_model.pth", "facenet.pth"), requires=("torchvision",),
                 unavailable=_TORCHVISION, tag="openpose"),
    Preprocessor("openpose_hand", None, weights=("body_pose_model.pth", "hand_pose_model.pth"), requires=("torchvision",),
                 unavailable=_TORCHVISION, tag="openpose"),
    Preprocessor("openpose_full", None, weights=("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"),
                 requires=("torchvision",), unavailable=_TORCHVISION, tag="openpose"),
    Preprocessor("dw_openpose_full", None, requires=("onnxruntime",),
                 unavailable="DWPose needs onnxruntime (or mmpose) and its ONNX models, which Sfumato does not install", tag="openpose"),
    Preprocessor("mediapipe_face", None, _RES, threshold_a=Param("Max Faces", 1, 1, 10), threshold_b=Param("Min Face Confidence", 0.5, 0.01, 1.0, 0.01),
                 requires=("mediapipe",), unavailable="needs the mediapipe package, which Sfumato does not install", tag="face"),
    Preprocessor("seg_ofade20k", None, unavailable="controlnet_aux 0.0.10 has no OneFormer segmenter", aliases=("oneformer_ade20k",), tag="seg"),
    Preprocessor("seg_ofcoco", None, unavailable="controlnet_aux 0.0.10 has no OneFormer segmenter", aliases=("oneformer_coco",), tag="seg"),
    Preprocessor("seg_ufade20k", None, unavailable="controlnet_aux 0.0.10 has no UniFormer segmenter", aliases=("segmentation",), tag="seg"),
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


def why_unavailable(name: str, models_dir: Path | None) -> str | None:
    """None when the preprocessor can run now; else what is missing, and where to put it."""
    spec = get(name)
    if spec.unavailable:
        return f"{spec.name}: {spec.unavailable}"
    missing_packages = [package for package in spec.requires if importlib.util.find_spec(package) is None]
    if missing_packages:
        return f"{spec.name} needs the Python package(s) {', '.join(missing_packages)}"
    folder = annotators_dir(models_dir)
    missing = [weight for weight in spec.weights if not (folder / weight).is_file()]
    if missing:
        return (f"{spec.name} needs its weights: put {', '.join(missing)} in {folder} "
                "(from the lllyasviel/Annotators collection; Sfumato never downloads)")
    return None


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
    try:
        result = spec.run(rgb, int(resolution), param_value(spec.threshold_a, threshold_a), param_value(spec.threshold_b, threshold_b),
                          annotators_dir(models_dir))
    except SfumatoError:
        raise
    except Exception as error:
        raise ModelError(f"preprocessor {spec.name} failed: {type(error).__name__}: {error}") from error
    return Image.fromarray(to_rgb_array(result), "RGB")
