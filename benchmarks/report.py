"""The figures' targets, a verdict for each figure, and what bench.py prints and writes.

A target set for a GPU is not judged from a run without one: a CPU's eval_speedup says nothing
about an H200's, so such a row reads n/a (and its JSON `met` is null) rather than NO.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import projection

TARGETS = {  # figure -> (comparison, bound, the device the bound is set for)
    "data_pipeline_speedup": (">=", 10.0, "CPU"),
    "eval_speedup": (">=", 20.0, "H200"),
    "round_overhead_ratio": ("<=", 1.10, "CPU"),
    "startup_seconds": ("<=", 8.0, "CPU"),
    "exchange_gbytes_per_s": (">=", 1.0, "CPU"),
    "grid_projected_minutes": ("<=", projection.TARGET_MINUTES, projection.TARGET_DEVICE),
}
# Sections of bench.py's table, top to bottom (they are measured in another order).
ROW_ORDER = (
    "data_pipeline",
    "eval",
    "precision",
    "models",
    "experiment",
    "startup",
    "exchange",
    "extension",
    "cuda",
    "grid",
)


def met(metric: str, value, on_gpu: bool) -> bool | None:
    """Whether `value` meets the target of `metric`; None when there is no target or no value,
    or when the target is a GPU's and the figure was not measured on one."""
    if metric not in TARGETS or value is None:
        return None
    op, bound, where = TARGETS[metric]
    if where != "CPU" and not on_gpu:
        return None
    return value >= bound if op == ">=" else value <= bound


def judge(figures: dict, on_gpu: bool, names=tuple(TARGETS)) -> dict:
    """The verdict on each target of `names`, as both benchmark scripts record it: the comparison,
    the bound, the device it is set for, the figure's value and `met` (see met)."""
    return {
        m: {"op": op, "bound": bound, "where": where, "value": figures.get(m), "met": met(m, figures.get(m), on_gpu)}
        for m in names
        for op, bound, where in [TARGETS[m]]
    }


def verdict(metric: str, value, on_gpu: bool) -> tuple[str, str]:
    """(target text, 'yes' / 'NO' / 'n/a'), or two empty strings for a figure without target or value."""
    if metric not in TARGETS or value is None:
        return "", ""
    op, bound, where = TARGETS[metric]
    return f"{op} {bound:g} ({where})", {True: "yes", False: "NO", None: "n/a"}[met(metric, value, on_gpu)]


def fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def table(rows: list[tuple[str, object, str]], on_gpu: bool) -> str:
    """A Markdown table: one row per (figure, value, unit), with its target and verdict."""
    lines = [("metric", "value", "unit", "target", "met?")]
    for metric, value, unit in rows:
        lines.append((metric, fmt(value), unit, *verdict(metric, value, on_gpu)))
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    out = []
    for k, line in enumerate(lines):
        out.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |")
        if k == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


@dataclass
class Section:
    """What one measurement gives: its details (JSON), its headline figures, and its table rows."""

    details: dict
    figures: dict
    rows: list[tuple[str, object, str]]


class Report:
    """Every figure of one bench.py run, gathered section by section."""

    def __init__(self, info: dict, quick: bool, sizes: dict, on_gpu: bool, path: str | None = None):
        self.results: dict = {"machine": info, "quick": quick, "sizes": sizes, "details": {}, "figures": {}}
        self.info, self.quick, self.on_gpu, self.path = info, quick, on_gpu, path
        self.figures: dict[str, float | None] = self.results["figures"]
        self.rows: dict[str, list] = {}

    def add(self, name: str, section: Section) -> Section:
        """One section's results; with a `path`, every result so far is written there at once, so
        that a run stopped before the end (gpu_check.py's budget) keeps what it measured."""
        self.results["details"][name] = section.details
        self.figures.update(section.figures)
        self.rows[name] = section.rows
        if self.path:
            self.write(self.path)
        return section

    def finish(self) -> None:
        """The load at the end, the figures and each target's verdict, into the results."""
        self.info["load_average_1min_end"] = round(os.getloadavg()[0], 2)
        self.results["figures"] = self.figures
        self.results["targets"] = judge(self.figures, self.on_gpu)

    def text(self) -> str:
        info = self.info
        busy = max(info["load_average_1min_start"], info["load_average_1min_end"]) > 0.5 * info["cores"]
        noisy = "  <- other processes were running; timings are noisy" if busy else ""
        rows = [row for name in ROW_ORDER for row in self.rows.get(name, [])]
        return "\n".join(
            [
                f"fedshard benchmark, {info['date']}{' (--quick)' if self.quick else ''}",
                (
                    f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, "
                    f"torch {info['torch']}, device {info.get('gpu', info['device'])}"
                ),
                (
                    f"load average (1 min) at start / end: {info['load_average_1min_start']} / "
                    f"{info['load_average_1min_end']}{noisy}"
                ),
                table(rows, self.on_gpu),
            ]
        )

    def write(self, path: str) -> None:
        Path(path).write_text(json.dumps(self.results, indent=2, default=str))
