"""The shipped demo model, through the engine: it loads offline, matches its card, and draws what it is asked."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from engine import GenerationRequest
from training import world
from training.evaluate import _iou, classify
from training.world import COLOURS, IMAGE_SIZE, PALETTE, POSITION_PHRASES, POSITIONS, SHAPES

DEMO = Path(__file__).resolve().parent.parent / "builtin" / "sfumato-demo"
SEEDS = (1, 2, 3, 4)


def draw(engine, prompt, seed, **changes):
    request = GenerationRequest(**{"prompt": prompt, "model": "sfumato-demo", "steps": 20, "cfg_scale": 5.0, "seed": seed, **changes})
    return engine.generate(request).images[0].image


def majority(values, expected, need=3):
    return sum(v == expected for v in values) >= need


def test_the_demo_model_loads_offline_at_its_native_size_and_matches_its_card(demo_engine):
    loaded = demo_engine.registry.load("sfumato-demo")
    card = json.loads((DEMO / "sfumato.json").read_text())
    assert loaded.family.native_size == (card["native_width"], card["native_height"]) == (IMAGE_SIZE, IMAGE_SIZE)
    assert np.asarray(card["latent_rgb_factors"]).shape == (4, 3)
    vocabulary = set(loaded.pipeline.tokenizer.get_vocab())
    for word in (*COLOURS, "gray", *SHAPES, *POSITIONS, "small", "large", "background"):
        assert any(token.startswith(word) for token in vocabulary), f"{word!r} missing from the tokenizer"
    size = sum(p.stat().st_size for p in DEMO.parent.glob("sfumato-demo*/**/*") if p.is_file())
    assert size <= 30 * 2**20, f"built-in models take {size / 2**20:.1f} MB"
    assert demo_engine.registry.default_name() == "sfumato-demo-flow"  # the flow demo beats it on every evaluator figure
    result = demo_engine.generate(GenerationRequest(prompt="a red circle", model="sfumato-demo", steps=4, seed=1))
    assert result.images[0].image.size == (64, 64)


def test_a_red_circle_is_predominantly_red(demo_engine):
    readings = [classify(draw(demo_engine, "a red circle", seed)) for seed in SEEDS]
    assert majority([r.colour for r in readings], "red"), [r.as_dict() for r in readings]


def test_blue_background_gives_a_blue_background(demo_engine):
    readings = [classify(draw(demo_engine, "a yellow square, blue background", seed)) for seed in SEEDS]
    assert majority([r.background for r in readings], "blue"), [r.as_dict() for r in readings]


def test_on_the_left_puts_the_shape_in_the_left_third(demo_engine):
    centroids = []
    for seed in SEEDS:
        reading = classify(draw(demo_engine, "a large white circle on the left, black background", seed))
        xs = np.nonzero(reading.mask)[1]
        centroids.append(xs.mean() if xs.size else IMAGE_SIZE / 2)
    assert sum(c < IMAGE_SIZE / 3 for c in centroids) >= 3, centroids


def test_guidance_makes_the_prompt_count_more(demo_engine):
    from training.evaluate import eval_scenes, score
    from training.world import full_caption

    scenes = eval_scenes()[:24]

    def accuracy(cfg):
        # Euler: the demo model reads colour, background, position and size right even unguided, so only shape
        # tells; measured on 32 scenes, shape 0.62 at CFG 1 against 0.78 at CFG 5 (DPM++ 2M + Karras ties at 0.72).
        # On the first 24 of them (a quarter less time), shape 0.67 against 0.83: mean 0.933 against 0.967,
        # the same margin as on 32 (0.925 against 0.956). On 16 it is two pictures; at 10 steps it all but vanishes.
        readings = [classify(draw(demo_engine, full_caption(scene), 1, cfg_scale=cfg, sampler="Euler")) for scene in scenes]
        return float(np.mean(list(score(readings, scenes).values())))

    weak, strong = accuracy(1.0), accuracy(5.0)
    assert strong > weak, (weak, strong)


def inpaint_green_square(base, paint) -> None:
    """Mask the right half of ``base``, ask ``paint(mask)`` for a green square there: the region turns green and every
    pixel the blurred mask leaves out stays exactly as it was."""
    mask = Image.new("L", base.size, 0)
    ImageDraw.Draw(mask).rectangle((30, 14, 60, 50), fill=255)
    out = np.asarray(paint(mask))
    region = out[18:46, 34:58]
    green = np.asarray(PALETTE["green"], dtype=float)
    gray = np.asarray(PALETTE["gray"], dtype=float)
    closer_to_green = np.linalg.norm(region - green, axis=-1) < np.linalg.norm(region - gray, axis=-1)
    assert closer_to_green.mean() > 0.3, "the masked region did not turn green"
    _, soft = __import__("engine.image_ops", fromlist=["prepare_mask"]).prepare_mask(mask, False, 2)
    assert np.array_equal(out[soft == 0], np.asarray(base)[soft == 0])


def test_inpainting_a_green_square_turns_the_masked_region_green_and_keeps_the_rest(demo_engine):
    base = draw(demo_engine, "a small red circle on the left, gray background", 5)

    def paint(mask):
        request = GenerationRequest(prompt="a green square on the right, gray background", model="sfumato-demo", steps=20,
                                    cfg_scale=5.0, seed=5, init_image=base, mask=mask, denoising_strength=1.0, mask_blur=2)
        return demo_engine.generate(request).images[0].image

    inpaint_green_square(base, paint)


# --------------------------------------------------------------------------- sfumato-demo-flow (SD3 layout)

FLOW = "sfumato-demo-flow"
FLOW_DIR = DEMO.parent / FLOW
FLOW_CONTROLNET = "sfumato-demo-flow-controlnet-outline"


@pytest.fixture(scope="module")
def flow_engine(demo_engine):
    if not (FLOW_DIR / "model_index.json").is_file():
        pytest.skip("builtin/sfumato-demo-flow is not present")
    return demo_engine


def flow_draw(engine, prompt, seed, **changes):
    """The card's recommended settings: Euler, Simple, 20 steps, its CFG."""
    cfg = json.loads((FLOW_DIR / "sfumato.json").read_text())["recommended_cfg"]
    return draw(engine, prompt, seed, **{"model": FLOW, "sampler": "Euler", "schedule": "Simple", "cfg_scale": cfg,
                                         **changes})


