"""Results -> what a researcher reads: the console report of `fedshard analyze`, and one
directory holding report.md (every table as Markdown, ready to paste into a paper draft),
comparisons.csv, targets.csv and the figures. `write_report` is what the sweep calls too.

The numbers come from analysis.py and the figures from plots.py; this module only chooses the
targets, formats and writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import analysis
from .analysis import config_settings, format_value, setting_label
from .files import not_a_directory, write_atomic
from .plots import BYTES_PLOT_FILE, figures
from .results import read, to_frame

REPORT_FILE = "report.md"
COMPARISONS_FILE = "comparisons.csv"
TARGETS_FILE = "targets.csv"
METRIC_TITLES = {"final_accuracy": "final accuracy", "best_accuracy": "best accuracy"}
FILE_NOTES = {
    COMPARISONS_FILE: "the paired comparisons, both metrics (column `metric`)",
    TARGETS_FILE: "rounds (and bytes) to each target accuracy",
    "learning_curves.png": "test accuracy per round",
    "accuracy_vs_lr.png": "final accuracy against learning rate",
    "swap_comparison.png": "final accuracy with and without swapping",
    "best_accuracy_vs_rounds.png": "best accuracy against the number of rounds",
    BYTES_PLOT_FILE: "test accuracy against cumulative bytes exchanged",
}


def parse_targets(values) -> list[float] | None:
    """--target values ('0.3', '0.3,0.5', '' for none given) -> sorted targets, or None when none
    is given (the defaults apply). A value that is not a number in (0, 1] is a ValueError."""
    targets = set()
    for text in (t.strip() for value in values for t in str(value).split(",")):
        if not text:
            continue
        try:
            target = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number; a target is a test accuracy in (0, 1], "
                             "e.g. 0.3 or 0.3,0.5") from None
        if not 0 < target <= 1:  # NaN fails this too
            raise ValueError(f"{text} is not in (0, 1]; a target is a test accuracy, e.g. 0.3 or 0.3,0.5")
        targets.add(target)
    return sorted(targets) or None


@dataclass(frozen=True)
class Tables:
    """Everything the console, report.md and the figures show, each computed once."""
    frame: pd.DataFrame  # the results frame
    runs: pd.DataFrame  # analysis.per_run
    summary: pd.DataFrame  # analysis.summarize
    settings: list  # the settings that tell configurations apart (analysis.config_settings)
    comparisons: pd.DataFrame
    reached: pd.DataFrame
    targets_note: str


def target_text(target: float) -> str:
    """0.50 beside 0.28 (2 decimals, as the defaults are rounded), 0.375 as given."""
    return f"{target:.2f}" if round(target, 2) == target else f"{target:g}"


def _targets_text(targets) -> str:
    return ", ".join(map(target_text, targets))


def tables(results, targets=None) -> Tables:
    """The analysis of `results`; targets None (or empty) means the default targets."""
    frame = to_frame(results)
    runs = analysis.per_run(frame)
    summary = analysis.summarize(frame, runs=runs)
    if targets:
        note = f"targets given: {_targets_text(targets)}"
    elif pd.isna(best := analysis.best_mean_final_accuracy(summary)):
        targets, note = [], "no default targets: every run diverged, so no configuration has a final accuracy"
    else:
        targets = analysis.targets_for(best)
        *first, last = (f"{fraction * 100:g} %" for fraction in analysis.TARGET_FRACTIONS)
        fractions = f"{', '.join(first)} and {last}" if first else last
        note = (f"default targets {_targets_text(targets) or '(none)'}: {fractions} of the best configuration's "
                f"mean final accuracy ({best:.4f}), rounded to 2 decimals")
    return Tables(frame, runs, summary, config_settings(runs), analysis.comparisons(frame, runs=runs),
                  analysis.targets_table(frame, targets, runs=runs), note)


# --------------------------------------------------------------------------- display tables


def _settings_cells(table: pd.DataFrame, settings) -> dict:
    # None marks the compared setting's own column in a comparison: shown empty.
    return {setting_label(s): ["" if v is None else format_value(s, v) for v in table[s].tolist()] for s in settings}


# Display tables hold text cells only, built from lists: the source tables' own row order (a
# sorted, filtered index) never leaks in through index alignment.


def _number(value: float) -> str:
    return "none" if pd.isna(value) else f"{value:.4f}"


def _accuracy_cells(table: pd.DataFrame) -> dict:
    """Final accuracy (mean ± std over the seeds that did not diverge), n (those seeds) and, where
    any seed diverged, how many of how many did."""
    cells = {"Final Acc (mean ± std)": ["none" if pd.isna(m) else analysis.mean_std_text(m, s)
                                        for m, s in zip(table["final_accuracy_mean"], table["final_accuracy_std"])],
             "n": [str(n - d) for n, d in zip(table["n"], table["diverged"])]}
    if table["diverged"].any():
        cells["Diverged"] = list(map(analysis.diverged_text, table["diverged"], table["n"]))
    return cells


def summary_display(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary table (analysis.summarize) as text cells, one row per configuration in settings order."""
    settings = config_settings(summary)
    table = summary.sort_values(settings, kind="mergesort")
    return pd.DataFrame({
        **_settings_cells(table, settings),
        **_accuracy_cells(table),
        "Best Acc (mean)": list(map(_number, table["best_accuracy_mean"])),
        "Final Loss (mean)": list(map(_number, table["final_loss_mean"])),
    })


