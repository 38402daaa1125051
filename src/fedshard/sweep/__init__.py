"""Running a sweep: the plan (planning.py) N experiments at a time, to the end, whatever fails.

One job a module:

- here, `main`: what `fedshard sweep` (and `python sweep.py`) does once its options are parsed:
  the experiment, stale runs marked KILLED, the plan, the dry run, the data, then the sweep;
- `scheduling`: the loop (`Sweep`, `Job`, `Outcome`): which experiment starts when (one that
  extends a twin of this sweep waits for it), finishing, retrying from a checkpoint, stopping
  every experiment on a signal or an error;
- `claiming`: the sweep's side of claims (tracking/claims.py): each configuration claimed just
  before its launcher starts, so that no two sweeps train it; the ones held elsewhere watched;
- `reporting`: what the sweep shows (`Report`): the console lines, the progress bar or progress
  lines with the ETA, the parent run's description, counters (sweep/finished, ...) and analysis,
  and the final summary;
- `resources`: what each experiment's process is given: its `fedshard run` command line, its
  share of the cores, its GPU.

What a sweep looks like from outside (options, console, its MLflow run) is docs/sweeps.md; where
the package sits among fedshard's modules, docs/architecture.md.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING

from fedshard.core import precision
from fedshard.core.config import ExperimentConfig
from fedshard.sweep.grid import Grid, SweepError, describe, expand
from fedshard.sweep.planning import Plan, config_of, plan
from fedshard.sweep.reporting import Report, axes_text
from fedshard.sweep.resources import child_command, cpus_per_experiment, pick_gpu, visible_gpus
from fedshard.sweep.scheduling import Job, Outcome, Sweep

if TYPE_CHECKING:
    from fedshard.sweep.executors import Executor
    from fedshard.tracking import RunRecord

__all__ = [
    "Job",
    "Outcome",
    "Report",
    "Sweep",
    "SweepError",
    "child_command",
    "cpus_per_experiment",
    "main",
    "pick_gpu",
    "visible_gpus",
]


def main(
    grid: Grid,
    experiment_name: str | None,
    parallel: int,
    max_retries: int,
    dry_run: bool,
    echo: Callable[[str], None] = print,
    show_progress: bool = True,
    executor: Executor | None = None,
    resume: bool = True,
    extend: bool = True,
    wait: bool = False,
) -> int:
    """What `python sweep.py` does, after the options were parsed; returns the exit code."""
    from fedshard import tracking

    configs = expand(grid, _resolved)
    tracking.ensure_store()
    experiment_name = _experiment(experiment_name)
    runs = tracking.list_runs(experiment_name)
    stale = [r for r in runs if tracking.claims.dead(r)]
    if stale and not dry_run:
        _mark_stale(stale, echo)
    work = plan(configs, runs, resume=resume, extend=extend, stale={r.run_id for r in stale})
    echo(f"Total experiments to run: {len(work.tasks)} ({len(work.skipped)} already finished)")
    echo(work.rounds_line())
    todo = {t.cfg for t in work.tasks}
    _note_running(runs, stale, todo, wait, echo)
    if dry_run:
        _dry_run(grid, len(configs), work, experiment_name, echo)
        return 0
    if not work.tasks:
        echo(f"Nothing to run: every configuration already has a FINISHED run in {experiment_name!r}.")
        return 0
    _ensure_data(todo)
    return Sweep(work, experiment_name, parallel, max_retries, grid, echo, show_progress, executor, resume, wait).run()


def _resolved(cfg: ExperimentConfig) -> ExperimentConfig:
    """The configuration in the precision it computes in here. A run records that precision, so
    `auto` is decided on this machine before the store's runs are compared with the grid (on a
    cluster whose nodes differ, name it: -P precision=); bf16 where it cannot be is refused now,
    before any run exists, not by every experiment's launcher."""
    try:
        return cfg.replace(precision=precision.resolve(cfg.precision, cfg.device))
    except precision.PrecisionError as exc:
        raise SweepError(str(exc)) from None


def _experiment(experiment_name: str | None) -> str:
    """The experiment the sweep runs in: under `mlflow run -e sweep` that run is the parent, and
    its experiment is ours."""
    from fedshard import tracking

    parent = os.environ.get("MLFLOW_RUN_ID")
    if parent:
        mine = tracking.experiment_name_of_run(parent)
        if experiment_name and experiment_name != mine:
            raise SweepError(
                f"--experiment-name {experiment_name!r} differs from the experiment {mine!r} of "
                f"MLFLOW_RUN_ID={parent}; choose the experiment with `mlflow run --experiment-name`"
            )
        experiment_name = mine
    return tracking.default_experiment_name(experiment_name)


