"""Results -> the figures (PNG), every one mean ± sd over seeds.

Panels and lines keep configurations apart: a setting beyond the classic four that varies in
the data (strategy, batch size, ...) is part of each panel's name, so runs that differ in it are
never averaged together. Diverged runs (analysis.per_run) are left out of every figure, and the
figure's title says how many. Takes a classic results dict or a results frame (see results.py).
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import matplotlib

# Figures only ever go to files: Agg needs no display (servers, CI, GPU nodes).
matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedshard.core.files import write_atomic
from fedshard.results.analysis import (
    SOURCE,
    byte_unit,
    config_settings,
    extra_settings,
    format_value,
    per_run,
    setting_label,
)
from fedshard.results.formats import ResultsOrFrame, plain, to_frame

# The classic figures, in the order make_plots writes them (swap_comparison only where a
# swapping and a non-swapping configuration can be compared).
PLOT_FILES = (
    "learning_curves.png",
    "accuracy_vs_lr.png",
    "swap_comparison.png",
    "best_accuracy_vs_rounds.png",
)
# Drawn after them, only when the results know each round's communication bytes (CSV exports).
BYTES_PLOT_FILE = "accuracy_vs_bytes.png"
LEARNING_CURVES_TITLE = "Test accuracy per round (mean ± sd over seeds)"
# Panels a row at most: a grid of four world sizes with and without swapping wraps instead of
# running 3000 pixels wide.
MAX_COLUMNS = 4
# A panel whose curves span less than this share of the figure's accuracy range would be flat
# lines on a shared y axis: it gets its own range, and says so.
FLAT_SHARE = 0.25
ACCURACY_VS_LR_TITLE = "Final accuracy vs learning rate (mean ± sd over seeds)"
BEST_VS_ROUNDS_TITLE = "Best accuracy over the trained rounds (r ≥ 1) vs rounds (mean ± sd over seeds)"


# A setting's value in a panel's title at most this long: a run name (init_from=run:...) is a whole
# configuration, which report.md gives in full.
TITLE_VALUE_CHARS = 24


def _extras_label(row: Mapping[Any, object], extras: Iterable[str]) -> str:
    """'layerwise on, strategy fedavg' of a row's further settings."""

    def value(s: str) -> str:
        v = plain(row[s])
        text = ("on" if v else "off") if isinstance(v, bool) else format_value(s, v)
        return text if len(text) <= TITLE_VALUE_CHARS else text[: TITLE_VALUE_CHARS - 1] + "…"

    return ", ".join(f"{setting_label(s).lower()} {value(s)}" for s in extras)


def _labelled(frame: pd.DataFrame, settings: list[str], extras: list[str]) -> pd.DataFrame:
    """Categorical text columns for seaborn (which would otherwise treat world size and learning
    rate as continuous hues with a colour bar instead of a legend), and panel names; `extras` are
    the settings beyond the classic four (analysis.extra_settings)."""
    frame = frame.copy()
    records = frame[settings].to_dict("records")
    frame["LR"] = frame["learning_rate"].map(lambda lr: format_value("learning_rate", lr))
    frame["world size"] = frame["world_size"].astype(str)
    frame["swapping"] = frame["enable_swapping"].map({True: "swap on", False: "swap off"})
    # What the classic four leave open: "" for a classic results file.
    frame["variant"] = [_extras_label(r, extras) for r in records]
    frame["setting"] = [
        ", ".join(filter(None, [f"world size {r['world_size']}", "swap" if r["enable_swapping"] else "no swap", v]))
        for r, v in zip(records, frame["variant"])
    ]
    frame["configuration"] = [
        ", ".join(
            filter(
                None,
                [
                    f"ws {r['world_size']}",
                    f"lr {format_value('learning_rate', r['learning_rate'])}",
                    "swap" if r["enable_swapping"] else "no swap",
                    f"{r['rounds']} rounds",
                    v,
                ],
            )
        )
        for r, v in zip(records, frame["variant"])
    ]
    return frame


def _ordered(frame: pd.DataFrame, column: str, by: list[str]) -> list[str]:
    return list(frame.sort_values(by, kind="mergesort")[column].unique())