def ranking_display(summary: pd.DataFrame, top: int) -> pd.DataFrame:
    """The ranking of the summary table (analysis.summarize) as a table: rank, settings, final
    accuracy (mean ± std), n (and how many seeds diverged, where any did)."""
    table = summary.head(top)
    return pd.DataFrame({
        "Rank": [str(i) for i in range(1, len(table) + 1)],
        **_settings_cells(table, config_settings(table)),
        **_accuracy_cells(table),
    })


def comparisons_display(comparisons: pd.DataFrame, metric: str, settings) -> pd.DataFrame:
    """One metric's paired comparisons as text cells; `settings` are the configurations' (Tables.settings)."""
    rows = comparisons[comparisons["metric"] == metric]
    return pd.DataFrame({
        "Setting": [setting_label(s) for s in rows["setting"]],
        "a": [format_value(s, v) for s, v in zip(rows["setting"], rows["value_a"])],
        "b": [format_value(s, v) for s, v in zip(rows["setting"], rows["value_b"])],
        **_settings_cells(rows, settings),
        "n": [str(n) for n in rows["n"]],
        "b − a (mean)": ["n/a" if pd.isna(d) else f"{d:+.4f}" for d in rows["mean_difference"]],
        "95 % CI": ["n/a (n < 2)" if pd.isna(lo) else f"[{lo:+.4f}, {hi:+.4f}]"
                    for lo, hi in zip(rows["ci_low"], rows["ci_high"])],
    })


def targets_display(reached: pd.DataFrame, settings, with_bytes: bool) -> pd.DataFrame:
    """Rounds to each target as text: '2.0 (3/3 seeds)', 'never (0/3 seeds)'; `settings` are the
    configurations' (Tables.settings)."""
    shown = pd.DataFrame({
        **_settings_cells(reached, settings),
        "Target": [target_text(t) for t in reached["target"]],
        "Rounds to target": [
            f"{'never' if k == 0 else f'{r:.1f}'} ({k}/{n} seeds)"
            for r, k, n in zip(reached["rounds_to_target"], reached["reached"], reached["n"])
        ],
    })
    if with_bytes:
        shown["Bytes to target"] = ["" if pd.isna(b) else analysis.bytes_text(b) for b in reached["bytes_to_target"]]
    return shown


def _has_bytes(frame: pd.DataFrame) -> bool:
    return "bytes_total" in frame.columns and bool(frame["bytes_total"].notna().any())


