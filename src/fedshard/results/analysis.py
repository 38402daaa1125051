"""Results -> the tables: per-run numbers, the summary over seeds, the ranking, the paired
comparisons and the rounds to a target accuracy.

A configuration is every setting of RESULT_SETTINGS but the seed, and the `source` (results
file) where several are read (sources.py); runs of one configuration with different seeds are
its repeats. Tables name the classic four settings (world_size, learning_rate, enable_swapping,
rounds) always and every other setting only where it varies in the data (layerwise swapping
also wherever a run has it on), so a classic pickle gives the classic tables. Everything here takes a classic results
dict or a results frame (see results.py) alike, and never talks to MLflow. The figures are in
plots.py, the console report and report.md in report.py.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from fedshard.core.config import KEY_SETTINGS, RESULT_SETTINGS, ConfigError, ExperimentConfig
from fedshard.results.formats import ResultsOrFrame, plain, settings_of, to_frame

CONFIG_FIELDS = KEY_SETTINGS[:4]
METRICS = ("final_accuracy", "best_accuracy")
# Which results file a run came from, where several are read (sources.SOURCE): a setting like any other here.
SOURCE = "source"
# Named in the tables wherever a run has it on, even if every run does: the harness's sixth key field.
NAMED_WHEN_ON = ("enable_layerwise_swapping",)
# A run whose round-0 test accuracy reaches this started from a trained model: an untrained network
# guesses one class of CIFAR-100's 100 (1 %). Its change from the start is then shown too.
TRAINED_START = 0.05
CONFIDENCE = 0.95
# Default targets: these fractions of the best configuration's mean final accuracy.
TARGET_FRACTIONS = (0.5, 0.75, 0.9)
# An experiment (experiment()): its source, and its configuration's identity (or its settings as given).
Experiment = tuple[object, tuple[tuple[str, object], ...]]
# How tables and figures name a setting; one not named here is named by setting_label.
LABELS = {
    "world_size": "World Size",
    "learning_rate": "LR",
    "enable_swapping": "Swap",
    "rounds": "Rounds",
    "local_epochs": "Local Epochs",
    "batch_size": "Batch Size",
    "swap_every": "Swap Every",
    "strategy": "Strategy",
    "partition": "Partition",
    "dirichlet_alpha": "Dirichlet Alpha",
    "max_train_samples": "Train Samples",
    "max_test_samples": "Test Samples",
    "init_from": "Init From",
    "precision": "Precision",
    "seed": "Seed",
    "enable_layerwise_swapping": "Layerwise",
    SOURCE: "Source",
}


# --------------------------------------------------------------------------- configurations


def setting_label(setting: str) -> str:
    """How tables and figures name a setting: its LABELS entry, else its name in words ('Swap Every')."""
    return LABELS.get(setting) or setting.replace("_", " ").title()


def extra_settings(frame: pd.DataFrame) -> list[str]:
    """The settings beyond the classic four that tell configurations apart here: every other
    setting of the frame (seed excluded) that takes more than one value, or is on in a run
    (NAMED_WHEN_ON), then the source where there are several."""
    return [
        s
        for s in (*RESULT_SETTINGS, SOURCE)
        if s not in KEY_SETTINGS
        and s in frame.columns
        and (frame[s].nunique(dropna=False) > 1 or (s in NAMED_WHEN_ON and frame[s].any()))
    ]


def config_settings(frame: pd.DataFrame) -> list[str]:
    """The settings that tell configurations apart here: the classic four always, then
    extra_settings."""
    return [*CONFIG_FIELDS, *extra_settings(frame)]


def format_value(setting: str, value: object) -> str:
    """A setting's value as people read it: LR 1e-05 (not np.float64(1e-05)), True, 'none'."""
    value = plain(value)
    if isinstance(value, float):
        return repr(value)
    if setting == "init_from" and value == "":
        return "none"
    return str(value)


def config_text(row: Mapping[Any, object], settings: Iterable[str]) -> str:
    """'World Size: 2, LR: 0.001, Swap: False, Rounds: 1, Strategy: fedavg' of a row (a mapping)."""
    return ", ".join(f"{setting_label(s)}: {format_value(s, row[s])}" for s in settings)


def byte_unit(count: float) -> tuple[str, float]:
    """The unit to show `count` bytes in, and its size: ('MB', 1e6) for 2_500_000."""
    return next(
        ((unit, scale) for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if count >= scale), ("B", 1.0)
    )


def bytes_text(count: float) -> str:
    """'2.5 MB', '1.0 GB', '512 B'."""
    unit, scale = byte_unit(count)
    return f"{count:.0f} B" if unit == "B" else f"{count / scale:.1f} {unit}"