def _mark_stale(stale: Sequence[RunRecord], echo: Callable[[str], None]) -> None:
    """RUNNING runs that nobody will end never end by themselves: mark them KILLED, so their
    configurations run (or resume) again. A dead claim (its owner gone, or silent for over its claim
    timeout, tracking/claims.py) is reaped: its owner, should it come back, finds its run taken. Other
    runs (a sweep's own, runs from before claims) are stale when their owner on this host is gone."""
    from fedshard import tracking

    claims = tracking.claims
    reaped = [
        r
        for r in stale
        if claims.is_claim(r)
        and claims.reap(
            r,
            "KILLED",
            f"stale: its owner ({claims.owner_text(r)}) is gone or silent for over its claim "
            f"timeout of {claims.claim_timeout(r):g}s",
        )
    ]
    others = [r for r in stale if not claims.is_claim(r)]
    for r in others:
        tracking.end_run(
            r.run_id,
            "KILLED",
            f"stale: its owner (pid {r.tags.get(tracking.PID_TAG)} on {r.tags.get(tracking.HOST_TAG)}) is gone",
        )
    if reaped:
        echo(
            f"Marked {len(reaped)} dead claim(s) KILLED (their owner is gone, or silent for over the claim "
            f"timeout); they continue here: " + ", ".join(f"{r.run_id} ({claims.owner_text(r)})" for r in reaped)
        )
    if others:
        echo(
            f"Marked {len(others)} stale RUNNING run(s) KILLED (their sweep or launcher on this host is gone): "
            + ", ".join(r.run_id for r in others)
        )


def _note_running(
    runs: Iterable[RunRecord],
    stale: Iterable[RunRecord],
    todo: Iterable[ExperimentConfig],
    wait: bool,
    echo: Callable[[str], None],
) -> None:
    """Say which configurations to run are running elsewhere now: held by a live claim (reported when
    their turn comes, and waited for with --wait), or RUNNING in a run from before claims, which this
    sweep cannot judge and runs again."""
    from fedshard import tracking

    dead = {r.run_id for r in stale}
    mine = {c.identity() for c in todo}
    running = [
        (r, cfg)
        for r in runs
        if r.status == "RUNNING"
        and r.run_id not in dead
        and (cfg := config_of(r)) is not None
        and cfg.identity() in mine
    ]
    held = {cfg.identity() for r, cfg in running if tracking.claims.is_claim(r)}
    legacy = {cfg.identity() for r, cfg in running if not tracking.claims.is_claim(r)} - held
    if held:
        echo(
            f"Note: {len(held)} of them are running elsewhere now (claimed by another sweep or machine); "
            + ("this sweep waits for them (--wait)" if wait else "they are not run here (--wait waits for them)")
        )
    if legacy:
        echo(
            f"Note: {len(legacy)} of them have a RUNNING run from before claims (another sweep, or one that "
            f"was killed hard); they run again here."
        )


def _dry_run(grid: Grid, configurations: int, work: Plan, experiment_name: str, echo: Callable[[str], None]) -> None:
    """What a sweep would run (and from which round) and what it skips; it starts nothing."""
    from fedshard import tracking

    echo(f"Dry run: experiment {experiment_name!r} in {tracking.tracking_uri()}; nothing is started.")
    echo(_axes_line(grid, configurations - bool(grid.pretrain)))
    if grid.fixed:
        echo("Fixed parameters: " + ", ".join(f"{k}={v}" for k, v in grid.fixed.items()))
    if grid.pretrain:
        echo(
            "Pretrain run, first: "
            + ", ".join(f"{k}={v}" for k, v in grid.pretrain.items())
            + "; every configuration of the grid starts from its final model"
        )
    for i, task in enumerate(work.tasks, 1):
        echo(
            f"Would run {i}/{len(work.tasks)}: {describe(task.cfg, grid.extra_axes)}"
            + (f" ({task.describe()}: {task.rounds_to_train} rounds to train)" if task.start or task.source else "")
        )
    for cfg, run_id in work.skipped:
        echo(f"Skip (FINISHED run {run_id}): {describe(cfg, grid.extra_axes)}")


def _axes_line(grid: Grid, configurations: int) -> str:
    """'Axes: world_sizes=1,2 (2) x ... = 24 combinations, 18 configurations (...)'."""
    combinations = math.prod(len(values) for values in grid.axes.values())
    line = f"Axes: {axes_text(grid)}"
    collapsed = (
        (
            " (combinations where a setting does not apply, such as swapping for world size 1 or "
            "FedAvg, are one configuration)"
        )
        if configurations < combinations
        else ""
    )
    return f"{line} = {combinations} combinations, {configurations} configurations{collapsed}"


def _ensure_data(configs: Collection[ExperimentConfig]) -> None:
    """Download (or unpack) the data set once, before experiments run side by side and would
    each try to download it into the same directory."""
    from fedshard.core import data

    for data_dir in dict.fromkeys(c.data_dir for c in configs):
        try:
            data.ensure_cifar100(data_dir)
        except data.DataError as exc:
            raise SweepError(str(exc)) from exc