# --------------------------------------------------------------------------- Markdown


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def markdown_table(shown: pd.DataFrame) -> str:
    """A GitHub/pandoc pipe table of text cells (no tabulate needed); columns of numbers only are
    right-aligned, as a paper sets them."""
    def cell(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    def numeric(column) -> bool:
        return all(_is_number(v) for v in column if v != "")

    lines = ["| " + " | ".join(cell(c) for c in shown.columns) + " |",
             "|" + "|".join("---:" if numeric(shown[c]) else "---" for c in shown.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines)


def _section(title: str, text: str, shown: pd.DataFrame, empty: str, level: str = "##") -> list[str]:
    body = markdown_table(shown) if not shown.empty else f"_{empty}_"
    return [f"{level} {title}", "", *([text, ""] if text else []), body, ""]


def diverged_note(t: Tables) -> str:
    """What the tables and figures do with diverged runs, where there are any; '' otherwise."""
    count = int(t.runs["diverged"].sum())
    if not count:
        return ""
    return (f"{count} of {len(t.runs)} runs diverged (their last round's test loss or accuracy is NaN or infinite). "
            "They are counted (column Diverged) but kept out of every mean, ± and confidence interval (n counts "
            "the seeds that did not diverge); configurations with a diverged seed rank last, and the figures leave "
            "diverged runs out.")


def markdown(t: Tables, files, top: int = 5, source=None) -> str:
    """report.md: every table, the targets used, and the files written beside it."""
    lines = ["# fedshard analysis", "",
             f"{int(t.summary['n'].sum())} experiments (runs) in {len(t.summary)} configurations"
             + (f", from `{source}`." if source else "."),
             "Final accuracy is a run's last-round test accuracy, best accuracy its highest over all rounds; "
             "± is the sample standard deviation over seeds (none is shown for a single seed).",
             *([diverged_note(t)] if diverged_note(t) else []), ""]
    lines += _section("Summary", "", summary_display(t.summary), "no configurations")
    lines += _section(f"Top {top} configurations by final accuracy", "", ranking_display(t.summary, top), "none")
    lines += ["## Paired comparisons", "",
              "Every two configurations that differ in exactly one setting, paired by seed: b − a is the mean "
              "over the seeds both ran of (b − a), with its 95 % confidence interval (Student t on the paired "
              "differences; none below two pairs; a pair where either run diverged is left out). a < b in natural "
              "order (False < True, numbers ascending, "
              "names alphabetically).", ""]
    for metric, title in METRIC_TITLES.items():
        lines += _section(title.capitalize(), "", comparisons_display(t.comparisons, metric, t.settings),
                          "no two configurations differ in exactly one setting", level="###")
    lines += _section("Rounds to target accuracy",
                      f"Targets: {t.targets_note}. The first round whose test accuracy is at or above the target, "
                      "mean over the seeds that reach it (how many of all seeds do, in brackets; never: none "
                      "does); bytes: mean cumulative bytes exchanged up to that round.",
                      targets_display(t.reached, t.settings, _has_bytes(t.frame)), "no targets")
    empty = " (nothing to draw: every run diverged)" if t.runs["diverged"].all() else ""
    lines += ["## Files", "", *(f"- [{p.name}]({p.name}): {FILE_NOTES.get(p.name, '')}"
                                + (empty if p.suffix == ".png" else "") for p in files)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- writing, printing


def _csv(table: pd.DataFrame) -> bytes:
    return table.to_csv(index=False, lineterminator="\n").encode()


def _write(t: Tables, output_dir, plots: bool, top: int, source) -> list[Path]:
    # Every file is made in memory first: a figure that cannot be drawn leaves no half-written report.
    out = Path(output_dir)
    contents = {COMPARISONS_FILE: _csv(t.comparisons), TARGETS_FILE: _csv(t.reached),
                **(figures(t.frame, runs=t.runs) if plots else {})}
    files = [out / name for name in contents]
    contents = {REPORT_FILE: markdown(t, files, top, source).encode(), **contents}
    return [write_atomic(out / name, data) for name, data in contents.items()]


def write_report(frame, output_dir, targets=None, plots: bool = True, *, top: int = 5,
                 source=None) -> list[Path]:
    """Write report.md, comparisons.csv, targets.csv and (plots=True) the figures into
    output_dir (created if missing); return every file written, report.md first. targets None
    means the default targets; `source` names the results file in report.md."""
    return _write(tables(frame, targets), output_dir, plots, top, source)


def console_lines(t: Tables, top: int = 5) -> list[str]:
    """The tables as the console shows them: summary, ranking, comparisons, rounds to target."""
    lines = ["Summary statistics (final test accuracy over seeds: mean ± std, n):",
             summary_display(t.summary).to_string(index=False),
             *([f"Note: {diverged_note(t)}"] if diverged_note(t) else []), "",
             *analysis.ranking_lines(t.frame, top, summary=t.summary)]
    for metric, title in METRIC_TITLES.items():
        shown = comparisons_display(t.comparisons, metric, t.settings)
        lines += ["", f"Paired comparisons, {title} (b − a over the seeds both ran, 95 % CI):",
                  shown.to_string(index=False) if not shown.empty
                  else "  none: no two configurations differ in exactly one setting"]
    shown = targets_display(t.reached, t.settings, _has_bytes(t.frame))
    lines += ["", f"Rounds to target accuracy ({t.targets_note}):",
              shown.to_string(index=False) if not shown.empty else "  none: no targets"]
    return lines


def report(results_file, output_dir="plots", top: int = 5, plots: bool = True, targets=None,
           echo=print) -> None:
    """What `fedshard analyze` shows; unless plots=False (print the tables only, write nothing),
    also write_report into output_dir."""
    if plots and (problem := not_a_directory(output_dir)) is not None:  # found before anything is shown
        raise NotADirectoryError(problem)
    t = tables(read(results_file), targets)
    echo(f"Loaded {int(t.summary['n'].sum())} experiments ({len(t.summary)} configurations) from {results_file}")
    echo("")
    for line in console_lines(t, top):
        echo(line)
    if plots:
        report_file, *files = _write(t, output_dir, True, top, results_file)
        echo("")
        echo(f"Report written to {report_file}, with:")
        for path in files:
            echo(f"  {path}")