def mean_std_text(mean: float, std: float) -> str:
    """'0.5000 ± 0.0707'; a single seed has no known spread (std NaN): '0.0100'."""
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def accuracy_text(mean: float, std: float, n: int, diverged: int = 0) -> str:
    """'0.5000 ± 0.0707 (n=2)', '0.0100 (n=1)'; n counts every seed, and the mean is over those that
    did not diverge: '0.4000 (n=1; 1 of 2 seeds diverged)', 'none (2 of 2 seeds diverged)'."""
    n, diverged = int(n), int(diverged)
    if not diverged:
        return f"{mean_std_text(mean, std)} (n={n})"
    if diverged == n:
        return f"none ({diverged} of {n} seeds diverged)"
    return f"{mean_std_text(mean, std)} (n={n - diverged}; {diverged} of {n} seeds diverged)"


def diverged_text(diverged: int, n: int) -> str:
    """'1 of 2' of a configuration with a diverged seed; '' where none diverged."""
    return f"{int(diverged)} of {int(n)}" if diverged else ""


# --------------------------------------------------------------------------- per run, per configuration


def per_run(results: ResultsOrFrame) -> pd.DataFrame:
    """One row per run (configuration and seed), in settings order: start_accuracy (round 0's: the
    model before any training; NaN where the run has no round 0), final_accuracy and final_loss
    (the last round's, NaN where that is NaN), best_accuracy (the highest over the trained rounds,
    r >= 1: a run started from a trained model often peaks at its start), gain (final minus start
    accuracy), diverged (the last round's test loss or accuracy is NaN or infinite: a run that
    blew up)."""
    frame = to_frame(results)
    keys = [*config_settings(frame), "seed"]
    ordered = frame.sort_values([*keys, "round"], kind="mergesort")
    # Each run's last-round row as it is: groupby's "last" would skip a NaN for an earlier round's value.
    last = ordered.drop_duplicates(keys, keep="last")
    trained = ordered[ordered["round"] >= 1]
    best = trained.groupby(keys, sort=True, dropna=False)["test_accuracy"].max().rename("best_accuracy")
    start = ordered[ordered["round"] == 0].set_index(keys)["test_accuracy"].rename("start_accuracy")
    runs = last[keys].assign(
        final_accuracy=last["test_accuracy"],
        final_loss=last["test_loss"],
        diverged=~(np.isfinite(last["test_accuracy"]) & np.isfinite(last["test_loss"])),
    )
    runs = runs.merge(best.reset_index(), on=keys, how="left").merge(start.reset_index(), on=keys, how="left")
    return runs.assign(gain=runs["final_accuracy"] - runs["start_accuracy"])[
        [*keys, "start_accuracy", "final_accuracy", "best_accuracy", "gain", "final_loss", "diverged"]
    ].reset_index(drop=True)


def counted(runs: pd.DataFrame) -> pd.DataFrame:
    """per_run's table with every number of a diverged run blanked (NaN): what means, spreads and
    intervals are computed over. A diverged run is counted and shown, never averaged in."""
    return runs.assign(**{m: runs[m].where(~runs["diverged"]) for m in (*METRICS, "gain", "final_loss")})


def from_trained_model(frame: pd.DataFrame) -> bool:
    """Whether runs start from a trained model: init_from set, or a start at TRAINED_START or above."""
    starts = frame.loc[frame["round"] == 0, "test_accuracy"]
    return bool((starts >= TRAINED_START).any() or ("init_from" in frame.columns and (frame["init_from"] != "").any()))


