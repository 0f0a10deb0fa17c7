"""A1111's X/Y/Z plot: its value syntax, axes read from the field registry, cells with their own infotexts,
labelled grids, interrupts, and the A1111 API's positional script_args."""
from __future__ import annotations

import base64
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from engine.errors import ValidationError
from engine.fields import FIELDS, Field
from engine.infotext import parse_infotext
from engine.request import CancelToken, GenerationRequest
from engine.xyz import PlotOptions, XyzPlot, a1111_axis, a1111_labels, axis_types, find_axis, parse_values

torch.set_num_threads(1)
SIZE = 64


# --- the values syntax (A1111 1.10's xyz_grid.py, written out by hand here) -------------------------------

@pytest.mark.parametrize("text, kind, expected", [
    ("10, 20,30", int, [10, 20, 30]),
    ("1-5", int, [1, 2, 3, 4, 5]),
    ("1-10 (+3)", int, [1, 4, 7, 10]),
    ("1-10 (+4)", int, [1, 5, 9]),
    ("5-1 (-1)", int, [5, 4, 3]),  # A1111: range(start, end + 1, step), so counting down stops before 2
    ("10-20 [3]", int, [10, 15, 20]),
    ("1-10 [4]", int, [1, 4, 7, 10]),  # linspace 1, 4, 7, 10
    ("1-2 [4]", int, [1, 1, 1, 2]),  # linspace truncated: 1, 1.33, 1.67, 2
    ("-1, 7", int, [-1, 7]),
    ("-5--3", int, [-5, -4, -3]),
    ("1-3, 8, 10-12 (+2)", int, [1, 2, 3, 8, 10, 12]),
    ("3.5, 7", float, [3.5, 7.0]),
    ("1-2 (+0.5)", float, [1.0, 1.5, 2.0]),
    ("1.5-2.5", float, [1.5, 2.5]),
    ("0.1-0.3 (+0.1)", float, [0.1, 0.2, 0.30000000000000004, 0.4]),  # numpy arange(0.1, 0.4, 0.1) rounds past the end
    ("0-1 [5]", float, [0.0, 0.25, 0.5, 0.75, 1.0]),
    ("Euler, DPM++ 2M", str, ["Euler", "DPM++ 2M"]),
    ('cat, "dog, wet", bird', str, ["cat", "dog, wet", "bird"]),
    ('<lora:x:0.5>, <lora:x:1>', str, ["<lora:x:0.5>", "<lora:x:1>"]),
    (" a ,b ", str, ["a", "b"]),
])
def test_values_read_as_a1111_reads_them(text, kind, expected):
    assert parse_values(text, kind, "X axis (Steps)") == expected


@pytest.mark.parametrize("text, kind, says", [
    ("ten", int, "'ten' is not a whole number"),
    ("1.5", int, "'1.5' is not a whole number"),
    ("1-5 (2)", int, "'1-5 (2)' is not a whole number"),  # a step needs its sign, as in A1111
    ("1-5 (+0)", int, "step must not be 0"),
    ("abc", float, "'abc' is not a number"),
    ("", int, "has no values"),
    ("  ", str, "has no values"),
])
def test_a_bad_value_is_an_error_that_names_the_axis(text, kind, says):
    with pytest.raises(ValidationError) as error:
        parse_values(text, kind, "X axis (Steps)")
    assert error.value.field == "X axis (Steps)" and says in error.value.message


def test_a_value_the_field_refuses_names_the_axis_before_anything_runs():
    base = GenerationRequest(prompt="a cat", steps=3, width=SIZE, height=SIZE, seed=1)
    for axis, values, says in (("Steps", "2, 500", "500"), ("Sampler", "Euler, Nonsense", "Nonsense"),
                               ("CFG Scale", "3, 99", "99"), ("Prompt S/R", "dog, cow", "did not find 'dog'"),
                               ("Size", "64x64, big", "'big'")):
        with pytest.raises(ValidationError) as error:
            XyzPlot.plan(base, [(find_axis("Nothing"), ""), (find_axis(axis), values)])
        assert error.value.field == f"Y axis ({find_axis(axis).label})" and says in error.value.message, error.value


