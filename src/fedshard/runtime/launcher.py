"""One experiment from the input check to the end of its MLflow run.

The launcher checks the inputs before anything starts, starts the experiment's processes
(processes.Experiment: metaserver, aggregator, trainers), watches them, tears them all down
whatever happens (a failing child, Ctrl-C, SIGTERM from `mlflow run` or a sweep) and ends the
run: FINISHED only when every round was logged, else FAILED or KILLED with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

from fedshard.core.config import ExperimentConfig
from fedshard.core.errors import FedshardError, described
from fedshard.core.identity import process_alive, started_at
from fedshard.runtime import progress
from fedshard.runtime.lifecycle import CLAIM_LOST
from fedshard.runtime.processes import Experiment, ExperimentFailed, Placement, interrupted, terminate_when_parent_dies

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from types import FrameType

    from fedshard.runtime.resume import Start
    from fedshard.tracking.claims import Keeper


# What became of a run that changed hands while this launcher ran it (tracking/claims.py).
LOST = "LOST"


class Interrupted(BaseException):
    """A signal (SIGINT, SIGTERM, SIGHUP) stops the experiment. Not an Exception, nor a FedshardError, on
    purpose: no `except Exception` may swallow it; the launcher ends the run KILLED with 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class CheckFailed(FedshardError):
    """The experiment cannot start (data, init_from, partition); nothing was started."""

    exit_code = 2


def check(cfg: ExperimentConfig, experiment_name: str | None = None) -> list:
    """Everything that can be wrong with the inputs, found before any process or run exists (a run
    that init_from=run:<name> names is looked for in `experiment_name`, or the one this process
    works in). Returns the data sets the experiment reads (data.DatasetInput), for its run to record."""
    from fedshard.core import data, precision

    try:
        if cfg.precision == "bf16" and cfg.device != "cuda":  # bf16 where the device cannot: refused now
            precision.resolve(cfg.precision, cfg.device)
        _, test_labels = data.load_split(cfg.data_dir, "test", cfg.max_test_samples)
        _, labels = data.load_split(cfg.data_dir, "train", cfg.max_train_samples)
        try:
            parts = data.partition(labels, cfg.world_size, cfg.partition, cfg.seed, cfg.dirichlet_alpha)
        except data.DataError as exc:
            raise CheckFailed(f"world_size={cfg.world_size}: {exc}") from exc
        _check_batches(cfg, [len(p) for p in parts])
        if cfg.init_from:
            from fedshard.runtime import initial  # imports PyTorch: only when there are weights to check

            initial.weights(cfg, experiment_name)
    except (data.DataError, ValueError, FileNotFoundError) as exc:
        raise CheckFailed(str(exc)) from exc
    return data.inputs(
        cfg.data_dir, parts, len(test_labels), cfg.partition, cfg.seed, cfg.max_train_samples, cfg.max_test_samples
    )


def _check_batches(cfg: ExperimentConfig, sizes: list[int]) -> None:
    """Refuse a partition that would end an epoch on a batch the model cannot train on (batch norm
    with a 1 x 1 map, as ResNet's last stage at 32 x 32, needs two images)."""
    from fedshard.core import models

    smallest = models.get(cfg.model).min_batch(cfg.image_size)
    for k, n in enumerate(sizes):
        if 0 < n % cfg.batch_size < smallest:
            raise CheckFailed(
                f"trainer {k}'s {n} training images end each epoch on a batch of {n % cfg.batch_size} "
                f"at batch_size={cfg.batch_size}, and {cfg.model} at image_size={cfg.image_size} trains "
                f"on batches of {smallest} images or more (batch norm of a 1x1 map); choose another "
                f"batch_size, max_train_samples or image_size"
            )


