"""Where a sweep's experiments run: local processes (the default) or Ray tasks on a cluster.

Either way an experiment is the same `fedshard run` command with its MLFLOW_RUN_ID, and the
sweep holds a handle with the same verbs: done?, how it ended, stop (the launcher tears its
experiment down and marks the run KILLED), kill (for one that does not stop). Ray is imported
only by the Ray executor, so the default needs no Ray.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from fedshard.core.config import ExperimentConfig
from fedshard.core.errors import FedshardError, described, first_line
from fedshard.runtime.processes import describe_exit, preexec_launcher  # no import may run between fork and exec

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray._private.worker import RemoteFunction2  # what ray.remote makes of run_on_node; Ray exports no name for it
log = logging.getLogger(__name__)

POLL_SECONDS = 0.2
# A launcher's output comes back with its Ray task; a few rounds' lines fit easily.
OUTPUT_LIMIT = 1 << 20


def child_env(overrides: dict[str, str]) -> dict[str, str]:
    """This machine's environment for a `fedshard run`, importing the fedshard that runs here."""
    pkg_root = str(Path(__file__).resolve().parents[2])  # src/, above fedshard/sweep/executors.py
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([pkg_root] + ([path] if path else [])),
        "PYTHONUNBUFFERED": "1",
        **overrides,
    }


# --------------------------------------------------------------------------- local processes


class LocalProcess:
    """A `fedshard run` child of the sweep, in its own session, writing to its log file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path):
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=preexec_launcher(),
            )
        self.where = f"pid {self.proc.pid}"

    def done(self) -> bool:
        return self.proc.poll() is not None

    def outcome(self) -> str:
        return describe_exit(self.proc.returncode)

    def stop(self) -> None:
        with suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL a launcher that ignored SIGTERM, and every process below it."""
        import psutil

        try:
            family = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for p in family:
            with suppress(psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with suppress(psutil.NoSuchProcess):
                p.kill()
        self.proc.wait()
        psutil.wait_procs(family, timeout=5)


class LocalExecutor:
    """Experiments as child processes of the sweep; `--parallel N` shares this machine's cores."""

    spreads_gpus = True  # the sweep hands out CUDA_VISIBLE_DEVICES itself

    def open(self, configs: Sequence[ExperimentConfig], parallel: int, echo: Callable[[str], None]) -> None:
        pass

    def start(self, cfg: ExperimentConfig, argv: list[str], env: dict[str, str], log: Path) -> LocalProcess:
        return LocalProcess(argv, env, log)

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- Ray


class ExecutorError(FedshardError, ValueError):
    """The executor cannot run this sweep (Ray missing, a request no node can satisfy)."""

    exit_code = 2


def run_on_node(args: list[str], overrides: dict[str, str], cwd: str) -> tuple[int, bytes]:
    """The body of an experiment's Ray task: `python -m fedshard run ...` on this node, with this
    node's Python; returns its exit code and output. Runs in the sweep's working directory when
    this node has it (the same machine, a shared filesystem), so relative paths mean the same."""
    # ray.cancel() interrupts the task like Ctrl-C; a worker may have inherited an ignored SIGINT
    # (a sweep started in the background by a script), which would make cancelling a no-op.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = cwd if os.path.isdir(cwd) else os.path.expanduser("~")
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env(overrides),
            cwd=workdir,
            start_new_session=True,
            preexec_fn=preexec_launcher(),
        )
        try:
            while proc.poll() is None:  # short sleeps: ray.cancel interrupts between them
                time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:  # ray.cancel(): the launcher tears down and marks its run KILLED
            proc.send_signal(signal.SIGTERM)
            proc.wait()
        out.seek(max(0, out.seek(0, os.SEEK_END) - OUTPUT_LIMIT))
        return proc.returncode, out.read()