# --- axes come from the field registry ---------------------------------------------------------------------

def test_every_plain_field_is_an_axis_and_a_new_field_becomes_one(monkeypatch):
    names = {axis.name for axis in axis_types("txt2img")}
    assert {"steps", "cfg_scale", "sampler", "schedule", "clip_skip", "subseed_strength", "eta", "width", "height"} <= names
    assert {"nothing", "seed", "prompt_sr", "size", "checkpoint", "vae"} <= names
    assert "denoising_strength" in {axis.name for axis in axis_types("img2img")}
    assert "Hires steps" in a1111_labels("txt2img") and "Hires steps" not in a1111_labels("img2img")
    # The hires fields were declared after the plot was written: they are axes with no change to it,
    # under A1111's labels and indices.
    axis = a1111_axis(5, "txt2img", "x")
    assert (axis.name, axis.label, axis.value_type) == ("hr_second_pass_steps", "Hires steps", int)
    assert find_axis("hires steps").name == "hr_second_pass_steps"
    assert a1111_axis(10, "txt2img", "x").name == "hr_sampler_name"  # indices count the tab's own list
    assert "hr_second_pass_steps" not in {axis.name for axis in axis_types("img2img")}
    # A field declared later still is an axis at once.
    declared = Field("hr_future_knob", int, 0, range=(0, 9), label="Future knob", control="slider", modes=("txt2img",))
    monkeypatch.setitem(FIELDS._fields, declared.name, declared)
    assert find_axis("future knob").name == "hr_future_knob"
    # An extension's field is its own settings inside request.extensions, never a request attribute: not an axis.
    owned = Field("cn_weight", float, 1.0, range=(0, 2), label="Control weight", control="slider", owner="controlnet")
    monkeypatch.setitem(FIELDS._fields, owned.name, owned)
    assert "cn_weight" not in {axis.name for axis in axis_types("txt2img")}


def test_checkpoint_and_vae_values_are_checked_against_what_is_installed(demo_engine):
    from engine.xyz.axes import installed_in

    base = GenerationRequest(prompt="x", seed=1)
    known = installed_in(demo_engine.registry)
    plot = XyzPlot.plan(base, [(find_axis("Checkpoint name"), "sfumato-demo"), (find_axis("VAE"), "Automatic, None")], known=known)
    assert [cell.request.vae for cell in plot.cells()] == ["Automatic", "None"]
    with pytest.raises(ValidationError) as error:
        XyzPlot.plan(base, [(find_axis("Checkpoint name"), "sfumato-demo, nowhere")], known=known)
    assert error.value.field == "X axis (Checkpoint name)" and "'nowhere'" in error.value.message
    with pytest.raises(ValidationError, match="no VAE named 'missing.safetensors'"):
        XyzPlot.plan(base, [(find_axis("VAE"), "missing.safetensors")], known=known)


def test_a1111_indices_follow_its_1_10_axis_list():
    txt2img, img2img = a1111_labels("txt2img"), a1111_labels("img2img")
    assert txt2img[:11] == ["Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "Hires steps", "CFG Scale", "Prompt S/R",
                            "Prompt order", "Sampler", "Hires sampler"]
    assert img2img[:10] == ["Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "CFG Scale", "Image CFG Scale",
                            "Prompt S/R", "Prompt order", "Sampler"]
    assert txt2img[-1] == img2img[-1] == "Size" and len(txt2img) == 43 and len(img2img) == 42
    assert [a1111_axis(i, "txt2img", "x").name for i in (0, 1, 4, 6, 7, 9, 11, 17, 25, 42)] == [
        "nothing", "seed", "steps", "cfg_scale", "prompt_sr", "sampler", "checkpoint", "schedule", "clip_skip", "size"]
    assert a1111_axis(25, "img2img", "y").name == "denoising_strength"  # "Denoising" on img2img
    assert a1111_axis("CFG Scale", "txt2img", "x").name == "cfg_scale"


