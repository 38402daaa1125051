"""Results -> the tables: per-run numbers, the summary over seeds, the ranking, the paired
comparisons and the rounds to a target accuracy.

A configuration is every setting of RESULT_SETTINGS but the seed; runs of one configuration
with different seeds are its repeats. Tables name the classic four settings (world_size,
learning_rate, enable_swapping, rounds) always and every other setting only where it varies in
the data, so a classic pickle gives the classic tables. Everything here takes a classic results
dict or a results frame (see results.py) alike, and never talks to MLflow. The figures are in
plots.py, the console report and report.md in report.py.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from scipy import stats

from .config import KEY_SETTINGS, RESULT_SETTINGS, ConfigError, ExperimentConfig
from .results import plain, settings_of, to_frame

CONFIG_FIELDS = KEY_SETTINGS[:4]
METRICS = ("final_accuracy", "best_accuracy")
CONFIDENCE = 0.95
# Default targets: these fractions of the best configuration's mean final accuracy.
TARGET_FRACTIONS = (0.5, 0.75, 0.9)
# How tables and figures name a setting; one not named here is named by setting_label.
LABELS = {
    "world_size": "World Size", "learning_rate": "LR", "enable_swapping": "Swap", "rounds": "Rounds",
    "local_epochs": "Local Epochs", "batch_size": "Batch Size", "swap_every": "Swap Every",
    "strategy": "Strategy", "partition": "Partition", "dirichlet_alpha": "Dirichlet Alpha",
    "max_train_samples": "Train Samples", "max_test_samples": "Test Samples", "init_from": "Init From",
    "precision": "Precision", "seed": "Seed",
}


# --------------------------------------------------------------------------- configurations


def setting_label(setting: str) -> str:
    """How tables and figures name a setting: its LABELS entry, else its name in words ('Swap Every')."""
    return LABELS.get(setting) or setting.replace("_", " ").title()


def extra_settings(frame: pd.DataFrame) -> list[str]:
    """The settings beyond the classic four that tell configurations apart here: every other
    setting of the frame (seed excluded) that takes more than one value."""
    return [s for s in RESULT_SETTINGS if s not in KEY_SETTINGS and s in frame.columns
            and frame[s].nunique(dropna=False) > 1]


def config_settings(frame: pd.DataFrame) -> list[str]:
    """The settings that tell configurations apart here: the classic four always, then
    extra_settings."""
    return [*CONFIG_FIELDS, *extra_settings(frame)]


def format_value(setting: str, value) -> str:
    """A setting's value as people read it: LR 1e-05 (not np.float64(1e-05)), True, 'none'."""
    value = plain(value)
    if isinstance(value, float):
        return repr(value)
    if setting == "init_from" and value == "":
        return "none"
    return str(value)


def config_text(row, settings) -> str:
    """'World Size: 2, LR: 0.001, Swap: False, Rounds: 1, Strategy: fedavg' of a row (a mapping)."""
    return ", ".join(f"{setting_label(s)}: {format_value(s, row[s])}" for s in settings)


def byte_unit(count: float) -> tuple[str, float]:
    """The unit to show `count` bytes in, and its size: ('MB', 1e6) for 2_500_000."""
    return next(((unit, scale) for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if count >= scale),
                ("B", 1.0))


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


def per_run(results) -> pd.DataFrame:
    """One row per run (configuration and seed), in settings order: final_accuracy and final_loss
    (the last round's, NaN where that is NaN), best_accuracy (the highest over its rounds),
    diverged (the last round's test loss or accuracy is NaN or infinite: a run that blew up)."""
    frame = to_frame(results)
    keys = [*config_settings(frame), "seed"]
    ordered = frame.sort_values([*keys, "round"], kind="mergesort")
    # Each run's last-round row as it is: groupby's "last" would skip a NaN for an earlier round's value.
    last = ordered.drop_duplicates(keys, keep="last")
    best = ordered.groupby(keys, sort=True, dropna=False)["test_accuracy"].max().rename("best_accuracy")
    runs = last[keys].assign(final_accuracy=last["test_accuracy"], final_loss=last["test_loss"],
                             diverged=~(np.isfinite(last["test_accuracy"]) & np.isfinite(last["test_loss"])))
    return runs.merge(best.reset_index(), on=keys, how="left")[
        [*keys, "final_accuracy", "best_accuracy", "final_loss", "diverged"]].reset_index(drop=True)


def counted(runs: pd.DataFrame) -> pd.DataFrame:
    """per_run's table with every number of a diverged run blanked (NaN): what means, spreads and
    intervals are computed over. A diverged run is counted and shown, never averaged in."""
    return runs.assign(**{m: runs[m].where(~runs["diverged"]) for m in (*METRICS, "final_loss")})


