"""Start, watch and tear down the processes of one experiment.

This is the only code that creates processes. Every child is the leader of its
own process group and is told by the kernel to die with the launcher
(PR_SET_PDEATHSIG), so whatever ends the experiment - success, a failing child,
Ctrl-C, SIGTERM from `mlflow run`, even SIGKILL of the launcher - leaves no
process behind. The MLflow run ends FINISHED only when every round was logged.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ExperimentConfig
from .files import tail
from .processes import describe_exit, killed_with_parent, terminate_with_parent

if TYPE_CHECKING:
    from .resume import Start

POLL_SECONDS = 0.2
STARTUP_TIMEOUT = 60.0
GRACE_SECONDS = 5.0


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class CheckFailed(Exception):
    """The experiment cannot start (data, init_from, partition); nothing was started."""


def check(cfg: ExperimentConfig) -> list:
    """Everything that can be wrong with the inputs, found before any process or run exists.
    Returns the data sets the experiment reads (data.DatasetInput), for its run to record."""
    from . import data

    try:
        _, test_labels = data.load_split(cfg.data_dir, "test", cfg.max_test_samples)
        _, labels = data.load_split(cfg.data_dir, "train", cfg.max_train_samples)
        try:
            parts = data.partition(labels, cfg.world_size, cfg.partition, cfg.seed, cfg.dirichlet_alpha)
        except data.DataError as exc:
            raise CheckFailed(f"world_size={cfg.world_size}: {exc}") from exc
        if cfg.init_from:
            from . import aggregator  # imports PyTorch: only when there are weights to check

            aggregator.load_initial_weights(cfg)
    except (data.DataError, ValueError, FileNotFoundError) as exc:
        raise CheckFailed(str(exc)) from exc
    return data.inputs(cfg.data_dir, parts, len(test_labels), cfg.partition, cfg.seed, cfg.max_train_samples,
                       cfg.max_test_samples)


class ExperimentFailed(Exception):
    """A child failed; the message is the reason recorded on the run."""


def cpu_budget() -> int:
    """Cores this experiment may use: FEDSHARD_CPUS (set by a sweep running several at once) or all."""
    available = len(os.sched_getaffinity(0))
    return max(1, min(available, int(os.environ.get("FEDSHARD_CPUS", available))))


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path
    _offset: int = field(default=0)

    def last_lines(self, n: int = 5) -> str:
        return tail(self.log, n)

    def new_lines(self) -> list[str]:
        with suppress(OSError), self.log.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read()
            end = chunk.rfind(b"\n") + 1
            self._offset += end
            return chunk[:end].decode(errors="replace").splitlines()
        return []


@dataclass(frozen=True)
class Placement:
    """Where the experiment's roles live. By default all on this machine, the metaserver on
    loopback; with remote_trainers only metaserver and aggregator, the metaserver on an address
    that the trainers' machines reach, and the trainers started there by hand."""

    metaserver_host: str = "127.0.0.1"
    metaserver_port: int = 0
    remote_trainers: bool = False
    join_timeout: float = 600.0


