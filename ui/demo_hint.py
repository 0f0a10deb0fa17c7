"""The line shown while the demo model is selected: what it can draw, three prompts to try, where real checkpoints go.

The demo model knows a tiny world (one shape on a plain background at 64×64), so "portrait of a
woman in a garden" gives a blob: without this line nothing tells the artist why. What it knows is
read from the ``vocabulary`` its ``sfumato.json`` ships (written from ``training/world.py``), so
any model that declares a vocabulary gets the same guide, and other models hide it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from engine.families import FAMILY_FILE
from engine.models import CHECKPOINT_SUBDIR, REPO_ROOT, ModelEntry

from .model_info import entry_or_none

EXAMPLE_COUNT = 3
# Tried after the model's own example, and kept only if every word is in its vocabulary.
CANDIDATE_EXAMPLES = (
    "a small yellow triangle at the top, black background",
    "a green square in the center, white background",
    "a large orange circle on the right, gray background",
    "a blue square at the bottom, yellow background",
)


@dataclass(frozen=True)
class Vocabulary:
    """What a demo-style model was trained to draw."""

    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    backgrounds: tuple[str, ...]
    sizes: tuple[str, ...]
    positions: tuple[str, ...]  # phrases: "on the left"
    words: frozenset[str]
    size: tuple[int, int]
    example: str | None


def vocabulary(entry: ModelEntry | None) -> Vocabulary | None:
    """The vocabulary the model folder declares in its sfumato.json; None for ordinary checkpoints."""
    if entry is None or not entry.path.is_dir():
        return None
    try:
        data = json.loads((entry.path / FAMILY_FILE).read_text())
        known = data["vocabulary"]
        return Vocabulary(
            shapes=tuple(known["shapes"]), colours=tuple(known["colours"]), backgrounds=tuple(known["backgrounds"]), sizes=tuple(known["sizes"]),
            positions=tuple(known["positions"].values()), words=frozenset(known["words"]),
            size=(int(data.get("native_width", 64)), int(data.get("native_height", 64))), example=known.get("example"),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def example_prompts(known: Vocabulary) -> list[str]:
    """Three prompts the model can draw: its own example first, then candidates made only of its words."""
    candidates = [known.example] if known.example else []
    candidates += CANDIDATE_EXAMPLES
    fits = [prompt for prompt in candidates if set(prompt.replace(",", " , ").split()) <= known.words]
    return list(dict.fromkeys(fits))[:EXAMPLE_COUNT]


def checkpoints_folder(studio) -> str:
    """Where real checkpoints go, as the artist should type it: relative to the app folder when inside it."""
    folder = Path(studio.config.models_dir) / CHECKPOINT_SUBDIR
    try:
        return str(folder.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(folder)


def other_demos(studio, model: str | None) -> list[str]:
    """The other models in the list that declare a vocabulary (the built-in demos: the first one's UNet and the flow
    transformer), so an artist on one of them learns that the other is there."""
    return [entry.name for entry in studio.registry.list() if entry.name != model and vocabulary(entry) is not None]


def hint_text(known: Vocabulary, checkpoints: str, others: list[str] | tuple[str, ...] = ()) -> str:
    width, height = known.size
    extra = [colour for colour in known.backgrounds if colour not in known.colours]
    background = "a plain background of those colours" + (f" or {' or '.join(extra)}" if extra else "")
    also = f"The same world, another model: {', '.join(f'`{name}`' for name in others)} in the model list. " if others else ""
    return (
        f"ℹ️ **Demo model:** a tiny model that draws one {' / '.join(known.shapes)} in a colour "
        f"({', '.join(known.colours)}), {' or '.join(known.sizes)}, {', '.join(known.positions)}, "
        f"on {background}, at {width}×{height}; other words are ignored. {also}"
        f"For real pictures, put checkpoints in `{checkpoints}` and refresh the model list. Try:"
    )


@dataclass
class DemoHint:
    box: gr.Group
    text: gr.Markdown
    examples: list[gr.Button]


def build_demo_hint(studio, model: str | None) -> DemoHint:
    """The hint under the model picker, visible when ``model`` declares a vocabulary."""
    known = vocabulary(entry_or_none(studio, model))
    examples = example_prompts(known) if known else [""] * EXAMPLE_COUNT
    with gr.Group(visible=known is not None, elem_id="demo_hint") as box:
        text = gr.Markdown(hint_text(known, checkpoints_folder(studio), other_demos(studio, model)) if known else "",
                           elem_id="demo_hint_text")
        with gr.Row():
            buttons = [gr.Button(prompt, size="sm", elem_id=f"demo_example_{index}", elem_classes=["sfumato-example"])
                       for index, prompt in enumerate(examples)]
    return DemoHint(box, text, buttons)


def wire_demo_hint(studio, hint: DemoHint, model_dropdown, tabs: gr.Tabs, txt2img_prompt) -> None:
    """Follow the selected model; an example click fills the txt2img prompt and shows that tab."""

    def follow_model(name):
        known = vocabulary(entry_or_none(studio, name))
        if known is None:
            return gr.update(visible=False), gr.skip(), *[gr.skip()] * len(hint.examples)
        examples = example_prompts(known)
        labels = [gr.update(value=prompt, visible=True) for prompt in examples]
        labels += [gr.update(visible=False)] * (len(hint.examples) - len(labels))
        return gr.update(visible=True), hint_text(known, checkpoints_folder(studio), other_demos(studio, name)), *labels

    model_dropdown.change(follow_model, model_dropdown, [hint.box, hint.text, *hint.examples], api_visibility="private",
                          queue=False)
    for button in hint.examples:
        button.click(lambda prompt: (prompt, gr.Tabs(selected="txt2img")), button, [txt2img_prompt, tabs],
                     api_visibility="private", queue=False)
