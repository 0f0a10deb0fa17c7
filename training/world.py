"""The procedural world the demo model is trained on.

Every image is 64×64 RGB and shows ONE filled shape on a plain background.
Attributes: shape, colour, size, position and background colour. A second drawing style,
``outlined`` (a ring of ``OUTLINE_WIDTH`` px in the shape's colour around a hollow of background),
is never in the demo model's data: it is what the demo LoRA (``training.demo_lora``) teaches. Captions name the
attributes in natural word order; each attribute may be dropped, so short prompts work.
Everything here is deterministic given a seed (``numpy.random.Generator``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64

#: Fixed RGB values of the shape colours (exported for the evaluator and the UI).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 130, 0),
    "yellow": (250, 225, 20),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
#: Backgrounds are any shape colour other than the shape's own, or gray.
BACKGROUND_ONLY: dict[str, tuple[int, int, int]] = {"gray": (128, 128, 128)}
PALETTE: dict[str, tuple[int, int, int]] = {**COLOURS, **BACKGROUND_ONLY}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")

#: Half-extent in pixels of each size (circle radius, half side of the square/triangle box).
SIZE_RADIUS: dict[str, int] = {"small": 9, "large": 14}
#: Centre (x, y) of each position; the shape's box centre is jittered by ±POSITION_JITTER px.
POSITION_ANCHORS: dict[str, tuple[int, int]] = {
    "left": (17, 32),
    "right": (47, 32),
    "top": (32, 17),
    "bottom": (32, 47),
    "center": (32, 32),
}
POSITION_JITTER = 2

#: Drawing styles: the demo model only ever saw "filled"; "outlined" is the demo LoRA's lesson.
STYLES: tuple[str, ...] = ("filled", "outlined")
#: Ring width in px of an outlined shape: measured to survive the demo VAE's f8 round trip
#: (``training.demo_lora.measure_vae_round_trip``).
OUTLINE_WIDTH = 4

#: (colour, shape, position) triples never shown in training (any size, any background).
HELD_OUT_COMBOS: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "left"),
    ("blue", "square", "right"),
    ("green", "triangle", "top"),
    ("yellow", "circle", "bottom"),
    ("purple", "square", "center"),
    ("white", "triangle", "left"),
)

POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}

#: Every word a caption can contain (the tokenizer makes each one a single token).
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["a", "shape", "background", ","]
        + list(SIZES)
        + list(PALETTE)
        + list(SHAPES)
        + " ".join(POSITION_PHRASES.values()).split()
    )
)


@dataclass(frozen=True)
class Scene:
    """One image's attributes; ``cx, cy`` is the centre of the shape's bounding box."""

    shape: str
    colour: str
    size: str
    position: str
    background: str
    cx: int
    cy: int
    style: str = "filled"

    @property
    def radius(self) -> int:
        return SIZE_RADIUS[self.size]

    @property
    def combo(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.position)

    def moved(self, position: str) -> "Scene":
        """The same scene with the shape at another position's anchor (no jitter)."""
        x, y = POSITION_ANCHORS[position]
        return replace(self, position=position, cx=x, cy=y)


def backgrounds_for(colour: str) -> list[str]:
    """Allowed backgrounds for a shape colour: every other palette colour, gray included."""
    return [name for name in PALETTE if name != colour]


def is_held_out(scene: Scene) -> bool:
    return scene.combo in HELD_OUT_COMBOS


def sample_scene(rng: np.random.Generator, exclude_held_out: bool = True) -> Scene:
    """Draw a random scene uniformly over the attributes (rejecting held-out combos)."""
    while True:
        colour = str(rng.choice(list(COLOURS)))
        shape = str(rng.choice(SHAPES))
        position = str(rng.choice(POSITIONS))
        if exclude_held_out and (colour, shape, position) in HELD_OUT_COMBOS:
            continue
        size = str(rng.choice(SIZES))
        background = str(rng.choice(backgrounds_for(colour)))
        ax, ay = POSITION_ANCHORS[position]
        jx, jy = rng.integers(-POSITION_JITTER, POSITION_JITTER + 1, size=2)
        return Scene(shape, colour, size, position, background, int(ax + jx), int(ay + jy))


