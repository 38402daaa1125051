"""An experiment's OS processes: starting each role, watching them, and leaving none behind.

Every process fedshard starts is the leader of its own process group and asks the kernel for a
signal when its parent dies (prctl PR_SET_PDEATHSIG), so whatever ends an experiment - success,
a failing child, Ctrl-C, SIGTERM from `mlflow run`, even SIGKILL of the launcher or the sweep -
leaves no process behind. Which signal is the choice: a role (metaserver, aggregator, trainer)
has nothing to clean up and is killed; a launcher must end its MLflow run, so it is asked to
terminate. This module holds those kernel requests, one experiment's processes (`Experiment`:
spawn, watch, tear down) and how a child ended, in words; launcher.py decides what the run
records.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from fedshard.core import log as log_setup
from fedshard.core.config import ExperimentConfig
from fedshard.core.errors import FedshardError, described
from fedshard.core.files import tail

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl():
    """libc's prctl (Linux), looked up once, when first asked for: never inside a preexec_fn, where
    loading a library after fork, with other threads of the parent holding its locks, may deadlock
    (the preexec functions below look it up in the parent), and never on import, so that what runs
    no process (analyze, export) imports this module on any system."""
    return ctypes.CDLL(None, use_errno=True).prctl


def signal_when_parent_dies(sig: int, parent: int) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies. False when the parent,
    `parent` (its pid), had already died: the kernel then never sends it."""
    _prctl()(_PR_SET_PDEATHSIG, sig)
    return os.getppid() == parent


def _die_with(parent: int, sig: int, unblock: bool) -> None:
    if unblock:
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
    if not signal_when_parent_dies(sig, parent):
        os._exit(128 + sig)  # the parent died between fork and now: start nothing


def preexec_role() -> Callable[[], None]:
    """The preexec_fn (it runs between fork and exec) of an experiment's role started by this
    process: SIGKILL when this process dies, and no role at all if it died before that was asked."""
    _prctl()
    return functools.partial(_die_with, os.getpid(), signal.SIGKILL, False)


def preexec_launcher() -> Callable[[], None]:
    """The preexec_fn of a launcher started by this process (a sweep, a Ray worker): SIGTERM when
    this process dies, so the launcher tears its experiment down and marks its run KILLED, and no
    launcher at all if it died before that was asked. Ray's processes block SIGINT, and a signal
    mask survives exec: the launcher must get its signals."""
    _prctl()
    return functools.partial(_die_with, os.getpid(), signal.SIGTERM, True)


def terminate_when_parent_dies() -> None:
    """For a launcher started by `mlflow run`: SIGTERM when that process dies, even by SIGKILL.
    If it died before the request was in place, terminate now."""
    if not signal_when_parent_dies(signal.SIGTERM, os.getppid()):
        os.kill(os.getpid(), signal.SIGTERM)


