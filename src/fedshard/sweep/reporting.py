"""What a sweep shows while it runs and when it ends: the console, its progress, its MLflow run.

The console lines are the original harness's (`=== Running experiment 1/54 ===`, `Experiment
completed successfully: ...`, the summary): people and scripts read them, so they keep their
words. On a terminal a tqdm bar counts completed experiments; redirected to a file (a sweep left
to run) a Progress line with the ETA follows each completion instead, as a bar is unreadable in
a log. The sweep's parent run describes the sweep (its grid as params, a note), grows counters
while it runs (sweep/finished, sweep/running, ...), and ends with the analysis of the sweep's
FINISHED experiments and the best configuration in its note.

Scheduling (scheduling.py) decides what happens; this module words and records it, and changes
none of the sweep's lists.
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Never

from fedshard.core.errors import described
from fedshard.runtime.progress import clock
from fedshard.sweep.grid import describe, label, named
from fedshard.sweep.planning import config_of

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from tqdm import tqdm

    from fedshard.core.config import ExperimentConfig
    from fedshard.sweep.grid import Grid
    from fedshard.sweep.planning import Task
    from fedshard.sweep.scheduling import Job, Outcome, Sweep
    from fedshard.tracking import RunRecord

# How often the sweep looks at its running experiments' latest round (console, parent run counters).
PROGRESS_SECONDS = 5.0
# How often it says where each running experiment stands inside its round (steps, img/s, ETA).
STEPS_SECONDS = 30.0


def axes_text(grid: Grid) -> str:
    """The grid's axes, each with its values and their count: 'world_sizes=1,2 (2) x seeds=1,2,3 (3)'."""
    return " x ".join(f"{label(s)}={','.join(v)} ({len(v)})" for s, v in grid.axes.items())