def summarize(results: ResultsOrFrame, *, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per configuration, seeds aggregated, best final accuracy first; `runs` is
    per_run(results) where the caller has it already.

    Columns: the configuration's settings (config_settings), start_accuracy_mean, final_accuracy_mean,
    final_accuracy_std (sample std; NaN for a single seed, whose spread is unknown), n (seeds),
    diverged (seeds that diverged: per_run), best_accuracy_mean, gain_mean, final_loss_mean. Means and spreads
    are over the seeds that did not diverge (counted), and configurations with a diverged seed
    come after every other, those where all diverged last.
    """
    runs = per_run(results) if runs is None else runs
    table = (
        counted(runs)
        .groupby(config_settings(runs), sort=True, dropna=False)
        .agg(
            start_accuracy_mean=("start_accuracy", "mean"),
            final_accuracy_mean=("final_accuracy", "mean"),
            final_accuracy_std=("final_accuracy", "std"),
            n=("seed", "size"),
            diverged=("diverged", "sum"),
            best_accuracy_mean=("best_accuracy", "mean"),
            gain_mean=("gain", "mean"),
            final_loss_mean=("final_loss", "mean"),
        )
        .reset_index()
    )
    # Stable sort: ties keep the configuration order, so output is deterministic.
    return (
        table.assign(_diverged=table["diverged"] > 0)
        .sort_values(
            ["_diverged", "final_accuracy_mean"], ascending=[True, False], na_position="last", kind="mergesort"
        )
        .drop(columns="_diverged")
        .reset_index(drop=True)
    )


def ranking_lines(results: ResultsOrFrame, top: int = 5, *, summary: pd.DataFrame | None = None) -> list[str]:
    """The classic "Top N Configurations by Final Accuracy" lines, with mean ± std (n); `summary`
    is summarize(results) where the caller has it already."""
    table = summarize(results) if summary is None else summary
    settings = config_settings(table)
    lines = [f"Top {top} Configurations by Final Accuracy:"]
    for i, row in enumerate(table.head(top).to_dict("records"), 1):
        accuracy = accuracy_text(row["final_accuracy_mean"], row["final_accuracy_std"], row["n"], row["diverged"])
        lines.append(f"{i}. {config_text(row, settings)}, Accuracy: {accuracy}")
    return lines


# --------------------------------------------------------------------------- paired comparisons


def paired_interval(differences: pd.Series) -> tuple[int, float, float, float]:
    """(n, mean, ci_low, ci_high) of paired differences: Student t at CONFIDENCE. No interval
    (NaN) below two pairs; [mean, mean] where every difference is the same (no spread)."""
    n = len(differences)
    if n == 0:
        return 0, math.nan, math.nan, math.nan
    mean = float(differences.mean())
    if n < 2:
        return n, mean, math.nan, math.nan
    if differences.nunique() == 1:
        return n, mean, mean, mean
    low, high = stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=stats.sem(differences))
    return n, mean, float(low), float(high)


@functools.lru_cache(maxsize=4096)
def _experiment_of(items: tuple[tuple[str, object], ...]) -> Experiment:
    values = dict(items)
    source = values.pop(SOURCE, None)
    try:
        return source, ExperimentConfig.from_mapping(values).identity()
    except ConfigError:  # not a configuration fedshard would run: only itself
        return source, items


def experiment(values: Mapping[Any, object]) -> Experiment:
    """The experiment that settings make, as fedshard records it: a setting that does not apply
    takes the value it is recorded as, so (world size 1, swapping on) and (world size 1, swapping
    off) are one experiment, as are (1, fedavg) and (1, tensor_parallel). Two sources are two."""
    return _experiment_of(tuple((s, plain(v)) for s, v in values.items()))


def _by_value(
    runs: pd.DataFrame,
    group: pd.DataFrame,
    setting: str,
    values: Iterable[object],
    shared: Mapping[str, object],
    context: Mapping[str, object],
    metric: str,
) -> dict[Any, tuple[Experiment, pd.Series]]:
    """value -> (its experiment, its runs' metric by seed) for each value of `setting` in this
    context: the group's own runs of it, else the runs recorded as that experiment (world size 1
    stands in every swapping context, its swapping not applying)."""
    found: dict[Any, tuple[Experiment, pd.Series]] = {}  # Any: the values, sortable among themselves
    for value in values:
        exp = experiment({**shared, **context, setting: value})
        own = group[group[setting] == value]
        chosen = own if not own.empty else runs[runs["_experiment"] == exp].drop_duplicates("seed")
        if not chosen.empty:
            found[value] = (exp, chosen.set_index("seed")[metric])
    return found


def _pairs(
    runs: pd.DataFrame,
    group: pd.DataFrame,
    setting: str,
    values: Iterable[object],
    shared: Mapping[str, object],
    context: Mapping[str, object],
    metric: str,
    seen: set[tuple[str, Experiment, Experiment]],
) -> list[dict[str, object]]:
    """Rows for every two values of `setting` within one context (the other settings fixed; `shared`:
    those every run has), a < b in natural order, that are two experiments not compared yet
    (`seen`); the runs are paired by seed."""
    by_value = _by_value(runs, group, setting, values, shared, context, metric)
    rows: list[dict[str, object]] = []
    for a, b in itertools.combinations(sorted(by_value), 2):
        (exp_a, first), (exp_b, second) = by_value[a], by_value[b]
        if exp_a == exp_b or (metric, exp_a, exp_b) in seen:
            continue
        seen.add((metric, exp_a, exp_b))
        n, mean, low, high = paired_interval((second - first).dropna())
        rows.append(
            {
                "metric": metric,
                "setting": setting,
                "value_a": a,
                "value_b": b,
                **context,
                setting: None,
                "n": n,
                "mean_difference": mean,
                "ci_low": low,
                "ci_high": high,
            }
        )
    return rows


def comparisons(results: ResultsOrFrame, *, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every two configurations that differ in exactly one setting (and are two experiments:
    experiment), paired by seed: the mean difference b − a of each metric (METRICS) and its
    95 % interval, over the seeds where neither run diverged; `runs` is per_run(results) where the
    caller has it already. A setting that does not apply counts as any value: world size 1 is
    compared with world size 2 with swapping and without it.

    Columns: metric, setting, value_a, value_b, the configuration's settings (the compared
    one's own column empty), n (seeds in both), mean_difference, ci_low, ci_high. value_a <
    value_b in natural order (False < True, 1 < 2, fedavg < tensor_parallel), so a row is the
    effect of going from a to b. Settings with one value are never compared.
    """
    frame = to_frame(results)
    runs = counted(per_run(frame) if runs is None else runs)
    settings = config_settings(runs)
    # The settings every run shares are part of each context too: a dirichlet_alpha matters with
    # partition=dirichlet, however constant that is.
    shared = {s: plain(frame[s].iloc[0]) for s in settings_of(frame) if s not in settings and s != "seed"}
    experiments = [experiment({**shared, **r}) for r in runs[settings].to_dict("records")]
    runs = runs.assign(_experiment=pd.Series(experiments, index=runs.index, dtype=object))
    rows: list[dict[str, object]] = []
    seen: set[tuple[str, Experiment, Experiment]] = set()
    for metric in METRICS:
        for setting in settings:
            values = sorted(map(plain, runs[setting].unique()))
            if len(values) < 2:
                continue
            others = [s for s in settings if s != setting]
            for context, group in runs.groupby(others, sort=True, dropna=False):
                rows += _pairs(
                    runs, group, setting, values, shared, dict(zip(others, map(plain, context))), metric, seen
                )
    # Settings and values as objects: an int column with an empty cell must not become 2.0.
    table = pd.DataFrame(
        {
            c: pd.Series([row[c] for row in rows], dtype=object)
            for c in ["metric", "setting", "value_a", "value_b", *settings]
        }
    )
    numbers = pd.DataFrame(rows, columns=["n", "mean_difference", "ci_low", "ci_high"])
    return pd.concat(
        [
            table,
            numbers.astype({"n": "int64", "mean_difference": "float64", "ci_low": "float64", "ci_high": "float64"}),
        ],
        axis=1,
    )


# --------------------------------------------------------------------------- rounds to target


def best_mean_final_accuracy(summary: pd.DataFrame) -> float:
    """The best configuration's mean final accuracy, of a summarize table; NaN where every run diverged."""
    return float(summary["final_accuracy_mean"].max())


def targets_for(best: float) -> list[float]:
    """TARGET_FRACTIONS of `best` (best_mean_final_accuracy), each rounded to 2 decimals; a target
    that rounds to 0 (met by round 0's accuracy, before any training) is dropped."""
    return sorted({t for fraction in TARGET_FRACTIONS if (t := round(fraction * best, 2)) > 0})


def default_targets(results: ResultsOrFrame) -> list[float]:
    """targets_for the best configuration's mean final accuracy."""
    return targets_for(best_mean_final_accuracy(summarize(results)))


def targets_table(
    results: ResultsOrFrame, targets: Iterable[float], *, runs: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Per configuration and target accuracy: rounds_to_target (the first round whose test
    accuracy is at or above the target, mean over the seeds that reach it; NaN when none does),
    reached (seeds that do), n (seeds), bytes_to_target (mean bytes_total at that round over the
    seeds that reached it and whose bytes are known; NaN otherwise). `runs` is per_run(results)
    where the caller has it already."""
    frame = to_frame(results)
    runs = per_run(frame) if runs is None else runs
    settings = config_settings(runs)
    keys = [*settings, "seed"]
    curves = frame.sort_values("round", kind="mergesort")
    if "bytes_total" not in curves.columns:
        curves = curves.assign(bytes_total=np.nan)
    tables: list[pd.DataFrame] = []
    for target in targets:
        # drop_duplicates keeps each run's first row at or above the target: its earliest round.
        first = curves[curves["test_accuracy"] >= target].drop_duplicates(keys)[[*keys, "round", "bytes_total"]]
        table = (
            runs[keys]
            .merge(first, on=keys, how="left")
            .groupby(settings, sort=True, dropna=False)
            .agg(
                rounds_to_target=("round", "mean"),
                reached=("round", "count"),
                n=("seed", "size"),
                bytes_to_target=("bytes_total", "mean"),
            )
            .reset_index()
        )
        table.insert(len(settings), "target", float(target))
        tables.append(table)
    columns = [*settings, "target", "rounds_to_target", "reached", "n", "bytes_to_target"]
    if not tables:
        return pd.DataFrame(columns=columns)
    table = pd.concat(tables, ignore_index=True)[columns]
    return table.sort_values([*settings, "target"], kind="mergesort").reset_index(drop=True)
