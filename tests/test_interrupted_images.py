"""Images stopped early by Interrupt or Skip: flagged in the result, kept out of the outputs folder
unless the setting says so, and then their infotext says where they stopped."""
from __future__ import annotations

from dataclasses import replace

import pytest

from engine import GenerationRequest
from engine.infotext import parse_infotext, request_fields_from_infotext
from engine.request import CancelToken, EarlyStop
from engine.studio import Studio, StudioConfig


def request(seed=7, steps=20, **changes):
    return GenerationRequest(prompt="a red circle", model="tiny-sd1", steps=steps, width=64, height=64, seed=seed, **changes)


def generate_stopped(engine, action: str, at_step: int = 2, **changes):
    """Run a request and press Interrupt or Skip while step ``at_step`` is reported."""
    cancel = CancelToken()

    def on_progress(progress):
        if progress.step == at_step and progress.image_index == 0:
            getattr(cancel, action)()

    return engine.generate(request(**changes), on_progress=on_progress, cancel=cancel)


@pytest.fixture
def studio(tmp_path, tiny_models_dir):
    return Studio(StudioConfig(models_dir=tiny_models_dir, outputs_dir=tmp_path / "outputs", user_dir=tmp_path / "user",
                               builtin_models_dir=None))


def saved_files(studio) -> list:
    return sorted(studio.config.outputs_dir.rglob("*.png"))


def test_an_interrupted_image_says_at_which_step_it_stopped_and_keeps_the_requested_steps(engine):
    result = generate_stopped(engine, "interrupt")
    assert result.interrupted and len(result.images) == 1
    # the interrupt stops step 3 at its next model block, so the picture is step 2's
    assert result.images[0].stopped_early == EarlyStop(reason="interrupted", step=2, total_steps=20)
    parsed = parse_infotext(result.images[0].infotext)
    assert parsed["Steps"] == "20" and parsed["Interrupted at step"] == "2/20"
    assert request_fields_from_infotext(parsed)["steps"] == 20  # reading it back asks for the full run again


def test_a_skipped_image_is_marked_and_the_next_image_of_the_batch_finishes(engine):
    result = generate_stopped(engine, "skip", batch_count=2)
    assert not result.interrupted and [image.seed for image in result.images] == [7, 8]
    assert result.images[0].stopped_early == EarlyStop(reason="skipped", step=3, total_steps=20)
    assert "Skipped at step: 3/20" in result.images[0].infotext
    assert result.images[1].stopped_early is None and "at step" not in result.images[1].infotext


def test_img2img_counts_the_steps_it_actually_runs(engine):
    from PIL import Image

    init = Image.new("RGB", (64, 64), (200, 30, 30))
    result = generate_stopped(engine, "interrupt", init_image=init, denoising_strength=0.5)
    # A1111's img2img runs t_enc + 1 steps, t_enc = int(0.5 · 20) = 10
    assert result.images[0].stopped_early == EarlyStop(reason="interrupted", step=2, total_steps=11)


def test_a_finished_image_has_no_stop_mark(engine):
    result = engine.generate(request(steps=4))
    assert result.images[0].stopped_early is None and "at step" not in result.images[0].infotext


def test_interrupted_and_skipped_images_are_not_saved_by_default(studio):
    assert studio.settings.save_interrupted_images is False
    interrupted = generate_stopped(studio.engine, "interrupt")
    skipped = generate_stopped(studio.engine, "skip", batch_count=2)
    studio.save_result(interrupted)
    studio.save_result(skipped)
    assert interrupted.images[0].path is None and skipped.images[0].path is None
    assert skipped.images[1].path is not None  # the finished one is saved as usual
    assert saved_files(studio) == [studio.config.outputs_dir.joinpath(skipped.images[1].path).resolve()]


def test_with_the_setting_on_an_interrupted_image_is_saved_with_its_stop_step(studio):
    studio.update_settings(replace(studio.settings, save_interrupted_images=True))
    result = generate_stopped(studio.engine, "interrupt")
    studio.save_result(result)
    from engine.image_metadata import read_generation_info

    [path] = saved_files(studio)
    infotext = read_generation_info(path).infotext
    assert "Steps: 20," in infotext and "Interrupted at step: 2/20" in infotext


def test_the_setting_survives_a_restart_and_rejects_non_booleans(studio, tiny_models_dir):
    from engine.errors import ValidationError
    from engine.settings import Settings

    studio.update_settings(replace(studio.settings, save_interrupted_images=True))
    assert Studio(studio.config).settings.save_interrupted_images is True
    with pytest.raises(ValidationError, match="save_interrupted_images"):
        Settings(save_interrupted_images="yes").validate()


def test_after_a_skip_the_ui_stream_never_keeps_the_skipped_images_preview(engine):
    from engine.jobs import JobQueue
    from ui.runner import follow

    queue = JobQueue(engine)
    job = queue.submit(request(steps=40, batch_count=2, preview_every=10))  # image 2's first previews come at step 10
    first_of_next = None
    for tick in follow(queue, job, frame=0.0):
        if tick.kind == "progress" and tick.text.startswith("Image 1/2") and tick.preview is not None:
            queue.skip_current()
        if tick.kind == "progress" and tick.text.startswith("Image 2/2") and first_of_next is None:
            first_of_next = tick
    assert first_of_next is not None
    assert first_of_next.preview is not None or first_of_next.clear_preview
