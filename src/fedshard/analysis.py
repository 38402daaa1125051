"""Results pickle -> summary tables, ranking and figures.

This module owns everything downstream of the classic results pickle
``{(world_size, learning_rate, enable_swapping, rounds, seed):
[(round, test_loss, test_accuracy), ...]}``: reading it safely, checking its
format, aggregating seeds into configurations (the key without the seed),
the best-configuration ranking, the plots and the console report. It never
talks to MLflow; ``export.py`` produces the pickle.
"""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path

import matplotlib

# Figures only ever go to files: Agg needs no display (servers, CI, GPU nodes).
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

CONFIG_FIELDS = ("world_size", "learning_rate", "enable_swapping", "rounds")
KEY_FIELDS = CONFIG_FIELDS + ("seed",)
KEY_TYPES = (int, float, bool, int, int)

PLOT_FILES = (
    "learning_curves.png",
    "accuracy_vs_lr.png",
    "swap_comparison.png",
    "best_accuracy_vs_rounds.png",
)


class ResultsError(Exception):
    """The file is missing, empty or not a results pickle; message says which and why."""


# --------------------------------------------------------------------------- loading


class _NoGlobalsUnpickler(pickle.Unpickler):
    # dict/list/tuple/int/float/bool have opcodes of their own, so a genuine
    # results pickle never names a global. Refusing every global means loading
    # a hostile file cannot import or call anything (os.system, eval, ...).
    def find_class(self, module, name):
        raise ResultsError(
            f"it refers to the global {module}.{name}, which is refused "
            "(a results pickle holds only dicts, lists, tuples, ints, floats and bools)"
        )

    def persistent_load(self, pid):
        raise ResultsError("it contains a persistent id, which is refused")


def _is_int(x) -> bool:
    # bool is a subclass of int, but True is not a world size or a round.
    return type(x) is int


def _is_number(x) -> bool:
    return type(x) in (int, float)


def _key_problem(key) -> str | None:
    if type(key) is not tuple or len(key) != 5:
        return f"key {key!r} is not a 5-tuple {KEY_FIELDS}"
    for field, expected, value in zip(KEY_FIELDS, KEY_TYPES, key):
        if type(value) is not expected:
            return (
                f"key {key!r}: {field} is {type(value).__name__} {value!r}, "
                f"expected {expected.__name__}"
            )
    world_size, lr, _, rounds, _ = key
    if world_size < 1:
        return f"key {key!r}: world_size must be >= 1"
    if not (math.isfinite(lr) and lr > 0):
        return f"key {key!r}: learning_rate must be a positive finite float"
    if rounds < 1:
        return f"key {key!r}: rounds must be >= 1"
    return None


def _entries_problem(entries) -> str | None:
    if type(entries) is not list or not entries:
        return (
            f"value is {type(entries).__name__} {entries!r:.60}, expected a non-empty "
            "list of (round, test_loss, test_accuracy) tuples"
        )
    for i, entry in enumerate(entries):
        if not (
            type(entry) is tuple
            and len(entry) == 3
            and _is_int(entry[0])
            and _is_number(entry[1])
            and _is_number(entry[2])
        ):
            return (
                f"entry {i} is {entry!r:.60}, expected a tuple "
                "(round: int, test_loss: float, test_accuracy: float)"
            )
        if i == 0 and entry[0] != 0:
            return f"entry 0 has round {entry[0]}, expected round 0 (before training) first"
        if i > 0 and entry[0] <= entries[i - 1][0]:
            return (
                f"entry {i} has round {entry[0]} after round {entries[i - 1][0]}, "
                "expected rounds strictly increasing"
            )
    return None


