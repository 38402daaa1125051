"""Opening, continuing and failing an experiment's MLflow run.

`fedshard run` parses its options (cli.py) and hands the experiment to the launcher; this module
is what happens to the MLflow run around it: where a --resume or --extend continues from, how the
run is opened once the metaserver is starting (a new run, the one `mlflow run` made, or a
reopened one), and that no run is left RUNNING when the experiment cannot start. A refusal is a
`Refused` that carries the message and the exit status; saying it and exiting stay with the
command.

MLflow is imported inside the functions only: the launcher starts the metaserver before it opens
the run, so that the two start-ups (seconds of imports each) overlap.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .config import ExperimentConfig
from .errors import described

if TYPE_CHECKING:  # resume imports tracking, hence MLflow
    from .resume import Start


class Refused(Exception):
    """The experiment cannot start. The command says the message and exits with `code`: 2 for
    input, or a run named, that cannot be used; 1 for a run made that could not be prepared."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def fail_outer_run(message: str) -> None:
    """Under `mlflow run` (MLFLOW_RUN_ID) the run exists before fedshard starts: end it FAILED with
    `message`, so that input fedshard refuses never leaves it RUNNING."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        from . import tracking

        try:
            tracking.end_run(run_id, "FAILED", message)
        except Exception:
            pass  # the store itself may be what is broken; the command's message says so


def refuse(message: str) -> Refused:
    """The refusal of bad input, to raise, once the run `mlflow run` created is failed with it."""
    fail_outer_run(message)
    return Refused(message)


def keep_with_outer_run(path, artifact_path: str | None = None) -> None:
    """Under `mlflow run -e export` or `-e analyze`: keep what the command wrote with that run too."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        from . import tracking

        tracking.log_artifact(run_id, path, artifact_path)


def resumed(run_id: str, warn=None) -> tuple[ExperimentConfig, Start]:
    """The configuration and start of `fedshard run --resume RUN_ID`: the run's own configuration,
    after its newest usable checkpoint; `warn` hears of checkpoints passed over."""
    if os.environ.get("MLFLOW_RUN_ID"):
        raise refuse("--resume continues a run of its own; it cannot log into the run `mlflow run` made")
    from . import resume, tracking

    try:
        tracking.ensure_store()
        return resume.for_resume(run_id, warn=warn)
    except (tracking.TrackingError, resume.ContinueError) as exc:
        raise Refused(str(exc)) from None


def extended(cfg: ExperimentConfig, source_id: str) -> Start:
    """The start of `fedshard run --extend SOURCE_ID`: the final model of that shorter FINISHED
    run of the same configuration, whose rounds the new run copies in."""
    from . import resume, tracking

    try:
        tracking.ensure_store()
        return resume.for_extension(cfg, source_id)
    except (tracking.TrackingError, resume.ContinueError) as exc:
        raise refuse(str(exc)) from None


def open_run(cfg: ExperimentConfig, datasets: list, experiment_name: str | None = None, resume_id: str | None = None,
             extend_id: str | None = None, start: Start | None = None) -> str:
    """Open the experiment's run and return its id: the launcher's `open_run`, called while the
    metaserver starts. A resumed run is reopened, with the metrics of its checkpoint's round that
    it lacks (the checkpoint was stored before they were logged); any other run is started (or
    is the one `mlflow run` made), records its datasets and, extending a run, copies its rounds.

    A store that cannot be used refuses (exit 2) before any run exists; a run that exists but
    cannot be prepared is ended FAILED (exit 1): it must not stay RUNNING."""
    from . import tracking

    try:
        tracking.ensure_store()
        if resume_id:
            tracking.reopen_run(resume_id, {tracking.RESUMED_TAG: str(start.checkpoint.round)})
            run_id = resume_id
        else:
            run_id = tracking.start_run(cfg, experiment_name)
    except tracking.TrackingError as exc:
        raise refuse(str(exc)) from None  # the launcher stops the metaserver it started
    try:  # the run is RUNNING from here on: whatever fails ends it
        if resume_id:
            tracking.log_missing(resume_id, start.checkpoint.round, start.checkpoint.metrics)
        else:
            tracking.log_datasets(run_id, datasets)
            if extend_id:
                tracking.copy_round_metrics(extend_id, run_id, start.copied_rounds)
                tracking.set_tags(run_id, {tracking.EXTENDS_TAG: extend_id})
    except Exception as exc:
        reason = f"could not prepare run {run_id}: {described(exc)}"
        tracking.end_run(run_id, "FAILED", reason)
        raise Refused(reason, 1) from None
    return run_id
