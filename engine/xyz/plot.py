"""Running an X/Y/Z plot: one generation per cell, then the labelled grids.

``XyzPlot.plan`` reads and checks every axis before anything runs (a bad value fails the whole plot at
once, naming its axis); ``XyzPlot.run`` then generates the cells through ``Engine.generate``, each with
``base.with_changes(...)`` of its X, Y and Z values, so each cell's infotext carries its own values.

As A1111 does (scripts/xyz_grid.py, 1.10):

- a seed of -1 is drawn once for the whole plot (and each -1 on a Seed axis once for its row or column),
  unless "Keep -1 for seeds" is on; "Vary seeds" adds the cell's index on that axis to its seed;
- the costliest axis (checkpoint, then VAE) changes least often: the loops run it outermost;
- there is one grid per Z value (X across, Y down) and, with more than one Z value, a grid of those grids
  with the Z labels on top, which comes first;
- a grid's infotext is its first cell's plus "Script", the axis types and their values.

While it runs, each progress tick's preview is the current Z grid: the cells finished so far, the running
cell's live preview in its place, black where nothing ran yet. An interrupt ends the plot after the
cell it stops; the cells finished before are kept, and the grids are drawn with them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from PIL import Image

from ..errors import SfumatoError, ValidationError
from ..infotext import quote
from ..request import CancelToken, GeneratedImage, GenerationRequest, GenerationResult, Progress
from ..seeds import resolve_seed
from .axes import NOTHING, SEED, AxisType, check_values, find_axis, read_values, seed_values
from .grid import draw_grid
from .ranges import join_values

SCRIPT_TITLE = "X/Y/Z plot"
AXIS_NAMES = ("x", "y", "z")
MAX_GRID_MEGAPIXELS = 200
SEED_AXES = (SEED, "subseed")  # A1111 fixes each -1 of its Seed and Var. seed axes once


class Generator(Protocol):
    def generate(self, request: GenerationRequest, on_progress: Callable[[Progress], None] | None = None,
                 cancel: CancelToken | None = None) -> GenerationResult: ...


@dataclass(frozen=True)
class Axis:
    """One axis of a plot: its type, its values (ranges expanded, seeds fixed) and the text they came from."""

    type: AxisType
    values: tuple[Any, ...]
    text: str = ""

    @property
    def labels(self) -> list[str]:
        return [self.type.value_label(value) for value in self.values]


NO_AXIS = Axis(find_axis(NOTHING), (None,))


@dataclass(frozen=True)
class PlotOptions:
    """A1111's plot options that change what Sfumato does."""

    draw_legend: bool = True
    keep_random_seeds: bool = False  # A1111's "Keep -1 for seeds": each cell draws its own random seed
    vary_seeds: tuple[bool, bool, bool] = (False, False, False)  # X, Y, Z: add the cell's index on that axis to its seed
    margin: int = 0  # pixels between cells ("Grid margins (px)")


@dataclass(frozen=True)
class Cell:
    index: int  # ix + iy·len(X) + iz·len(X)·len(Y), A1111's order of the cells
    position: tuple[int, int, int]
    request: GenerationRequest


@dataclass
class PlotResult(GenerationResult):
    """A plot's result. ``images`` holds the grids (the grid of grids first when there is one), then the cells.

    ``cells`` has one entry per cell in A1111's order: its first image, or None where it did not run.
    """

    cells: list[GeneratedImage | None] = field(default_factory=list)
    grids: list[GeneratedImage] = field(default_factory=list)  # the grid of grids (with 2+ Z values), then one per Z
    z_grid_count: int = 1


