"""Model upscaler files and the Extras upscale, on tiny random-weight ESRGAN and Compact files.

The ESRGAN reference below is the published RRDBNet forward pass written out in torch from the state dict (no
spandrel), so a wrong detection, channel order or rounding shows up as different pixels."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from _upscaler_files import esrgan_state, write_upscalers

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
ESRGAN, LEGACY, COMPACT = "4x-tiny-esrgan", "2x-legacy-esrgan", "2x-tiny-compact"
# Tiled and whole runs differ where a tile's zero-padded border leaks into the blend; measured on a 130×100
# image with 48-pixel tiles: max 0.0003 (ESRGAN) and 0.004 (Compact) in [0, 1] units, i.e. at most one 8-bit level.
TILED_TOLERANCE = 2 / 255


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("upscalers") / "models"
    write_upscalers(root)
    broken = root / "ESRGAN"
    (broken / "truncated.pth").write_bytes((root / "ESRGAN" / f"{ESRGAN}.pth").read_bytes()[:2000])
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(2, 2)}, str(broken / "not-an-upscaler.safetensors"))
    # the names spandrel knows GFPGAN (a face restorer) and LaMa (an inpainter) by, on placeholder tensors
    save_file({"toRGB.0.weight": torch.zeros(1), "stylegan_decoder.style_mlp.1.weight": torch.zeros(1)},
              str(broken / "face.safetensors"))
    save_file({"generator.model.1.bn_l.running_mean": torch.zeros(1)}, str(broken / "inpaint.safetensors"))
    torch.save(_Trap(), broken / "code.pth")
    misshapen = esrgan_state()
    misshapen["model.0.weight"] = misshapen["model.0.weight"][:, :, :2, :2].contiguous()  # ESRGAN's keys, wrong shapes
    save_file(misshapen, str(root / "upscale_models" / "4x-misshapen.safetensors"))
    return root


class _Trap:
    """Unpickling this would create a marker file: the safe loader must refuse before running it."""

    def __reduce__(self):
        return (Path.touch, (Path(__file__).resolve().parent / "_upscaler_trap_ran",))


@pytest.fixture(scope="module")
def library(models_dir):
    from engine.upscalers.library import UpscalerLibrary

    return UpscalerLibrary(models_dir, torch.device("cpu"), torch.float32)


def picture(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def png_bytes(image: Image.Image, infotext: str | None = None, workflow: str | None = None) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    if workflow:
        info.add_text("workflow", workflow)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def esrgan_reference(state: dict, x: torch.Tensor, blocks: int = 1, scale: int = 4) -> torch.Tensor:
    """RRDBNet (Wang et al. 2018): dense blocks with LeakyReLU(0.2) and 0.2 residual scaling, nearest ×2 upsampling."""
    def conv(value, key):
        return F.conv2d(value, state[f"{key}.weight"], state[f"{key}.bias"], padding=1)

    def lrelu(value):
        return F.leaky_relu(value, 0.2)

    features = conv(x, "model.0")
    trunk = features
    for block in range(blocks):
        block_in = trunk
        for rdb in (1, 2, 3):
            parts = [trunk]
            for index in range(1, 5):
                parts.append(lrelu(conv(torch.cat(parts, 1), f"model.1.sub.{block}.RDB{rdb}.conv{index}.0")))
            trunk = conv(torch.cat(parts, 1), f"model.1.sub.{block}.RDB{rdb}.conv5.0") * 0.2 + trunk
        trunk = trunk * 0.2 + block_in
    features = features + conv(trunk, f"model.1.sub.{blocks}")
    doublings = {2: 1, 4: 2}[scale]
    for step in range(doublings):  # [Upsample, conv, LeakyReLU] at model.2-4, model.5-7
        features = lrelu(conv(F.interpolate(features, scale_factor=2, mode="nearest"), f"model.{3 + 3 * step}"))
    return conv(lrelu(conv(features, f"model.{3 * doublings + 2}")), f"model.{3 * doublings + 4}")


def test_files_are_found_in_both_folders_and_listed_after_the_resamplers(library):
    # A1111's folders, then ComfyUI's; within one, by path ("4x-misshapen" is not known broken until built)
    assert library.names() == ["None", "Lanczos", "Nearest", ESRGAN, LEGACY, "4x-misshapen", COMPACT]
    architectures = {file.name: file.architecture for file in library.files() if file.problem is None}
    assert architectures == {ESRGAN: "ESRGAN", LEGACY: "ESRGAN", COMPACT: "Compact", "4x-misshapen": "ESRGAN"}


def test_broken_files_are_listed_with_their_reason_and_refused_by_name(library):
    problems = {file.name: file.problem for file in library.files() if file.problem}
    assert set(problems) == {"truncated", "not-an-upscaler", "code", "face", "inpaint"}
    assert problems["face"].endswith("face.safetensors is a face restorer (GFPGAN), not an upscaler")
    assert problems["inpaint"].endswith("inpaint.safetensors is an inpainting model (LaMa), not an upscaler")
    assert "truncated.pth cannot be read" in problems["truncated"]
    assert "not-an-upscaler.safetensors is no architecture spandrel" in problems["not-an-upscaler"]
    assert "code.pth is a pickle holding more than weights" in problems["code"]
    assert not (Path(__file__).resolve().parent / "_upscaler_trap_ran").exists()
    from engine.errors import ValidationError

    with pytest.raises(ValidationError) as refused:
        library.find("truncated", "upscaler_1")
    assert refused.value.field == "upscaler_1" and "truncated.pth" in refused.value.message
    with pytest.raises(ValidationError) as unknown:
        library.find("4x-tiny-esrgn", "hr_upscaler")
    assert unknown.value.field == "hr_upscaler" and f"did you mean {ESRGAN}" in unknown.value.message
    with pytest.raises(ValidationError, match="Latent .bicubic. is a latent upscale mode"):
        library.find("Latent (bicubic)")


@pytest.mark.parametrize("name, scale, seed", [(ESRGAN, 4, 0), (LEGACY, 2, 2)])
def test_esrgan_runs_as_the_published_network_with_a1111s_bgr_and_rounding(library, name, scale, seed):
    image = picture()
    upscaler = library.find(name)
    assert upscaler.native_scale == scale
    out = np.asarray(upscaler.upscale_once(image), dtype=np.int16)
    bgr = torch.from_numpy(np.asarray(image, dtype=np.float32)[:, :, ::-1].copy() / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = esrgan_reference(esrgan_state(scale=scale, seed=seed), bgr, scale=scale)[0].clamp(0, 1).mul(255).round()
    expected = expected.numpy()[::-1].transpose(1, 2, 0)
    assert out.shape == (30 * scale, 40 * scale, 3)
    assert np.abs(out - expected).max() <= 1
    assert out.std() > 1  # the tiny model draws something, not a flat field


@pytest.mark.parametrize("name, scale", [(ESRGAN, 4), (COMPACT, 2)])
def test_tiled_and_whole_runs_agree(library, name, scale):
    from engine.upscalers.model_files import image_to_bgr, run_tiled

    descriptor = library.find(name).descriptor
    x = image_to_bgr(picture(130, 100, seed=3))
    with torch.no_grad():
        whole = descriptor(x)
    tiled = run_tiled(descriptor, x, scale, tile=48, overlap=8)
    assert tiled.shape == whole.shape == (1, 3, 100 * scale, 130 * scale)
    assert (tiled - whole).abs().max().item() <= TILED_TOLERANCE


def test_passes_repeat_until_the_target_then_lanczos_gives_the_exact_size(library, monkeypatch):
    from engine.upscalers.model_files import ModelUpscaler

    upscaler = library.find(COMPACT)
    calls = []
    original = ModelUpscaler.upscale_once
    monkeypatch.setattr(ModelUpscaler, "upscale_once", lambda self, image: calls.append(image.size) or original(self, image))
    assert upscaler.upscale(picture(10, 8), 37, 29).size == (37, 29)  # 2× twice reaches 40×32, then resized
    assert calls == [(10, 8), (20, 16)]
    calls.clear()
    assert upscaler.upscale(picture(10, 8), 160, 128).size == (160, 128)  # 16× wanted: A1111 stops after 3 passes
    assert calls == [(10, 8), (20, 16), (40, 32)]


def test_extras_sizes_follow_a1111(library):
    from engine.extras import ExtrasRequest, upscale_image

    image = picture(50, 37)
    by, _ = upscale_image(image, ExtrasRequest(upscaler_1=COMPACT, upscaling_resize=2.5), library)
    assert by.size == (50 * 25 // 10 // 8 * 8, int(37 * 2.5) // 8 * 8)  # (120, 88)
    to, text = upscale_image(image, ExtrasRequest(upscaler_1="Lanczos", resize_mode=1, upscaling_resize_w=100,
                                                  upscaling_resize_h=100), library)
    assert to.size == (100, 100)
    assert text == "Postprocess upscale to: 100x100, Postprocess crop to: 100x100, Postprocess upscaler: Lanczos"
    # max(100/50, 100/37) = 2.70…: 135×100 rounded down to 8s → 128×96, centred on the black 100×100 canvas
    uncropped, _ = upscale_image(image, ExtrasRequest(upscaler_1="Lanczos", resize_mode=1, upscaling_resize_w=100,
                                                      upscaling_resize_h=100, upscaling_crop=False), library)
    assert uncropped.size == (128, 96)
    assert np.asarray(to)[:2].max() == 0  # the 96-pixel-high picture leaves black rows at the top and bottom
    nothing, text = upscale_image(image, ExtrasRequest(upscaler_1="None"), library)
    assert nothing.size == image.size and text == ""


def test_upscaler_2_is_blended_in_by_its_visibility(library):
    from engine.extras import ExtrasRequest, upscale_image

    image = picture(24, 16)
    first, _ = upscale_image(image, ExtrasRequest(upscaler_1=ESRGAN), library)
    second, _ = upscale_image(image, ExtrasRequest(upscaler_1="Nearest"), library)
    mixed, text = upscale_image(image, ExtrasRequest(upscaler_1=ESRGAN, upscaler_2="Nearest",
                                                     extras_upscaler_2_visibility=0.3), library)
    a, b, m = (np.asarray(picture_, dtype=np.float64) for picture_ in (first, second, mixed))
    assert np.abs(m - (a * 0.7 + b * 0.3)).max() <= 1
    assert np.abs(a - b).mean() > 5  # the two differ, so the blend is a real test
    assert text == f"Postprocess upscale by: 2.0, Postprocess upscaler: {ESRGAN}, Postprocess upscaler 2: Nearest"


def test_the_source_infotext_is_kept_and_the_record_added(library, tmp_path):
    from engine.extras import ExtrasRequest, ExtrasSource, run_extras, save_extras
    from engine.image_metadata import read_generation_info
    from engine.outputs import OutputWriter

    source = "a lighthouse\nSteps: 20, Sampler: Euler, Seed: 1234, Size: 40x30"
    workflow = '{"nodes":[1,2]}'
    [result] = run_extras([ExtrasSource(png_bytes(picture(), source, workflow=workflow))], ExtrasRequest(upscaler_1=ESRGAN), library)
    record = f"Postprocess upscale by: 2.0, Postprocess upscaler: {ESRGAN}"
    path = save_extras(OutputWriter(tmp_path), result)
    assert path.relative_to(tmp_path).parts[0] == "extras" and path.name.endswith("-1234.png")
    saved = read_generation_info(path)
    assert saved.infotext == source
    assert saved.other_chunks == {"postprocessing": record, "extras": record}
    assert Image.open(path).text["workflow"] == workflow  # ComfyUI's graph kept byte for byte
    assert saved.size == (80, 56)


def test_the_registry_offers_the_library(models_dir):
    from engine.models import ModelRegistry

    registry = ModelRegistry(models_dir, builtin_dir=None, device="cpu")
    assert ESRGAN in registry.upscalers.names()
    (models_dir / "DAT").mkdir(exist_ok=True)
    (models_dir / "upscale_models" / "sub" / f"{COMPACT}.safetensors").rename(models_dir / "DAT" / "2x-moved.safetensors")
    try:
        registry.refresh()
        assert registry.upscalers.names()[3:] == [ESRGAN, LEGACY, "2x-moved", "4x-misshapen"]  # DAT comes before upscale_models
    finally:
        (models_dir / "DAT" / "2x-moved.safetensors").rename(models_dir / "upscale_models" / "sub" / f"{COMPACT}.safetensors")


def test_spandrel_imports_without_leaving_a_torchvision_behind():
    code = ("import sys\nfrom engine.upscalers.torchvision_stand_in import import_spandrel, normalize, rotate\n"
            "import torch\nspandrel = import_spandrel()\n"
            "from spandrel.architectures.RestoreFormer import tv_normalize\n"
            "x = torch.arange(12.).view(3, 2, 2)\n"
            "ok = torch.equal(tv_normalize(x, [1, 2, 3], [2, 4, 8]), (x - torch.tensor([1., 2, 3]).view(3, 1, 1)) / torch.tensor([2., 4, 8]).view(3, 1, 1))\n"
            "try:\n    rotate(x, 1.0)\n    raised = False\nexcept NotImplementedError:\n    raised = True\n"
            "print('torchvision' in sys.modules, ok, raised, len(spandrel.MAIN_REGISTRY) > 30)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "True", "True"]


@pytest.mark.parametrize("length", [193, 300, 383, 384, 385, 1000, 4097])
def test_tiles_cover_every_pixel_and_overlap_by_at_least_the_overlap(length):
    from engine.upscalers.model_files import tile_starts

    starts = tile_starts(length, 192, 8)
    assert starts[0] == 0 and starts[-1] + 192 == length
    assert all(0 < later - earlier <= 192 - 8 for earlier, later in zip(starts, starts[1:]))
    assert len(starts) == -(-(length - 8) // (192 - 8))  # the fewest tiles that can overlap by 8


def test_none_is_a_plain_lanczos_resize_outside_extras(library):
    image = picture(30, 20)
    none = library.find("None")
    assert none.upscale(image, 30, 20) is image
    expected = np.asarray(image.resize((61, 41), Image.Resampling.LANCZOS))
    assert np.array_equal(np.asarray(none.upscale(image, 61, 41)), expected)


def test_a_result_too_large_is_refused_naming_the_field(library):
    from engine.errors import ValidationError
    from engine.extras import ExtrasRequest, upscale_image

    with pytest.raises(ValidationError) as refused:
        upscale_image(picture(1200, 1200), ExtrasRequest(upscaler_1="Lanczos", upscaling_resize=4), library)
    assert refused.value.field == "upscaling_resize" and "4800×4800" in refused.value.message


def test_a_file_that_fails_to_load_is_an_error_naming_it_and_is_listed_broken_after(models_dir):
    from engine.errors import ModelError, ValidationError
    from engine.upscalers.library import UpscalerLibrary

    library = UpscalerLibrary(models_dir, torch.device("cpu"), torch.float32)
    assert "4x-misshapen" in library.names()  # its keys look like ESRGAN's: only building it tells
    with pytest.raises(ModelError, match="4x-misshapen.safetensors could not be built"):
        library.find("4x-misshapen").upscale(picture(), 160, 120)
    assert "4x-misshapen" not in library.names()
    with pytest.raises(ValidationError, match="could not be built"):
        library.find("4x-misshapen", "upscaler_1")


def test_a_jpeg_sources_exif_infotext_becomes_the_pngs_parameters(library):
    from engine.extras import ExtrasRequest, ExtrasSource, run_extras
    from engine.image_metadata import jpeg_with_infotext

    source = "a jpeg\nSteps: 5, Seed: 3, Size: 40x30"
    [result] = run_extras([ExtrasSource(jpeg_with_infotext(picture(), source))], ExtrasRequest(upscaler_1="Lanczos"), library)
    assert result.chunks == {"parameters": source, "postprocessing": "Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos"}
