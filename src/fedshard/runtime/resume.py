"""Where a run continues from, checked before anything starts.

Resume: a FAILED, KILLED or stale RUNNING run (its owner gone, or its claim dead: no heartbeat
for longer than its timeout) continues in place from its newest checkpoint. Extension: a new run
of a configuration starts from the final model of a FINISHED run of the same configuration with
fewer rounds, whose rounds it copies in. Either way the result is a `Start` (a checkpoint: round and model) that the
aggregator begins after, and every problem is a ContinueError that names the run
and what would be valid, raised before any run is changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fedshard import tracking
from fedshard.core.checkpoint import Checkpoint
from fedshard.core.config import ConfigError, ExperimentConfig
from fedshard.core.errors import FedshardError, described, first_line

log = logging.getLogger(__name__)


class ContinueError(FedshardError, ValueError):
    """This run cannot be resumed or extended; nothing was changed."""

    exit_code = 2


@dataclass
class Start:
    checkpoint: Checkpoint  # the aggregator starts after checkpoint.round, from checkpoint.weights
    copied_rounds: int = 0  # rounds 1..copied_rounds came from a shorter run (extension)


def _experiment_run(run_id: str, verb: str) -> tuple[tracking.RunRecord, ExperimentConfig]:
    try:
        record = tracking.run_record(run_id)
    except Exception as exc:
        raise ContinueError(
            f"--{verb} {run_id}: no such run in {tracking.tracking_uri()} ({first_line(exc)})"
        ) from None
    if not record.is_experiment:
        raise ContinueError(
            f"--{verb} {run_id}: not a fedshard experiment run (it has no experiment params; "
            f"a sweep's run or another project's)"
        )
    try:
        return record, record.config()
    except ConfigError as exc:
        raise ContinueError(f"--{verb} {run_id}: not a fedshard experiment run: {exc}") from None


def for_resume(run_id: str, handed: int | None = None) -> tuple[ExperimentConfig, Start]:
    """The configuration and start of a run to resume; raises ContinueError when it cannot be. A
    RUNNING run is refused while its claim is live (tracking/claims.py), unless a sweep took it for
    this launcher (`handed`: the hand it holds the run at)."""
    record, cfg = _experiment_run(run_id, "resume")
    if record.status == "FINISHED":
        raise ContinueError(f"--resume {run_id}: the run is FINISHED, every round is in; nothing to resume")
    claims = tracking.claims
    if record.status == "RUNNING" and not claims.dead(record) and handed != claims.hands(record):
        alive = tracking.owner_alive(record)
        where = claims.owner_text(record) if record.tags.get(tracking.HOST_TAG) else "an unknown process"
        raise ContinueError(
            f"--resume {run_id}: the run is RUNNING and its owner ({where}) "
            f"{'is alive' if alive else 'may be alive on that host'}; stop it first "
            f"(a FAILED, KILLED, or RUNNING run whose owner is gone, or silent for over "
            f"its claim timeout, can be resumed)"
        )
    if cfg.precision == "auto":
        raise ContinueError(
            f"--resume {run_id}: the run was recorded on device=auto before fedshard recorded the "
            f"precision it computed in, so its rounds cannot be continued exactly; run the "
            f"configuration again (precision=fp32 reproduces what it computed on a CPU)"
        )
    start = _resume_point(run_id, record, cfg)
    beyond = sorted(s for s in tracking.logged_steps(run_id) if s > start.checkpoint.round)
    if beyond:  # training them again would log those rounds twice
        raise ContinueError(
            f"--resume {run_id}: rounds {beyond[0]}..{beyond[-1]} are logged but its newest usable "
            f"checkpoint is of round {start.checkpoint.round}"
        )
    return cfg, start


def _resume_point(run_id: str, record: tracking.RunRecord, cfg: ExperimentConfig) -> Start:
    extends = record.tags.get(tracking.EXTENDS_TAG)
    copied = _run_rounds(extends) if extends else 0
    ckpt = tracking.load_checkpoint(run_id, cfg.model)
    if ckpt is not None:
        return Start(ckpt, copied)
    if extends:  # an extended run that stopped before its first own checkpoint: its source's model
        return for_extension(cfg, extends)
    raise ContinueError(
        f"--resume {run_id}: the run has no checkpoint (it stopped before its first round was "
        f"stored); run the configuration again instead"
    )


def _run_rounds(run_id: str) -> int:
    try:
        return int(tracking.run_record(run_id).params.get("rounds", 0))
    except Exception as exc:  # a source run gone or unreadable: no rounds copied from it
        log.debug(f"the rounds of run {run_id} are taken as 0: {described(exc)}")
        return 0


def for_extension(cfg: ExperimentConfig, source_id: str) -> Start:
    """The start of a run of `cfg` that continues FINISHED run `source_id`, the same
    configuration with fewer rounds, from its final model."""
    record, source = _experiment_run(source_id, "extend")
    if record.status != "FINISHED":
        raise ContinueError(
            f"--extend {source_id}: the run is {record.status}; only a FINISHED run can be extended "
            f"(resume it with --resume)"
        )
    if source.rounds >= cfg.rounds:
        raise ContinueError(
            f"--extend {source_id}: it has rounds={source.rounds}; an extension needs more rounds "
            f"(got rounds={cfg.rounds})"
        )
    theirs, ours = source.settings(), cfg.settings()  # the settings that make a configuration, no more
    differ = [f"{k}={theirs[k]} (here {ours[k]})" for k in ours if k != "rounds" and theirs[k] != ours[k]]
    if differ:
        raise ContinueError(f"--extend {source_id}: a different configuration: {', '.join(differ)}")
    try:
        weights = tracking.load_final_weights(source_id)
    except Exception as exc:
        raise ContinueError(f"--extend {source_id}: cannot load its final model: {exc}") from exc
    # The bytes its rounds moved, so that the extension's cumulative count goes on from there.
    moved = tracking.latest(source_id, "comm/bytes_total")
    metrics = {"comm/bytes_total": moved[1]} if moved and moved[0] == source.rounds else {}
    return Start(Checkpoint(source.rounds, weights, metrics), copied_rounds=source.rounds)
