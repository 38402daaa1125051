"""A sweep's side of claims (tracking/claims.py): claiming a configuration just before its launcher
starts, keeping the claims of launchers that have not taken them over yet alive, and watching the
configurations that another live owner holds ("running elsewhere") for a sweep that waits for them.

The claim is made here, in the sweep, before the executor gets the experiment: a launcher, local or
a Ray task on any node, starts only once its claim has won, so a loser never starts a process, and
one tracking store (a server, for a cluster) decides for every machine. Until the launcher takes
the claim over (its own pid in the owner tags) the sweep renews the heartbeat, also while a Ray task
waits for a free node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedshard.sweep.planning import Task

if TYPE_CHECKING:
    from fedshard.sweep.scheduling import Job
    from fedshard.tracking import RunRecord


@dataclass(frozen=True)
class Claimed:
    """The configuration is this sweep's: its launcher carries out `task` in run `run_id`, at `hand`."""

    run_id: str
    hand: int
    task: Task


@dataclass(frozen=True)
class Held:
    """Another live owner holds the configuration: it runs elsewhere (`run` is its claim)."""

    run: RunRecord


@dataclass(frozen=True)
class Done:
    """The configuration got a FINISHED run (`run`) since the sweep planned it."""

    run: RunRecord


@dataclass(frozen=True)
class Busy:
    """Several claimed it at once and this one withdrew (or another took the run first): try again
    shortly, when the contest is decided."""


@dataclass
class Away:
    """A job of this sweep whose configuration runs elsewhere, and the claim that holds it."""

    job: Job
    run: RunRecord


def claim(
    task: Task, experiment_id: str, parent_run_id: str, attempt: int, resume: bool = True
) -> Claimed | Held | Done | Busy:
    """Claim `task`'s configuration: a new child run of the sweep (created pending, then judged), or,
    to resume a run, that run's next hand (then judged like a new one). With `resume`, a run of the
    configuration that stopped (or whose claim died) since the plan was made, with a checkpoint
    beyond the task's start, is resumed instead. Whatever does not win leaves nothing behind: a new
    run is withdrawn, a resumed one goes back to how it ended."""
    from fedshard import tracking

    claims = tracking.claims
    if resume and not task.resume:
        task = _resumable(task, experiment_id)
    if task.resume:
        return _claim_run(task, experiment_id, parent_run_id)
    run_id = tracking.create_child_run(
        task.cfg,
        experiment_id,
        parent_run_id,
        tags={
            "fedshard.sweep.attempt": str(attempt),
            **tracking.owner_tags(),
            **claims.claim_tags(task.cfg, claims.PENDING),
        },
    )
    got = _judged(run_id, 0, experiment_id, task)
    if not isinstance(got, Claimed):
        claims.withdraw(run_id)
    return got


def _resumable(task: Task, experiment_id: str) -> Task:
    """The task, or the resume of the configuration's run with the newest checkpoint beyond its start
    among those that ended without finishing or whose claim is dead (planning.resumable)."""
    from fedshard import tracking
    from fedshard.sweep.planning import resumable

    runs = tracking.claims.claims_of(experiment_id, tracking.claims.key(task.cfg))
    best = resumable(runs, stale={r.run_id for r in runs if tracking.claims.dead(r)}).get(task.cfg.identity())
    return Task(task.cfg, start=best[0], resume=best[1]) if best and best[0] > task.start else task


def _claim_run(task: Task, experiment_id: str, parent_run_id: str) -> Claimed | Held | Done | Busy:
    """Claim the run `task` resumes: held while its own claim is live, else its next hand."""
    from fedshard import tracking

    claims = tracking.claims
    record = tracking.run_record(task.resume)
    if record.status == "FINISHED":
        return Done(record)
    if record.status == "RUNNING" and not claims.dead(record):
        return Held(record)
    hand = claims.reclaim(record, task.cfg, f"resumed by sweep run {parent_run_id}")
    if hand is None:
        return Busy()
    got = _judged(task.resume, hand, experiment_id, task)
    if not isinstance(got, Claimed) and claims.taken(task.resume, hand) is None:  # still ours to give back
        status = record.status if record.status in ("FAILED", "KILLED") else "KILLED"
        claims.release(
            task.resume,
            status,
            record.tags.get(tracking.FAILURE_TAG)
            or "its sweep's claim to resume it lost to another claim of the configuration",
        )
    return got


def _judged(run_id: str, hand: int, experiment_id: str, task: Task) -> Claimed | Held | Done | Busy:
    from fedshard import tracking

    claims = tracking.claims
    verdict = claims.acquire(run_id, hand, experiment_id, claims.key(task.cfg))
    if verdict.kind == claims.WON:
        return Claimed(run_id, hand, task)
    # A FINISHED or ELSEWHERE verdict names the run it is about (`other`).
    if verdict.kind == claims.FINISHED and verdict.other is not None:
        return Done(verdict.other)
    if verdict.kind == claims.ELSEWHERE and verdict.other is not None:
        return Held(verdict.other)
    return Busy()


def keep_alive(jobs: list[Job]) -> None:
    """Renew the heartbeat of every claim this sweep still owns itself: its launcher has not started
    (or its Ray task waits for a node); once the launcher owns the run, it renews it itself."""
    from fedshard import tracking

    me = {tracking.HOST_TAG: tracking.host(), tracking.PID_TAG: str(os.getpid())}
    for job in jobs:
        if job.beating:
            tags = tracking.run_record(job.run_id).tags
            job.beating = all(tags.get(k) == v for k, v in me.items())
            if job.beating:
                tracking.claims.beat(job.run_id)


def look_elsewhere(away: list[Away], take: bool) -> list[tuple[Away, RunRecord, Task | None]]:
    """What became of configurations held elsewhere: (away, its run now, None) for one now FINISHED;
    with `take`, (away, its run, the task that continues it here) for one whose holder ended without
    finishing or went silent (a dead claim is reaped first, fencing its owner off). The others are
    left out, their records brought up to date."""
    from fedshard import tracking

    claims = tracking.claims
    news: list[tuple[Away, RunRecord, Task | None]] = []
    for a in away:
        a.run = run = tracking.run_record(a.run.run_id)
        if run.status == "FINISHED":
            news.append((a, run, None))
        elif take and (run.status != "RUNNING" or claims.dead(run)):
            if run.status == "RUNNING" and not claims.reap(
                run, "KILLED", f"stale: its owner ({claims.owner_text(run)}) is gone or silent past its claim timeout"
            ):
                continue  # someone took it first: look again later
            # Planned again at its claim: the resume of this run from its checkpoint, where it has one.
            news.append((a, run, a.job.task if not a.job.task.resume else Task(a.job.cfg)))
    return news