def held_out_scenes(rng: np.random.Generator) -> list[Scene]:
    """One random scene (size, background, jitter) for each held-out combo."""
    scenes = []
    for colour, shape, position in HELD_OUT_COMBOS:
        size = str(rng.choice(SIZES))
        background = str(rng.choice(backgrounds_for(colour)))
        x, y = POSITION_ANCHORS[position]
        scenes.append(Scene(shape, colour, size, position, background, x, y))
    return scenes


def _draw_shape(draw: ImageDraw.ImageDraw, scene: Scene, fill: int | tuple[int, int, int]) -> None:
    r, x, y = scene.radius, scene.cx, scene.cy
    box = [x - r, y - r, x + r - 1, y + r - 1]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(x - 0.5, y - r), (x - r, y + r - 1), (x + r - 1, y + r - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")


def shape_mask(scene: Scene) -> np.ndarray:
    """Filled mask of the shape: bool array (64, 64)."""
    img = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    _draw_shape(ImageDraw.Draw(img), scene, 255)
    return np.asarray(img) > 127


def render(scene: Scene, outline_width: int = OUTLINE_WIDTH) -> np.ndarray:
    """The scene as a uint8 RGB array (64, 64, 3), hard edges (no anti-aliasing).

    An ``outlined`` scene keeps only the outer ``outline_width`` px of the shape in its colour;
    the inside is background."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), PALETTE[scene.background])
    _draw_shape(ImageDraw.Draw(img), scene, COLOURS[scene.colour])
    pixels = np.asarray(img).copy()
    if scene.style == "outlined":
        pixels[erode(shape_mask(scene), outline_width)] = PALETTE[scene.background]
    elif scene.style != "filled":
        raise ValueError(f"unknown style {scene.style!r}")
    return pixels


def erode(mask: np.ndarray, width: int) -> np.ndarray:
    """``mask`` eroded ``width`` times by a 3×3 cross (pixels outside the image count as off)."""
    inner = mask.copy()
    for _ in range(width):
        padded = np.pad(inner, 1, constant_values=False)
        inner = (
            padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        )
    return inner


def outline_from_mask(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """White outline (``width`` px, inside the mask edge) on black, uint8 RGB (64, 64, 3)."""
    edge = mask & ~erode(mask, width)
    return np.repeat((edge * 255).astype(np.uint8)[..., None], 3, axis=2)


def render_outline(scene: Scene, width: int = 2) -> np.ndarray:
    """The ControlNet conditioning map of a scene: its shape's outline, white on black."""
    return outline_from_mask(shape_mask(scene), width)


def full_caption(scene: Scene) -> str:
    """E.g. ``"a large red circle on the left, blue background"``."""
    return caption_from_parts(scene, keep=dict.fromkeys(("size", "colour", "shape", "position", "background"), True))


def caption_from_parts(scene: Scene, keep: dict[str, bool]) -> str:
    """A caption naming only the attributes whose ``keep`` flag is set, in natural order."""
    has_object = keep["size"] or keep["colour"] or keep["shape"] or keep["position"]
    words: list[str] = []
    if has_object:
        words.append("a")
        if keep["size"]:
            words.append(scene.size)
        if keep["colour"]:
            words.append(scene.colour)
        words.append(scene.shape if keep["shape"] else "shape")
        if keep["position"]:
            words.append(POSITION_PHRASES[scene.position])
    text = " ".join(words)
    if keep["background"]:
        text = f"{text}, {scene.background} background" if text else f"{scene.background} background"
    return text


def random_caption(scene: Scene, rng: np.random.Generator, drop_p: float = 0.12, empty_p: float = 0.1) -> str:
    """Training caption: empty with prob ``empty_p`` (for classifier-free guidance),
    else each attribute is dropped independently with prob ``drop_p``."""
    if rng.random() < empty_p:
        return ""
    keys = ("size", "colour", "shape", "position", "background")
    drops = rng.random(len(keys)) < drop_p
    return caption_from_parts(scene, {k: not d for k, d in zip(keys, drops)})


def make_dataset(n: int, seed: int, style: str = "filled") -> tuple[np.ndarray, list[Scene]]:
    """``n`` training scenes (held-out combos excluded) in ``style`` and their images (n, 64, 64, 3) uint8."""
    rng = np.random.default_rng(seed)
    scenes = [replace(sample_scene(rng), style=style) for _ in range(n)]
    images = np.stack([render(s) for s in scenes])
    return images, scenes