class RayTask:
    """One experiment running as a Ray task somewhere in the cluster."""

    def __init__(self, ray: ModuleType, ref: ObjectRef[tuple[int, bytes]], log: Path):
        self.ray, self.ref, self.log = ray, ref, log
        self.where = f"Ray task {ref.task_id().hex()[:12]}"
        self._outcome: str | None = None
        log.write_text("(the launcher's output arrives when its Ray task ends)\n")

    def done(self) -> bool:
        if self._outcome is None and self.ray.wait([self.ref], timeout=0)[0]:
            self._collect()
        return self._outcome is not None

    def _collect(self) -> None:
        try:
            code, output = self.ray.get(self.ref)
        except self.ray.exceptions.RayError as exc:  # worker or node died, task cancelled or failed
            # Ray's explanation takes the launcher's place in the log (and so in the reason).
            self._outcome = f"Ray task failed: {type(exc).__name__}"
            self.log.write_text(f"{str(exc).strip() or type(exc).__name__}\n")
            return
        self.log.write_bytes(output)
        self._outcome = describe_exit(code)

    def outcome(self) -> str:
        return self._outcome or "still running"

    def stop(self) -> None:
        try:
            self.ray.cancel(self.ref)  # interrupts run_on_node, which stops the launcher
        except Exception as exc:  # the task has ended already, or Ray is going: wait() and kill() follow
            log.debug(f"the Ray task was not cancelled: {described(exc)}")

    def wait(self, timeout: float) -> None:
        self.ray.wait([self.ref], timeout=max(0.0, timeout))

    def kill(self) -> None:
        try:
            self.ray.cancel(self.ref, force=True)  # the worker exits; its launcher dies with it
        except Exception as exc:  # the task has ended already, or Ray is going
            log.debug(f"the Ray task was not force-cancelled: {described(exc)}")
        self.wait(30)
        self.done()


def default_cpus(world_size: int, parallel: int, cluster_cpus: float, node_cpus: list[float]) -> float:
    """CPUs one experiment asks Ray for when not told: one per computing process (world_size + 1),
    capped so that `parallel` experiments fit the cluster at once (its CPUs / parallel, fractional
    below one CPU; Ray's CPUs are a scheduling count, not a limit) and one fits on the largest node.
    On a 2-core machine, --parallel 2 of world-size-2 experiments asks for 1 CPU each."""
    want = min(world_size + 1.0, cluster_cpus / parallel, max(node_cpus, default=0.0))
    return round(max(want, 0.01), 2)  # Ray takes resource amounts to 0.0001; 2 decimals read better


