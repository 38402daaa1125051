"""The sweep's loop: which experiment starts when, what happens when one ends, stopping them all.

A sweep is one MLflow parent run; each experiment is a child run that the sweep creates (params
logged, tag mlflow.parentRunId) and hands to its own `fedshard run` process through
MLFLOW_RUN_ID. That process is the launcher of the experiment: it owns the metaserver,
aggregator and trainers, tears them down on SIGTERM and marks the run KILLED. The sweep only ever
stops the launcher, and steps in itself (kill, mark KILLED) when one does not exit. Where
launchers run - child processes here, or Ray tasks on a cluster - is the executor's business
(executors.py).

Where each experiment starts is the plan's business (planning.py); here a task that extends a
twin of this sweep, or starts from the final model of another of its runs (init_from=run:), waits
until that run is FINISHED, and a failed experiment is retried by resuming it from its checkpoint
when it has one, so no finished round is trained twice. Whatever starts from a run that failed is
not started: the next sweep continues the chain. Just before an experiment starts, its
configuration is claimed in the tracking store (claiming.py): one that another sweep or machine
holds runs elsewhere and is not started here (with `wait`, the sweep waits for it, and continues
it should its owner stop without finishing it).
"""

from __future__ import annotations

import logging
import random
import shutil
import signal
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType

from fedshard.core.config import ExperimentConfig
from fedshard.core.errors import described, one_line
from fedshard.core.files import tail
from fedshard.runtime.processes import describe_exit, interrupted
from fedshard.sweep import claiming, executors
from fedshard.sweep.grid import Grid, SweepError
from fedshard.sweep.planning import Plan, Task
from fedshard.sweep.reporting import Report
from fedshard.sweep.resources import cpus_per_experiment, pick_gpu, task_command, visible_gpus
from fedshard.tracking.claims import HAND_ENV

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2
# How long a launcher gets to tear its experiment down after SIGTERM before the
# sweep kills what is left itself.
STOP_GRACE_SECONDS = 30.0
# The launcher's output, stored with its run; one per attempt, as a resumed run has several.
LAUNCHER_LOG = "fedshard-run-attempt{}.log"
# How often the sweep renews the claims it still owns and looks at those held elsewhere, at most.
CLAIMS_SECONDS = 2.0
# What a launcher that refused its input says (`fedshard run` exits 2): another attempt would be refused too.
REFUSED = describe_exit(2)


@dataclass
class Job:
    task: Task
    index: int  # 1-based position among the configurations to run
    attempt: int = 1
    run_id: str = ""
    handle: executors.Handle | None = None
    log: Path | None = None
    gpu: str | None = None
    started: float = 0.0
    last_round: int = 0  # the highest round its run has logged, as last seen
    progress_file: Path | None = None  # where its aggregator relays the progress inside a round (progress.py)
    hand: int = 0  # the hand its run is held at (tracking/claims.py)
    beating: bool = True  # the sweep renews its claim's heartbeat until the launcher owns the run
    not_before: float = 0.0  # a contested claim is tried again from then on (time.monotonic)

    @property
    def cfg(self) -> ExperimentConfig:
        return self.task.cfg

    @property
    def launcher(self) -> executors.Handle:
        """The handle of its launcher, which every started job (in Sweep.running) has."""
        if self.handle is None:
            raise RuntimeError(f"experiment {self.index} has not started")
        return self.handle


@dataclass
class Outcome:
    cfg: ExperimentConfig
    run_id: str
    attempts: int
    reason: str = ""


