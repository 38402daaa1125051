"""The tables as text cells, as the console and report.md show them: the summary, the ranking,
the paired comparisons and the rounds to target (the numbers come from analysis.py)."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from fedshard.results import analysis
from fedshard.results.analysis import config_settings, format_value, setting_label


def target_text(target: float) -> str:
    """0.50 beside 0.28 (2 decimals, as the defaults are rounded), 0.375 as given."""
    return f"{target:.2f}" if round(target, 2) == target else f"{target:g}"


def _settings_cells(table: pd.DataFrame, settings: Iterable[str]) -> dict[str, list[str]]:
    # None marks the compared setting's own column in a comparison: shown empty.
    return {setting_label(s): ["" if v is None else format_value(s, v) for v in table[s].tolist()] for s in settings}


# Display tables hold text cells only, built from lists: the source tables' own row order (a
# sorted, filtered index) never leaks in through index alignment.


def _number(value: float) -> str:
    return "none" if pd.isna(value) else f"{value:.4f}"


def _accuracy_cells(table: pd.DataFrame) -> dict:
    """Final accuracy (mean ± std over the seeds that did not diverge), n (those seeds) and, where
    any seed diverged, how many of how many did."""
    cells = {
        "Final Acc (mean ± std)": [
            "none" if pd.isna(m) else analysis.mean_std_text(m, s)
            for m, s in zip(table["final_accuracy_mean"], table["final_accuracy_std"])
        ],
        "n": [str(n - d) for n, d in zip(table["n"], table["diverged"])],
    }
    if table["diverged"].any():
        cells["Diverged"] = list(map(analysis.diverged_text, table["diverged"], table["n"]))
    return cells


def summary_display(summary: pd.DataFrame, trained_start: bool = False) -> pd.DataFrame:
    """The summary table (analysis.summarize) as text cells, one row per configuration in settings
    order: round 0's accuracy (the start) in a column of its own, and where runs start from a
    trained model (trained_start) the change from it."""
    settings = config_settings(summary)
    table = summary.sort_values(settings, kind="mergesort")
    return pd.DataFrame(
        {
            **_settings_cells(table, settings),
            "Start Acc (round 0)": list(map(_number, table["start_accuracy_mean"])),
            **_accuracy_cells(table),
            **(
                {"Final − Start (mean)": ["none" if pd.isna(g) else f"{g:+.4f}" for g in table["gain_mean"]]}
                if trained_start
                else {}
            ),
            "Best Acc r ≥ 1 (mean)": list(map(_number, table["best_accuracy_mean"])),
            "Final Loss (mean)": list(map(_number, table["final_loss_mean"])),
        }
    )


def ranking_display(summary: pd.DataFrame, top: int) -> pd.DataFrame:
    """The ranking of the summary table (analysis.summarize) as a table: rank, settings, final
    accuracy (mean ± std), n (and how many seeds diverged, where any did)."""
    table = summary.head(top)
    return pd.DataFrame(
        {
            "Rank": [str(i) for i in range(1, len(table) + 1)],
            **_settings_cells(table, config_settings(table)),
            **_accuracy_cells(table),
        }
    )


def comparisons_display(comparisons: pd.DataFrame, metric: str, settings: Iterable[str]) -> pd.DataFrame:
    """One metric's paired comparisons as text cells; `settings` are the configurations' (Tables.settings)."""
    rows = comparisons[comparisons["metric"] == metric]
    return pd.DataFrame(
        {
            "Setting": [setting_label(s) for s in rows["setting"]],
            "a": [format_value(s, v) for s, v in zip(rows["setting"], rows["value_a"])],
            "b": [format_value(s, v) for s, v in zip(rows["setting"], rows["value_b"])],
            **_settings_cells(rows, settings),
            "n": [str(n) for n in rows["n"]],
            "b − a (mean)": ["n/a" if pd.isna(d) else f"{d:+.4f}" for d in rows["mean_difference"]],
            "95 % CI": [
                "n/a (n < 2)" if pd.isna(lo) else f"[{lo:+.4f}, {hi:+.4f}]"
                for lo, hi in zip(rows["ci_low"], rows["ci_high"])
            ],
        }
    )


def targets_display(reached: pd.DataFrame, settings: Iterable[str], with_bytes: bool) -> pd.DataFrame:
    """Rounds to each target as text: '2.0 (3/3 seeds)', 'never (0/3 seeds)'; `settings` are the
    configurations' (Tables.settings)."""
    shown = pd.DataFrame(
        {
            **_settings_cells(reached, settings),
            "Target": [target_text(t) for t in reached["target"]],
            "Rounds to target": [
                f"{'never' if k == 0 else f'{r:.1f}'} ({k}/{n} seeds)"
                for r, k, n in zip(reached["rounds_to_target"], reached["reached"], reached["n"])
            ],
        }
    )
    if with_bytes:
        shown["Bytes to target"] = ["" if pd.isna(b) else analysis.bytes_text(b) for b in reached["bytes_to_target"]]
    return shown
