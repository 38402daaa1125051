"""Results -> what a researcher reads: the console report of `fedshard analyze`, and one
directory holding report.md (every table as Markdown, ready to paste into a paper draft),
comparisons.csv, targets.csv and the figures. `write_report` is what the sweep calls too.

The numbers come from analysis.py, the text tables from display.py and the figures from
plots.py; this module only chooses the targets, says what the tables mean, and writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fedshard.core.files import not_a_directory, write_atomic
from fedshard.results import analysis
from fedshard.results.analysis import config_settings
from fedshard.results.display import comparisons_display, ranking_display, summary_display, target_text, targets_display
from fedshard.results.formats import ResultsOrFrame, to_frame
from fedshard.results.plots import BYTES_PLOT_FILE, figures
from fedshard.results.sources import read_sources

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
    "best_accuracy_vs_rounds.png": "best accuracy (over rounds r ≥ 1) against the number of rounds",
    BYTES_PLOT_FILE: "test accuracy against cumulative bytes exchanged",
}


def parse_targets(values: Iterable[object]) -> list[float] | None:
    """--target values ('0.3', '0.3,0.5', '' for none given) -> sorted targets, or None when none
    is given (the defaults apply). A value that is not a number in (0, 1] is a ValueError."""
    targets: set[float] = set()
    for text in (t.strip() for value in values for t in str(value).split(",")):
        if not text:
            continue
        try:
            target = float(text)
        except ValueError:
            raise ValueError(
                f"{text!r} is not a number; a target is a test accuracy in (0, 1], e.g. 0.3 or 0.3,0.5"
            ) from None
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
    settings: list[str]  # the settings that tell configurations apart (analysis.config_settings)
    comparisons: pd.DataFrame
    reached: pd.DataFrame
    targets_note: str
    trained_start: bool  # runs start from a trained model (analysis.from_trained_model)
    notes: tuple[str, ...] = ()  # what reading several results files assumed (sources.read_sources)


def _targets_text(targets: Iterable[float]) -> str:
    return ", ".join(map(target_text, targets))


def tables(results: ResultsOrFrame, targets: Sequence[float] | None = None, notes: Iterable[str] = ()) -> Tables:
    """The analysis of `results`; targets None (or empty) means the default targets; `notes` are
    read_sources' notes."""
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
        note = (
            f"default targets {_targets_text(targets) or '(none)'}: {fractions} of the best configuration's "
            f"mean final accuracy ({best:.4f}), rounded to 2 decimals"
        )
    return Tables(
        frame,
        runs,
        summary,
        config_settings(runs),
        analysis.comparisons(frame, runs=runs),
        analysis.targets_table(frame, targets, runs=runs),
        note,
        analysis.from_trained_model(frame),
        tuple(notes),
    )


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

    def cell(text: object) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    def numeric(column: Iterable[str]) -> bool:
        return all(_is_number(v) for v in column if v != "")

    lines = [
        "| " + " | ".join(cell(c) for c in shown.columns) + " |",
        "|" + "|".join("---:" if numeric(shown[c]) else "---" for c in shown.columns) + "|",
    ]
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
    return (
        f"{count} of {len(t.runs)} runs diverged (their last round's test loss or accuracy is NaN or infinite). "
        "They are counted (column Diverged) but kept out of every mean, ± and confidence interval (n counts "
        "the seeds that did not diverge); configurations with a diverged seed rank last, and the figures leave "
        "diverged runs out."
    )


def reading_notes(t: Tables) -> list[str]:
    """What the columns mean, what several results files were taken to be, and what became of
    diverged runs: the lines under the summary."""
    notes = [
        "Start accuracy is round 0's test accuracy (the model before any training), final accuracy a run's "
        "last-round test accuracy, best accuracy its highest over the trained rounds (r ≥ 1: never the "
        "start); ± is the sample standard deviation over seeds (none is shown for a single seed)."
    ]
    if t.trained_start:
        notes.append(
            f"Runs here start from a trained model (init_from, or a round-0 accuracy of "
            f"{analysis.TRAINED_START * 100:g} % or more): Final − Start is each run's change from its "
            "start."
        )
    if analysis.SOURCE in t.settings:
        notes.append(
            "Source is the results file a run came from: runs of the same configuration and seed in two "
            "files are compared under Source like any other setting."
        )
    return [*notes, *t.notes, *filter(None, [diverged_note(t)])]