class Experiment:
    """One experiment's processes, from start to a clean end."""

    def __init__(self, cfg: ExperimentConfig, workdir: Path, echo=print, placement: Placement = Placement(),
                 start_file: Path | None = None):
        self.cfg, self.workdir, self.echo, self.placement = cfg, workdir, echo, placement
        self.start_file = start_file  # a checkpoint the aggregator starts after (resume, extension)
        self.run_id: str | None = None
        self.children: list[Child] = []
        self.metaserver: Child | None = None
        self.aggregator: Child | None = None
        self.trainers: list[Child] = []
        self.secret = secrets.token_hex(16)
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "config.json"
        self.config_path.write_text(cfg.to_json())

    def spawn(self, name: str, args: list[str], threads: int, **env_extra: str) -> Child:
        log = self.workdir / "logs" / f"{name}.log"
        # gloo's interface: GLOO_SOCKET_IFNAME if set here, else the one towards the metaserver
        # (transport.join), i.e. loopback for a local experiment.
        env = dict(os.environ, FEDSHARD_SECRET=self.secret, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
                   **env_extra)
        env.pop("MLFLOW_RUN_ID", None)  # children log to the run they are given, explicitly
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedshard", *args, "--threads", str(threads)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                process_group=0, preexec_fn=killed_with_parent,
            )
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def start_metaserver(self) -> None:
        """Start the metaserver; it needs no run, so it imports PyTorch (seconds) while the
        launcher opens the MLflow run."""
        self.address_file = self.workdir / "metaserver.address"
        where = ["--host", self.placement.metaserver_host, "--port", str(self.placement.metaserver_port)]
        self.metaserver = self.spawn("metaserver", ["metaserver", *where, "--address-file", str(self.address_file)], 1)
        self.metaserver_deadline = time.monotonic() + STARTUP_TIMEOUT

    def start(self, run_id: str) -> None:
        """Once the metaserver listens, start the aggregator and the trainers of run `run_id`."""
        self.run_id = run_id
        cores = cpu_budget()
        meta = self.metaserver
        while not self.address_file.exists():
            if meta.proc.poll() is not None:
                raise ExperimentFailed(f"metaserver {describe_exit(meta.proc.returncode)}: {meta.last_lines()}")
            if time.monotonic() > self.metaserver_deadline:
                raise ExperimentFailed(f"metaserver did not start within {STARTUP_TIMEOUT:.0f}s")
            time.sleep(0.02)
        self.address = self.address_file.read_text().strip()
        common = ["--metaserver", self.address, "--run-id", run_id]
        from . import tracking

        start = ["--start-from", str(self.start_file)] if self.start_file else []
        self.aggregator = self.spawn("aggregator", ["aggregator", *common, "--config", str(self.config_path),
                                                    "--join-timeout", str(self.placement.join_timeout), *start],
                                     cores, MLFLOW_TRACKING_URI=tracking.tracking_uri())
        if self.placement.remote_trainers:
            return
        # Trainers train at the same time and share the cores; the aggregator
        # mostly works while they wait (evaluation), so it may use all of them.
        per_trainer = max(1, cores // self.cfg.world_size)
        self.trainers = [
            self.spawn(f"trainer_{k}", ["trainer", *common, "--rank", str(k)], per_trainer)
            for k in range(self.cfg.world_size)
        ]

    def remote_trainer_commands(self) -> list[str]:
        """What to run on each trainer machine. It carries the secret: pass it on privately."""
        return [shlex.join(["fedshard", "trainer", "--metaserver", self.address, "--run-id", self.run_id,
                            "--rank", str(k), "--secret", self.secret]) for k in range(self.cfg.world_size)]

    def watch(self) -> None:
        """Return when the aggregator completed; raise ExperimentFailed as soon as any child fails."""
        while True:
            for line in self.aggregator.new_lines():
                self.echo(line)
            if self.aggregator.proc.poll() == 0:
                return
            if any(self._failed(c) for c in self.children):
                # One death brings others down. A process killed by a signal is the cause; when
                # none was, the aggregator knows best what went wrong (a trainer that merely lost
                # its peer may exit first), so wait a little for it. Name causes first.
                deadline = time.monotonic() + (0.5 if self._killed() else GRACE_SECONDS)
                while time.monotonic() < deadline and self.aggregator.proc.poll() is None:
                    time.sleep(0.05)
                failed = sorted((c for c in self.children if self._failed(c)),
                                key=lambda c: (c.proc.returncode >= 0, c is not self.aggregator))
                raise ExperimentFailed("; ".join(
                    f"{c.name.replace('_', ' ')} died ({describe_exit(c.proc.returncode)})"
                    + (f": {c.last_lines(1)}" if c.proc.returncode > 0 else "") for c in failed))
            time.sleep(POLL_SECONDS)

    def _killed(self) -> bool:
        return any((c.proc.poll() or 0) < 0 for c in self.children)

    def _failed(self, child: Child) -> bool:
        code = child.proc.poll()
        # A trainer exits 0 once told to stop; the metaserver must outlive the experiment.
        return code is not None and (code != 0 or child.name == "metaserver")

    def teardown(self) -> None:
        """SIGTERM every child's process group, SIGKILL what is still there after a grace period."""
        for child in self.children:
            for sig in (signal.SIGTERM, signal.SIGCONT):  # SIGCONT: a stopped process acts on SIGTERM
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.proc.pid, sig)
        deadline = time.monotonic() + GRACE_SECONDS
        for child in self.children:
            with suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for child in self.children:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(child.proc.pid, signal.SIGKILL)
            child.proc.wait()