def summarize(results, *, runs=None) -> pd.DataFrame:
    """One row per configuration, seeds aggregated, best final accuracy first; `runs` is
    per_run(results) where the caller has it already.

    Columns: the configuration's settings (config_settings), final_accuracy_mean,
    final_accuracy_std (sample std; NaN for a single seed, whose spread is unknown), n (seeds),
    diverged (seeds that diverged: per_run), best_accuracy_mean, final_loss_mean. Means and spreads
    are over the seeds that did not diverge (counted), and configurations with a diverged seed
    come after every other, those where all diverged last.
    """
    runs = per_run(results) if runs is None else runs
    table = counted(runs).groupby(config_settings(runs), sort=True, dropna=False).agg(
        final_accuracy_mean=("final_accuracy", "mean"),
        final_accuracy_std=("final_accuracy", "std"),
        n=("seed", "size"),
        diverged=("diverged", "sum"),
        best_accuracy_mean=("best_accuracy", "mean"),
        final_loss_mean=("final_loss", "mean"),
    ).reset_index()
    # Stable sort: ties keep the configuration order, so output is deterministic.
    return table.assign(_diverged=table["diverged"] > 0).sort_values(
        ["_diverged", "final_accuracy_mean"], ascending=[True, False], na_position="last", kind="mergesort"
    ).drop(columns="_diverged").reset_index(drop=True)


def ranking_lines(results, top: int = 5, *, summary=None) -> list[str]:
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


def same_experiment(context: dict, setting: str, a, b) -> bool:
    """Whether values a and b of `setting` make one experiment in `context` (the other settings)
    once settings that do not apply are canonicalised: a legacy pickle's (1, lr, True, rounds) is
    its (1, lr, False, rounds), as swapping does not apply to one trainer."""
    try:
        return ExperimentConfig.from_mapping({**context, setting: a}) == ExperimentConfig.from_mapping(
            {**context, setting: b})
    except ConfigError:  # not a configuration fedshard would run: not one experiment either
        return False


def _pairs(group: pd.DataFrame, setting: str, shared: dict, context: dict, metric: str) -> list[dict]:
    """Rows for every two values of `setting` within one context (the other settings fixed; `shared`:
    those every run has), a < b in natural order, that are two experiments (same_experiment); the
    runs are paired by seed."""
    by_value = {plain(value): g.set_index("seed")[metric] for value, g in group.groupby(setting, sort=True)}
    rows = []
    for a, b in itertools.combinations(sorted(by_value), 2):
        if same_experiment({**shared, **context}, setting, a, b):
            continue
        n, mean, low, high = paired_interval((by_value[b] - by_value[a]).dropna())
        rows.append({"metric": metric, "setting": setting, "value_a": a, "value_b": b,
                     **context, setting: None,
                     "n": n, "mean_difference": mean, "ci_low": low, "ci_high": high})
    return rows


def comparisons(results, *, runs=None) -> pd.DataFrame:
    """Every two configurations that differ in exactly one setting (and are two experiments:
    same_experiment), paired by seed: the mean difference b − a of each metric (METRICS) and its
    95 % interval; `runs` is per_run(results) where the caller has it already.

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
    rows = []
    for metric in METRICS:
        for setting in settings:
            if runs[setting].nunique() < 2:
                continue
            others = [s for s in settings if s != setting]
            for context, group in runs.groupby(others, sort=True, dropna=False):
                rows += _pairs(group, setting, shared, dict(zip(others, map(plain, context))), metric)
    # Settings and values as objects: an int column with an empty cell must not become 2.0.
    table = pd.DataFrame({c: pd.Series([row[c] for row in rows], dtype=object)
                          for c in ["metric", "setting", "value_a", "value_b", *settings]})
    numbers = pd.DataFrame(rows, columns=["n", "mean_difference", "ci_low", "ci_high"])
    return pd.concat([table, numbers.astype({"n": "int64", "mean_difference": "float64", "ci_low": "float64",
                                             "ci_high": "float64"})], axis=1)


# --------------------------------------------------------------------------- rounds to target


def best_mean_final_accuracy(summary: pd.DataFrame) -> float:
    """The best configuration's mean final accuracy, of a summarize table; NaN where every run diverged."""
    return float(summary["final_accuracy_mean"].max())


def targets_for(best: float) -> list[float]:
    """TARGET_FRACTIONS of `best` (best_mean_final_accuracy), each rounded to 2 decimals; a target
    that rounds to 0 (met by round 0's accuracy, before any training) is dropped."""
    return sorted({t for fraction in TARGET_FRACTIONS if (t := round(fraction * best, 2)) > 0})


def default_targets(results) -> list[float]:
    """targets_for the best configuration's mean final accuracy."""
    return targets_for(best_mean_final_accuracy(summarize(results)))


def targets_table(results, targets, *, runs=None) -> pd.DataFrame:
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
    tables = []
    for target in targets:
        # drop_duplicates keeps each run's first row at or above the target: its earliest round.
        first = curves[curves["test_accuracy"] >= target].drop_duplicates(keys)[[*keys, "round", "bytes_total"]]
        table = runs[keys].merge(first, on=keys, how="left").groupby(settings, sort=True, dropna=False).agg(
            rounds_to_target=("round", "mean"),
            reached=("round", "count"),
            n=("seed", "size"),
            bytes_to_target=("bytes_total", "mean"),
        ).reset_index()
        table.insert(len(settings), "target", float(target))
        tables.append(table)
    columns = [*settings, "target", "rounds_to_target", "reached", "n", "bytes_to_target"]
    if not tables:
        return pd.DataFrame(columns=columns)
    table = pd.concat(tables, ignore_index=True)[columns]
    return table.sort_values([*settings, "target"], kind="mergesort").reset_index(drop=True)