class XyzPlot:
    def __init__(self, base: GenerationRequest, axes: Sequence[Axis], options: PlotOptions | None = None):
        self.base = base
        self.x, self.y, self.z = (list(axes) + [NO_AXIS] * 3)[:3]
        self.options = options or PlotOptions()

    # -- planning ------------------------------------------------------------------------
    @classmethod
    def plan(cls, base: GenerationRequest, axes: Sequence[tuple[AxisType, str | Sequence[Any]]],
             options: PlotOptions | None = None, known: Callable[[str, str], str | None] | None = None) -> "XyzPlot":
        """Read and check up to three (axis type, values) pairs against ``base``.

        ``known(kind, name)`` says what is wrong with a "model" or "vae" name (None when it is installed).
        Raises ValidationError naming the axis ("X axis (Steps)") for any value that would not run.
        """
        options = options or PlotOptions()
        if len(axes) > 3:
            raise ValidationError("xyz", f"a plot has at most three axes, got {len(axes)}")
        if not options.keep_random_seeds:
            base = base.with_changes(seed=resolve_seed(base.seed))
            if base.subseed_strength > 0:
                base = base.with_changes(subseed=resolve_seed(base.subseed))
        planned = []
        for which, (axis_type, text) in zip(AXIS_NAMES, axes):
            values = read_values(axis_type, text, which)
            if axis_type.name in SEED_AXES:
                values = seed_values(values, options.keep_random_seeds)
            if axis_type.name != NOTHING:
                check_values(axis_type, values, base, which, known)
            shown = text if isinstance(text, str) else join_values([str(value) for value in text])
            planned.append(Axis(axis_type, tuple(values), shown))
        plot = cls(base, planned, options)
        width, height = plot._cell_size()
        columns, rows, layers = plot.shape
        megapixels = round(columns * rows * layers * width * height / 1_000_000)
        if megapixels >= MAX_GRID_MEGAPIXELS:  # A1111's default "img_max_size_mp" limit, checked as it does
            raise ValidationError("xyz", f"the grid would be {megapixels} megapixels ({columns}×{rows}×{layers} cells of "
                                         f"{width}×{height}); the limit is {MAX_GRID_MEGAPIXELS}: use fewer values or a smaller size")
        return plot

    @property
    def axes(self) -> tuple[Axis, Axis, Axis]:
        return self.x, self.y, self.z

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.x.values), len(self.y.values), len(self.z.values)

    def cell_request(self, ix: int, iy: int, iz: int) -> GenerationRequest:
        request = self.base
        for axis, index in zip(self.axes, (ix, iy, iz)):
            request = request.with_changes(**axis.type.changes(request, axis.values[index], axis.values))
        offset = sum(index for index, vary in zip((ix, iy, iz), self.options.vary_seeds) if vary)
        if offset and request.seed != -1:
            request = request.with_changes(seed=request.seed + offset)
        return request

    def cells(self) -> list[Cell]:
        """Every cell, in the order they run: the costliest axis outermost (Z, Y, X when costs tie)."""
        columns, rows, layers = self.shape
        counts = {0: columns, 1: rows, 2: layers}
        # (axis number, axis), outermost first: Z, Y, X unless an axis costs more (a stable sort keeps ties in that order)
        loops = sorted(zip((2, 1, 0), (self.z, self.y, self.x)), key=lambda pair: -pair[1].type.cost)
        positions: list[dict[int, int]] = [{}]
        for number, _ in loops:
            positions = [{**outer, number: i} for outer in positions for i in range(counts[number])]
        return [Cell(p[0] + p[1] * columns + p[2] * columns * rows, (p[0], p[1], p[2]), self.cell_request(p[0], p[1], p[2]))
                for p in positions]

    # -- running -------------------------------------------------------------------------
    def run(self, engine: Generator, on_progress: Callable[[Progress], None] | None = None,
            cancel: CancelToken | None = None) -> PlotResult:
        """Generate every cell (until an interrupt), then draw the grids."""
        cancel = cancel or CancelToken()
        started = time.perf_counter()
        cells = self.cells()
        per_cell = self.base.images_total
        images_total = len(cells) * per_cell
        finished: dict[int, list[GeneratedImage]] = {}
        warnings: list[str] = []
        interrupted = False
        first_error: SfumatoError | None = None
        for done, cell in enumerate(cells):
            if cancel.interrupted:
                interrupted = True
                break

            def on_cell_progress(progress: Progress, cell: Cell = cell, done: int = done) -> None:
                if on_progress is None:
                    return
                live = progress.preview_source if progress.has_preview else None
                source = _PartialGrid(self, finished, cell, live) if live is not None else None
                on_progress(self._tick(progress.step, progress.total_steps, done * per_cell + progress.image_index,
                                       images_total, started, source))

            try:
                result = engine.generate(cell.request, on_progress=on_cell_progress, cancel=cancel)
            except SfumatoError as error:  # as A1111 does, a failed cell stays blank and the plot goes on
                first_error = first_error or error
                warnings.append(f"cell {cell.index + 1} failed: {error}")
                continue
            warnings.extend(result.warnings)
            kept = [image for image in result.images
                    if not (result.interrupted and image.stopped_early and image.stopped_early.reason == "interrupted")]
            if kept:
                finished[cell.index] = kept
            if result.interrupted:
                interrupted = True
                break
            if on_progress is not None:
                on_progress(self._tick(cell.request.steps, cell.request.steps, (done + 1) * per_cell - 1, images_total,
                                       started, _PartialGrid(self, finished, cell, None)))
        if not finished and first_error is not None and not interrupted:
            raise first_error
        return self._result(finished, interrupted, warnings, time.perf_counter() - started)

    @staticmethod
    def _tick(step: int, total_steps: int, image_index: int, images_total: int, started: float, preview: Any) -> Progress:
        elapsed = time.perf_counter() - started
        fraction = min(1.0, (image_index * total_steps + step) / max(1, images_total * total_steps))
        eta = elapsed / fraction * (1.0 - fraction) if fraction > 0 else 0.0
        return Progress(step, total_steps, image_index, images_total, elapsed, eta, preview)

    # -- the grids -----------------------------------------------------------------------
    def z_grid(self, iz: int, cells: Sequence[Image.Image | None]) -> Image.Image:
        """The grid of one Z value: X across, Y down, from the cells of that layer (None: blank)."""
        columns, rows, _ = self.shape
        layer = list(cells[iz * columns * rows:(iz + 1) * columns * rows])
        return draw_grid(layer, columns, self.x.labels, self.y.labels, fallback_size=self._cell_size(),
                         margin=self.options.margin, legend=self.options.draw_legend)

    def _cell_size(self) -> tuple[int, int]:
        return self.base.width or 512, self.base.height or 512

    def grid_infotext(self, first: GeneratedImage, with_z: bool) -> str:
        """The first cell's infotext with the plot's entries added: "Script", and each axis's type and values."""
        entries = {"Script": SCRIPT_TITLE}
        for letter, axis in zip("XYZ", self.axes):
            if axis.type.name == NOTHING or (letter == "Z" and not with_z):
                continue
            entries[f"{letter} Type"] = axis.type.label
            entries[f"{letter} Values"] = axis.text
            if axis.type.name in SEED_AXES and not self.options.keep_random_seeds:
                entries[f"Fixed {letter} Values"] = ", ".join(str(value) for value in axis.values)
        lines = first.infotext.split("\n")
        lines[-1] += "".join(f", {key}: {quote(value)}" for key, value in entries.items())
        return "\n".join(lines)

    def _result(self, finished: dict[int, list[GeneratedImage]], interrupted: bool, warnings: list[str],
                seconds: float) -> PlotResult:
        columns, rows, layers = self.shape
        cells = [finished[index][0] if index in finished else None for index in range(columns * rows * layers)]
        pictures = [cell.image if cell is not None else None for cell in cells]
        grids: list[GeneratedImage] = []
        template = next((cell for cell in cells if cell is not None), None)
        if template is not None:
            for iz in range(layers):
                first = next((cell for cell in cells[iz * columns * rows:(iz + 1) * columns * rows] if cell is not None), template)
                grids.append(self._grid_image(self.z_grid(iz, pictures), first, with_z=False))
            if layers > 1:
                combined = draw_grid([grid.image for grid in grids], layers, self.z.labels, [""],
                                     legend=self.options.draw_legend)
                grids.insert(0, self._grid_image(combined, template, with_z=True))
        images = [*grids, *(image for index in sorted(finished) for image in finished[index])]
        return PlotResult(request=self.base, images=images, interrupted=interrupted, timings={"total": seconds},
                          warnings=warnings, cells=cells, grids=grids, z_grid_count=layers)

    def _grid_image(self, image: Image.Image, first: GeneratedImage, with_z: bool) -> GeneratedImage:
        return GeneratedImage(image=image, seed=first.seed, subseed=first.subseed,
                              infotext=self.grid_infotext(first, with_z or self.shape[2] == 1), grid=True)


class _PartialGrid:
    """A progress preview: the running cell's Z grid as it stands, drawn only when someone shows it."""

    def __init__(self, plot: XyzPlot, finished: dict[int, list[GeneratedImage]], cell: Cell, live: Any):
        self._plot, self._cell, self._live = plot, cell, live
        self._finished = {index: images[0].image for index, images in finished.items()}  # a snapshot: the dict grows

    def image(self) -> Image.Image:
        columns, rows, layers = self._plot.shape
        pictures: list[Image.Image | None] = [self._finished.get(index) for index in range(columns * rows * layers)]
        if self._live is not None:
            live = self._live if isinstance(self._live, Image.Image) else self._live.image()
            size = next((picture.size for picture in pictures if picture is not None), self._plot._cell_size())
            pictures[self._cell.index] = live.resize(size)
        return self._plot.z_grid(self._cell.position[2], pictures)