def _png(figure: Figure, title: str, note: str) -> bytes:
    """The figure as PNG bytes, titled, with `note` (what was left out) under it as a footnote; closed."""
    figure.suptitle(title, y=1.02)
    if note:
        figure.text(0.5, -0.02, note, ha="center", va="top", fontsize=9, color="dimgray")
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return out.getvalue()


def _nothing_to_draw(title: str, why: str) -> bytes:
    figure, ax = plt.subplots(figsize=(6, 2))
    ax.set_axis_off()
    ax.text(0.5, 0.5, f"Nothing to draw: {why}", ha="center", va="center", wrap=True)
    return _png(figure, title, "")


def _layout(frame: pd.DataFrame, extras: list[str]) -> tuple[dict[str, object], dict[tuple[str, int], str]]:
    """The panels of the learning curves: one per world size (and round count, where there are
    several), swapping and further settings, a row per world size with its panels side by side
    from the left; where a world size has more than MAX_COLUMNS, every panel in turn, wrapped
    MAX_COLUMNS a row. Returns relplot's keyword arguments and each panel's title by its
    (row, column) names. Adds the columns it lays out to `frame`."""
    several = frame["rounds"].nunique() > 1
    frame["panel_row"] = [
        f"world size {ws}" + (f", {r} rounds" if several else "") for ws, r in zip(frame["world_size"], frame["rounds"])
    ]
    frame["panel"] = [
        ", ".join(filter(None, [row, "swap" if swap else "no swap", v]))
        for row, swap, v in zip(frame["panel_row"], frame["enable_swapping"], frame["variant"])
    ]
    panels = _ordered(frame, "panel", ["world_size", "rounds", "enable_swapping", *extras])
    rows = _ordered(frame, "panel_row", ["world_size", "rounds"])
    in_row = {row: [p for p in panels if frame.loc[frame["panel"] == p, "panel_row"].iloc[0] == row] for row in rows}
    if max(map(len, in_row.values())) > MAX_COLUMNS:
        return {"col": "panel", "col_order": panels, "col_wrap": MAX_COLUMNS}, {}
    slot = {p: i for row in rows for i, p in enumerate(in_row[row])}
    frame["panel_slot"] = frame["panel"].map(slot)
    titles = {(row, i): p for row in rows for i, p in enumerate(in_row[row])}
    return {"row": "panel_row", "row_order": rows, "col": "panel_slot"}, titles


def _fit_y(grid: sns.FacetGrid) -> str:
    """One y range for every panel, but a panel whose curves would be flat on it (FLAT_SHARE) keeps
    its own, its title saying so; empty panels (no such configuration) are hidden. Returns the
    footnote explaining the own ranges, or ''."""
    drawn = [ax for ax in grid.axes.flat if ax.has_data()]
    for ax in grid.axes.flat:
        if not ax.has_data():
            ax.set_visible(False)
    low, high = min(ax.dataLim.y0 for ax in drawn), max(ax.dataLim.y1 for ax in drawn)
    pad = 0.05 * (high - low) or 0.01
    own = [ax for ax in drawn if ax.dataLim.height < FLAT_SHARE * (high - low)]
    for ax in drawn:
        if ax in own:
            ax.set_title(f"{ax.get_title()}\n(own y range)", color="firebrick", fontsize=10)
        else:
            ax.set_ylim(low - pad, high + pad)
    return (
        f"(own y range): zoomed in, as on the shared range ({low:.2f} to {high:.2f}) its curves would be nearly flat"
        if own
        else ""
    )


