"""Running a sweep: the plan (planning.py) N experiments at a time, to the end, whatever fails.

A sweep is one MLflow parent run; each experiment is a child run that the sweep
creates (params logged, tag mlflow.parentRunId) and hands to its own
`fedshard run` process through MLFLOW_RUN_ID. That process is the launcher of
the experiment: it owns the metaserver, aggregator and trainers, tears them
down on SIGTERM and marks the run KILLED. The sweep only ever stops the
launcher, and steps in itself (kill, mark KILLED) when one does not exit.
Where launchers run - child processes here, or Ray tasks on a cluster - is the
executor's business (executors.py).

What to run, and where each experiment starts (round 0, a failed run's checkpoint,
a shorter twin's final model), is the plan's business; here a task that extends a
twin of this sweep waits until that twin is FINISHED, and a failed experiment is
retried by resuming it from its checkpoint when it has one, so no finished round
is trained twice.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from collections import deque
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path

from . import executors
from .config import ConfigError, ExperimentConfig
from .grid import Grid, SweepError, describe, expand, label, named
from .planning import Plan, Task, plan

POLL_SECONDS = 0.2
# How often the sweep looks at its running experiments' latest round (console, parent run counters).
PROGRESS_SECONDS = 5.0
# How long a launcher gets to tear its experiment down after SIGTERM before the
# sweep kills what is left itself.
STOP_GRACE_SECONDS = 30.0
# The launcher's output, stored with its run; one per attempt, as a resumed run has several.
LAUNCHER_LOG = "fedshard-run-attempt{}.log"


def child_command(cfg: ExperimentConfig) -> list[str]:
    """`fedshard run` with every parameter spelled out, so the process runs exactly this config."""
    args = [sys.executable, "-m", "fedshard", "run"]
    for name, value in cfg.params().items():
        args += [f"--{name.replace('_', '-')}", value]
    return args


def task_command(task: Task) -> list[str]:
    """The `fedshard run` that carries out a task: resuming its run, or a run of its configuration,
    extending a FINISHED run when the task says so."""
    if task.resume:
        return [sys.executable, "-m", "fedshard", "run", "--resume", task.resume]
    return child_command(task.cfg) + (["--extend", task.extends] if task.extends else [])


# --------------------------------------------------------------------------- resources


def visible_gpus() -> list[str]:
    """The GPUs experiments may be spread over: $CUDA_VISIBLE_DEVICES when set, else all torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch build with CUDA, no driver: CPU only
        return []


def pick_gpu(gpus: list[str], busy: list[str | None]) -> str | None:
    """The GPU for the next experiment: the one running the fewest now (ties: the first), so
    parallel experiments go round-robin over the GPUs; None with fewer than two GPUs."""
    if len(gpus) < 2:
        return None
    return min(gpus, key=lambda g: (busy.count(g), gpus.index(g)))


