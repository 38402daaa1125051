"""Opening, continuing and failing an experiment's MLflow run.

`fedshard run` parses its options (cli/) and hands the experiment to the launcher; this module
is what happens to the MLflow run around it: where a --resume or --extend continues from, how the
run is opened once the metaserver is starting (a new run, the one `mlflow run` made, or a
reopened one), and that no run is left RUNNING when the experiment cannot start. A refusal is a
`StartRefused` that carries the message and the exit status; saying it and exiting stay with the
command.

MLflow is imported inside the functions only: the launcher starts the metaserver before it opens
the run, so that the two start-ups (seconds of imports each) overlap.
"""

from __future__ import annotations

import logging
import os
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

from fedshard.core.config import ConfigError, ExperimentConfig
from fedshard.core.errors import FedshardError, described

if TYPE_CHECKING:  # resume imports tracking, hence MLflow
    from fedshard.runtime.resume import Start

log = logging.getLogger(__name__)

# The exit status of a launcher whose run changed hands (tracking/claims.py): a sweep took it over while
# this launcher was paused past the claim timeout, or before it could start.
CLAIM_LOST = 3


class StartRefused(FedshardError):
    """The experiment cannot start. The command says the message and exits with `exit_code`: 2 for
    input, or a run named, that cannot be used; 1 for a run made that could not be prepared;
    CLAIM_LOST for a run that changed hands."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def fail_outer_run(message: str) -> None:
    """Under `mlflow run` (MLFLOW_RUN_ID) the run exists before fedshard starts: end it FAILED with
    `message`, so that input fedshard refuses never leaves it RUNNING."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        from fedshard import tracking

        try:
            tracking.end_run(run_id, "FAILED", message)
        except Exception as exc:  # the store itself may be what is broken; the command's message says so
            log.debug(f"run {run_id} of `mlflow run` was not ended FAILED: {described(exc)}")


def refuse(message: str) -> StartRefused:
    """The refusal of bad input, to raise, once the run `mlflow run` created is failed with it."""
    fail_outer_run(message)
    return StartRefused(message)


