"""Drawing a plot's grid: cells in rows and columns, labels on the top and left, as A1111 lays them out.

The layout follows A1111's ``images.image_grid`` and ``images.draw_grid_annotations`` (1.10), re-made from
what they draw:

- cells sit on a grid of the largest cell's size, top-left in their slot; a missing cell (not run yet,
  interrupted) is left black, as A1111 fills a failed cell;
- with labels, the canvas is white and ``margin`` pixels apart between cells; the font size is
  (cell width + cell height) // 25 (here never below ``MIN_FONT_SIZE``, so small cells stay readable),
  and lines are that // 2 apart;
- column labels are centred over their column, wrapped to its width; the top band is as tall as the tallest
  label plus a line spacing above and below, and absent when no column has a label;
- row labels are centred in a left band three quarters of a cell wide, wrapped to it; absent when no row has one.

The font is Pillow's built-in one (``ImageFont.load_default(size=...)``), so it works offline.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

MIN_FONT_SIZE = 10
TEXT_COLOUR = (0, 0, 0)


@lru_cache(maxsize=8)
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def font_size(cell_width: int, cell_height: int) -> int:
    return max(MIN_FONT_SIZE, (cell_width + cell_height) // 25)


def _text_width(draw: ImageDraw.ImageDraw, text: str, typeface) -> float:
    left, _, right, _ = draw.textbbox((0, 0), text, font=typeface)
    return right - left


def wrap(draw: ImageDraw.ImageDraw, text: str, typeface, width: int) -> list[str]:
    """Words on lines no wider than ``width`` (a single longer word keeps its own line)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and _text_width(draw, candidate, typeface) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def _line_height(draw: ImageDraw.ImageDraw, text: str, typeface) -> int:
    _, top, _, bottom = draw.multiline_textbbox((0, 0), text, font=typeface)
    return bottom - top


def _block(draw: ImageDraw.ImageDraw, text: str, typeface, width: int, spacing: int) -> tuple[list[str], list[int], int]:
    """A label's wrapped lines, their heights, and the block's height (lines + spacing between them)."""
    if not text:
        return [], [], 0
    lines = wrap(draw, text, typeface, width)
    heights = [_line_height(draw, line, typeface) for line in lines]
    return lines, heights, sum(heights) + spacing * (len(lines) - 1)


def cell_size(cells: Sequence[Image.Image | None], fallback: tuple[int, int]) -> tuple[int, int]:
    present = [cell.size for cell in cells if cell is not None]
    if not present:
        return fallback
    return max(width for width, _ in present), max(height for _, height in present)


def label_bands(cell: tuple[int, int], column_labels: Sequence[str], row_labels: Sequence[str]) -> tuple[int, int]:
    """(left band width, top band height) for labels on cells of this size."""
    width, height = cell
    size = font_size(width, height)
    typeface, spacing = font(size), size // 2
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = width * 3 // 4 if any(row_labels) else 0
    heights = [_block(draw, label, typeface, width, spacing)[2] for label in column_labels]
    top = max(heights) + 2 * spacing if any(column_labels) else 0
    return left, top


def draw_grid(cells: Sequence[Image.Image | None], columns: int, column_labels: Sequence[str], row_labels: Sequence[str],
              *, fallback_size: tuple[int, int] = (64, 64), margin: int = 0, legend: bool = True) -> Image.Image:
    """The cells, row by row (``columns`` to a row), with the labels when ``legend`` is on.

    ``column_labels`` has one label per column and ``row_labels`` one per row ("" for none).
    """
    rows = -(-len(cells) // columns)
    width, height = cell_size(cells, fallback_size)
    if not legend:
        column_labels, row_labels, margin = [""] * columns, [""] * rows, 0
    left, top = label_bands((width, height), column_labels, row_labels) if legend else (0, 0)
    canvas_size = (left + columns * width + margin * (columns - 1), top + rows * height + margin * (rows - 1))
    canvas = Image.new("RGB", canvas_size, "white" if (left or top or margin) else "black")
    for index in range(rows * columns):
        row, column = divmod(index, columns)
        x, y = left + column * (width + margin), top + row * (height + margin)
        cell = cells[index] if index < len(cells) else None
        if cell is None:
            canvas.paste((0, 0, 0), (x, y, x + width, y + height))
        else:
            canvas.paste(cell.convert("RGB"), (x, y))
    if left or top:
        _draw_labels(canvas, (width, height), margin, left, top, column_labels, row_labels)
    return canvas


def _draw_labels(canvas: Image.Image, cell: tuple[int, int], margin: int, left: int, top: int,
                 column_labels: Sequence[str], row_labels: Sequence[str]) -> None:
    width, height = cell
    size = font_size(width, height)
    typeface, spacing = font(size), size // 2
    draw = ImageDraw.Draw(canvas)

    def write(centre_x: float, y: float, lines: list[str], heights: list[int]) -> None:
        for line, line_height in zip(lines, heights):
            draw.text((centre_x, y), line, font=typeface, fill=TEXT_COLOUR, anchor="ma")
            y += line_height + spacing

    for column, label in enumerate(column_labels):
        lines, heights, total = _block(draw, label, typeface, width, spacing)
        write(left + column * (width + margin) + width / 2, top / 2 - total / 2, lines, heights)
    for row, label in enumerate(row_labels):
        lines, heights, total = _block(draw, label, typeface, left, spacing)
        write(left / 2, top + row * (height + margin) + height / 2 - total / 2, lines, heights)
