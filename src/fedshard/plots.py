"""Results -> the figures (PNG), every one mean ± sd over seeds.

Panels and lines keep configurations apart: a setting beyond the classic four that varies in
the data (strategy, batch size, ...) is part of each panel's name, so runs that differ in it are
never averaged together. Diverged runs (analysis.per_run) are left out of every figure, and the
figure's title says how many. Takes a classic results dict or a results frame (see results.py).
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

# Figures only ever go to files: Agg needs no display (servers, CI, GPU nodes).
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .analysis import byte_unit, config_settings, extra_settings, format_value, per_run, setting_label  # noqa: E402
from .files import write_atomic  # noqa: E402
from .results import to_frame  # noqa: E402

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
ACCURACY_VS_LR_TITLE = "Final accuracy vs learning rate (mean ± sd over seeds)"
BEST_VS_ROUNDS_TITLE = "Best accuracy reached vs rounds (mean ± sd over seeds)"


def _extras_label(row, extras) -> str:
    return ", ".join(f"{setting_label(s).lower()} {format_value(s, row[s])}" for s in extras)


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
        ", ".join(filter(None, [f"world size {r['world_size']}",
                                "swap" if r["enable_swapping"] else "no swap", v]))
        for r, v in zip(records, frame["variant"])
    ]
    frame["configuration"] = [
        ", ".join(filter(None, [f"ws {r['world_size']}", f"lr {format_value('learning_rate', r['learning_rate'])}",
                                "swap" if r["enable_swapping"] else "no swap", f"{r['rounds']} rounds", v]))
        for r, v in zip(records, frame["variant"])
    ]
    return frame


def _ordered(frame: pd.DataFrame, column: str, by: list[str]) -> list[str]:
    return list(frame.sort_values(by, kind="mergesort")[column].unique())


def _png(figure, title: str, note: str) -> bytes:
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


def _learning_curves(curves, lr_order, settings_order, note) -> bytes:
    # One panel per (rounds, setting); one line per learning rate, i.e. one line per
    # configuration, mean over seeds with a ±1 sd band.
    grid = sns.relplot(
        data=curves, kind="line", x="round", y="test_accuracy",
        hue="LR", hue_order=lr_order, row="rounds", col="setting", col_order=settings_order,
        errorbar="sd", height=3, aspect=1.3,
        facet_kws={"margin_titles": True},
    )
    grid.set_axis_labels("round", "test accuracy")
    grid.set_titles(col_template="{col_name}", row_template="{row_name} rounds")
    grid.legend.set_title("learning rate")
    return _png(grid.figure, LEARNING_CURVES_TITLE, note)


def _accuracy_vs_lr(runs, extras, note) -> bytes:
    runs = runs.assign(panel=[f"{r} rounds" + (f", {v}" if v else "")
                              for r, v in zip(runs["rounds"], runs["variant"])])
    grid = sns.relplot(
        data=runs, kind="line", x="learning_rate", y="final_accuracy",
        hue="world size", hue_order=_ordered(runs, "world size", ["world_size"]),
        style="swapping", col="panel", col_order=_ordered(runs, "panel", ["rounds", *extras]),
        markers=True, errorbar="sd", err_style="bars", height=3.5, aspect=1.2,
    )
    grid.set(xscale="log")
    grid.set_axis_labels("learning rate", "final test accuracy")
    grid.set_titles("{col_name}")
    return _png(grid.figure, ACCURACY_VS_LR_TITLE, note)


def _swap_comparison(runs, lr_order, extras, note) -> bytes | None:
    """Only (world_size > 1, lr, rounds, other settings) that ran both with and without swapping."""
    sharded = runs[runs["world_size"] > 1]
    paired = sharded.groupby(["world_size", "learning_rate", "rounds", "variant"])[
        "enable_swapping"
    ].transform("nunique") == 2
    sharded = sharded[paired].copy()
    if sharded.empty:
        return None
    sharded["panel"] = [
        f"world size {ws}, {r} rounds" + (f", {v}" if v else "")
        for ws, r, v in zip(sharded["world_size"], sharded["rounds"], sharded["variant"])
    ]
    panels = _ordered(sharded, "panel", ["world_size", "rounds", *extras])
    grid = sns.catplot(
        data=sharded, kind="bar", x="LR",
        order=[lr for lr in lr_order if lr in set(sharded["LR"])],
        y="final_accuracy", hue="swapping", hue_order=["swap off", "swap on"],
        col="panel", col_order=panels, col_wrap=min(3, len(panels)),
        errorbar="sd", capsize=0.1, height=3.5, aspect=1.1,
    )
    grid.set_axis_labels("learning rate", "final test accuracy")
    grid.set_titles("{col_name}")
    return _png(grid.figure, "Swapping on vs off (mean ± sd over seeds)", note)


def _best_vs_rounds(runs, lr_order, settings_order, note) -> bytes:
    grid = sns.catplot(
        data=runs, kind="point", x="rounds", y="best_accuracy",
        hue="LR", hue_order=lr_order, col="setting", col_order=settings_order,
        # seaborn divides the dodge width by the number of hues minus one
        errorbar="sd", dodge=0.3 if len(lr_order) > 1 else False, height=3.5, aspect=1.0,
    )
    grid.set_axis_labels("rounds (setting)", "best test accuracy")
    grid.set_titles("{col_name}")
    grid.legend.set_title("learning rate")
    return _png(grid.figure, BEST_VS_ROUNDS_TITLE, note)


def _accuracy_vs_bytes(curves, settings, note) -> bytes | None:
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
        data=known, kind="line", x="communicated", y="test_accuracy",
        hue="configuration", hue_order=_ordered(known, "configuration", settings),
        col="rounds", errorbar="sd", marker="o", height=3.5, aspect=1.3,
    )
    grid.set_axis_labels(f"cumulative bytes exchanged ({unit})", "test accuracy")
    grid.set_titles("{col_name} rounds")
    return _png(grid.figure, "Test accuracy vs communication (mean ± sd over seeds)", note)


def _left_out(runs: pd.DataFrame) -> str:
    """What the figures leave out: '' or 'left out: 1 of 4 runs, diverged (...)'."""
    count = int(runs["diverged"].sum())
    return (f"left out: {count} of {len(runs)} runs, diverged (NaN or infinite final test loss or accuracy)"
            if count else "")


def figures(results, *, runs=None) -> dict[str, bytes]:
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
        return {name: _nothing_to_draw(title, why) for name, title in
                ((PLOT_FILES[0], LEARNING_CURVES_TITLE), (PLOT_FILES[1], ACCURACY_VS_LR_TITLE),
                 (PLOT_FILES[3], BEST_VS_ROUNDS_TITLE))}
    kept = runs[~runs["diverged"]]
    frame = frame.merge(kept[[*settings, "seed"]], on=[*settings, "seed"], how="inner")
    runs, curves = _labelled(kept, settings, extras), _labelled(frame, settings, extras)
    lr_order = [format_value("learning_rate", lr) for lr in sorted(runs["learning_rate"].unique())]
    settings_order = _ordered(runs, "setting", ["world_size", "enable_swapping", *extras])
    drawn = {
        PLOT_FILES[0]: _learning_curves(curves, lr_order, settings_order, note),
        PLOT_FILES[1]: _accuracy_vs_lr(runs, extras, note),
        PLOT_FILES[2]: _swap_comparison(runs, lr_order, extras, note),
        PLOT_FILES[3]: _best_vs_rounds(runs, lr_order, settings_order, note),
        BYTES_PLOT_FILE: _accuracy_vs_bytes(curves, settings, note),
    }
    return {name: png for name, png in drawn.items() if png is not None}


def make_plots(results, output_dir, *, runs=None) -> list[Path]:
    """Write the figures (figures) into output_dir (created if missing); return their paths."""
    return [write_atomic(Path(output_dir) / name, png) for name, png in figures(results, runs=runs).items()]