# --- cells: each request gets its own values -----------------------------------------------------------------

def test_prompt_search_and_replace_swaps_the_first_value_in_both_prompts():
    base = GenerationRequest(prompt="a cat <lora:x:0.5>, cat ears", negative_prompt="no cat", seed=3)
    plot = XyzPlot.plan(base, [(find_axis("Prompt S/R"), 'cat, "dog, wet"'), (find_axis("Prompt S/R"), "<lora:x:0.5>, <lora:x:1>")])
    prompts = {cell.position[:2]: (cell.request.prompt, cell.request.negative_prompt) for cell in plot.cells()}
    assert prompts[(0, 0)] == ("a cat <lora:x:0.5>, cat ears", "no cat")
    assert prompts[(1, 0)] == ("a dog, wet <lora:x:0.5>, dog, wet ears", "no dog, wet")
    assert prompts[(1, 1)] == ("a dog, wet <lora:x:1>, dog, wet ears", "no dog, wet")


def test_minus_one_seeds_are_drawn_once_unless_kept():
    base = GenerationRequest(prompt="x", seed=-1)
    plot = XyzPlot.plan(base, [(find_axis("Steps"), "2,3"), (find_axis("Seed"), "-1, 5")])
    seeds = {cell.position[:2]: cell.request.seed for cell in plot.cells()}
    assert seeds[(0, 0)] == seeds[(1, 0)] != -1 and seeds[(0, 1)] == seeds[(1, 1)] == 5
    kept = XyzPlot.plan(base, [(find_axis("Seed"), "-1, 5")], PlotOptions(keep_random_seeds=True))
    assert [cell.request.seed for cell in kept.cells()] == [-1, 5]
    varied = XyzPlot.plan(GenerationRequest(prompt="x", seed=10), [(find_axis("Steps"), "2,3,4")],
                          PlotOptions(vary_seeds=(True, False, False)))
    assert [cell.request.seed for cell in varied.cells()] == [10, 11, 12]


def test_a_plot_too_large_to_draw_is_refused_before_it_runs():
    base = GenerationRequest(prompt="x", seed=1, width=1024, height=1024)
    with pytest.raises(ValidationError, match="would be 210 megapixels"):  # 200 cells of 1024² (A1111's limit: 200)
        XyzPlot.plan(base, [(find_axis("Steps"), "1-20"), (find_axis("CFG Scale"), "1-10")])


def test_the_costliest_axis_runs_outermost():
    base = GenerationRequest(prompt="x", seed=1)
    plot = XyzPlot.plan(base, [(find_axis("Checkpoint name"), "a, b"), (find_axis("Steps"), "2,3")])
    assert [cell.position[:2] for cell in plot.cells()] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    plain = XyzPlot.plan(base, [(find_axis("CFG Scale"), "3, 4"), (find_axis("Steps"), "2,3")])
    assert [cell.position[:2] for cell in plain.cells()] == [(0, 0), (1, 0), (0, 1), (1, 1)]


# --- a real plot on the demo model ------------------------------------------------------------------------