def test_the_flow_demo_loads_offline_as_sd3_with_16_latent_channels_and_matches_its_card(flow_engine):
    loaded = flow_engine.registry.load(FLOW)
    card = json.loads((FLOW_DIR / "sfumato.json").read_text())
    assert loaded.family.id == "sd3" and loaded.latent_channels == 16
    assert loaded.family.native_size == (card["native_width"], card["native_height"]) == (IMAGE_SIZE, IMAGE_SIZE)
    assert np.asarray(card["latent_rgb_factors"]).shape == (16, 3)
    assert FLOW_CONTROLNET in card["controlnets"] and (DEMO.parent / FLOW_CONTROLNET / "config.json").is_file()
    assert flow_engine.registry.get(FLOW).usable


def test_the_flow_demo_draws_a_red_circle_red_round_and_on_the_left(flow_engine):
    readings = [classify(flow_draw(flow_engine, "a large red circle on the left, gray background", seed)) for seed in SEEDS]
    assert majority([r.colour for r in readings], "red"), [r.as_dict() for r in readings]
    assert majority([r.shape for r in readings], "circle"), [r.as_dict() for r in readings]
    assert majority([r.position for r in readings], "left"), [r.as_dict() for r in readings]
    assert majority([r.background for r in readings], "gray"), [r.as_dict() for r in readings]