class Sweep:
    """Runs configurations `parallel` at a time, each as its own cancellable `fedshard run`."""

    def __init__(
        self,
        work: Plan,
        experiment_name: str,
        parallel: int = 1,
        max_retries: int = 1,
        grid: Grid | None = None,
        echo: Callable[[str], None] = print,
        show_progress: bool = True,
        executor: executors.Executor | None = None,
        resume: bool = True,
        wait: bool = False,
    ):
        self.plan, self.configs, self.experiment_name = work, [t.cfg for t in work.tasks], experiment_name
        self.parallel, self.max_retries, self.resume, self.wait = parallel, max_retries, resume, wait
        self.skipped, self.grid = list(work.skipped), grid
        self.finished: list[Outcome] = []
        self.failed: list[Outcome] = []
        self.killed: list[Outcome] = []
        self.not_started: list[Outcome] = []  # what was to start from a run of this sweep that failed
        self.running: list[Job] = []
        self.elsewhere: list[claiming.Away] = []  # held by another live owner, not run here
        self.claims_looked = 0.0
        self.pending: deque[Job] = deque(Job(t, i) for i, t in enumerate(work.tasks, 1))
        self.stop_signal: int | None = None
        self.parent_run_id = self.experiment_id = ""
        self.gpus: list[str] = []
        self.env: dict[str, str] = {}
        self.logs: Path | None = None  # the launchers' logs, kept when something failed
        self.executor = executor or executors.LocalExecutor()
        self.report = Report(self, echo, show_progress)

    # -- lifecycle ----------------------------------------------------------------------
    def run(self) -> int:
        """Run everything; return the exit code (0 all finished, 1 some failed, 128+signal)."""
        try:  # first: ray.init installs a SIGTERM handler of its own, which ours must replace
            self.executor.open(self.configs, self.parallel, self.report.say)
        except executors.ExecutorError as exc:
            self.executor.close()
            raise SweepError(str(exc)) from exc
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        self.logs = Path(tempfile.mkdtemp(prefix="fedshard-sweep-"))
        status, error = "FAILED", None
        try:
            self._prepare()
            self._loop()
            if not self.stop_signal:
                self._look_after_claims(last=True)
            status = "KILLED" if self.stop_signal else ("FAILED" if self.failed else "FINISHED")
        except BaseException as exc:  # our own bug or a broken store: still leave no process behind
            error = exc
            raise
        finally:
            self._stop_all(error)
            self.executor.close()
            for s, h in handlers.items():
                signal.signal(s, h)
            self.report.close(status, self._end_reason(error), analyse=not self.stop_signal)
            if not self.failed and not self.killed:  # else the launchers' logs tell what happened
                shutil.rmtree(self.logs, ignore_errors=True)
        self.report.summary()
        if self.stop_signal:
            return 128 + self.stop_signal
        return 1 if self.failed else 0

    def _prepare(self) -> None:
        """The launchers' environment (the store, their share of the cores) and GPUs, and the
        sweep's parent run."""
        from fedshard import tracking

        per_cpu = cpus_per_experiment(self.parallel)
        self.env = executors.child_env({"MLFLOW_TRACKING_URI": tracking.tracking_uri(), "FEDSHARD_CPUS": str(per_cpu)})
        self.gpus = visible_gpus() if self.parallel > 1 and self.executor.spreads_gpus else []
        self.parent_run_id, self.experiment_id = self.report.start_parent_run()
        self.report.begin()

    def _end_reason(self, error: BaseException | None) -> str | None:
        """Why the parent run did not finish: the sweep's own error (even when a signal came too: the
        error is the news), the signal, or the failures."""
        if error:
            return described(error)
        if self.stop_signal:
            return interrupted(self.stop_signal)
        return f"{len(self.failed)} experiment(s) failed" if self.failed else None

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
        # A second Ctrl-C while stopping changes nothing: the teardown always completes.

    def _loop(self) -> None:
        while (self.pending or self.running or (self.wait and self.elsewhere)) and not self.stop_signal:
            changed = False
            while len(self.running) < self.parallel and not self.stop_signal and (job := self._next_ready()):
                self._start(job)
                changed = True
            changed |= self._look_after_claims()
            if self.report.due():
                changed |= self.report.look_at_rounds(self.running)
            for job in [j for j in self.running if j.launcher.done()]:
                self.running.remove(job)
                self._finish(job)
                changed = True
            if changed:
                try:
                    self.report.log_counters()
                except Exception as exc:  # counters are never worth failing the sweep for
                    log.debug(f"the sweep's counters were not logged: {described(exc)}")
            self.report.tick()
            time.sleep(POLL_SECONDS)

    # -- one experiment -------------------------------------------------------------------
    def _next_ready(self) -> Job | None:
        """The first pending job that can start now: one that extends a twin of this sweep waits
        until the twin is FINISHED (then extends its run), or trains from round 0 if it failed; one
        that starts from a run of this sweep (init_from=run:) waits until it is FINISHED, and is not
        started if it failed."""
        finished = {o.cfg: o.run_id for o in self.finished}
        for job in list(self.pending):
            if job.not_before > time.monotonic():
                continue
            source = job.task.source
            if source is not None and source not in finished and source not in dict(self.skipped):
                why = self._source_lost(source)
                if why:
                    self.pending.remove(job)
                    outcome = Outcome(job.cfg, "", 0, f"the run it starts from, {source.run_name()}, {why}")
                    self.not_started.append(outcome)
                    self.report.not_started(outcome)
                continue  # the source is still pending or running (here, or elsewhere while waiting)
            after = job.task.after
            if after is not None:
                if after in finished:
                    job.task = replace(job.task, extends=finished[after], after=None)
                elif any(o.cfg == after for o in self.failed) or (
                    not self.wait and any(a.job.cfg == after for a in self.elsewhere)
                ):
                    self.report.twin_failed(job, after)
                    job.task = Task(job.cfg)
                else:
                    continue  # the twin is still pending or running (here, or elsewhere while waiting)
            self.pending.remove(job)
            return job
        return None

    def _source_lost(self, source: ExperimentConfig) -> str:
        """Why the run a job starts from will not be FINISHED in this sweep ('' while it may be yet): it
        failed here, or runs elsewhere and this sweep does not wait."""
        lost = next((o for o in self.failed + self.not_started if o.cfg == source), None)
        if lost is not None:
            return "did not finish" + (f" (run {lost.run_id})" if lost.run_id else "")
        away = next((a for a in self.elsewhere if a.job.cfg == source), None)
        if away is not None and not self.wait:
            return f"runs elsewhere (run {away.run.run_id})"
        return ""

    def _start(self, job: Job) -> None:
        """Its claim (its run: a new child run, or the failed one it resumes), its GPU and log, its
        launcher; or, when the claim does not win, nothing."""
        from fedshard import tracking

        assert self.logs is not None, "run() makes the logs' directory before the loop starts"
        if not self._claim(job):
            return
        task = job.task
        self.report.starting(job)
        env = {**self.env, HAND_ENV: str(job.hand)}
        if task.resume:
            env.pop("MLFLOW_RUN_ID", None)  # `fedshard run --resume` reopens the run itself
        else:
            env["MLFLOW_RUN_ID"] = job.run_id
        job.gpu = pick_gpu(self.gpus, [j.gpu for j in self.running])
        if job.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = job.gpu
        job.log = self.logs / f"{job.index:03d}-{job.run_id[:8]}-attempt{job.attempt}.log"
        job.progress_file = self.logs / f"{job.index:03d}-{job.run_id[:8]}-attempt{job.attempt}.progress.json"
        env["FEDSHARD_PROGRESS_FILE"] = str(job.progress_file)
        try:
            job.handle = self.executor.start(job.cfg, task_command(task), env, job.log)
        except Exception as exc:
            tracking.claims.end(job.run_id, job.hand, "FAILED", f"sweep could not start the experiment: {exc}")
            raise
        job.started, job.last_round = time.monotonic(), task.start
        self.running.append(job)
        self.report.started(job)

    def _claim(self, job: Job) -> bool:
        """Claim the job's configuration (claiming.py): True when it is this sweep's to run; else it was
        held or FINISHED elsewhere (said and counted), or contested (tried again shortly)."""
        got = claiming.claim(job.task, self.experiment_id, self.parent_run_id, job.attempt, self.resume)
        if isinstance(got, claiming.Claimed):
            job.run_id, job.hand, job.task = got.run_id, got.hand, got.task
            return True
        if isinstance(got, claiming.Busy):
            job.not_before = time.monotonic() + random.uniform(0.5, 2.0)
            self.pending.append(job)
        elif isinstance(got, claiming.Done):
            self.skipped.append((job.cfg, got.run.run_id))
            self.report.finished_elsewhere(job, got.run)
        else:
            self.elsewhere.append(claiming.Away(job, got.run))
            self.report.elsewhere(job, got.run)
        return False

    def _look_after_claims(self, last: bool = False) -> bool:
        """Every few seconds: renew the claims whose launchers have not taken them over yet, and (with
        `wait`) look at the configurations held elsewhere: one FINISHED there counts as finished here,
        one whose holder stopped without finishing it (or went silent) is claimed to run here. The
        `last` look, when the sweep's own work is done, counts those FINISHED meanwhile. True when
        there was news."""
        from fedshard import tracking

        if not last and time.monotonic() - self.claims_looked < min(
            CLAIMS_SECONDS, tracking.claims.beat_seconds(tracking.claims.timeout())
        ):
            return False
        self.claims_looked = time.monotonic()
        try:
            claiming.keep_alive(self.running)
        except Exception as exc:  # a store hiccup: the next look tries again
            log.debug(f"the claims were not renewed this time: {described(exc)}")
        if not (self.wait or last):
            return False
        news = []
        try:
            news = claiming.look_elsewhere(self.elsewhere, take=self.wait)
        except Exception as exc:  # likewise
            log.debug(f"the configurations held elsewhere were not looked at this time: {described(exc)}")
        for away, run, task in news:
            self.elsewhere.remove(away)
            if task is None:
                self.finished.append(Outcome(away.job.cfg, run.run_id, 0))
                self.report.completed_elsewhere(away.job, run)
            else:
                self.report.free_again(away.job, run)
                self.pending.append(Job(task, away.job.index, away.job.attempt))
        return bool(news)

    def _finish(self, job: Job, retry: bool = True) -> None:
        """A job whose launcher ended: FINISHED, or failed, with the reason its run recorded (else
        its log's last lines), and retried while attempts are left (`retry`), unless its launcher
        refused the input (exit 2): that refusal would only come again."""
        from fedshard import tracking

        record = tracking.run_record(job.run_id)
        reason = record.tags.get(tracking.FAILURE_TAG) or (tail(job.log, 3) if job.log is not None else "")
        reason = f"{job.launcher.outcome()}: {reason}" if reason else job.launcher.outcome()
        if record.status == "RUNNING" and tracking.claims.end(job.run_id, job.hand, "FAILED", reason):
            record = replace(record, status="FAILED")  # the launcher died (or its node was lost) before it ended it
        if (who := tracking.claims.lost(job.run_id, job.hand)) is not None:  # taken over while its launcher was silent
            self.elsewhere.append(claiming.Away(job, record))
            self.report.taken_over(job, who, record)
            return
        self._upload_log(job)
        self.report.look_at_rounds([job])
        outcome = Outcome(job.cfg, job.run_id, job.attempt, one_line(reason))
        if record.status == "FINISHED":
            self.finished.append(replace(outcome, reason=""))
            self.report.completed(job)
            return
        if retry and job.attempt <= self.max_retries and job.launcher.outcome() != REFUSED:
            # The retry continues from the failed run's checkpoint if it stored one: no round twice.
            again = job.task
            if self.resume and record.checkpoint_round:
                again = Task(job.cfg, start=record.checkpoint_round, resume=job.run_id)
            self.report.failed(job, outcome, again)
            self.pending.append(Job(again, job.index, job.attempt + 1))
            return
        self.failed.append(outcome)
        self.report.failed(job, outcome)

    @staticmethod
    def _upload_log(job: Job) -> None:
        from fedshard import tracking

        if job.log is None:  # it never started
            return
        try:
            with tempfile.TemporaryDirectory() as tmp:
                copy = Path(tmp) / LAUNCHER_LOG.format(job.attempt)
                copy.write_bytes(job.log.read_bytes())
                tracking.log_artifact(job.run_id, copy, "logs")
        except Exception as exc:  # the launcher's log stays in the sweep's folder
            log.debug(f"the launcher's log was not stored in run {job.run_id}: {described(exc)}")

    # -- stopping -------------------------------------------------------------------------
    def _stop_all(self, error: BaseException | None) -> None:
        """Stop every launcher (SIGTERM, or a Ray cancel that sends it; each tears its experiment down
        and marks its run KILLED), kill whatever is left after the grace period, and make sure no
        run stays RUNNING. An experiment that ended on its own meanwhile (FINISHED, or FAILED) counts
        as such, not as stopped. Why they stop: the sweep's `error`, else the signal."""
        from fedshard import tracking

        jobs, self.running = self.running, []
        if not jobs:
            return
        if error is not None:
            why = f"failed: {described(error)}"
        else:
            assert self.stop_signal is not None, "running experiments stop early on an error or a signal only"
            why = interrupted(self.stop_signal)
        self.report.stopping(why, jobs)
        for job in jobs:
            job.launcher.stop()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for job in jobs:
            job.launcher.wait(max(0.0, deadline - time.monotonic()))
            if not job.launcher.done():
                job.launcher.kill()
            status = None
            try:
                status = tracking.run_status(job.run_id)
            except Exception as exc:  # a broken store: the run is counted stopped
                log.debug(f"the status of run {job.run_id} is unknown: {described(exc)}")
            if status in ("FINISHED", "FAILED"):
                self._finish(job, retry=False)
                continue
            reason = f"sweep {why}"
            try:
                if status == "RUNNING":
                    tracking.claims.end(job.run_id, job.hand, "KILLED", reason)
            except Exception as exc:  # a broken store: the next sweep marks the run KILLED (stale)
                log.debug(f"run {job.run_id} was not ended KILLED: {described(exc)}")
            self._upload_log(job)
            self.killed.append(Outcome(job.cfg, job.run_id, job.attempt, reason))
            self.report.stopped(job)