def run(
    cfg: ExperimentConfig,
    open_run: Callable[[], str],
    echo: Callable[[str], None] = print,
    placement: Placement = Placement(),
    start: Start | None = None,
    progress_every: float = 30.0,
    hand: int = 0,
) -> int:
    """Run one experiment and end its MLflow run; returns the process exit code.

    `open_run` opens the run and returns its id. It is called once the metaserver is starting,
    so that the two start-ups (seconds of imports each) overlap; if it raises, the metaserver is
    stopped again and the exception propagates, with no run to end. With `start` the
    aggregator begins after that checkpoint's round (resume, extension) instead of round 0.
    Progress inside a round is shown every `progress_every` seconds (progress.Display). The work
    directory goes whatever happens. The launcher holds the run at `hand` (tracking/claims.py): it
    renews the claim's heartbeat, and stops, writing nothing more into the run, once the run changed
    hands (exit CLAIM_LOST).
    """
    if os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run` or a sweep: go down with whoever started us
        terminate_when_parent_dies()
    workdir = make_workdir()
    try:
        return _run_in(workdir, cfg, open_run, echo, placement, start, progress_every, hand)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_in(
    workdir: Path,
    cfg: ExperimentConfig,
    open_run: Callable[[], str],
    echo: Callable[[str], None],
    placement: Placement,
    start: Start | None,
    progress_every: float,
    hand: int,
) -> int:
    """run(), in the work directory that run() removes."""
    start_file = None
    if start is not None:
        from fedshard.core import checkpoint

        start_file = checkpoint.save(start.checkpoint, workdir / "start.pt")
    exp = Experiment(cfg, workdir, echo, placement, start_file)
    exp.start_metaserver()
    try:
        run_id = open_run()
    except BaseException:
        exp.teardown()
        raise
    from fedshard import tracking  # imported by open_run

    keeper = tracking.claims.Keeper(run_id, hand)
    display = progress.Display(exp.progress_file, progress_every, echo)
    exp.echo = display.write
    try:
        status, reason, code = _run_to_the_end(exp, keeper, display.tick)
    finally:
        display.close()
        exp.echo = echo
    if status != LOST:
        status, reason, code = _record_the_end(exp, keeper, status, reason, code, start.copied_rounds if start else 0)
    if status == LOST:
        echo(f"fedshard: run {run_id} was taken over ({reason}); stopped, leaving the run to its new owner")
    else:
        echo(f"fedshard: run {run_id} {status}" + (f": {reason}" if reason else ""))
    return code


def make_workdir() -> Path:
    """A fresh directory for the experiment's config, logs and start checkpoint (220 MB), which the
    launcher removes at the end. It names its owner, so that the directories of launchers killed
    outright (SIGKILL, OOM), which could not remove their own, are removed here."""
    for owner_file in Path(tempfile.gettempdir()).glob("fedshard-*/owner.json"):
        with suppress(OSError, ValueError, KeyError, TypeError):
            owner = json.loads(owner_file.read_text())
            if not process_alive(int(owner["pid"]), float(owner["started"])):
                shutil.rmtree(owner_file.parent, ignore_errors=True)
    workdir = Path(tempfile.mkdtemp(prefix="fedshard-"))
    (workdir / "owner.json").write_text(json.dumps({"pid": os.getpid(), "started": started_at()}))
    return workdir


class _Signals:
    """While entered, SIGINT, SIGTERM and SIGHUP: the first one is kept in `signum` and, while
    `raising`, raises Interrupted; later ones are ignored: a second Ctrl-C must not interrupt the
    teardown that the first one started, nor may a first one that comes during the teardown."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.raising = True

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            if self.raising:
                raise Interrupted(signum)

    def __enter__(self) -> _Signals:
        self.previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        return self

    def __exit__(self, *_exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _run_to_the_end(
    exp: Experiment, keeper: Keeper, tick: Callable[[], None] | None = None
) -> tuple[str, str | None, int]:
    """Start the experiment's processes, watch them to the end and tear them down whatever happens;
    returns the run's (status, reason, exit code): FINISHED only when every round was logged, KILLED
    when a signal came before that, even during the teardown, LOST as soon as `keeper` (the claim's
    heartbeat) finds that the run changed hands."""
    from fedshard import tracking  # already imported by open_run

    cfg, run_id = exp.cfg, keeper.run_id
    status, reason, code = "FAILED", None, 1
    monitor = None

    def look():
        if tick is not None:
            tick()
        keeper.check()

    with _Signals() as signals:
        try:
            keeper.start()
            monitor = tracking.monitor_system(run_id)
            tracking.log_artifact(run_id, exp.config_path)
            exp.start(run_id, keeper.hand)
            _announce(exp)
            exp.watch(look)
            missing = sorted(set(range(cfg.rounds + 1)) - tracking.logged_steps(run_id))
            if missing:
                raise ExperimentFailed(f"aggregator exited but rounds {missing} of 0..{cfg.rounds} were not logged")
            status, code = "FINISHED", 0
        except tracking.claims.ClaimLost as exc:
            status, reason, code = LOST, str(exc), CLAIM_LOST
        except Interrupted:
            pass  # said below, as a signal that comes during the teardown is
        except ExperimentFailed as exc:
            reason = str(exc)
        except Exception as exc:  # anything else in the launcher itself is still a failed run, not a RUNNING one
            reason = f"launcher error: {described(exc)}"
        finally:
            signals.raising = False  # from here on a first signal is only kept: the teardown goes to its end
            keeper.stop()
            exp.teardown()
    if signals.signum is not None and status not in ("FINISHED", LOST):  # a FINISHED run lost nothing: it stays so
        after = f" (tearing down after: {reason})" if reason else ""
        status, reason, code = "KILLED", interrupted(signals.signum) + after, 128 + signals.signum
    for line in exp.aggregator.new_lines() if exp.aggregator else []:
        exp.echo(line)
    if monitor is not None:
        try:
            monitor.finish()
        except Exception as exc:  # system metrics are never worth the run's end
            log.debug(f"the system metrics monitor did not finish: {described(exc)}")
    return status, reason, code


def _announce(exp: Experiment) -> None:
    """Say where the experiment's processes are; with remote trainers, the command for each."""
    cfg, placement, echo = exp.cfg, exp.placement, exp.echo
    where = f"fedshard: run {exp.run_id}: metaserver {exp.address}, aggregator pid {exp.pid_of_aggregator}"
    if not placement.remote_trainers:
        echo(f"{where}, trainer pids {[t.proc.pid for t in exp.trainers]}")
        return
    echo(
        f"{where}, waiting up to {placement.join_timeout:g}s for {cfg.world_size} remote trainer(s); on each "
        f"trainer machine run (with CIFAR-100 in {cfg.data_dir}, or add --data-dir DIR):"
    )
    for command in exp.remote_trainer_commands():
        echo(f"  {command}")


def _record_the_end(
    exp: Experiment, keeper: Keeper, status: str, reason: str | None, code: int, copied_rounds: int
) -> tuple[str, str | None, int]:
    """End the MLflow run with its status and reason, its processes' logs and the rounds its own
    trainers trained; a FINISHED run's checkpoint goes (its final model is kept, once). The run is
    ended only through the claim's next hand: when it changed hands meanwhile, nothing is ended and
    the outcome is LOST. Returns the (status, reason, exit code) that stand."""
    from fedshard import tracking

    run_id = keeper.run_id
    try:  # not into a run that is another launcher's now (nor below: the end takes a hand)
        tracking.claims.check(run_id, keeper.hand)
        tracking.log_artifact(run_id, exp.workdir / "logs")
    except Exception as exc:  # the logs are not worth the run's end, which is what matters now
        log.debug(f"the processes' logs were not stored in run {run_id}: {described(exc)}")
    tags = {}
    try:  # rounds this run's own trainers trained: the last one in, less copied ones
        last = max(tracking.logged_steps(run_id) or {0})
        tags[tracking.ROUNDS_TRAINED_TAG] = str(max(0, last - copied_rounds))
    except Exception as exc:  # a tag is not worth the run's end
        log.debug(f"run {run_id} ends without its rounds-trained tag: {described(exc)}")
    if not keeper.end(status, reason, tags):
        return LOST, tracking.claims.taken(run_id, keeper.hand), CLAIM_LOST
    if status == "FINISHED":  # only now: until the run is FINISHED, its checkpoint is what resumes it
        try:
            tracking.delete_checkpoints(run_id)
        except Exception as exc:  # the run is FINISHED; a checkpoint left over only takes room
            log.debug(f"the checkpoints of FINISHED run {run_id} were not deleted: {described(exc)}")
    return status, reason, code