def markdown(t: Tables, files: Iterable[Path], top: int = 5, sources: Sequence[str | Path] = ()) -> str:
    """report.md: every table, the targets used, and the files written beside it; `sources` are the
    results files read."""
    lines = [
        "# fedshard analysis",
        "",
        f"{int(t.summary['n'].sum())} experiments (runs) in {len(t.summary)} configurations"
        + (f", from {', '.join(f'`{s}`' for s in sources)}." if sources else "."),
        "",
    ]
    lines += [f"{note}\n" for note in reading_notes(t)]
    lines += _section("Summary", "", summary_display(t.summary, t.trained_start), "no configurations")
    lines += _section(f"Top {top} configurations by final accuracy", "", ranking_display(t.summary, top), "none")
    lines += [
        "## Paired comparisons",
        "",
        "Every two configurations that differ in exactly one setting, paired by seed: b − a is the mean "
        "over the seeds both ran of (b − a), with its 95 % confidence interval (Student t on the paired "
        "differences; none below two pairs; a pair where either run diverged is left out). a < b in natural "
        "order (False < True, numbers ascending, "
        "names alphabetically).",
        "",
    ]
    for metric, title in METRIC_TITLES.items():
        lines += _section(
            title.capitalize(),
            "",
            comparisons_display(t.comparisons, metric, t.settings),
            "no two configurations differ in exactly one setting",
            level="###",
        )
    lines += _section(
        "Rounds to target accuracy",
        f"Targets: {t.targets_note}. The first round whose test accuracy is at or above the target, "
        "mean over the seeds that reach it (how many of all seeds do, in brackets; never: none "
        "does); bytes: mean cumulative bytes exchanged up to that round.",
        targets_display(t.reached, t.settings, _has_bytes(t.frame)),
        "no targets",
    )
    empty = " (nothing to draw: every run diverged)" if t.runs["diverged"].all() else ""
    lines += [
        "## Files",
        "",
        *(
            f"- [{p.name}]({p.name}): {FILE_NOTES.get(p.name, '')}" + (empty if p.suffix == ".png" else "")
            for p in files
        ),
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- writing, printing


def _csv(table: pd.DataFrame) -> bytes:
    return table.to_csv(index=False, lineterminator="\n").encode()


def _write(t: Tables, output_dir: str | Path, plots: bool, top: int, sources: Sequence[str | Path]) -> list[Path]:
    # Every file is made in memory first: a figure that cannot be drawn leaves no half-written report.
    out = Path(output_dir)
    contents = {
        COMPARISONS_FILE: _csv(t.comparisons),
        TARGETS_FILE: _csv(t.reached),
        **(figures(t.frame, runs=t.runs) if plots else {}),
    }
    files = [out / name for name in contents]
    contents = {REPORT_FILE: markdown(t, files, top, sources).encode(), **contents}
    return [write_atomic(out / name, data) for name, data in contents.items()]


def write_report(
    frame: ResultsOrFrame,
    output_dir: str | Path,
    targets: Sequence[float] | None = None,
    plots: bool = True,
    *,
    top: int = 5,
    sources: Sequence[str | Path] = (),
) -> list[Path]:
    """Write report.md, comparisons.csv, targets.csv and (plots=True) the figures into
    output_dir (created if missing); return every file written, report.md first. targets None
    means the default targets; `sources` names the results files in report.md."""
    return _write(tables(frame, targets), output_dir, plots, top, sources)


def console_lines(t: Tables, top: int = 5) -> list[str]:
    """The tables as the console shows them: summary, ranking, comparisons, rounds to target."""
    lines = [
        "Summary statistics (final test accuracy over seeds: mean ± std, n):",
        summary_display(t.summary, t.trained_start).to_string(index=False),
        *(f"Note: {note}" for note in reading_notes(t)),
        "",
        *analysis.ranking_lines(t.frame, top, summary=t.summary),
    ]
    for metric, title in METRIC_TITLES.items():
        shown = comparisons_display(t.comparisons, metric, t.settings)
        lines += [
            "",
            f"Paired comparisons, {title} (b − a over the seeds both ran, 95 % CI):",
            shown.to_string(index=False)
            if not shown.empty
            else "  none: no two configurations differ in exactly one setting",
        ]
    shown = targets_display(t.reached, t.settings, _has_bytes(t.frame))
    lines += [
        "",
        f"Rounds to target accuracy ({t.targets_note}):",
        shown.to_string(index=False) if not shown.empty else "  none: no targets",
    ]
    return lines


def report(
    results_files: str | Path | Iterable[str | Path],
    output_dir: str | Path = "plots",
    top: int = 5,
    plots: bool = True,
    targets: Sequence[float] | None = None,
    echo: Callable[[str], None] = print,
    labels: Iterable[object] = (),
) -> None:
    """What `fedshard analyze` shows of one results file or several (a path, or a list of paths;
    `labels` are NAME=FILE items naming their sources); unless plots=False (print the tables
    only, write nothing), also write_report into output_dir."""
    files = [results_files] if isinstance(results_files, (str, Path)) else list(results_files)
    if plots and (problem := not_a_directory(output_dir)) is not None:  # found before anything is shown
        raise NotADirectoryError(problem)
    frame, notes = read_sources(files, labels)
    t = tables(frame, targets, notes)
    echo(
        f"Loaded {int(t.summary['n'].sum())} experiments ({len(t.summary)} configurations) from "
        f"{', '.join(map(str, files))}"
    )
    echo("")
    for line in console_lines(t, top):
        echo(line)
    if plots:
        report_file, *written = _write(t, output_dir, True, top, files)
        echo("")
        echo(f"Report written to {report_file}, with:")
        for path in written:
            echo(f"  {path}")
