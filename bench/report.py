"""What a bench returns, the table printed from it, and the README section written from it."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

README_START = "<!-- bench:results:start -->"
README_END = "<!-- bench:results:end -->"


@dataclass(frozen=True)
class Row:
    """One line of the results table. Every goal is an upper bound: ``value <= goal`` passes."""

    figure: str
    value: float | None
    unit: str = "×"
    goal: float | None = None
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.value is None or (isinstance(self.value, float) and math.isnan(self.value)):
            return "skipped"
        if self.goal is None:
            return ""
        return "pass" if self.value <= self.goal else "FAIL"

    def cells(self) -> list[str]:
        return [self.figure, _format(self.value, self.unit), "" if self.goal is None else f"≤ {_format(self.goal, self.unit)}",
                self.verdict, self.note]


@dataclass
class BenchResult:
    name: str
    title: str
    figures: dict = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    skipped: str | None = None  # why the bench could not run, when it could not


def _format(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if unit == "×":
        return f"{value:.3f}×" if value == 0 or abs(value) >= 0.01 else f"{value:.2g}×"
    if unit.startswith("/"):
        return f"{value:g}{unit}"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "MiB":
        return f"{value:.0f} MiB"
    return f"{value:g} {unit}".strip()


HEADER = ["Figure", "Measured", "Goal", "Verdict", "Note"]


def markdown_table(results: list[BenchResult]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for result in results:
        if result.skipped:
            lines.append(f"| {result.title} | — | | skipped | {result.skipped} |")
            continue
        for row in result.rows:
            lines.append("| " + " | ".join(cell.replace("|", "/") for cell in row.cells()) + " |")
    return "\n".join(lines)


def text_table(results: list[BenchResult]) -> str:
    rows = [HEADER]
    for result in results:
        if result.skipped:
            rows.append([result.title, "—", "", "skipped", result.skipped])
            continue
        rows.extend(row.cells() for row in result.rows)
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
    out = []
    for index, row in enumerate(rows):
        out.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
        if index == 0:
            out.append("  ".join("-" * width for width in widths) + "  " + "-" * 4)
    return "\n".join(out)


def readme_section(results: list[BenchResult], meta: dict) -> str:
    machine = ", ".join(f"{key}: {value}" for key, value in meta.items()
                        if key in ("mode", "device", "torch", "diffusers", "threads", "cpu_count", "load_average", "date"))
    notes = meta.get("notes") or []
    lines = [README_START, f"Latest run ({machine}).", "", markdown_table(results)]
    if notes:
        lines += ["", *[f"- {note}" for note in notes]]
    if meta.get("plot"):
        lines += ["", f"![time per step vs size and batch]({meta['plot']})"]
    lines.append(README_END)
    return "\n".join(lines)


def write_readme(path: Path, results: list[BenchResult], meta: dict) -> None:
    """Replace the generated section of ``path`` (between the markers), keeping the prose around it."""
    section = readme_section(results, meta)
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{README_START}\n{README_END}\n"
    if README_START in text and README_END in text:
        pattern = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.S)
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n## Latest results\n\n" + section + "\n"
    path.write_text(text)