def cpus_per_experiment(parallel: int) -> int:
    """Cores each of `parallel` experiments may use (FEDSHARD_CPUS), so they do not oversubscribe."""
    from .launcher import cpu_budget

    return max(1, cpu_budget() // parallel)


# --------------------------------------------------------------------------- running


@dataclass
class Job:
    task: Task
    index: int  # 1-based position among the configurations to run
    attempt: int = 1
    run_id: str = ""
    handle: executors.LocalProcess | executors.RayTask | None = None
    log: Path | None = None
    gpu: str | None = None
    started: float = 0.0
    last_round: int = 0  # the highest round its run has logged, as last seen

    @property
    def cfg(self) -> ExperimentConfig:
        return self.task.cfg


@dataclass
class Outcome:
    cfg: ExperimentConfig
    run_id: str
    attempts: int
    reason: str = ""


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Sweep:
    """Runs configurations `parallel` at a time, each as its own cancellable `fedshard run`."""

    def __init__(self, work: Plan, experiment_name: str, parallel: int = 1, max_retries: int = 1,
                 grid: Grid | None = None, echo=print, progress: bool = True, executor=None, resume: bool = True):
        self.plan, self.configs, self.experiment_name = work, [t.cfg for t in work.tasks], experiment_name
        self.parallel, self.max_retries, self.resume = parallel, max_retries, resume
        self.skipped, self.grid, self.echo, self.progress = list(work.skipped), grid, echo, progress
        self.finished: list[Outcome] = []
        self.failed: list[Outcome] = []
        self.killed: list[Outcome] = []
        self.running: list[Job] = []
        self.pending: deque[Job] = deque(Job(t, i) for i, t in enumerate(work.tasks, 1))
        self.stop_signal: int | None = None
        self.parent_run_id = self.experiment_id = ""
        self.gpus: list[str] = []
        self.env: dict[str, str] = {}
        self.bar = None  # the tqdm progress bar, on stderr
        self.executor = executor or executors.LocalExecutor()
        self.t0 = time.monotonic()
        self.rounds_done = 0  # rounds this sweep's experiments trained, as seen in their runs
        self.counter_step = 0
        self.looked = 0.0  # when the running experiments' rounds were last looked at
        self.note = ""
        self.extra = grid.extra_axes if grid is not None else []  # further axes, named in console lines

    # -- lifecycle ----------------------------------------------------------------------
    def run(self) -> int:
        """Run everything; return the exit code (0 all finished, 1 some failed, 128+signal)."""
        from . import tracking

        try:  # first: ray.init installs a SIGTERM handler of its own, which ours must replace
            self.executor.open(self.configs, self.parallel, self.say)
        except executors.ExecutorError as exc:
            self.executor.close()
            raise SweepError(str(exc)) from exc
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        self.logs = Path(tempfile.mkdtemp(prefix="fedshard-sweep-"))
        status, error = "FAILED", None
        try:
            self._prepare()
            self.say(f"Sweep run {self.parent_run_id} in experiment {self.experiment_name!r} "
                      f"({tracking.tracking_uri()}); logs in {self.logs}")
            self._loop()
            status = "KILLED" if self.stop_signal else ("FAILED" if self.failed else "FINISHED")
        except BaseException as exc:  # our own bug or a broken store: still leave no process behind
            error = exc
            raise
        finally:
            self._stop_all(f"interrupted by {signal.Signals(self.stop_signal).name}" if self.stop_signal
                           else f"sweep failed: {type(error).__name__}: {error}")
            self.executor.close()
            for s, h in handlers.items():
                signal.signal(s, h)
            if self.bar is not None:
                self.bar.close()
            if self.parent_run_id:
                with suppress(Exception):
                    self._log_counters()
                try:
                    if not self.stop_signal:  # interrupted: end promptly; the next sweep analyses
                        self._log_analysis()
                except Exception as exc:  # the sweep's own results are safe in its experiments' runs
                    self.say(f"Note: could not log the analysis to the sweep's run: {type(exc).__name__}: {exc}")
                reason = (f"interrupted by {signal.Signals(self.stop_signal).name}" if self.stop_signal else
                          f"{type(error).__name__}: {error}" if error else
                          f"{len(self.failed)} experiment(s) failed" if self.failed else None)
                with suppress(Exception):
                    tracking.end_run(self.parent_run_id, status, reason)
        self._summary()
        if not self.failed and not self.killed:
            import shutil

            shutil.rmtree(self.logs, ignore_errors=True)
        if self.stop_signal:
            return 128 + self.stop_signal
        return 1 if self.failed else 0

    def _prepare(self) -> None:
        from . import tracking

        per_cpu = cpus_per_experiment(self.parallel)
        self.env = executors.child_env({"MLFLOW_TRACKING_URI": tracking.tracking_uri(), "FEDSHARD_CPUS": str(per_cpu)})
        self.gpus = visible_gpus() if self.parallel > 1 and self.executor.spreads_gpus else []
        tags = {"fedshard.sweep.experiments": str(len(self.configs)),
                "fedshard.sweep.skipped": str(len(self.skipped))}
        params = {"sweep.parallel": str(self.parallel), "sweep.max_retries": str(self.max_retries),
                  "sweep.executor": type(self.executor).__name__.removesuffix("Executor").lower(),
                  "sweep.experiments": str(len(self.configs) + len(self.skipped)),
                  "sweep.rounds_to_train": str(self.plan.rounds_to_train),
                  "sweep.rounds_from_scratch": str(self.plan.rounds_from_scratch)}
        grid_words = ""
        if self.grid is not None:  # the grid as params: its axes, and what every experiment shares
            params.update({f"grid.{label(s)}": ",".join(v) for s, v in self.grid.axes.items()})
            params.update({f"fixed.{k}": v for k, v in self.grid.fixed.items()})
            grid_words = (" x ".join(f"{label(s)} {','.join(v)}" for s, v in self.grid.axes.items())
                          + "".join(f"; {k}={v}" for k, v in self.grid.fixed.items()))
        self.note = (f"fedshard sweep over {grid_words or 'a grid'}: {len(self.configs)} experiments to run, "
                     f"{len(self.skipped)} already FINISHED. {self.plan.rounds_line()}.")
        tags[tracking.NOTE_TAG] = self.note
        self.parent_run_id, self.experiment_id = tracking.start_sweep_run(
            self.experiment_name, f"sweep-{time.strftime('%Y%m%d-%H%M%S')}", tags, params)
        self._log_counters()
        if self.progress:
            from tqdm import tqdm

            tqdm.monitor_interval = 0  # no monitor thread: children are started with a preexec_fn
            # On a terminal a live bar; redirected to a file (a sweep left to run), a line per
            # completed experiment instead (see _advance), as a bar is unreadable in a log.
            self.bar = tqdm(total=len(self.configs), unit="exp", desc="sweep", file=sys.stderr, disable=None,
                            dynamic_ncols=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                            "[{elapsed}<{remaining}{postfix}]")
            self.bar.set_postfix_str("0 failed")
        self.t0 = time.monotonic()

    def _on_signal(self, signum, _frame) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
        # A second Ctrl-C while stopping changes nothing: the teardown below always completes.

    def say(self, message: str) -> None:
        if self.bar is not None and not self.bar.disable:
            from tqdm import tqdm

            with tqdm.external_write_mode(file=sys.stdout):
                self.echo(message)
        else:
            self.echo(message)

    def _loop(self) -> None:
        while (self.pending or self.running) and not self.stop_signal:
            changed = False
            while len(self.running) < self.parallel and not self.stop_signal and (job := self._next_ready()):
                self._start(job)
                changed = True
            if time.monotonic() - self.looked >= PROGRESS_SECONDS:
                changed |= self._look_at_rounds(self.running)
            for job in [j for j in self.running if j.handle.done()]:
                self.running.remove(job)
                self._finish(job)
                changed = True
            if changed:
                with suppress(Exception):  # counters are never worth failing the sweep for
                    self._log_counters()
            if self.bar is not None and not self.bar.disable:
                self.bar.refresh()  # keeps the elapsed time ticking between completions
            time.sleep(POLL_SECONDS)

    # -- one experiment -------------------------------------------------------------------
    def _next_ready(self) -> Job | None:
        """The first pending job that can start now: one that extends a twin of this sweep waits
        until the twin is FINISHED (then extends its run), or trains from round 0 if it failed."""
        finished = {o.cfg: o.run_id for o in self.finished}
        for job in list(self.pending):
            after = job.task.after
            if after is not None:
                if after in finished:
                    job.task = replace(job.task, extends=finished[after], after=None)
                elif any(o.cfg == after for o in self.failed):
                    self.say(f"Note: {describe(job.cfg, self.extra)} was to extend the {after.rounds}-round run, which failed; "
                             f"it trains from round 0 instead")
                    job.task = Task(job.cfg)
                else:
                    continue  # the twin is still pending or running
            self.pending.remove(job)
            return job
        return None

    def _start(self, job: Job) -> None:
        from . import tracking

        total, task = len(self.configs), job.task
        if job.attempt == 1:
            self.say(f"=== Running experiment {job.index}/{total} ===")
        else:
            self.say(f"=== Retrying experiment {job.index}/{total} (attempt {job.attempt}/{self.max_retries + 1}) ===")
        env = dict(self.env)
        if task.resume:
            self.say(f"Resuming experiment: {describe(job.cfg, self.extra)} from round {task.start} (run {task.resume})")
            job.run_id = task.resume
            env.pop("MLFLOW_RUN_ID", None)  # `fedshard run --resume` reopens the run itself
        else:
            self.say(f"Starting experiment: {describe(job.cfg, self.extra)}"
                     + (f", extending run {task.extends} from round {task.start}" if task.extends else ""))
            job.run_id = tracking.create_child_run(job.cfg, self.experiment_id, self.parent_run_id,
                                                   tags={"fedshard.sweep.attempt": str(job.attempt),
                                                         **tracking.owner_tags()})
            env["MLFLOW_RUN_ID"] = job.run_id
        job.gpu = pick_gpu(self.gpus, [j.gpu for j in self.running])
        if job.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = job.gpu
        job.log = self.logs / f"{job.index:03d}-{job.run_id[:8]}-attempt{job.attempt}.log"
        try:
            job.handle = self.executor.start(job.cfg, task_command(task), env, job.log)
        except Exception as exc:
            tracking.end_run(job.run_id, "FAILED", f"sweep could not start the experiment: {exc}")
            raise
        job.started, job.last_round = time.monotonic(), task.start
        self.running.append(job)
        self.say(f"  MLflow run {job.run_id}" + (f" on GPU {job.gpu}" if job.gpu is not None else "")
                 + f", {job.handle.where}, log {job.log}")

    def _finish(self, job: Job) -> None:
        from . import tracking

        record = tracking.run_record(job.run_id)
        self._upload_log(job)
        self._look_at_rounds([job])
        outcome = Outcome(job.cfg, job.run_id, job.attempt)
        if record.status == "FINISHED":
            self.say(f"Experiment completed successfully: {named(job.cfg, self.extra)} "
                     f"({time.monotonic() - job.started:.0f}s)")
            self.finished.append(outcome)
            self._advance()
            return
        reason = record.tags.get(tracking.FAILURE_TAG) or self._log_tail(job)
        reason = f"{job.handle.outcome()}: {reason}" if reason else job.handle.outcome()
        if record.status == "RUNNING":  # the launcher died (or its node was lost) before it could end its run
            tracking.end_run(job.run_id, "FAILED", reason)
        outcome.reason = _one_line(reason)
        if job.attempt <= self.max_retries:
            # The retry continues from the failed run's checkpoint if it stored one: no round twice.
            retry = job.task
            if self.resume and record.checkpoint_round:
                retry = Task(job.cfg, start=record.checkpoint_round, resume=job.run_id)
            self.say(f"Experiment failed: {named(job.cfg, self.extra)}: {outcome.reason} (run {job.run_id}); "
                     f"will retry, {retry.describe()} ({job.attempt}/{self.max_retries + 1} attempts used)")
            self.pending.append(Job(retry, job.index, job.attempt + 1))
            return
        self.say(f"Experiment failed: {named(job.cfg, self.extra)}: {outcome.reason} (run {job.run_id})")
        self.failed.append(outcome)
        self._advance()

    def _look_at_rounds(self, jobs) -> bool:
        """Say each experiment's newest round and accuracy, and count the rounds trained; True when
        there was news."""
        from . import tracking

        self.looked = time.monotonic()
        total, changed = len(self.configs), False
        for job in jobs:
            with suppress(Exception):  # a progress report is never worth failing the sweep for
                seen = tracking.latest(job.run_id)
                if seen and seen[0] > job.last_round:
                    self.rounds_done += seen[0] - job.last_round
                    job.last_round, changed = seen[0], True
                    self.say(f"  [{job.index}/{total}] round {seen[0]}/{job.cfg.rounds}: "
                             f"test_accuracy={seen[1]:.4f} (run {job.run_id[:8]})")
        return changed

    def _log_counters(self) -> None:
        """The sweep's run shows where it stands, as metrics that grow while it runs."""
        from . import tracking

        self.counter_step += 1
        tracking.log_round(self.parent_run_id, self.counter_step, {
            "sweep/finished": len(self.finished), "sweep/failed": len(self.failed),
            "sweep/killed": len(self.killed), "sweep/running": len(self.running),
            "sweep/skipped": len(self.skipped), "sweep/rounds_done": self.rounds_done})

    def _log_analysis(self) -> None:
        """`fedshard analyze` of the sweep's FINISHED experiments (these and those skipped), into its
        run: the summary table, the ranking, the comparison report (report.md, comparisons.csv,
        targets.csv) and the plots; the best configuration in its description."""
        from . import analysis, export, report, tracking

        mine = {c.identity() for c in self.configs} | {c.identity() for c, _ in self.skipped}
        runs = [r for r in tracking.list_runs(self.experiment_name, status="FINISHED")
                if r.is_experiment and _parses(r) and r.config().identity() in mine]
        exported = export.collect(runs, tracking.metric_history, warn=None)
        if not exported:
            return
        results = export.frame(exported)
        tracking.log_table(self.parent_run_id, analysis.summarize(results), "analysis/summary.json")
        ranking = analysis.ranking_lines(results, top=5)
        tracking.log_text(self.parent_run_id, "\n".join(ranking) + "\n", "analysis/ranking.txt")
        with tempfile.TemporaryDirectory(prefix="fedshard-report-") as tmp:
            report.write_report(results, tmp)
            tracking.log_artifacts(self.parent_run_id, tmp, "analysis")
        best = ranking[1].split(". ", 1)[1]
        tracking.set_tags(self.parent_run_id, {tracking.NOTE_TAG: f"{self.note} Best configuration: {best}."})

    def _advance(self) -> None:
        done, total = len(self.finished) + len(self.failed), len(self.configs)
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix_str(f"{len(self.failed)} failed")
            self.bar.update(1)
        elif self.progress:
            elapsed = time.monotonic() - self.t0
            eta = elapsed / done * (total - done)
            self.say(f"Progress: {done}/{total} done ({len(self.failed)} failed), elapsed {_clock(elapsed)}, "
                     f"ETA {_clock(eta)}")

    @staticmethod
    def _log_tail(job: Job, n: int = 3) -> str:
        with suppress(OSError):
            lines = [ln for ln in job.log.read_text(errors="replace").splitlines() if ln.strip()]
            return " | ".join(lines[-n:])
        return ""

    @staticmethod
    def _upload_log(job: Job) -> None:
        from . import tracking

        with suppress(Exception), tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / LAUNCHER_LOG.format(job.attempt)
            copy.write_bytes(job.log.read_bytes())
            tracking.log_artifact(job.run_id, copy, "logs")

    # -- stopping -------------------------------------------------------------------------
    def _stop_all(self, why: str) -> None:
        """Stop every launcher (SIGTERM, or a Ray cancel that sends it; each tears its experiment down
        and marks its run KILLED), kill whatever is left after the grace period, and make sure no
        run stays RUNNING."""
        from . import tracking

        jobs, self.running = self.running, []
        if not jobs:
            return
        self.say(f"Sweep {why}: stopping {len(jobs)} running experiment(s)...")
        for job in jobs:
            job.handle.stop()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for job in jobs:
            job.handle.wait(max(0.0, deadline - time.monotonic()))
            if not job.handle.done():
                job.handle.kill()
            reason = f"sweep {why}"
            with suppress(Exception):
                if tracking.run_status(job.run_id) == "RUNNING":
                    tracking.end_run(job.run_id, "KILLED", reason)
            self._upload_log(job)
            self.killed.append(Outcome(job.cfg, job.run_id, job.attempt, reason))
            self.say(f"Experiment stopped: {named(job.cfg, self.extra)} (run {job.run_id} KILLED)")

    # -- report ---------------------------------------------------------------------------
    def _summary(self) -> None:
        say = self.say
        say("")
        say("=== Sweep summary ===")
        say(f"Finished: {len(self.finished)}")
        say(f"Failed: {len(self.failed)}")
        for o in self.failed:
            say(f"  {named(o.cfg, self.extra)}: {o.reason} (run {o.run_id}, {o.attempts} attempt(s))")
        say(f"Skipped (already finished): {len(self.skipped)}")
        if self.killed:
            say(f"Interrupted: {len(self.killed)} (marked KILLED)")
            for o in self.killed:
                say(f"  {named(o.cfg, self.extra)} (run {o.run_id})")
        not_started = len({j.index for j in self.pending})
        if self.stop_signal and not_started:
            say(f"Not started: {not_started}")
        if self.stop_signal:
            say("Run the same sweep again to continue with what is left.")
        say(self.plan.rounds_line())
        if self.failed or self.killed:
            say(f"Logs of this sweep's experiments: {self.logs}")


# --------------------------------------------------------------------------- the command


def main(grid: Grid, experiment_name: str | None, parallel: int, max_retries: int, dry_run: bool,
         echo=print, progress: bool = True, executor=None, resume: bool = True, extend: bool = True) -> int:
    """What `python sweep.py` does, after the options were parsed; returns the exit code."""
    from . import tracking

    configs = expand(grid)
    tracking.ensure_store()
    parent = os.environ.get("MLFLOW_RUN_ID")
    if parent:  # under `mlflow run -e sweep`: that run is the parent, its experiment is ours
        mine = tracking.experiment_name_of_run(parent)
        if experiment_name and experiment_name != mine:
            raise SweepError(f"--experiment-name {experiment_name!r} differs from the experiment {mine!r} of "
                             f"MLFLOW_RUN_ID={parent}; choose the experiment with `mlflow run --experiment-name`")
        experiment_name = mine
    experiment_name = tracking.default_experiment_name(experiment_name)
    runs = tracking.list_runs(experiment_name)
    stale = [r for r in runs if r.status == "RUNNING" and tracking.owner_alive(r) is False]
    if stale and not dry_run:
        for r in stale:
            tracking.end_run(r.run_id, "KILLED", f"stale: its owner (pid {r.tags.get(tracking.PID_TAG)} on "
                                                 f"{r.tags.get(tracking.HOST_TAG)}) is gone")
        echo(f"Marked {len(stale)} stale RUNNING run(s) KILLED (their sweep or launcher on this host is gone): "
             + ", ".join(r.run_id for r in stale))
    stale_ids = {r.run_id for r in stale}
    work = plan(configs, runs, resume=resume, extend=extend, stale=stale_ids)
    echo(f"Total experiments to run: {len(work.tasks)} ({len(work.skipped)} already finished)")
    echo(work.rounds_line())
    todo = {t.cfg for t in work.tasks}
    running_elsewhere = {r.config().identity() for r in runs if r.status == "RUNNING" and r.is_experiment
                         and r.run_id not in stale_ids and _parses(r)} & {c.identity() for c in todo}
    if running_elsewhere:
        echo(f"Note: {len(running_elsewhere)} of them have a RUNNING run (another sweep, or one that was "
             f"killed hard); they run again here.")
    if dry_run:
        echo(f"Dry run: experiment {experiment_name!r} in {tracking.tracking_uri()}; nothing is started.")
        echo(_axes_line(grid, len(configs)))
        if grid.fixed:
            echo("Fixed parameters: " + ", ".join(f"{k}={v}" for k, v in grid.fixed.items()))
        for i, task in enumerate(work.tasks, 1):
            echo(f"Would run {i}/{len(work.tasks)}: {describe(task.cfg, grid.extra_axes)}"
                 + (f" ({task.describe()}: {task.rounds_to_train} rounds to train)" if task.start else ""))
        for cfg, run_id in work.skipped:
            echo(f"Skip (FINISHED run {run_id}): {describe(cfg, grid.extra_axes)}")
        return 0
    if not work.tasks:
        echo(f"Nothing to run: every configuration already has a FINISHED run in {experiment_name!r}.")
        return 0
    _ensure_data(todo)
    return Sweep(work, experiment_name, parallel, max_retries, grid, echo, progress, executor, resume).run()


def _axes_line(grid: Grid, configurations: int) -> str:
    """'Axes: world_sizes=1,2 (2) x ... = 24 combinations, 18 configurations (...)'."""
    combinations = 1
    for values in grid.axes.values():
        combinations *= len(values)
    line = "Axes: " + " x ".join(f"{label(s)}={','.join(v)} ({len(v)})" for s, v in grid.axes.items())
    collapsed = (" (combinations where a setting does not apply, such as swapping for world size 1 or "
                 "FedAvg, are one configuration)") if configurations < combinations else ""
    return f"{line} = {combinations} combinations, {configurations} configurations{collapsed}"


def _parses(run) -> bool:
    try:
        run.config()
        return True
    except ConfigError:
        return False


def _ensure_data(configs) -> None:
    """Download (or unpack) the data set once, before experiments run side by side and would
    each try to download it into the same directory."""
    from . import data

    for data_dir in dict.fromkeys(c.data_dir for c in configs):
        try:
            data.ensure_cifar100(data_dir)
        except data.DataError as exc:
            raise SweepError(str(exc)) from exc
