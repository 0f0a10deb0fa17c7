"""Helpers for the HTTP API and server tests: a Studio on tiny models and a real server on 127.0.0.1."""
from __future__ import annotations

import base64
import io
import os
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch
from PIL import Image

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
MODEL = "tiny"  # named as A1111 names models: a folder's name, a checkpoint file's stem
INPAINT_MODEL = "tiny-inpaint"
OTHER_MODEL = "tiny-other"
CHECKPOINTS = "Stable-diffusion"
CONTROLNET = "tiny-cn"


def build_models(root: Path) -> Path:
    """models/ with two tiny SD 1.x, a tiny inpainting model and a tiny ControlNet (A1111 layout)."""
    from engine.tiny_models import build_sd1

    build_sd1(root / CHECKPOINTS / MODEL, seed=0)
    build_sd1(root / CHECKPOINTS / INPAINT_MODEL, seed=1, in_channels=9)
    build_sd1(root / CHECKPOINTS / OTHER_MODEL, seed=2)
    build_controlnet(root / CHECKPOINTS / MODEL, root / "ControlNet" / CONTROLNET)
    return root


def build_controlnet(base_model: Path, folder: Path) -> Path:
    """A tiny random ControlNet from the tiny UNet. Its zero convolutions get random weights so it has an effect."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(3)
    unet = UNet2DConditionModel.from_pretrained(base_model / "unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 16))
    zero_initialised = [controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block, controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for module in zero_initialised:
            for parameter in module.parameters():
                parameter.normal_(0.0, 0.2)
    controlnet.save_pretrained(folder, safe_serialization=True)
    return folder


def make_studio(tmp: Path, models_dir: Path):
    from engine.studio import Studio, StudioConfig

    config = StudioConfig(
        models_dir=models_dir, outputs_dir=tmp / "outputs", user_dir=tmp / "user", extensions_dir=REPO / "extensions",
        presets_dir=REPO / "presets", builtin_models_dir=None, device="cpu", dtype="float32",
    )
    studio = Studio(config)
    studio.update_settings(replace(studio.settings, default_model=MODEL))
    _extensions_look_in(studio, models_dir)
    return studio


def _extensions_look_in(studio, models_dir: Path) -> None:
    """Extensions (ControlNet) must find their models in the test's models folder.

    Studio does not pass its models_dir to the ExtensionManager yet; until it
    does, swap in a manager that gets it, through the public constructors only.
    """
    from engine.extensions import ExtensionManager

    if Path(studio.extensions.models_dir).resolve() == Path(models_dir).resolve():
        return
    studio.extensions = ExtensionManager(studio.config.extensions_dir, studio.config.user_dir / "extensions.json",
                                         models_dir=models_dir, builtin_dir=None)
    studio.engine.extensions = studio.extensions


@contextmanager
def running_server(studio, **options):
    """A real server on 127.0.0.1 and a free port; stopped on exit."""
    from ui.server import serve

    options.setdefault("ui_builder", False)
    handle = serve(studio, host="127.0.0.1", port=0, block=False, **options)
    try:
        yield handle
    finally:
        handle.stop()


def controlnet_available(studio) -> bool:
    manager = getattr(studio, "extensions", None)
    loaded = getattr(manager, "loaded", None)
    loaded = loaded() if callable(loaded) else loaded
    return bool(loaded) and "controlnet" in loaded


# --- images -----------------------------------------------------------------------

def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_b64(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def gradient(width: int = 64, height: int = 64) -> Image.Image:
    image = Image.new("RGB", (width, height))
    image.putdata([(x * 4 % 256, y * 4 % 256, (x + y) * 2 % 256) for y in range(height) for x in range(width)])
    return image


def centre_mask(width: int = 64, height: int = 64) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return mask


# --- OpenAPI -----------------------------------------------------------------------

def response_schema(openapi: dict, path: str, method: str, status: int) -> dict:
    """The JSON schema the server publishes for one response, with its components so $refs resolve."""
    responses = openapi["paths"][path][method.lower()]["responses"]
    schema = responses[str(status)]["content"]["application/json"]["schema"]
    return {**schema, "components": openapi["components"]}


def check_against_schema(instance, schema: dict) -> None:
    """Validate with jsonschema when installed, else with a small checker of types and required properties."""
    try:
        import jsonschema
    except ImportError:
        _mini_check(instance, schema, schema, "$")
        return
    jsonschema.Draft202012Validator(schema).validate(instance)


_JSON_TYPES = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float), "boolean": bool, "null": type(None)}


def _mini_check(value, schema: dict, root: dict, where: str) -> None:
    if "$ref" in schema:
        node = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        _mini_check(value, node, root, where)
        return
    if "anyOf" in schema:
        errors = []
        for option in schema["anyOf"]:
            try:
                _mini_check(value, option, root, where)
                return
            except AssertionError as error:
                errors.append(str(error))
        raise AssertionError(f"{where}: matches none of {errors}")
    kind = schema.get("type")
    if kind:
        python = _JSON_TYPES[kind]
        assert isinstance(value, python) and not (kind in ("integer", "number") and isinstance(value, bool)), f"{where}: {value!r} is not {kind}"
    if kind == "object":
        for name in schema.get("required", []):
            assert name in value, f"{where}: missing required {name!r}"
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                _mini_check(value[name], sub, root, f"{where}.{name}")
    if kind == "array" and "items" in schema:
        for index, item in enumerate(value):
            _mini_check(item, schema["items"], root, f"{where}[{index}]")
