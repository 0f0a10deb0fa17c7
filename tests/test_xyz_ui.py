"""The Script dropdown's X/Y/Z plot through the real Gradio server: the grid then the cells, each saved with its
infotext, and a bad value reported with its axis."""
from __future__ import annotations

import _ui_fixtures as fx  # noqa: E402  (sets the offline / thread environment first)

import pytest
from PIL import Image

from engine.infotext import parse_infotext

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    return fx.make_studio(tmp_path_factory.mktemp("xyz-ui-studio"))


@pytest.fixture(scope="module")
def client(studio):
    from gradio_client import Client

    with fx.running_server(studio) as url:
        client = Client(url, verbose=False, ssl_verify=False)
        yield client
        client.close()


def test_the_txt2img_script_dropdown_runs_a_plot_and_saves_grid_and_cells(client, studio):
    outputs = client.predict(prompt="a red circle", steps=2, width=fx.SIZE, height=fx.SIZE, seed=5, script="X/Y/Z plot",
                             xyz_x_type="Steps", xyz_x_values="1-2", xyz_y_type="CFG Scale", xyz_y_values="4, 6",
                             api_name="/txt2img")
    progress, gallery = outputs[1], outputs[2]
    assert progress.startswith("Done: 5 images"), progress
    images = [Image.open(item["image"]) for item in gallery]
    grid_info = parse_infotext(images[0].info["parameters"])
    assert (grid_info["Script"], grid_info["X Values"], grid_info["Y Values"]) == ("X/Y/Z plot", "1-2", "4, 6")
    assert [(parse_infotext(image.info["parameters"])["Steps"], parse_infotext(image.info["parameters"])["CFG scale"])
            for image in images[1:]] == [("1", "4"), ("2", "4"), ("1", "6"), ("2", "6")]
    grids = list((studio.config.outputs_dir / "txt2img-grids").rglob("*.png"))
    cells = list((studio.config.outputs_dir / "txt2img").rglob("*.png"))
    assert len(grids) == 1 and len(cells) == 4


def test_a_bad_axis_value_is_reported_with_its_axis(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=r"X axis \(Steps\).*'lots'"):
        client.predict(prompt="a red circle", steps=2, width=fx.SIZE, height=fx.SIZE, script="X/Y/Z plot",
                       xyz_x_type="Steps", xyz_x_values="2, lots", api_name="/txt2img")