def _learning_curves(curves: pd.DataFrame, lr_order: list[str], extras: list[str], note: str) -> bytes:
    # One panel per world size, swapping and further settings (_layout); one line per learning
    # rate, i.e. one line per configuration, mean over seeds with a ±1 sd band. Several sources
    # are line styles in one panel, so that their curves of one configuration lie side by side.
    sources = SOURCE in extras
    extras = [s for s in extras if s != SOURCE]
    curves = curves.assign(variant=[_extras_label(r, extras) for r in curves[extras].to_dict("records")])
    layout, titles = _layout(curves, extras)
    grid = sns.relplot(
        data=curves,
        kind="line",
        x="round",
        y="test_accuracy",
        hue="LR",
        hue_order=lr_order,
        style=SOURCE if sources else None,
        errorbar="sd",
        height=2.8,
        aspect=1.3,
        facet_kws={"sharey": False},
        **layout,
    )
    grid.set_axis_labels("round", "test accuracy")
    grid.set_titles("{col_name}")
    for key, ax in grid.axes_dict.items():
        ax.set_title(textwrap.fill(titles.get(key, "") if titles else ax.get_title(), 40), fontsize=10)
    for ax in grid.axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not sources:
        grid.legend.set_title("learning rate")
    grid.tight_layout()  # room for titles of several lines, between the rows too
    return _png(grid.figure, LEARNING_CURVES_TITLE, "\n".join(filter(None, [_fit_y(grid), note])))


def _accuracy_vs_lr(runs: pd.DataFrame, extras: list[str], note: str) -> bytes:
    runs = runs.assign(panel=[f"{r} rounds" + (f", {v}" if v else "") for r, v in zip(runs["rounds"], runs["variant"])])
    panels = _ordered(runs, "panel", ["rounds", *extras])
    grid = sns.relplot(
        data=runs,
        kind="line",
        x="learning_rate",
        y="final_accuracy",
        hue="world size",
        hue_order=_ordered(runs, "world size", ["world_size"]),
        style="swapping",
        col="panel",
        col_order=panels,
        col_wrap=min(MAX_COLUMNS, len(panels)),
        markers=True,
        errorbar="sd",
        err_style="bars",
        height=3.5,
        aspect=1.2,
    )
    grid.set(xscale="log")
    grid.set_axis_labels("learning rate", "final test accuracy")
    grid.set_titles("{col_name}")
    return _png(grid.figure, ACCURACY_VS_LR_TITLE, note)


def _swap_comparison(runs: pd.DataFrame, lr_order: list[str], extras: list[str], note: str) -> bytes | None:
    """Only (world_size > 1, lr, rounds, other settings) that ran both with and without swapping."""
    sharded = runs[runs["world_size"] > 1]
    paired = (
        sharded.groupby(["world_size", "learning_rate", "rounds", "variant"])["enable_swapping"].transform("nunique")
        == 2
    )
    sharded = sharded[paired].copy()
    if sharded.empty:
        return None
    sharded["panel"] = [
        f"world size {ws}, {r} rounds" + (f", {v}" if v else "")
        for ws, r, v in zip(sharded["world_size"], sharded["rounds"], sharded["variant"])
    ]
    panels = _ordered(sharded, "panel", ["world_size", "rounds", *extras])
    grid = sns.catplot(
        data=sharded,
        kind="bar",
        x="LR",
        order=[lr for lr in lr_order if lr in set(sharded["LR"])],
        y="final_accuracy",
        hue="swapping",
        hue_order=["swap off", "swap on"],
        col="panel",
        col_order=panels,
        col_wrap=min(3, len(panels)),
        errorbar="sd",
        capsize=0.1,
        height=3.5,
        aspect=1.1,
    )
    grid.set_axis_labels("learning rate", "final test accuracy")
    grid.set_titles("{col_name}")
    return _png(grid.figure, "Swapping on vs off (mean ± sd over seeds)", note)


def _best_vs_rounds(runs: pd.DataFrame, lr_order: list[str], settings_order: list[str], note: str) -> bytes:
    grid = sns.catplot(
        data=runs,
        kind="point",
        x="rounds",
        y="best_accuracy",
        hue="LR",
        hue_order=lr_order,
        col="setting",
        col_order=settings_order,
        col_wrap=min(MAX_COLUMNS, len(settings_order)),
        # seaborn divides the dodge width by the number of hues minus one
        errorbar="sd",
        dodge=0.3 if len(lr_order) > 1 else False,
        height=3.5,
        aspect=1.0,
    )
    grid.set_axis_labels("rounds (setting)", "best test accuracy")
    grid.set_titles("{col_name}")
    grid.legend.set_title("learning rate")
    return _png(grid.figure, BEST_VS_ROUNDS_TITLE, note)