def load_results(path) -> dict:
    """Read and validate a results pickle; raise ResultsError saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise ResultsError(f"{path}: no such results file")
    try:
        data = path.read_bytes()
    except OSError as e:  # a directory, no permission, ...
        raise ResultsError(f"{path}: cannot read the results file ({e.strerror})") from None
    if not data:
        raise ResultsError(f"{path}: the file is empty (0 bytes), not a results pickle")
    try:
        results = _NoGlobalsUnpickler(io.BytesIO(data)).load()
    except ResultsError as e:
        raise ResultsError(f"{path}: not a results pickle: {e}") from None
    except Exception as e:  # truncated/corrupt pickles raise many different types
        raise ResultsError(
            f"{path}: not a results pickle: cannot unpickle it ({type(e).__name__}: {e})"
        ) from None
    if type(results) is not dict:
        raise ResultsError(
            f"{path}: not a results pickle: it holds a {type(results).__name__}, "
            "expected a dict {(world_size, learning_rate, enable_swapping, rounds, seed): "
            "[(round, test_loss, test_accuracy), ...]}"
        )
    if not results:
        raise ResultsError(f"{path}: the results dict is empty (no experiments)")
    for key, entries in results.items():
        problem = _key_problem(key)
        if problem is None and (problem := _entries_problem(entries)) is not None:
            problem = f"key {key!r}: {problem}"
        if problem is not None:
            raise ResultsError(f"{path}: not a results pickle: {problem}")
    return results


# --------------------------------------------------------------------------- tables


def _per_run(results) -> pd.DataFrame:
    """One row per experiment (seed) with its final and best numbers."""
    rows = []
    for key, entries in results.items():
        _, final_loss, final_acc = entries[-1]
        best_acc = max(acc for _, _, acc in entries)
        rows.append((*key, float(final_acc), float(best_acc), float(final_loss)))
    return pd.DataFrame(
        rows, columns=[*KEY_FIELDS, "final_accuracy", "best_accuracy", "final_loss"]
    )


def summarize(results) -> pd.DataFrame:
    """One row per configuration, seeds aggregated, best final accuracy first.

    Columns: world_size, learning_rate, enable_swapping, rounds,
    final_accuracy_mean, final_accuracy_std (sample std, 0.0 for a single seed),
    n, best_accuracy_mean, final_loss_mean. "Final" is the last round logged,
    "best" the highest test accuracy over all rounds of a run.
    """
    runs = _per_run(results)
    grouped = runs.groupby(list(CONFIG_FIELDS), sort=True)
    table = grouped.agg(
        final_accuracy_mean=("final_accuracy", "mean"),
        final_accuracy_std=("final_accuracy", "std"),
        n=("seed", "size"),
        best_accuracy_mean=("best_accuracy", "mean"),
        final_loss_mean=("final_loss", "mean"),
    ).reset_index()
    # std of a single sample is undefined (NaN); report no spread instead.
    table["final_accuracy_std"] = table["final_accuracy_std"].where(table["n"] > 1, 0.0)
    # Stable sort: ties keep the configuration order, so output is deterministic.
    return table.sort_values(
        "final_accuracy_mean", ascending=False, kind="mergesort"
    ).reset_index(drop=True)


def ranking_lines(results, top: int = 5) -> list[str]:
    """The classic "Top N Configurations by Final Accuracy" lines, with mean ± std (n)."""
    lines = [f"Top {top} Configurations by Final Accuracy:"]
    for i, row in enumerate(summarize(results).head(top).itertuples(index=False), 1):
        # Back to plain Python types so LR prints as 1e-05, not np.float64(1e-05).
        lines.append(
            f"{i}. World Size: {int(row.world_size)}, LR: {float(row.learning_rate)!r}, "
            f"Swap: {bool(row.enable_swapping)}, Rounds: {int(row.rounds)}, "
            f"Accuracy: {row.final_accuracy_mean:.4f} ± {row.final_accuracy_std:.4f} "
            f"(n={int(row.n)})"
        )
    return lines


def _summary_text(results) -> str:
    table = summarize(results).sort_values(list(CONFIG_FIELDS))
    shown = pd.DataFrame(
        {
            "World Size": table["world_size"],
            "LR": [repr(float(lr)) for lr in table["learning_rate"]],
            "Swap": table["enable_swapping"],
            "Rounds": table["rounds"],
            "Final Acc (mean ± std)": [
                f"{m:.4f} ± {s:.4f}"
                for m, s in zip(table["final_accuracy_mean"], table["final_accuracy_std"])
            ],
            "n": table["n"],
            "Best Acc (mean)": table["best_accuracy_mean"].map("{:.4f}".format),
            "Final Loss (mean)": table["final_loss_mean"].map("{:.4f}".format),
        }
    )
    return shown.to_string(index=False)


# --------------------------------------------------------------------------- plots


def _lr_label(lr: float) -> str:
    return repr(float(lr))


def _setting(world_size, swapping) -> str:
    return f"world size {world_size}, {'swap' if swapping else 'no swap'}"


def _labelled(frame: pd.DataFrame) -> pd.DataFrame:
    # Categorical text columns: seaborn would otherwise treat world size and
    # learning rate as continuous hues with a colour bar instead of a legend.
    frame = frame.copy()
    frame["LR"] = frame["learning_rate"].map(_lr_label)
    frame["world size"] = frame["world_size"].astype(str)
    frame["swapping"] = frame["enable_swapping"].map({True: "swap on", False: "swap off"})
    frame["setting"] = [
        _setting(ws, swap) for ws, swap in zip(frame["world_size"], frame["enable_swapping"])
    ]
    return frame


def _curves(results) -> pd.DataFrame:
    rows = [(*key, *entry) for key, entries in results.items() for entry in entries]
    return pd.DataFrame(rows, columns=[*KEY_FIELDS, "round", "test_loss", "test_accuracy"])


def _save(grid, path: Path, title: str) -> Path:
    grid.figure.suptitle(title, y=1.02)
    grid.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(grid.figure)
    return path


def make_plots(results, output_dir) -> list[Path]:
    """Write the PNG figures into output_dir (created if missing); return their paths.

    swap_comparison.png is only drawn for (world_size > 1, lr, rounds) settings
    that have both a swapping and a non-swapping configuration; without any
    such pair it is skipped.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = _labelled(_per_run(results))
    lr_order = [_lr_label(lr) for lr in sorted(runs["learning_rate"].unique())]
    pairs = sorted(set(zip(runs["world_size"], runs["enable_swapping"])))
    settings = [_setting(ws, swap) for ws, swap in pairs]
    written = []

    # One panel per (rounds, world size/swapping); one line per learning rate,
    # i.e. one line per configuration, mean over seeds with a ±1 sd band.
    curves = _labelled(_curves(results))
    grid = sns.relplot(
        data=curves, kind="line", x="round", y="test_accuracy",
        hue="LR", hue_order=lr_order, row="rounds", col="setting", col_order=settings,
        errorbar="sd", height=3, aspect=1.3,
        facet_kws={"margin_titles": True},
    )
    grid.set_axis_labels("round", "test accuracy")
    grid.set_titles(col_template="{col_name}", row_template="{row_name} rounds")
    grid.legend.set_title("learning rate")
    written.append(_save(grid, out / PLOT_FILES[0],
                         "Test accuracy per round (mean ± sd over seeds)"))

    grid = sns.relplot(
        data=runs, kind="line", x="learning_rate", y="final_accuracy",
        hue="world size", style="swapping", col="rounds", markers=True,
        errorbar="sd", err_style="bars", height=3.5, aspect=1.2,
    )
    grid.set(xscale="log")
    grid.set_axis_labels("learning rate", "final test accuracy")
    written.append(_save(grid, out / PLOT_FILES[1],
                         "Final accuracy vs learning rate (mean ± sd over seeds)"))

    sharded = runs[runs["world_size"] > 1]
    paired = sharded.groupby(["world_size", "learning_rate", "rounds"])[
        "enable_swapping"
    ].transform("nunique") == 2
    sharded = sharded[paired].copy()
    if not sharded.empty:
        sharded["panel"] = [
            f"world size {ws}, {r} rounds"
            for ws, r in zip(sharded["world_size"], sharded["rounds"])
        ]
        panels = sharded.sort_values(["world_size", "rounds"])["panel"].unique()
        grid = sns.catplot(
            data=sharded, kind="bar", x="LR",
            order=[lr for lr in lr_order if lr in set(sharded["LR"])],
            y="final_accuracy", hue="swapping", hue_order=["swap off", "swap on"],
            col="panel", col_order=panels, col_wrap=min(3, len(panels)),
            errorbar="sd", capsize=0.1, height=3.5, aspect=1.1,
        )
        grid.set_axis_labels("learning rate", "final test accuracy")
        grid.set_titles("{col_name}")
        written.append(_save(grid, out / PLOT_FILES[2],
                             "Swapping on vs off (mean ± sd over seeds)"))

    grid = sns.catplot(
        data=runs, kind="point", x="rounds", y="best_accuracy",
        hue="LR", hue_order=lr_order, col="setting", col_order=settings,
        # seaborn divides the dodge width by the number of hues minus one
        errorbar="sd", dodge=0.3 if len(lr_order) > 1 else False, height=3.5, aspect=1.0,
    )
    grid.set_axis_labels("rounds (setting)", "best test accuracy")
    grid.set_titles("{col_name}")
    grid.legend.set_title("learning rate")
    written.append(_save(grid, out / PLOT_FILES[3],
                         "Best accuracy reached vs rounds (mean ± sd over seeds)"))
    return written


# --------------------------------------------------------------------------- report


def report(results_file, output_dir="plots", top: int = 5, plots: bool = True,
           echo=print) -> None:
    """Print what the analysis command shows; write the plots unless plots=False."""
    results = load_results(results_file)
    n_configs = len({key[:4] for key in results})
    echo(f"Loaded {len(results)} experiments ({n_configs} configurations) from {results_file}")
    echo("")
    echo("Summary statistics (final test accuracy over seeds: mean ± std, n):")
    echo(_summary_text(results))
    echo("")
    for line in ranking_lines(results, top):
        echo(line)
    if plots:
        echo("")
        echo(f"Plots written to {output_dir}:")
        for path in make_plots(results, output_dir):
            echo(f"  {path}")
