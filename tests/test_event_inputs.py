"""The generate click's inputs preprocessed in one pass (ui/event_inputs.py) and the streamed output
components whose API schema is computed once (ui/streamed_outputs.py)."""
from __future__ import annotations

import _ui_fixtures  # noqa: F401  (sets the offline / thread environment first)

import gradio as gr
import pytest
from gradio.data_classes import FileData
from PIL import Image

from engine.errors import ValidationError
from ui.event_inputs import preprocess_values
from ui.streamed_outputs import LivePreview, ResultGallery


def _components():
    with gr.Blocks():
        return {
            "prompt": gr.Textbox(), "seed": gr.Number(precision=0), "image": gr.Image(type="pil"),
            "model": gr.Dropdown(["a", "b"], value="a"), "weight": gr.Slider(0, 2, value=1), "results": gr.State([]),
        }


def test_values_come_out_as_each_component_would_hand_them_to_a_handler(tmp_path):
    path = tmp_path / "control.png"
    Image.new("RGB", (24, 16), "red").save(path)
    image_value = FileData(path=str(path), orig_name="control.png").model_dump()
    values = preprocess_values(_components(), {"prompt": 12, "seed": 7.0, "image": image_value, "model": "a", "weight": 1.5,
                                               "results": ["kept"]})
    assert values["prompt"] == "12" and values["seed"] == 7 and isinstance(values["seed"], int)
    assert isinstance(values["image"], Image.Image) and values["image"].size == (24, 16)
    assert values["weight"] == 1.5 and values["results"] == ["kept"]


def test_choices_a_session_added_pass_through_to_the_requests_own_validation():
    # e.g. a model that appeared after "refresh": the app-level dropdown does not list it, the session's does
    values = preprocess_values(_components(), {"model": "added-later", "weight": 5.0, "image": None})
    assert values == {"model": "added-later", "weight": 5.0, "image": None}


def test_an_unreadable_upload_is_a_validation_error_naming_the_control(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    components = _components()
    components["image"].label = "Control image"
    with pytest.raises(ValidationError) as raised:
        preprocess_values(components, {"image": FileData(path=str(broken)).model_dump()})
    assert raised.value.field == "image" and "Control image could not be read" in raised.value.message


def test_streamed_outputs_draw_as_their_parents_and_describe_their_schema_once(monkeypatch):
    with gr.Blocks():
        preview, gallery = LivePreview(), ResultGallery()
    assert (preview.get_block_name(), gallery.get_block_name()) == ("image", "gallery")
    assert gallery.api_info() == gr.Gallery().api_info()
    calls = []
    original = gallery.data_model.model_json_schema
    monkeypatch.setattr(gallery.data_model, "model_json_schema", lambda *a, **k: calls.append(1) or original(*a, **k))
    for _ in range(3):  # what Gradio does on every gr.skip() a generator yields for it
        rebuilt = ResultGallery(**{**gallery.constructor_args, "render": False})
        assert rebuilt.api_info() == gallery.api_info()
    assert calls == []


def test_outputs_are_postprocessed_as_gradio_would_send_them_and_skips_pass_through():
    from ui.streamed_outputs import postprocess_values

    with gr.Blocks():
        preview, progress, gallery, state = LivePreview(format="jpeg"), gr.Markdown(), ResultGallery(format="png"), gr.State()
    red = Image.new("RGB", (16, 16), "red")
    sent = postprocess_values([preview, progress, gallery, state], (red, "Step 1/4", gr.skip(), ["records"]))
    assert sent[0]["path"].endswith(".jpeg") and Image.open(sent[0]["path"]).getpixel((8, 8))[0] > 200
    assert sent[0] == preview.postprocess(red).model_dump() | {"path": sent[0]["path"]}
    assert sent[1:] == ("Step 1/4", gr.skip(), ["records"])
    final = postprocess_values([gallery], ([(red, "seed 1")],))[0]
    assert final == gallery.postprocess([(red, "seed 1")]).model_dump()
    with pytest.raises(ValueError):  # one value per output, or Gradio would misalign them
        postprocess_values([preview, progress], (red,))
