"""What of a grid is left to train, and where each configuration starts: pure, no processes,
no MLflow calls.

`plan` compares a grid's configurations (grid.py) with the runs already in the store and
says, per configuration, whether it is done (a FINISHED run), and if not, where it starts:

- resume: a FAILED, KILLED or stale run of it has a checkpoint of round k: continue
  that run in place from k;
- extension: a run of the same configuration with fewer rounds R is FINISHED, or is
  planned here: start a new run from its final model at round R (copying rounds
  0..R in) and train only R+1.. (nothing in a round depends on how many rounds follow
  it, so this equals training from scratch);
- otherwise from round 0.

Whichever trains the fewest rounds wins. The default grid has every setting at 30
and 50 rounds: extension trains 1,350 rounds of it instead of 2,160.

A configuration that starts from another run's final model (init_from=run:<name>) whose
configuration is in the plan waits for it: the source goes first, and a task that trains from
round 0 names it (`source`). A source that is neither in the grid nor FINISHED in the store
is refused before anything runs.

Runs are matched by their configuration's identity (config.RESULT_SETTINGS): a run whose
data sat elsewhere or whose timeout differed is the same configuration, one with another
strategy or batch size never is.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedshard.core.config import RUN_PREFIX, ConfigError, ExperimentConfig
from fedshard.sweep.grid import SweepError

if TYPE_CHECKING:
    from fedshard.tracking import RunRecord


def config_of(run: RunRecord) -> ExperimentConfig | None:
    """The configuration of an experiment run (tracking.RunRecord-like); None for a sweep's parent
    run or any other run that is no experiment, and for params no configuration can have: such a
    run is never skipped, resumed, extended, analysed or counted as running elsewhere."""
    if not run.is_experiment:
        return None
    try:
        return run.config()
    except ConfigError:
        return None


def finished_configs(runs: Iterable[RunRecord]) -> dict[tuple, tuple[ExperimentConfig, str]]:
    """Configuration identity -> (configuration, id) of a FINISHED experiment run (sweep parent runs
    excluded)."""
    done: dict[tuple, tuple[ExperimentConfig, str]] = {}
    for run in runs:
        if run.status == "FINISHED" and (cfg := config_of(run)) is not None:
            done[cfg.identity()] = (cfg, run.run_id)
    return done


def resumable(runs: Iterable[RunRecord], stale: Collection[str] = ()) -> dict[tuple, tuple[int, str]]:
    """Configuration identity -> (round, run id) of its most advanced checkpoint among FAILED, KILLED
    and stale (`stale`: ids of RUNNING runs whose owner is gone) runs."""
    best: dict[tuple, tuple[int, str]] = {}
    for run in runs:
        if (run.status in ("FAILED", "KILLED") or run.run_id in stale) and (cfg := config_of(run)) is not None:
            identity = cfg.identity()
            if run.checkpoint_round > best.get(identity, (0, ""))[0]:
                best[identity] = (run.checkpoint_round, run.run_id)
    return best


def twin_key(cfg: ExperimentConfig) -> tuple:
    """What two configurations share when one extends the other: every setting but the rounds."""
    return tuple((k, v) for k, v in cfg.identity() if k != "rounds")


@dataclass(frozen=True)
class Task:
    """One configuration to run, and where it starts: after round `start`, which is round 0 (from
    scratch), a checkpoint of run `resume`, the final model of FINISHED run `extends`, or the
    final model of the run this plan makes for `after` (which it then waits for). `source`: the
    configuration of this plan whose FINISHED run it starts from (init_from=run:<name>), which it
    waits for too."""

    cfg: ExperimentConfig
    start: int = 0
    resume: str = ""
    extends: str = ""
    after: ExperimentConfig | None = None
    source: ExperimentConfig | None = None

    @property
    def rounds_to_train(self) -> int:
        return self.cfg.rounds - self.start

    def describe(self) -> str:
        if self.resume:
            return f"resume run {self.resume} from round {self.start}"
        if self.extends:
            return f"extend FINISHED run {self.extends} from round {self.start}"
        if self.after is not None:
            return f"extend the {self.after.rounds}-round run of this sweep from round {self.start}"
        if self.source is not None:
            return f"from round 0, once run {self.source.run_name()} of this sweep has FINISHED"
        return "from round 0"


@dataclass
class Plan:
    tasks: list[Task]
    skipped: list[tuple[ExperimentConfig, str]] = field(default_factory=list)  # (config, FINISHED run id)

    @property
    def rounds_to_train(self) -> int:
        return sum(t.rounds_to_train for t in self.tasks)

    @property
    def rounds_from_scratch(self) -> int:
        return sum(t.cfg.rounds for t in self.tasks)

    def rounds_line(self) -> str:
        """e.g. 'Rounds to train: 1350 (2160 without extending shorter runs)' for the default grid."""
        ways = [
            w
            for w, used in (
                ("extending shorter runs", any(t.extends or t.after for t in self.tasks)),
                ("resuming", any(t.resume for t in self.tasks)),
            )
            if used
        ]
        return (
            f"Rounds to train: {self.rounds_to_train} ({self.rounds_from_scratch} without "
            f"{' or '.join(ways) or 'extending shorter runs or resuming'})"
        )


def _rank(task: Task) -> tuple[int, int]:
    """The most rounds already in place wins; on a tie, what needs no new run (resuming its own), then
    no waiting (extending a FINISHED run), then extending a run this plan makes, then round 0."""
    way = 3 if task.resume else 2 if task.extends else 1 if task.after is not None else 0
    return task.start, way


def plan(
    configs: Sequence[ExperimentConfig],
    runs: Sequence[RunRecord],
    resume: bool = True,
    extend: bool = True,
    stale: Collection[str] = (),
) -> Plan:
    """What to run of `configs` given the store's `runs` (tracking.RunRecord-like), in grid order.
    Only a FINISHED run makes a configuration done; `resume` / `extend` False train every
    configuration that is not done from round 0."""
    done = finished_configs(runs)
    todo = [c for c in configs if c.identity() not in done]
    checkpoints = resumable(runs, stale) if resume else {}
    finished_twins: dict[tuple, list[tuple[int, str]]] = {}
    planned_twins: dict[tuple, list[ExperimentConfig]] = {}
    if extend:
        for cfg, run_id in done.values():
            finished_twins.setdefault(twin_key(cfg), []).append((cfg.rounds, run_id))
        for cfg in todo:
            planned_twins.setdefault(twin_key(cfg), []).append(cfg)
    tasks = []
    for cfg in todo:
        options = [Task(cfg)]
        if cfg.identity() in checkpoints:
            round_, run_id = checkpoints[cfg.identity()]
            options.append(Task(cfg, start=round_, resume=run_id))
        shorter = [(r, run_id) for r, run_id in finished_twins.get(twin_key(cfg), []) if r < cfg.rounds]
        if shorter:
            r, run_id = max(shorter)
            options.append(Task(cfg, start=r, extends=run_id))
        planned = [c for c in planned_twins.get(twin_key(cfg), []) if c.rounds < cfg.rounds]
        if planned:
            twin = max(planned, key=lambda c: c.rounds)
            options.append(Task(cfg, start=twin.rounds, after=twin))
        tasks.append(max(options, key=_rank))
    tasks = _chained(tasks, configs, runs)
    return Plan(tasks, [(c, done[c.identity()][1]) for c in configs if c.identity() in done])


def source_name(cfg: ExperimentConfig) -> str | None:
    """The name of the run `cfg` starts from (init_from=run:<name>), or None."""
    return cfg.init_from[len(RUN_PREFIX) :] if cfg.init_from.startswith(RUN_PREFIX) else None


def _chained(tasks: list[Task], configs: Iterable[ExperimentConfig], runs: Iterable[RunRecord]) -> list[Task]:
    """Tasks that train from round 0 from a run the plan makes wait for it (`source`), and sources go
    first; a source that is neither in the grid nor a FINISHED run of the store is refused."""
    by_name = {c.run_name(): c for c in configs}
    finished = {r.tags.get("mlflow.runName") for r in runs if r.status == "FINISHED"}
    planned = {t.cfg for t in tasks}
    chained: list[Task] = []
    sources: set[ExperimentConfig] = set()
    for task in tasks:
        name = source_name(task.cfg)
        if name is not None and name not in by_name and name not in finished:
            raise SweepError(
                f"init_from={task.cfg.init_from}: no FINISHED run named {name!r} in the experiment, and "
                f"no configuration of this grid has that name"
            )
        source = by_name.get(name) if name is not None else None
        if source is not None and source in planned and not (task.start or task.resume):
            task = Task(task.cfg, source=source)
            sources.add(source)
        chained.append(task)
    return sorted(chained, key=lambda t: t.cfg not in sources)  # stable: sources first, grid order kept