def exit_now(code: int) -> NoReturn:
    """End this process with `code` at once, its output flushed: for when every result is sent and
    logged and every child is gone. The interpreter's teardown of PyTorch and MLflow would add
    about a second to each process of every experiment; multiprocessing ends its children so too."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextmanager
def role_process(role: str) -> Iterator[None]:
    """Run a role (metaserver, aggregator, trainer) to its end, then exit_now; it logs to its log file
    when the launcher started it (core/log.py). A failure is said in one line after its traceback
    (the launcher records a role's last line) and exits 1."""
    log_setup.setup_role()
    code = 0
    try:
        yield
    except Exception as exc:  # the role's end: said, with its traceback, and its exit code
        log.error("%s", traceback.format_exc().rstrip())
        log.error(f"{role}: error: {described(exc)}")
        code = 1
    exit_now(code)


def role_threads(threads: int | None) -> None:
    """The torch threads of a role: the launcher gives each its share of the cores."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def describe_exit(code: int) -> str:
    """'exited with code 1', 'killed by SIGKILL': a return code as Popen gives it, in words."""
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def interrupted(signum: int) -> str:
    """The reason recorded on a run stopped by a signal: 'interrupted by SIGINT'."""
    return f"interrupted by {signal.Signals(signum).name}"


# --------------------------------------------------------------------------- one experiment

POLL_SECONDS = 0.2
STARTUP_TIMEOUT = 60.0
GRACE_SECONDS = 5.0


class ExperimentFailed(FedshardError):
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

    def __init__(
        self,
        cfg: ExperimentConfig,
        workdir: Path,
        echo: Callable[[str], None] = print,
        placement: Placement = Placement(),
        start_file: Path | None = None,
    ):
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
        # Where the aggregator relays the trainers' progress (progress.py): a sweep names the file.
        self.progress_file = Path(os.environ.get("FEDSHARD_PROGRESS_FILE") or workdir / "progress.json")

    def spawn(self, name: str, args: list[str], threads: int, **env_extra: str) -> Child:
        log = self.workdir / "logs" / f"{name}.log"
        # gloo's interface: GLOO_SOCKET_IFNAME if set here, else the one towards the metaserver
        # (transport.join), i.e. loopback for a local experiment.
        env = dict(
            os.environ, FEDSHARD_SECRET=self.secret, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", **env_extra
        )
        env.pop("MLFLOW_RUN_ID", None)  # children log to the run they are given, explicitly
        env[log_setup.LOG_FILE_ENV] = str(log)  # the role's logging writes there (a FileHandler)
        # Appending, as the role's FileHandler does: its records and what it prints land in order.
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedshard", *args, "--threads", str(threads)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                process_group=0,
                preexec_fn=preexec_role(),
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

    def start(self, run_id: str, hand: int = 0) -> None:
        """Once the metaserver listens, start the aggregator and the trainers of run `run_id`, which
        this launcher holds at `hand` (tracking/claims.py; the aggregator writes nothing once it changed)."""
        self.run_id = run_id
        cores = cpu_budget()
        meta = self._started(self.metaserver, "metaserver")
        while not self.address_file.exists():
            if meta.proc.poll() is not None:
                raise ExperimentFailed(f"metaserver {describe_exit(meta.proc.returncode)}: {meta.last_lines()}")
            if time.monotonic() > self.metaserver_deadline:
                raise ExperimentFailed(f"metaserver did not start within {STARTUP_TIMEOUT:.0f}s")
            time.sleep(0.02)
        self.address = self.address_file.read_text().strip()
        common = ["--metaserver", self.address, "--run-id", run_id]
        from fedshard import tracking

        start = ["--start-from", str(self.start_file)] if self.start_file else []
        self.aggregator = self.spawn(
            "aggregator",
            [
                "aggregator",
                *common,
                "--config",
                str(self.config_path),
                "--join-timeout",
                str(self.placement.join_timeout),
                *start,
                "--progress-file",
                str(self.progress_file),
            ],
            cores,
            MLFLOW_TRACKING_URI=tracking.tracking_uri(),
            **{tracking.claims.HAND_ENV: str(hand)},
        )
        if self.placement.remote_trainers:
            return
        # Trainers train at the same time and share the cores; the aggregator
        # mostly works while they wait (evaluation), so it may use all of them.
        per_trainer = max(1, cores // self.cfg.world_size)
        self.trainers = [
            self.spawn(f"trainer_{k}", ["trainer", *common, "--rank", str(k)], per_trainer)
            for k in range(self.cfg.world_size)
        ]

    @property
    def pid_of_aggregator(self) -> int:
        return self._started(self.aggregator, "aggregator").proc.pid

    @staticmethod
    def _started(child: Child | None, role: str) -> Child:
        if child is None:
            raise RuntimeError(f"the {role} was not started")
        return child

    def remote_trainer_commands(self) -> list[str]:
        """What to run on each trainer machine. It carries the secret: pass it on privately."""
        if self.run_id is None:
            raise RuntimeError("the trainers' commands are known once the experiment started")
        return [
            shlex.join(
                [
                    "fedshard",
                    "trainer",
                    "--metaserver",
                    self.address,
                    "--run-id",
                    self.run_id,
                    "--rank",
                    str(k),
                    "--secret",
                    self.secret,
                ]
            )
            for k in range(self.cfg.world_size)
        ]

    def watch(self, tick: Callable[[], None] | None = None) -> None:
        """Return when the aggregator completed; raise ExperimentFailed as soon as any child fails.
        `tick()` is called at every look (the progress display)."""
        aggregator = self._started(self.aggregator, "aggregator")
        while True:
            for line in aggregator.new_lines():
                self.echo(line)
            if tick is not None:
                tick()
            if aggregator.proc.poll() == 0:
                return
            if any(self._failed(c) for c in self.children):
                # One death brings others down. A process killed by a signal is the cause; when
                # none was, the aggregator knows best what went wrong (a trainer that merely lost
                # its peer may exit first), so wait a little for it. Name causes first.
                deadline = time.monotonic() + (0.5 if self._killed() else GRACE_SECONDS)
                while time.monotonic() < deadline and aggregator.proc.poll() is None:
                    time.sleep(0.05)
                failed = sorted(
                    (c for c in self.children if self._failed(c)),
                    key=lambda c: (c.proc.returncode >= 0, c is not self.aggregator),
                )
                raise ExperimentFailed(
                    "; ".join(
                        f"{c.name.replace('_', ' ')} died ({describe_exit(c.proc.returncode)})"
                        + (f": {c.last_lines(1)}" if c.proc.returncode > 0 else "")
                        for c in failed
                    )
                )
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