def keep_with_outer_run(path: str | Path, artifact_path: str | None = None) -> None:
    """Under `mlflow run -e export` or `-e analyze`: keep what the command wrote with that run too."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        from fedshard import tracking

        tracking.log_artifact(run_id, path, artifact_path)


def resumed(run_id: str, hand: int | None = None) -> tuple[ExperimentConfig, Start, int]:
    """The configuration, start and hand of `fedshard run --resume RUN_ID`: the run's own configuration,
    after its newest usable checkpoint (checkpoints passed over are logged as warnings). A sweep hands the
    run over at `hand` (it took the run's claim); by hand, the run's next hand is taken here, before
    anything starts, so that two resumes of one run never both go ahead."""
    if os.environ.get("MLFLOW_RUN_ID"):
        raise refuse("--resume continues a run of its own; it cannot log into the run `mlflow run` made")
    from fedshard import tracking
    from fedshard.runtime import resume

    claims = tracking.claims
    try:
        tracking.ensure_store()
        if hand is not None and (taken := claims.taken(run_id, hand)) is not None:
            raise StartRefused(
                f"--resume {run_id}: the run changed hands before this launcher started: {taken}", CLAIM_LOST
            )
        cfg, start = resume.for_resume(run_id, handed=hand)
        if hand is None:
            hand = claims.hands(tracking.run_record(run_id)) + 1
            if not claims.take(run_id, hand, "resumed with fedshard run --resume"):
                raise StartRefused(
                    f"--resume {run_id}: another process took the run over just now; see its params fedshard.claim.*"
                )
        return cfg, start, hand
    except (tracking.TrackingError, resume.ContinueError, claims.ClaimError) as exc:
        raise StartRefused(str(exc)) from None


def extended(cfg: ExperimentConfig, source_id: str) -> Start:
    """The start of `fedshard run --extend SOURCE_ID`: the final model of that shorter FINISHED
    run of the same configuration, whose rounds the new run copies in."""
    from fedshard import tracking
    from fedshard.runtime import resume

    try:
        tracking.ensure_store()
        return resume.for_extension(cfg, source_id)
    except (tracking.TrackingError, resume.ContinueError) as exc:
        raise refuse(str(exc)) from None


def open_run(
    cfg: ExperimentConfig,
    datasets: list,
    experiment_name: str | None = None,
    resume_id: str | None = None,
    extend_id: str | None = None,
    start: Start | None = None,
    hand: int | None = None,
    no_duplicate: bool = False,
) -> str:
    """Open the experiment's run and return its id: the launcher's `open_run`, called while the
    metaserver starts. A resumed run is reopened, with the metrics of its checkpoint's round that
    it lacks (the checkpoint was stored before they were logged); any other run is started (or
    is the one `mlflow run` made), records its datasets and, extending a run, copies its rounds.
    Either way the run is a held claim of its configuration (tracking/claims.py) at `hand`: the one
    a sweep (or `resumed`) took; None for a run of its own, which first says its twins (a FINISHED
    run of the configuration, or a live claim of it) and with `no_duplicate` refuses to repeat them.

    A store that cannot be used refuses (exit 2) before any run exists; a run that exists but
    cannot be prepared is ended FAILED (exit 1): it must not stay RUNNING."""
    from fedshard import tracking

    claims = tracking.claims
    try:
        tracking.ensure_store()
        held = claims.claim_tags(cfg, claims.HELD)
        if resume_id:
            assert start is not None  # the launcher gives a resumed run its start
            if hand is not None:
                claims.check(resume_id, hand)
            tracking.reopen_run(resume_id, {tracking.RESUMED_TAG: str(start.checkpoint.round), **held})
            run_id = resume_id
        else:
            if hand is None:
                _say_twins(cfg, experiment_name, no_duplicate)
            elif os.environ.get("MLFLOW_RUN_ID"):
                claims.check(os.environ["MLFLOW_RUN_ID"], hand)
            run_id = tracking.start_run(cfg, experiment_name, tags=held)
    except tracking.TrackingError as exc:
        raise refuse(str(exc)) from None  # the launcher stops the metaserver it started
    except claims.ClaimError as exc:
        raise refuse(str(exc)) from None
    except claims.ClaimLost as exc:
        raise StartRefused(f"the run changed hands before this launcher started: {exc}", CLAIM_LOST) from None
    try:  # the run is RUNNING from here on: whatever fails ends it
        if resume_id:
            assert start is not None
            tracking.log_missing(resume_id, start.checkpoint.round, start.checkpoint.metrics)
        else:
            tracking.log_datasets(run_id, datasets)
            if extend_id:
                assert start is not None  # the launcher gives an extending run its start
                tracking.copy_round_metrics(extend_id, run_id, start.copied_rounds)
                tracking.set_tags(run_id, {tracking.EXTENDS_TAG: extend_id})
    except Exception as exc:
        reason = f"could not prepare run {run_id}: {described(exc)}"
        claims.end(run_id, hand or 0, "FAILED", reason)
        raise StartRefused(reason, 1) from None
    return run_id


def _say_twins(cfg: ExperimentConfig, experiment_name: str | None, no_duplicate: bool) -> None:
    """Repeating a configuration can be on purpose, so `fedshard run` goes ahead; but it first names
    the configuration's FINISHED runs and live claims in the experiment (with `no_duplicate`: refuses,
    exit 2, before any run exists)."""
    from fedshard import tracking

    name = tracking.default_experiment_name(experiment_name)
    twins = _twins(cfg, name, own=os.environ.get("MLFLOW_RUN_ID"))
    words = [
        f"already has FINISHED run {r.run_id}"
        if r.status == "FINISHED"
        else f"is running elsewhere: run {r.run_id} ({tracking.claims.owner_text(r)})"
        for r in twins
    ]
    if words and no_duplicate:
        raise refuse(f"--no-duplicate: this configuration {'; it '.join(words)} (experiment {name!r}); nothing started")
    for text in words:
        log.info(
            f"fedshard: note: this configuration {text} (experiment {name!r}); running it again, as asked "
            f"(--no-duplicate refuses instead)"
        )


def _twins(cfg: ExperimentConfig, experiment_name: str, own: str | None) -> list:
    """The configuration's FINISHED runs and live claims in the experiment (`own` left out), FINISHED
    ones first; FINISHED runs recorded before claims existed are found by their params."""
    from fedshard import tracking
    from fedshard.core import precision

    claims = tracking.claims
    exp_id = tracking.experiment_id(experiment_name, create=False)
    if exp_id is None:
        return []
    found = [
        r
        for r in claims.claims_of(exp_id, claims.key(cfg))
        if r.run_id != own and (r.status == "FINISHED" or claims.live(r))
    ]
    identity = precision.resolved(cfg).identity()
    for run in tracking.list_runs(experiment_name, status="FINISHED"):
        with suppress(ConfigError):
            if not claims.is_claim(run) and run.is_experiment and run.config().identity() == identity:
                found.append(run)
    return sorted(found, key=lambda r: r.status != "FINISHED")
