"""MLflow -> the classic results pickle, or a CSV of every setting, from FINISHED runs only.

    {(world_size, learning_rate, enable_swapping, rounds, seed):     # (int, float, bool, int, int)
        [(round, test_loss, test_accuracy), ...]}                    # (int, float, float), round 0 first

or, with key_format 6, the harness's (world_size, learning_rate, enable_swapping,
enable_layerwise_swapping, rounds, seed) key; a 5-tuple pickle holds no run with layerwise swapping.

A run's configuration is all its result settings (config.RESULT_SETTINGS), parsed through
ExperimentConfig, so '0.00001' and '1e-05' are one learning rate. Runs of one configuration
are one entry: the newest (by start time) wins, with a warning. Runs that differ in any
setting never mix: the pickle's key holds only five settings, so when the selected runs differ
in another one (strategy, partition, ...) the pickle is refused, naming it, and `--where
strategy=fedavg` selects; the CSV has a column for every setting, and the communication bytes
of every round. Files are written atomically (files.write_atomic).
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fedshard.core.config import RESULT_SETTINGS, ConfigError, ExperimentConfig, setting_value
from fedshard.core.errors import FedshardError, last_line
from fedshard.core.files import write_atomic

if TYPE_CHECKING:
    import pandas as pd

    from fedshard.tracking import RunRecord

# A metric's history, as tracking.metric_history gives it: (step, value, timestamp) tuples.
History = Iterable[tuple[int, float, int]]

log = logging.getLogger(__name__)

FORMATS = ("pickle", "csv")
DEFAULT_OUTPUT = {"pickle": "experiment_results.pkl", "csv": "experiment_results.csv"}
# Protocol 4: readable by every Python 3 still in use, and by results.load_pickle.
PICKLE_PROTOCOL = 4
# Per-round communication metrics (the aggregator's) -> CSV column.
COMM_METRICS = {"comm/bytes_down": "bytes_down", "comm/bytes_up": "bytes_up", "comm/bytes_total": "bytes_total"}


class ExportError(FedshardError):
    """Nothing to export (no FINISHED run) or the file cannot be written: exit 1."""


class SelectionError(ExportError):
    """Bad input: no such experiment, a bad --where, an --output under a file, or runs that the chosen
    format cannot keep apart; nothing written: exit 2."""

    exit_code = 2


@dataclass(frozen=True)
class ExportedRun:
    run_id: str
    start_time: int
    cfg: ExperimentConfig
    entries: list[tuple[int, float, float]]  # (round, test_loss, test_accuracy), round 0 first
    comm: dict[str, dict[int, float]] = field(default_factory=dict)  # CSV column -> {round: bytes}, rounds logged

    @property
    def key(self) -> tuple[int, float, bool, int, int]:
        return self.cfg.key()


def entries_from_history(loss: History, accuracy: History, rounds: int) -> list[tuple[int, float, float]]:
    """[(round, test_loss, test_accuracy)] for rounds 0..rounds from two metric histories of
    (step, value, timestamp); raise ValueError when a round is missing. A step logged twice
    keeps its last value."""
    losses, accs = _by_step(loss), _by_step(accuracy)
    expected = list(range(rounds + 1))
    for name, got in (("test_loss", losses), ("test_accuracy", accs)):
        if sorted(got) != expected:
            missing = sorted(set(expected) - set(got))
            extra = sorted(set(got) - set(expected))
            raise ValueError(
                f"{name} has rounds {_span(sorted(got))}, expected 0..{rounds}"
                + (f" (missing {_span(missing)})" if missing else "")
                + (f" (unexpected {_span(extra)})" if extra else "")
            )
    return [(r, losses[r], accs[r]) for r in expected]


def _by_step(history: History) -> dict[int, float]:
    latest: dict[int, float] = {}
    for step, value, _ts in sorted(history, key=lambda m: (m[0], m[2])):
        latest[int(step)] = float(value)
    return latest


def _span(steps: Sequence[int]) -> str:
    if not steps:
        return "none"
    return ", ".join(map(str, steps)) if len(steps) <= 6 else f"{steps[0]}..{steps[-1]} ({len(steps)} values)"


def parse_where(items: Iterable[object]) -> dict[str, str]:
    """--where NAME=VALUE items (or several in one, space-separated) -> {setting: canonical value}
    (config.setting_value); a name that is no result setting, or a value the setting refuses, is a
    SelectionError naming what is valid."""
    where: dict[str, str] = {}
    for item in (part for raw in items for part in str(raw).split()):  # MLproject passes one string
        name, sep, value = str(item).partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise SelectionError(f"--where {item!r}: expected NAME=VALUE, e.g. --where strategy=fedavg")
        if name not in RESULT_SETTINGS:
            raise SelectionError(f"--where {item!r}: unknown setting {name!r}; valid: {', '.join(RESULT_SETTINGS)}")
        try:
            where[name] = setting_value(name, value.strip())
        except ConfigError as exc:
            raise SelectionError(f"--where {item!r}: {last_line(exc)}") from None
    return where


def collect(
    runs: Iterable[RunRecord],
    histories: Callable[[str, str], History],
    where: Mapping[str, str] | None = None,
    quiet: bool = False,
) -> dict[tuple, ExportedRun]:
    """Configuration identity -> the newest valid FINISHED experiment run of it among those that
    match `where` ({setting: canonical value}).

    `runs` are tracking.RunRecord-like (run_id, status, start_time, is_experiment, config());
    `histories(run_id, metric)` gives (step, value, timestamp) tuples. Runs that are not FINISHED and
    sweep parent runs are left out silently; finished runs that cannot be read (bad params, missing
    rounds) with a warning, which `quiet` logs at DEBUG only (a sweep's analysis of its own runs). A
    `where` value that no finished run has is a SelectionError."""
    where = where or {}
    chosen: dict[tuple, ExportedRun] = {}
    seen: dict[str, set[str]] = {name: set() for name in where}
    level = logging.DEBUG if quiet else logging.WARNING
    for run in sorted(
        (r for r in runs if r.status == "FINISHED" and r.is_experiment), key=lambda r: (r.start_time, r.run_id)
    ):
        try:
            cfg = run.config()
            entries = entries_from_history(
                histories(run.run_id, "test_loss"), histories(run.run_id, "test_accuracy"), cfg.rounds
            )
        except (ConfigError, ValueError) as exc:
            log.log(level, f"warning: run {run.run_id} left out: {last_line(exc)}")
            continue
        settings = cfg.settings()
        for name in where:
            seen[name].add(settings[name])
        if any(settings[name] != value for name, value in where.items()):
            continue
        comm = {column: _by_step(histories(run.run_id, metric)) for metric, column in COMM_METRICS.items()}
        if cfg.identity() in chosen:
            log.log(
                level,
                f"warning: {cfg.run_name()} has several FINISHED runs; using the newest, {run.run_id} "
                f"(replaces {chosen[cfg.identity()].run_id})",
            )
        chosen[cfg.identity()] = ExportedRun(run.run_id, run.start_time, cfg, entries, comm)
    for name, value in where.items():
        if value not in seen[name]:
            raise SelectionError(
                f"--where {name}={value}: no FINISHED run has it; the runs have {name}="
                f"{', '.join(sorted(seen[name])) or '(no FINISHED run at all)'}"
            )
    return dict(sorted(chosen.items(), key=lambda item: (item[1].key, item[0])))


def pickle_refusal(table: pd.DataFrame, experiment_name: str, key_format: int = 5) -> str | None:
    """Why the runs of `table` (a results frame) cannot go into one pickle keyed by key_format's tuple
    (results.refusal, the rule results.pickle_dict keeps), or None when they can."""
    from fedshard.results import formats as results

    why = results.refusal(table, key_format)
    if why is None:
        return None
    differ = results.differing(table, key_format)
    select = ""
    if differ:
        name, values = next(iter(differ.items()))
        select = f"Select runs with --where {name}={values[0]} (or {', '.join(values[1:])}), or export"
    return (
        f"the FINISHED runs of experiment {experiment_name!r} {why}. {select or 'Export'} them all with "
        f"--format csv, which has a column for every setting; nothing written"
    )


def frame(exported: dict[tuple, ExportedRun]) -> pd.DataFrame:
    """The results frame (results.py): one row per run and round, every result setting a column, the
    round's bytes where the run counted them (bytes_total is 0 at round 0, as nothing was sent yet)."""
    import pandas as pd

    rows: list[dict[str, object]] = []
    for run in exported.values():
        settings = {name: getattr(run.cfg, name) for name in RESULT_SETTINGS}
        for r, loss, acc in run.entries:
            comm = {
                column: (0.0 if r == 0 and by_round else by_round.get(r, math.nan))
                for column, by_round in run.comm.items()
            }
            rows.append(
                {
                    **settings,
                    "run_id": run.run_id,
                    "round": r,
                    "test_loss": loss,
                    "test_accuracy": acc,
                    **{c: comm.get(c, math.nan) for c in COMM_METRICS.values()},
                }
            )
    return pd.DataFrame(rows)


def export(
    experiment_name: str,
    output: str | Path,
    fmt: str = "pickle",
    where: Iterable[object] = (),
    key_format: int = 5,
) -> tuple[Path, dict[tuple, ExportedRun]]:
    """Export the experiment's FINISHED runs (those matching `where`, NAME=VALUE items) to `output`, a
    pickle keyed by key_format's tuple (results.KEY_FORMATS) or a CSV; return (path, exported runs)."""
    from fedshard import tracking
    from fedshard.results import formats as results

    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if key_format not in results.KEY_FORMATS or (fmt == "csv" and key_format != 5):
        raise SelectionError(
            f"--key-format {key_format}: a pickle's key has 5 or 6 fields; a CSV has a column for "
            "every setting and no key"
        )
    selection = parse_where(where)
    tracking.ensure_store()
    if tracking.experiment_id(experiment_name, create=False) is None:  # a name given wrong: bad input
        raise SelectionError(
            f"no experiment {experiment_name!r} in {tracking.tracking_uri()} "
            f"(experiments there: {', '.join(tracking.experiment_names()) or 'none'})"
        )
    runs = tracking.list_runs(experiment_name, status="FINISHED")
    exported = collect(runs, tracking.metric_history, selection)
    if not exported:
        raise ExportError(f"experiment {experiment_name!r} has no FINISHED experiment run to export; nothing written")
    table = frame(exported)
    if fmt == "pickle":
        if (refusal := pickle_refusal(table, experiment_name, key_format)) is not None:
            raise SelectionError(refusal)
        data = pickle.dumps(results.pickle_dict(table, key_format), protocol=PICKLE_PROTOCOL)
    else:
        data = results.csv_bytes(table)
    try:
        path = write_atomic(output, data)
    except NotADirectoryError as exc:  # an --output that cannot be: bad input
        raise SelectionError(f"cannot write {output}: {exc.strerror or exc}; nothing written") from exc
    except OSError as exc:
        raise ExportError(f"cannot write {output}: {exc.strerror or exc}") from exc
    return path, exported