def test_the_flow_demo_puts_a_square_where_it_is_asked(flow_engine):
    for position in ("right", "top"):
        readings = [classify(flow_draw(flow_engine, f"a large blue square {POSITION_PHRASES[position]}, yellow background",
                                       seed)) for seed in SEEDS]
        assert majority([r.position for r in readings], position), (position, [r.as_dict() for r in readings])
        assert majority([r.shape for r in readings], "square"), (position, [r.as_dict() for r in readings])


def test_the_flow_demo_tells_a_small_circle_from_a_small_square(flow_engine):
    """The case the narrower run 2 lost (shape 0.73): it drew small circles and small squares as one rounded square."""
    for shape in ("circle", "square"):
        readings = [classify(flow_draw(flow_engine, f"a small white {shape} in the center, black background", seed))
                    for seed in SEEDS]
        assert majority([r.shape for r in readings], shape), (shape, [r.as_dict() for r in readings])
        assert majority([r.size for r in readings], "small"), (shape, [r.as_dict() for r in readings])


@pytest.fixture(scope="module")
def flow_controlnet_engine(flow_engine, tmp_path_factory):
    from engine import Engine, ModelRegistry
    from engine.extensions import ExtensionManager

    if not (DEMO.parent / FLOW_CONTROLNET / "config.json").is_file():
        pytest.skip(f"builtin/{FLOW_CONTROLNET} is not present")
    scratch = tmp_path_factory.mktemp("flow-cn")
    manager = ExtensionManager(DEMO.parent.parent / "extensions", scratch / "ext.json", models_dir=scratch,
                               builtin_dir=DEMO.parent)
    return Engine(ModelRegistry(None, builtin_dir=DEMO.parent), manager)


def flow_draw_outline(engine, caption: str, outline_of: world.Scene | None):
    """The card's settings, seed 1, with ``outline_of``'s outline through the flow demo's ControlNet (None: without)."""
    units = [] if outline_of is None else [{"image": Image.fromarray(world.render_outline(outline_of)), "module": "none",
                                            "model": FLOW_CONTROLNET}]
    return flow_draw(engine, caption, 1, preview_every=0, extensions={"controlnet": units} if units else {})


def test_the_flow_demo_controlnet_draws_the_shape_inside_a_drawn_outline(flow_controlnet_engine):
    """SD 3.5's ControlNet layout through the engine: the shape fills the outline far better than the caption alone
    places it (the evaluator's 32 outlines at the card's CFG: IoU 0.89)."""
    scenes = [world.sample_scene(np.random.default_rng(seed)) for seed in (3, 4, 5, 6)]

    def iou(scene, with_outline: bool) -> float:
        image = flow_draw_outline(flow_controlnet_engine, world.full_caption(scene), scene if with_outline else None)
        return _iou(classify(image).mask, world.shape_mask(scene))

    guided = [iou(scene, True) for scene in scenes]
    unguided = [iou(scene, False) for scene in scenes]
    assert np.mean(guided) >= 0.75 and np.mean(guided) > np.mean(unguided) + 0.1, (guided, unguided)


def test_the_flow_demo_controlnet_moves_the_shape_to_the_outline_against_the_caption(flow_controlnet_engine):
    """Where the drawing and the caption disagree on the place, the drawing wins (trained on ControlNet captions that
    sometimes name another position: ``cn_conflict_p``; without them the shape followed the caption)."""
    scene = world.sample_scene(np.random.default_rng(3))
    followed = {}
    for position in [p for p in POSITIONS if p != scene.position][:3]:
        image = flow_draw_outline(flow_controlnet_engine, world.full_caption(scene), scene.moved(position))
        followed[position] = classify(image).position
    assert sum(read == position for position, read in followed.items()) >= 2, (scene.position, followed)


def test_inpainting_on_the_flow_demo_draws_the_new_shape_in_the_mask_and_keeps_the_rest(flow_engine):
    base = flow_draw(flow_engine, "a small red circle on the left, gray background", 5)
    inpaint_green_square(base, lambda mask: flow_draw(flow_engine, "a large green square on the right, gray background", 5,
                                                      init_image=base, mask=mask, denoising_strength=1.0, mask_blur=2))