def _accuracy_vs_bytes(curves: pd.DataFrame, settings: list[str], note: str) -> bytes | None:
    """Test accuracy against cumulative communication, one line per configuration."""
    if "bytes_total" not in curves.columns:
        return None
    known = curves.dropna(subset=["bytes_total"])
    if known.empty:
        return None
    # Seeds of one configuration send (nearly) the same bytes per round: plot each round at
    # their mean, so that seaborn averages the accuracies of one round, not of one byte count.
    mean_bytes = known.groupby([*settings, "round"], dropna=False)["bytes_total"].transform("mean")
    unit, scale = byte_unit(mean_bytes.max())
    known = known.assign(communicated=mean_bytes / scale)
    grid = sns.relplot(
        data=known,
        kind="line",
        x="communicated",
        y="test_accuracy",
        hue="configuration",
        hue_order=_ordered(known, "configuration", settings),
        col="rounds",
        errorbar="sd",
        marker="o",
        height=3.5,
        aspect=1.3,
    )
    grid.set_axis_labels(f"cumulative bytes exchanged ({unit})", "test accuracy")
    grid.set_titles("{col_name} rounds")
    return _png(grid.figure, "Test accuracy vs communication (mean ± sd over seeds)", note)


def _left_out(runs: pd.DataFrame) -> str:
    """What the figures leave out: '' or 'left out: 1 of 4 runs, diverged (...)'."""
    count = int(runs["diverged"].sum())
    return (
        f"left out: {count} of {len(runs)} runs, diverged (NaN or infinite final test loss or accuracy)"
        if count
        else ""
    )


def figures(results: ResultsOrFrame, *, runs: pd.DataFrame | None = None) -> dict[str, bytes]:
    """The PNG figures, file name -> bytes, in PLOT_FILES order (then BYTES_PLOT_FILE); `runs` is
    analysis.per_run(results) where the caller has it already.

    swap_comparison.png is only drawn for settings that have both a swapping and a non-swapping
    configuration at world_size > 1; accuracy_vs_bytes.png only when the results hold
    communication bytes. Diverged runs are left out, saying so; where every run diverged, the
    three figures every analysis has say that there is nothing to draw.
    """
    frame = to_frame(results)
    settings, extras = config_settings(frame), extra_settings(frame)
    runs = per_run(frame) if runs is None else runs
    note = _left_out(runs)
    if runs["diverged"].all():
        why = "every run diverged (NaN or infinite final test loss or accuracy)"
        return {
            name: _nothing_to_draw(title, why)
            for name, title in (
                (PLOT_FILES[0], LEARNING_CURVES_TITLE),
                (PLOT_FILES[1], ACCURACY_VS_LR_TITLE),
                (PLOT_FILES[3], BEST_VS_ROUNDS_TITLE),
            )
        }
    kept = runs[~runs["diverged"]]
    frame = frame.merge(kept[[*settings, "seed"]], on=[*settings, "seed"], how="inner")
    runs, curves = _labelled(kept, settings, extras), _labelled(frame, settings, extras)
    lr_order = [format_value("learning_rate", lr) for lr in sorted(runs["learning_rate"].unique())]
    settings_order = _ordered(runs, "setting", ["world_size", "enable_swapping", *extras])
    drawn: dict[str, bytes | None] = {
        PLOT_FILES[0]: _learning_curves(curves, lr_order, extras, note),
        PLOT_FILES[1]: _accuracy_vs_lr(runs, extras, note),
        PLOT_FILES[2]: _swap_comparison(runs, lr_order, extras, note),
        PLOT_FILES[3]: _best_vs_rounds(runs, lr_order, settings_order, note),
        BYTES_PLOT_FILE: _accuracy_vs_bytes(curves, settings, note),
    }
    return {name: png for name, png in drawn.items() if png is not None}


def make_plots(results: ResultsOrFrame, output_dir: str | Path, *, runs: pd.DataFrame | None = None) -> list[Path]:
    """Write the figures (figures) into output_dir (created if missing); return their paths."""
    return [write_atomic(Path(output_dir) / name, png) for name, png in figures(results, runs=runs).items()]