class RayExecutor:
    """Each experiment a Ray task asking for the CPUs of its computing processes (aggregator and
    trainers) and a GPU, or a share of one; Ray starts it on a node where they are free."""

    spreads_gpus = False  # Ray assigns GPUs (CUDA_VISIBLE_DEVICES) to each task

    def __init__(self, address: str | None = None, cpus: float | None = None, gpus: float | None = None):
        if importlib.util.find_spec("ray") is None:
            raise ExecutorError("--executor ray needs Ray: pip install -e '.[ray]' (or pip install ray==2.60.0)")
        if gpus is not None and gpus > 1 and gpus != int(gpus):
            raise ExecutorError(f"--gpus-per-experiment {gpus:g}: a share of one GPU (<= 1) or whole GPUs")
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.cpus, self.gpus = cpus, gpus
        self.ray: ModuleType | None = None
        self.remote: RemoteFunction2[tuple[int, bytes], list[str], dict[str, str], str] | None = None
        self.parallel, self.cluster_cpus = 1, 0.0
        self.node_cpus: list[float] = []

    def open(self, configs: Sequence[ExperimentConfig], parallel: int, echo: Callable[[str], None]) -> None:
        import logging
        from urllib.parse import urlparse

        import ray

        from fedshard import tracking

        self.ray = ray
        try:  # "local": a fresh instance of our own, not a cluster that happens to run on this machine
            ray.init(
                address=self.address or "local",
                include_dashboard=False if not self.address else None,
                log_to_driver=False,
                logging_level=logging.ERROR,
            )
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError here
            hint = (
                "; if the cluster uses token authentication (clusters started by Ray 2.60 do), set "
                "RAY_AUTH_MODE=token here, with the cluster's token in ~/.ray/auth_token or $RAY_AUTH_TOKEN"
                if self.address and not os.environ.get("RAY_AUTH_MODE")
                else ""
            )
            raise ExecutorError(
                f"cannot use the Ray cluster at {self.address or 'a local instance'}: {first_line(exc)}" + hint
            ) from exc
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        total = ray.cluster_resources()
        self.parallel, self.cluster_cpus = parallel, total.get("CPU", 0.0)
        self.node_cpus = [n.get("CPU", 0.0) for n in nodes]
        if self.gpus is None:  # GPU nodes: one GPU per experiment, as the local sweep does
            self.gpus = 1.0 if total.get("GPU", 0) else 0.0
        where = f"Ray cluster at {self.address}" if self.address else "a local Ray instance"
        echo(f"Executor: {where}: {len(nodes)} node(s), {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs")
        uri = tracking.tracking_uri()
        if self.address and urlparse(uri).scheme in ("", "file", "sqlite"):
            echo(
                f"Note: the tracking store {uri} is a file on this machine; experiments on other nodes "
                f"reach it only through a shared filesystem. See docs/several-machines.md for a server."
            )
        for cfg in configs:
            cpus, gpus = self.resources(cfg)
            if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
                raise ExecutorError(
                    f"no node of the Ray cluster has the {cpus:g} CPUs and {gpus:g} GPUs that an "
                    f"experiment with world_size={cfg.world_size} asks for; set "
                    f"--cpus-per-experiment / --gpus-per-experiment"
                )
        if configs and self.cpus is None:
            echo(
                f"Each experiment asks for {self.resources(configs[0])[0]:g} CPUs (world_size + 1, at most the "
                f"cluster's CPUs / --parallel); --cpus-per-experiment sets it"
            )
        # Ray must not rerun a failed experiment itself: the sweep retries with a fresh run.
        self.remote = ray.remote(max_retries=0)(run_on_node)

    def resources(self, cfg: ExperimentConfig) -> tuple[float, float]:
        """(CPUs, GPUs) one experiment asks for: --cpus-per-experiment, else default_cpus."""
        cpus = self.cpus or default_cpus(cfg.world_size, self.parallel, self.cluster_cpus, self.node_cpus)
        return cpus, self.gpus or 0.0

    def start(self, cfg: ExperimentConfig, argv: list[str], env: dict[str, str], log: Path) -> RayTask:
        if self.ray is None or self.remote is None:
            raise RuntimeError("RayExecutor.start before open")
        cpus, gpus = self.resources(cfg)
        # The node's own environment and Python, plus what the experiment needs from the sweep:
        # its run, the tracking server (and its credentials), its share of the node's cores.
        from fedshard.tracking.owners import HOST_ENV

        # Not this machine's name for itself: the node's launcher records its own host as its claim's owner.
        overrides = {k: v for k, v in env.items() if k.startswith(("MLFLOW_", "FEDSHARD_")) and k != HOST_ENV}
        overrides["FEDSHARD_CPUS"] = str(max(1, int(cpus)))  # threads: at least one per process
        ref = self.remote.options(num_cpus=cpus, num_gpus=gpus).remote(argv[1:], overrides, os.getcwd())
        return RayTask(self.ray, ref, log)

    def close(self) -> None:
        if self.ray is not None and self.ray.is_initialized():
            self.ray.shutdown()


# What runs a sweep's experiments, and the handle of one running experiment (scheduling.py holds these).
Executor = LocalExecutor | RayExecutor
Handle = LocalProcess | RayTask


def make(name: str, address: str | None = None, cpus: float | None = None, gpus: float | None = None) -> Executor:
    if name == "local":
        if address or cpus or gpus is not None:
            raise ExecutorError(
                "--ray-address, --cpus-per-experiment and --gpus-per-experiment apply to --executor ray"
            )
        return LocalExecutor()
    return RayExecutor(address, cpus, gpus)