class Report:
    """The sweep as its user and its parent run see it."""

    def __init__(self, sweep: Sweep, echo: Callable[[str], None] = print, show_progress: bool = True):
        self.sweep, self.echo, self.show_progress = sweep, echo, show_progress
        self.extra = sweep.grid.extra_axes if sweep.grid is not None else []  # further axes, named in console lines
        self.bar: tqdm[Never] | None = None  # the progress bar (of no iterable), on stderr
        self.t0 = time.monotonic()
        self.rounds_done = 0  # rounds this sweep's experiments trained, as seen in their runs
        self.busy = 0.0  # experiment-seconds: the seconds each running experiment has run, summed
        self.tallied = self.t0  # when `busy` was last brought up to date
        self.counter_step = 0
        self.looked = self.looked_eta = 0.0  # when the running experiments' rounds, and the ETA, were last looked at
        self.stepped = time.monotonic()  # when their steps were last said
        self.note = ""

    def say(self, message: str) -> None:
        """One console line, written above the bar when there is one."""
        if self.bar is not None and not self.bar.disable:
            from tqdm import tqdm

            with tqdm.external_write_mode(file=sys.stdout):
                self.echo(message)
        else:
            self.echo(message)

    # -- the parent run, from start to end ----------------------------------------------------
    def start_parent_run(self) -> tuple[str, str]:
        """Create the sweep's run, described by its size, its grid (the axes, and what every
        experiment shares) as params and a note in words; return its id and its experiment's."""
        from fedshard import tracking

        s = self.sweep
        tags = {"fedshard.sweep.experiments": str(len(s.configs)), "fedshard.sweep.skipped": str(len(s.skipped))}
        params = {
            "sweep.parallel": str(s.parallel),
            "sweep.max_retries": str(s.max_retries),
            "sweep.executor": type(s.executor).__name__.removesuffix("Executor").lower(),
            "sweep.experiments": str(len(s.configs) + len(s.skipped)),
            "sweep.rounds_to_train": str(s.plan.rounds_to_train),
            "sweep.rounds_from_scratch": str(s.plan.rounds_from_scratch),
        }
        grid_words = ""
        if s.grid is not None:  # the grid as params: its axes, and what every experiment shares
            params.update({f"grid.{label(k)}": ",".join(v) for k, v in s.grid.axes.items()})
            params.update({f"fixed.{k}": v for k, v in s.grid.fixed.items()})
            grid_words = axes_text(s.grid) + "".join(f"; {k}={v}" for k, v in s.grid.fixed.items())
        self.note = (
            f"fedshard sweep over {grid_words or 'a grid'}: {len(s.configs)} experiments to run, "
            f"{len(s.skipped)} already FINISHED. {s.plan.rounds_line()}."
        )
        tags[tracking.NOTE_TAG] = self.note
        return tracking.start_sweep_run(s.experiment_name, f"sweep-{time.strftime('%Y%m%d-%H%M%S')}", tags, params)

    def begin(self) -> None:
        """Once the parent run exists: its first counters, the progress bar, the line naming the run."""
        from fedshard import tracking

        self.log_counters()
        if self.show_progress:
            from tqdm import tqdm

            tqdm.monitor_interval = 0  # no monitor thread: children are started with a preexec_fn
            # On a terminal a live bar; redirected to a file, a line per completed experiment
            # instead (see _advance).
            self.bar = tqdm(
                total=len(self.sweep.configs),
                unit="exp",
                desc="sweep",
                file=sys.stderr,
                disable=None,
                dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
            )
            self.bar.set_postfix_str("0 failed")
        self.t0 = self.tallied = time.monotonic()
        s = self.sweep
        self.say(
            f"Sweep run {s.parent_run_id} in experiment {s.experiment_name!r} "
            f"({tracking.tracking_uri()}); logs in {s.logs}"
        )

    def log_counters(self) -> None:
        """The sweep's run shows where it stands, as metrics that grow while it runs."""
        from fedshard import tracking

        s = self.sweep
        self.counter_step += 1
        tracking.log_round(
            s.parent_run_id,
            self.counter_step,
            {
                "sweep/finished": len(s.finished),
                "sweep/failed": len(s.failed),
                "sweep/killed": len(s.killed),
                "sweep/running": len(s.running),
                "sweep/elsewhere": len(s.elsewhere),
                "sweep/skipped": len(s.skipped),
                "sweep/rounds_done": self.rounds_done,
            },
        )

    def close(self, status: str, reason: str | None, analyse: bool) -> None:
        """The bar goes; the parent run gets its last counters, the analysis (not after an
        interruption: the sweep ends promptly, the next one analyses) and its status and why."""
        from fedshard import tracking

        if self.bar is not None:
            self.bar.close()
        if not self.sweep.parent_run_id:
            return
        try:
            self.log_counters()
        except Exception as exc:  # counters are never worth the sweep's end
            log.debug(f"the sweep's counters were not logged: {described(exc)}")
        try:
            if analyse:
                self.log_analysis()
        except Exception as exc:  # the sweep's own results are safe in its experiments' runs
            self.say(f"Note: could not log the analysis to the sweep's run: {described(exc)}")
        try:
            tracking.end_run(self.sweep.parent_run_id, status, reason)
        except Exception as exc:  # a broken store: the next sweep marks the run KILLED (stale)
            log.debug(f"the sweep's run was not ended {status}: {described(exc)}")

    def log_analysis(self) -> None:
        """`fedshard analyze` of the sweep's FINISHED experiments (these and those skipped), into its
        run: the summary table, the ranking, the comparison report (report.md, comparisons.csv,
        targets.csv) and the plots; the best configuration in its description."""
        from fedshard import tracking
        from fedshard.results import analysis, export, report

        s = self.sweep
        mine = {c.identity() for c in s.configs} | {c.identity() for c, _ in s.skipped}
        runs = [
            r
            for r in tracking.list_runs(s.experiment_name, status="FINISHED")
            if (cfg := config_of(r)) is not None and cfg.identity() in mine
        ]
        exported = export.collect(runs, tracking.metric_history, quiet=True)
        if not exported:
            return
        results = export.frame(exported)
        summary = analysis.summarize(results)
        tracking.log_table(s.parent_run_id, summary, "analysis/summary.json")
        ranking = analysis.ranking_lines(results, top=5)
        tracking.log_text(s.parent_run_id, "\n".join(ranking) + "\n", "analysis/ranking.txt")
        with tempfile.TemporaryDirectory(prefix="fedshard-report-") as tmp:
            report.write_report(results, tmp)
            tracking.log_artifacts(s.parent_run_id, tmp, "analysis")
        best = summary.head(1).to_dict("records")[0]  # the summary comes best first
        accuracy = analysis.accuracy_text(best["final_accuracy_mean"], best["final_accuracy_std"], best["n"])
        best_text = f"{analysis.config_text(best, analysis.config_settings(summary))}, Accuracy: {accuracy}"
        tracking.set_tags(s.parent_run_id, {tracking.NOTE_TAG: f"{self.note} Best configuration: {best_text}."})

    # -- one experiment ------------------------------------------------------------------------
    def starting(self, job: Job) -> None:
        """The lines before an experiment (or its retry) starts."""
        total, task = len(self.sweep.configs), job.task
        if job.attempt == 1:
            self.say(f"=== Running experiment {job.index}/{total} ===")
        else:
            self.say(
                f"=== Retrying experiment {job.index}/{total} (attempt {job.attempt}/{self.sweep.max_retries + 1}) ==="
            )
        if task.resume:
            self.say(
                f"Resuming experiment: {describe(job.cfg, self.extra)} from round {task.start} (run {task.resume})"
            )
        else:
            self.say(
                f"Starting experiment: {describe(job.cfg, self.extra)}"
                + (f", extending run {task.extends} from round {task.start}" if task.extends else "")
            )

    def started(self, job: Job) -> None:
        """Where the experiment runs and logs, and its run."""
        self.say(
            f"  MLflow run {job.run_id}"
            + (f" on GPU {job.gpu}" if job.gpu is not None else "")
            + f", {job.launcher.where}, log {job.log}"
        )

    def twin_failed(self, job: Job, after: ExperimentConfig) -> None:
        self.say(
            f"Note: {describe(job.cfg, self.extra)} was to extend the {after.rounds}-round run, which failed; "
            f"it trains from round 0 instead"
        )

    def not_started(self, outcome: Outcome) -> None:
        self.say(
            f"Not started: {named(outcome.cfg, self.extra)}: {outcome.reason}; run the sweep again once it has finished"
        )
        self._advance()

    def completed(self, job: Job) -> None:
        self.say(
            f"Experiment completed successfully: {named(job.cfg, self.extra)} ({time.monotonic() - job.started:.0f}s)"
        )
        self._advance()

    def failed(self, job: Job, outcome: Outcome, retry: Task | None = None) -> None:
        """A failed attempt: the reason and the run, and how it is retried when it is."""
        if retry is not None:
            self.say(
                f"Experiment failed: {named(job.cfg, self.extra)}: {outcome.reason} (run {job.run_id}); "
                f"will retry, {retry.describe()} ({job.attempt}/{self.sweep.max_retries + 1} attempts used)"
            )
            return
        self.say(f"Experiment failed: {named(job.cfg, self.extra)}: {outcome.reason} (run {job.run_id})")
        self._advance()

    # -- configurations another owner holds (claims: tracking/claims.py) ------------------------
    def elsewhere(self, job: Job, run: RunRecord) -> None:
        """A configuration that another live owner holds: where (host, pid) and its run."""
        from fedshard import tracking

        self.say(
            f"Experiment running elsewhere: {named(job.cfg, self.extra)} (run {run.run_id}, "
            f"{tracking.claims.owner_text(run)}); " + ("waiting for it" if self.sweep.wait else "not run here")
        )

    def taken_over(self, job: Job, who: str | None, run: RunRecord) -> None:
        self.say(
            f"Experiment taken over elsewhere: {named(job.cfg, self.extra)}: its launcher here was silent past "
            f"the claim timeout and stopped without ending run {job.run_id}, which changed hands ({who})"
        )

    def finished_elsewhere(self, job: Job, run: RunRecord) -> None:
        self.say(f"Experiment finished elsewhere: {named(job.cfg, self.extra)} (run {run.run_id}); skipped")

    def completed_elsewhere(self, job: Job, run: RunRecord) -> None:
        self.say(f"Experiment completed elsewhere: {named(job.cfg, self.extra)} (run {run.run_id})")
        self._advance()

    def free_again(self, job: Job, run: RunRecord) -> None:
        self.say(
            f"Experiment no longer held elsewhere: {named(job.cfg, self.extra)} (run {run.run_id} "
            f"{'ended ' + run.status if run.status != 'RUNNING' else 'went silent'}); claiming it here"
        )

    def stopping(self, why: str, jobs: list[Job]) -> None:
        self.say(f"Sweep {why}: stopping {len(jobs)} running experiment(s)...")

    def stopped(self, job: Job) -> None:
        self.say(f"Experiment stopped: {named(job.cfg, self.extra)} (run {job.run_id} KILLED)")

    # -- progress ------------------------------------------------------------------------------
    def due(self) -> bool:
        """Whether it is time to look at the running experiments' rounds again."""
        return time.monotonic() - self.looked >= PROGRESS_SECONDS

    def look_at_rounds(self, jobs: Iterable[Job]) -> bool:
        """Say each experiment's newest round and accuracy, and count the rounds trained; True when
        there was news."""
        from fedshard import tracking

        self.looked = time.monotonic()
        total, changed = len(self.sweep.configs), False
        for job in jobs:
            try:
                seen = tracking.latest(job.run_id)
                if seen and seen[0] > job.last_round:
                    self.rounds_done += seen[0] - job.last_round
                    job.last_round, changed = seen[0], True
                    self.say(
                        f"  [{job.index}/{total}] round {seen[0]}/{job.cfg.rounds}: "
                        f"test_accuracy={seen[1]:.4f} (run {job.run_id[:8]})"
                    )
            except Exception as exc:  # a progress report is never worth failing the sweep for
                log.debug(f"the rounds of run {job.run_id} were not looked at: {described(exc)}")
        return changed

    def look_at_steps(self, jobs: Iterable[Job]) -> None:
        """Every STEPS_SECONDS, each running experiment's progress inside its round, from the figures
        its launcher shows (progress.py): a round of many minutes is not silence."""
        from fedshard.runtime import progress

        if not self.show_progress or time.monotonic() - self.stepped < STEPS_SECONDS:
            return
        self.stepped = time.monotonic()
        for job in jobs:
            f = progress.figures(progress.read(job.progress_file)) if job.progress_file else None
            if f is not None and f.news:
                self.say(f"  [{job.index}/{len(self.sweep.configs)}] {f.line()} (run {job.run_id[:8]})")

    def tally(self, now: float) -> None:
        """Count the experiment-seconds since the last tally: as many as experiments ran."""
        self.busy += len(self.sweep.running) * (now - self.tallied)
        self.tallied = now

    def eta(self) -> float | None:
        """Seconds until the sweep ends: each running experiment's own ETA (its launcher's figures),
        and the pending ones' rounds at the pace rounds go at here, over the experiments at once.
        The pace of a round: the median of the running experiments' own, else the experiment-seconds
        spent per round trained so far."""
        from fedshard.runtime import progress

        s = self.sweep
        figures = [progress.figures(progress.read(j.progress_file)) if j.progress_file else None for j in s.running]
        paces = [f.pace for f in figures if f is not None and f.pace is not None]
        per_round = statistics.median(paces) if paces else self.busy / self.rounds_done if self.rounds_done else None
        if per_round is None:
            return None
        left = sum(
            f.eta_run if f is not None and f.eta_run is not None else per_round * (j.cfg.rounds - j.last_round)
            for j, f in zip(s.running, figures)
        )
        left += per_round * sum(j.task.rounds_to_train for j in s.pending)
        return left / max(1, min(s.parallel, len(s.running) + len(s.pending)))

    def tick(self) -> None:
        """Keep the bar's elapsed time and the sweep's ETA current between completions."""
        self.tally(time.monotonic())
        self.look_at_steps(self.sweep.running)
        if self.bar is not None and not self.bar.disable and time.monotonic() - self.looked_eta >= 1:
            self.looked_eta = time.monotonic()
            try:
                self.bar.set_postfix_str(f"{len(self.sweep.failed)} failed, ETA {clock(self.eta())}")
            except Exception as exc:  # an estimate is never worth failing the sweep for
                log.debug(f"no ETA: {described(exc)}")

    def _advance(self) -> None:
        """One more experiment done (finished, or failed for good): the bar, or a Progress line."""
        s = self.sweep
        done, total = len(s.finished) + len(s.failed) + len(s.not_started), len(s.configs)
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix_str(f"{len(s.failed)} failed")
            self.bar.update(1)
        elif self.show_progress:
            elapsed = time.monotonic() - self.t0
            eta = self.eta()
            self.say(
                f"Progress: {done}/{total} done ({len(s.failed)} failed), elapsed {clock(elapsed)}, "
                f"ETA {clock(eta if eta is not None else elapsed / done * (total - done))}"
            )

    # -- the end ---------------------------------------------------------------------------------
    def summary(self) -> None:
        """The harness's summary: what finished, failed (why, which run), was skipped or stopped."""
        s, say = self.sweep, self.say
        say("")
        say("=== Sweep summary ===")
        say(f"Finished: {len(s.finished)}")
        say(f"Failed: {len(s.failed)}")
        for o in s.failed:
            say(f"  {named(o.cfg, self.extra)}: {o.reason} (run {o.run_id}, {o.attempts} attempt(s))")
        say(f"Skipped (already finished): {len(s.skipped)}")
        if s.elsewhere:
            from fedshard import tracking

            say(
                f"Running elsewhere: {len(s.elsewhere)} (not run here; this sweep's results lack them until they "
                f"finish: run it again, or with --wait)"
            )
            for a in s.elsewhere:
                dead = "; its claim is dead: the next sweep takes it over" if tracking.claims.dead(a.run) else ""
                say(f"  {named(a.job.cfg, self.extra)} (run {a.run.run_id}, {tracking.claims.owner_text(a.run)}){dead}")
        if s.killed:
            say(f"Interrupted: {len(s.killed)} (marked KILLED)")
            for o in s.killed:
                say(f"  {named(o.cfg, self.extra)} (run {o.run_id})")
        if s.not_started:
            say(f"Not started (the run they start from is not FINISHED here): {len(s.not_started)}")
            for o in s.not_started:
                say(f"  {named(o.cfg, self.extra)}: {o.reason}")
        not_started = len({j.index for j in s.pending})
        if s.stop_signal and not_started:
            say(f"Not started: {not_started}")
        if s.stop_signal:
            say("Run the same sweep again to continue with what is left.")
        say(s.plan.rounds_line())
        if s.failed or s.killed:
            say(f"Logs of this sweep's experiments: {s.logs}")