def _label_band(cell: int, labels: list[str]) -> int:
    """The top band's height for one line of each label, as A1111 lays it out: text height + a line spacing above and below."""
    size = max(10, (cell + cell) // 25)  # A1111's (w + h) // 25; Sfumato never goes below 10 px
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    heights = []
    for label in labels:
        _, top, _, bottom = draw.multiline_textbbox((0, 0), label, font=font)
        heights.append(bottom - top)
    return max(heights) + 2 * (size // 2)


@pytest.fixture(scope="module")
def plot_2x2x2(demo_engine):
    base = GenerationRequest(prompt="a red circle", steps=3, width=SIZE, height=SIZE, seed=11, cfg_scale=5.0)
    plot = XyzPlot.plan(base, [(find_axis("Steps"), "3, 4"), (find_axis("CFG Scale"), "3, 7"),
                               (find_axis("Sampler"), "Euler, DPM++ 2M")])
    ticks = []
    return plot, plot.run(demo_engine, on_progress=ticks.append), ticks


def test_a_2x2x2_plot_gives_8_cells_each_with_its_own_infotext(plot_2x2x2):
    plot, result, _ = plot_2x2x2
    assert not result.interrupted and len(result.cells) == 8 and all(cell is not None for cell in result.cells)
    for index, cell in enumerate(result.cells):
        ix, iy, iz = index % 2, index // 2 % 2, index // 4
        parsed = parse_infotext(cell.infotext)
        assert parsed["Steps"] == str((3, 4)[ix]) and parsed["CFG scale"] == str((3, 7)[iy])
        assert parsed["Sampler"] == ("Euler", "DPM++ 2M")[iz] and parsed["Seed"] == "11" and "Script" not in parsed
        assert cell.image.size == (SIZE, SIZE)
    assert len({cell.image.tobytes() for cell in result.cells}) == 8  # every cell is a different picture
    # (at 3 steps and up: at 2, DPM++ 2M with Karras and Euler with Uniform end within 1/255 of each other on the demo model)
    assert [image.grid for image in result.images] == [True] * 3 + [False] * 8


def test_a_cell_is_the_picture_its_own_request_draws(plot_2x2x2, demo_engine):
    _, result, _ = plot_2x2x2
    alone = demo_engine.generate(GenerationRequest(prompt="a red circle", steps=4, cfg_scale=3.0, sampler="DPM++ 2M",
                                                   width=SIZE, height=SIZE, seed=11))
    assert np.array_equal(np.asarray(result.cells[1 + 0 * 2 + 1 * 4].image), np.asarray(alone.images[0].image))


def test_each_z_value_gets_a_labelled_grid_of_the_right_size(plot_2x2x2):
    plot, result, _ = plot_2x2x2
    combined, *z_grids = result.grids
    assert len(z_grids) == 2
    left, top = SIZE * 3 // 4, _label_band(SIZE, ["Steps: 3", "Steps: 4"])
    for iz, grid in enumerate(z_grids):
        assert grid.image.size == (left + 2 * SIZE, top + 2 * SIZE)
        pixels = np.asarray(grid.image)
        for iy in range(2):
            for ix in range(2):
                cell = np.asarray(result.cells[ix + 2 * iy + 4 * iz].image)
                placed = pixels[top + iy * SIZE:top + (iy + 1) * SIZE, left + ix * SIZE:left + (ix + 1) * SIZE]
                assert np.array_equal(placed, cell), (ix, iy, iz)
            assert (pixels[top + iy * SIZE:top + (iy + 1) * SIZE, :left] < 128).any(), "a row label is drawn"
        for ix in range(2):
            assert (pixels[:top, left + ix * SIZE:left + (ix + 1) * SIZE] < 128).any(), "a column label is drawn"
        parsed = parse_infotext(grid.infotext)
        assert (parsed["Script"], parsed["X Type"], parsed["X Values"], parsed["Y Type"]) == ("X/Y/Z plot", "Steps", "3, 4", "CFG Scale")
        assert "Z Type" not in parsed and parsed["Sampler"] == ("Euler", "DPM++ 2M")[iz]
    width, height = z_grids[0].image.size
    assert combined.image.size == (2 * width, _label_band_for_grid(width, height, ["Euler", "DPM++ 2M"]) + height)
    assert np.array_equal(np.asarray(combined.image)[-height:, width:], np.asarray(z_grids[1].image))
    assert parse_infotext(combined.infotext)["Z Values"] == "Euler, DPM++ 2M"


def _label_band_for_grid(width: int, height: int, labels: list[str]) -> int:
    size = max(10, (width + height) // 25)
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return max(draw.multiline_textbbox((0, 0), label, font=font)[3] - draw.multiline_textbbox((0, 0), label, font=font)[1]
               for label in labels) + 2 * (size // 2)


def test_progress_previews_show_the_grid_filling_in(plot_2x2x2):
    plot, result, ticks = plot_2x2x2
    assert ticks and ticks[-1].image_index == 7 and ticks[-1].images_total == 8
    fractions = [tick.fraction for tick in ticks]
    assert fractions == sorted(fractions)
    with_preview = [tick for tick in ticks if tick.has_preview]
    grid_size = result.grids[1].image.size
    assert with_preview and all(tick.preview.size == grid_size for tick in with_preview)
    last_of_first_layer = [tick for tick in with_preview if tick.image_index == 3][-1].preview
    assert np.array_equal(np.asarray(last_of_first_layer), np.asarray(result.grids[1].image))


class _InterruptingEngine:
    """The demo engine, interrupted at the first step of cell k + 1."""

    def __init__(self, engine, k: int):
        self.engine, self.k, self.calls = engine, k, 0

    def generate(self, request, on_progress=None, cancel=None):
        self.calls += 1
        stop_now = self.calls == self.k + 1

        def progress(tick):
            if stop_now:
                cancel.interrupt()
            if on_progress is not None:
                on_progress(tick)
        return self.engine.generate(request, on_progress=progress, cancel=cancel)


def test_an_interrupt_after_k_cells_keeps_those_k_and_draws_the_rest_blank(demo_engine):
    base = GenerationRequest(prompt="a red circle", steps=3, width=SIZE, height=SIZE, seed=4)
    plot = XyzPlot.plan(base, [(find_axis("Steps"), "2, 3"), (find_axis("Seed"), "1, 2")])
    engine = _InterruptingEngine(demo_engine, k=3)
    result = plot.run(engine, cancel=CancelToken())
    assert result.interrupted and engine.calls == 4
    assert [cell is not None for cell in result.cells] == [True, True, True, False]
    assert len([image for image in result.images if not image.grid]) == 3
    grid = np.asarray(result.grids[0].image)
    left, top = SIZE * 3 // 4, _label_band(SIZE, ["Steps: 2", "Steps: 3"])
    assert (grid[top + SIZE:, left + SIZE:] == 0).all()  # the unfinished cell is blank
    assert np.array_equal(grid[top:top + SIZE, left:left + SIZE], np.asarray(result.cells[0].image))


# --- the A1111 API: script_name "x/y/z plot" with its positional script_args --------------------------------

@pytest.fixture(scope="module")
def api_client(demo_engine):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from engine.jobs import JobQueue
    from engine.settings import Settings
    from ui.api import install_api

    registry = demo_engine.registry
    studio = SimpleNamespace(default_model=registry.default_name, registry=registry, presets=SimpleNamespace(list=lambda: []),
                             settings=Settings(), extensions=None, jobs=JobQueue(demo_engine))
    app = FastAPI()
    install_api(app, studio)
    return TestClient(app, raise_server_exceptions=False)


def _png(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def test_the_api_runs_a1111_script_args_and_returns_the_grid_then_the_cells(api_client):
    # As webuiapi and other clients send it: X = Steps (index 4), Y = Sampler (index 9, a dropdown list), Z = Nothing.
    script_args = [4, "2,3", [], 9, "", ["Euler", "DPM++ 2M"], 0, "", [], True, True, False, False, False, False, False, 0, False]
    body = {"prompt": "a red circle", "steps": 3, "width": SIZE, "height": SIZE, "seed": 21,
            "script_name": "X/Y/Z plot", "script_args": script_args}
    response = api_client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    payload = response.json()
    images = [_png(text) for text in payload["images"]]
    info = json.loads(payload["info"])
    assert len(images) == 5 and len(info["infotexts"]) == 5  # the grid, then the 4 cells (include_lone_images)
    assert images[0].size == (SIZE * 3 // 4 + 2 * SIZE, _label_band(SIZE, ["Steps: 2", "Steps: 3"]) + 2 * SIZE)
    grid_info = parse_infotext(info["infotexts"][0])
    assert (grid_info["X Type"], grid_info["Y Type"], grid_info["Y Values"]) == ("Steps", "Sampler", "Euler,DPM++ 2M")  # a dropdown list written back as A1111 writes it (csv)
    cells = [parse_infotext(text) for text in info["infotexts"][1:]]
    assert [(cell["Steps"], cell["Sampler"]) for cell in cells] == [("2", "Euler"), ("3", "Euler"), ("2", "DPM++ 2M"), ("3", "DPM++ 2M")]
    assert all(image.size == (SIZE, SIZE) for image in images[1:])

    only_grid = api_client.post("/sdapi/v1/txt2img", json={**body, "script_args": script_args[:10]})  # A1111's defaults for the rest
    assert only_grid.status_code == 200 and len(only_grid.json()["images"]) == 1


def test_the_img2img_api_reads_its_own_axis_list(api_client):
    buffer = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (200, 40, 40)).save(buffer, format="PNG")
    init = base64.b64encode(buffer.getvalue()).decode()
    # On img2img, A1111's index 25 is "Denoising" (txt2img's list has 26 there: it holds Hires steps and Hires sampler).
    body = {"prompt": "a red circle", "steps": 4, "seed": 3, "init_images": [init], "script_name": "x/y/z plot",
            "script_args": [25, "0.25, 0.75", [], 0, "", [], 0, "", [], True, True]}
    response = api_client.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    infotexts = json.loads(response.json()["info"])["infotexts"]
    assert [parse_infotext(text)["Denoising strength"] for text in infotexts[1:]] == ["0.25", "0.75"]
    assert parse_infotext(infotexts[0])["X Type"] == "Denoising"


@pytest.mark.parametrize("script_args, field, says", [
    ([8, "a,b"], "script_args.x_type", "8 (Prompt order) is not supported"),
    ([99, "1"], "script_args.x_type", "index into A1111's 43 axis types"),
    ([4, "2, many"], "X axis (Steps)", "'many' is not a whole number"),
    ([4, "2,3", [], 6, "3, 77"], "Y axis (CFG Scale)", "77"),
])
def test_the_api_names_the_axis_of_a_bad_script_arg(api_client, script_args, field, says):
    body = {"prompt": "a red circle", "steps": 3, "width": SIZE, "height": SIZE, "script_name": "x/y/z plot", "script_args": script_args}
    response = api_client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field and says in response.json()["detail"], response.json()


def test_the_api_refuses_a_script_it_does_not_have(api_client):
    response = api_client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "script_name": "prompt matrix"})
    assert response.status_code == 422 and response.json()["field"] == "script_name"


# --- the command line ----------------------------------------------------------------------------------------

def test_the_cli_reads_xyz_axes_in_order():
    from ui.cli import CliError, build_parser, plan_xyz

    args = build_parser().parse_args(["generate", "--prompt", "a cat", "--seed", "3", "--out", "x",
                                      "--xyz", "Steps: 10-20 [3]", "--xyz", "Sampler: Euler, DPM++ 2M", "--xyz-no-legend"])
    request = GenerationRequest(prompt="a cat", seed=3)
    plot = plan_xyz(args, request)
    assert [axis.type.name for axis in plot.axes] == ["steps", "sampler", "nothing"]
    assert plot.x.values == (10, 15, 20) and plot.y.values == ("Euler", "DPM++ 2M") and not plot.options.draw_legend
    bad = build_parser().parse_args(["generate", "--prompt", "a cat", "--out", "x", "--xyz", "Stepz: 1,2"])
    with pytest.raises(CliError, match="no axis 'Stepz'"):
        plan_xyz(bad, request)
    with pytest.raises(CliError, match=r"must be 'AXIS: VALUES'"):
        plan_xyz(build_parser().parse_args(["generate", "--out", "x", "--xyz", "Steps 1,2"]), request)