def run(cfg: ExperimentConfig, open_run: Callable[[], str], echo=print, placement: Placement = Placement(),
        start: Start | None = None) -> int:
    """Run one experiment and end its MLflow run; returns the process exit code.

    `open_run` opens the run and returns its id. It is called once the metaserver is starting,
    so that the two start-ups (seconds of imports each) overlap; if it raises, the metaserver is
    stopped again and the exception propagates, with no run to end. With `start` the
    aggregator begins after that checkpoint's round (resume, extension) instead of round 0.
    """
    if os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run` or a sweep: go down with whoever started us
        terminate_with_parent()
    workdir = Path(tempfile.mkdtemp(prefix="fedshard-"))
    start_file = None
    if start is not None:
        from . import checkpoint

        start_file = checkpoint.save(start.checkpoint, workdir / "start.pt")
    exp = Experiment(cfg, workdir, echo, placement, start_file)
    exp.start_metaserver()
    try:
        run_id = open_run()
    except BaseException:
        exp.teardown()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    from . import tracking  # already imported by open_run

    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        if not stopping:  # a second Ctrl-C must not interrupt the teardown
            stopping = True
            raise Interrupted(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    status, reason, code = "FAILED", None, 1
    monitor = None
    try:
        monitor = tracking.monitor_system(run_id)
        tracking.log_artifact(run_id, exp.config_path)
        exp.start(run_id)
        if placement.remote_trainers:
            echo(f"fedshard: run {run_id}: metaserver {exp.address}, aggregator pid {exp.aggregator.proc.pid}, "
                 f"waiting up to {placement.join_timeout:g}s for {cfg.world_size} remote trainer(s); on each "
                 f"trainer machine run (with CIFAR-100 in {cfg.data_dir}, or add --data-dir DIR):")
            for command in exp.remote_trainer_commands():
                echo(f"  {command}")
        else:
            echo(f"fedshard: run {run_id}: metaserver {exp.address}, aggregator pid {exp.aggregator.proc.pid}, "
                 f"trainer pids {[t.proc.pid for t in exp.trainers]}")
        exp.watch()
        missing = sorted(set(range(cfg.rounds + 1)) - tracking.logged_steps(run_id))
        if missing:
            raise ExperimentFailed(f"aggregator exited but rounds {missing} of 0..{cfg.rounds} were not logged")
        status, code = "FINISHED", 0
    except Interrupted as exc:
        status, reason, code = "KILLED", f"interrupted by {exc}", 128 + exc.signum
    except ExperimentFailed as exc:
        reason = str(exc)
    except Exception as exc:  # anything else in the launcher itself is still a failed run, not a RUNNING one
        reason = f"launcher error: {type(exc).__name__}: {exc}"
    finally:
        stopping = True
        exp.teardown()
        for s, handler in previous.items():
            signal.signal(s, handler)
    for line in exp.aggregator.new_lines() if exp.aggregator else []:
        echo(line)
    if monitor is not None:
        with suppress(Exception):
            monitor.finish()
    with suppress(Exception):
        tracking.log_artifact(run_id, workdir / "logs")
    tags = {}
    with suppress(Exception):  # rounds this run's own trainers trained: the last one in, less copied ones
        last = max(tracking.logged_steps(run_id) or {0})
        tags[tracking.ROUNDS_TRAINED_TAG] = str(max(0, last - (start.copied_rounds if start else 0)))
    tracking.end_run(run_id, status, reason, tags)
    if status == "FINISHED":  # only now: until the run is FINISHED, its checkpoint is what resumes it
        with suppress(Exception):
            tracking.delete_checkpoints(run_id)
    shutil.rmtree(workdir, ignore_errors=True)
    echo(f"fedshard: run {run_id} {status}" + (f": {reason}" if reason else ""))
    return code
