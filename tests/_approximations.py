"""What an opt-in speed-up that changes pixels must still give (token merging, the first block cache): another
picture, close to the exact one, that still draws what the prompt asked."""
from __future__ import annotations

import numpy as np
from PIL import Image

from bench.fixtures import psnr
from training.evaluate import classify
from training.world import IMAGE_SIZE

CIRCLE_LEFT = "a large red circle on the left, blue background"


def assert_close_and_still_a_red_circle_on_the_left(exact: Image.Image, approximate: Image.Image, min_psnr: float = 25) -> None:
    assert not np.array_equal(np.asarray(exact), np.asarray(approximate))  # it did something
    assert (db := psnr(approximate, exact)) > min_psnr, db
    reading = classify(approximate.resize((IMAGE_SIZE, IMAGE_SIZE)))
    xs = np.nonzero(reading.mask)[1]
    assert reading.colour == "red" and reading.background == "blue" and xs.mean() < IMAGE_SIZE / 3, reading.as_dict()


def draw(engine, fields: dict, **changes):
    """The first image of a job: ``fields`` with ``changes`` over them."""
    from engine import GenerationRequest

    return engine.generate(GenerationRequest(**{**fields, **changes})).images[0]
