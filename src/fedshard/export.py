"""MLflow -> the classic results pickle (or a tidy CSV), from FINISHED runs only.

    {(world_size, learning_rate, enable_swapping, rounds, seed):     # (int, float, bool, int, int)
        [(round, test_loss, test_accuracy), ...]}                    # (int, float, float), round 0 first

Params are parsed through ExperimentConfig, so a run logged as learning_rate
'0.00001' and one logged as '1e-05' land on the same key; when two finished runs
share a key the newest (by start time) wins, with a warning. Files are written
atomically: a crash never leaves half a file, and an existing file is replaced
only by a complete one.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import tempfile
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError

FORMATS = ("pickle", "csv")
DEFAULT_OUTPUT = {"pickle": "experiment_results.pkl", "csv": "experiment_results.csv"}
CSV_COLUMNS = ("world_size", "learning_rate", "enable_swapping", "rounds", "seed",
               "run_id", "round", "test_loss", "test_accuracy")
# Protocol 4: readable by every Python 3 still in use, and by analysis.load_results.
PICKLE_PROTOCOL = 4


# What the key is made of; strategy too, as it decides whether swapping applies.
KEY_PARAMS = ("world_size", "learning_rate", "enable_swapping", "rounds", "seed", "strategy")


class ExportError(Exception):
    """Nothing to export (no such experiment, no FINISHED run) or the file cannot be written."""


@dataclass(frozen=True)
class ExportedRun:
    run_id: str
    start_time: int
    key: tuple  # (int, float, bool, int, int)
    entries: list  # [(int, float, float)], round 0 first


def entries_from_history(loss, accuracy, rounds: int) -> list[tuple[int, float, float]]:
    """[(round, test_loss, test_accuracy)] for rounds 0..rounds from two metric histories of
    (step, value, timestamp); raise ValueError when a round is missing. A step logged twice
    keeps its last value."""
    by_step = []
    for history in (loss, accuracy):
        latest = {}
        for step, value, ts in sorted(history, key=lambda m: (m[0], m[2])):
            latest[int(step)] = float(value)
        by_step.append(latest)
    losses, accs = by_step
    expected = list(range(rounds + 1))
    for name, got in (("test_loss", losses), ("test_accuracy", accs)):
        if sorted(got) != expected:
            missing = sorted(set(expected) - set(got))
            extra = sorted(set(got) - set(expected))
            raise ValueError(f"{name} has rounds {_span(sorted(got))}, expected 0..{rounds}"
                             + (f" (missing {_span(missing)})" if missing else "")
                             + (f" (unexpected {_span(extra)})" if extra else ""))
    return [(r, losses[r], accs[r]) for r in expected]


def _span(steps) -> str:
    if not steps:
        return "none"
    return ", ".join(map(str, steps)) if len(steps) <= 6 else f"{steps[0]}..{steps[-1]} ({len(steps)} values)"


def collect(runs, histories, warn=print) -> dict[tuple, ExportedRun]:
    """key -> the newest valid FINISHED experiment run for it.

    `runs` are tracking.RunRecord-like (run_id, status, start_time, params, is_experiment,
    config()); `histories(run_id, metric)` gives (step, value, timestamp) tuples. Runs that are
    not FINISHED, sweep parent runs and runs without world_size are left out silently; finished
    runs that cannot be read (bad params, missing rounds) with a warning."""
    chosen: dict[tuple, ExportedRun] = {}
    for run in sorted((r for r in runs if r.status == "FINISHED" and r.is_experiment),
                      key=lambda r: (r.start_time, r.run_id)):
        try:
            cfg = run.config(only=KEY_PARAMS)
            entries = entries_from_history(histories(run.run_id, "test_loss"),
                                           histories(run.run_id, "test_accuracy"), cfg.rounds)
        except (ConfigError, ValueError) as exc:
            warn(f"warning: run {run.run_id} left out: {str(exc).splitlines()[-1].strip()}")
            continue
        key = (int(cfg.world_size), float(cfg.learning_rate), bool(cfg.enable_swapping), int(cfg.rounds),
               int(cfg.seed))
        if key in chosen:
            warn(f"warning: {key!r} has several FINISHED runs; using the newest, {run.run_id} "
                 f"(replaces {chosen[key].run_id})")
        chosen[key] = ExportedRun(run.run_id, run.start_time, key, entries)
    return dict(sorted(chosen.items()))


def results(exported: dict[tuple, ExportedRun]) -> dict:
    """The classic pickle's dict."""
    return {key: list(run.entries) for key, run in exported.items()}


def csv_text(exported: dict[tuple, ExportedRun]) -> str:
    """One row per run and round, for pandas: pd.read_csv(path)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for (ws, lr, swap, rounds, seed), run in exported.items():
        for r, loss, acc in run.entries:
            writer.writerow([ws, repr(lr), swap, rounds, seed, run.run_id, r, repr(loss), repr(acc)])
    return out.getvalue()


def write_atomic(path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same directory and os.replace: the
    previous file stays intact until the new one is complete, and no temporary file is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def export(experiment_name: str, output, fmt: str = "pickle", warn=print) -> tuple[Path, dict]:
    """Export the experiment's FINISHED runs to `output`; return (path, exported runs)."""
    from . import tracking

    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    tracking.ensure_store()
    if tracking.experiment_id(experiment_name, create=False) is None:
        raise ExportError(f"no experiment {experiment_name!r} in {tracking.tracking_uri()} "
                          f"(experiments there: {', '.join(tracking.experiment_names()) or 'none'})")
    runs = tracking.list_runs(experiment_name, status="FINISHED")

    def history(run_id, metric):
        return tracking.metric_history(run_id, metric)

    exported = collect(runs, history, warn)
    if not exported:
        raise ExportError(f"experiment {experiment_name!r} has no FINISHED experiment run to export; "
                          f"nothing written")
    data = (pickle.dumps(results(exported), protocol=PICKLE_PROTOCOL) if fmt == "pickle"
            else csv_text(exported).encode())
    try:
        path = write_atomic(output, data)
    except OSError as exc:
        raise ExportError(f"cannot write {output}: {exc.strerror or exc}") from exc
    return path, exported
