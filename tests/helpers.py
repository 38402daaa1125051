"""What the tests share beside their fixtures (conftest.py): the repository, running the real
`fedshard` command and starting experiments as a user would, finding leftover processes, the
reference configuration that continued runs must reproduce, and the claim race of several sweeps."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def in_test_dir(cwd: Path) -> dict:
    """The environment of a process a test starts: its temporary files (a launcher's work directory)
    under the test's directory, which pytest removes, not in the machine's /tmp."""
    return dict(os.environ, TMPDIR=str(cwd))


def fedshard(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real CLI as a user would, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "fedshard", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=in_test_dir(cwd),
    )


def fedshard_processes(marker: str) -> list[psutil.Process]:
    """Live processes whose command line contains `marker` (a run id or a test directory)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return [p for p in found if p.pid != os.getpid()]


def experiment_args(data_dir: Path, **params) -> list[str]:
    # fp32 by default: the tests' learning thresholds and exact histories were measured in fp32, and a
    # CPU with native bf16 would otherwise switch (precision=auto); the bf16 tests ask for it.
    # One local epoch (the harness's default is 3): the tests' rounds are kept short.
    base = {
        "max_train_samples": 64,
        "max_test_samples": 32,
        "batch_size": 16,
        "local_epochs": 1,
        "learning_rate": 1e-4,
        "precision": "fp32",
    }
    base.update(params)
    args = ["--data-dir", str(data_dir)]
    for name, value in base.items():
        args += [f"--{name.replace('_', '-')}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


# The experiment that resume and takeover tests stop and continue (tests/test_resume.py,
# tests/test_several_machines.py): rounds of about 3 s here, time to act between one round's
# checkpoint and the run's end.
CONFIG = dict(
    world_size=2,
    rounds=3,
    enable_swapping=True,
    swap_every=1,
    learning_rate=1e-3,
    max_train_samples=64,
    max_test_samples=32,
    batch_size=16,
    local_epochs=1,
    precision="fp32",
)
METRICS = ("test_loss", "test_accuracy")


def history(run_id: str, client=None) -> dict[str, dict[int, float]]:
    """Every value of the round metrics; a step logged twice would show as a list longer than its dict."""
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    out = {}
    for key in (*METRICS, "train_loss"):
        values = client.get_metric_history(run_id, key)
        out[key] = {m.step: m.value for m in values}
        assert len(values) == len(out[key]), f"{key}: a step was logged twice: {[m.step for m in values]}"
    return out


LEFTOVER_DEADLINE = 30.0


class Launcher:
    """`fedshard run` in the background, its output read line by line."""

    def __init__(self, tmp_path, data_dir, experiment="faults", resume: str = "", launcher_args=(), **params):
        args = (
            ["--resume", resume] if resume else [*experiment_args(data_dir, **params), "--experiment-name", experiment]
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedshard", "run", *args, *launcher_args],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=in_test_dir(tmp_path),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        started = self.wait_for(r"fedshard: run ([0-9a-f]{32}): .* aggregator pid (\d+), trainer pids \[([\d, ]+)\]")
        self.run_id = started.group(1)
        self.aggregator = int(started.group(2))
        self.trainers = [int(p) for p in started.group(3).split(",")]

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = 180):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.proc.poll() is None, "launcher exited early:\n" + "".join(self.output)
                continue
            self.output.append(line)
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(self.output))

    def finish(self, timeout: float = LEFTOVER_DEADLINE) -> float:
        start = time.monotonic()
        self.proc.wait(timeout=timeout)
        return time.monotonic() - start

    def children(self):
        return [self.aggregator, *self.trainers]


def assert_gone(pids, run_id, deadline=LEFTOVER_DEADLINE):
    """Every pid and its process group gone (zombies aside) within the deadline."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        groups = []
        for p in pids:
            try:
                os.killpg(p, 0)
                groups.append(p)
            except ProcessLookupError:
                pass
        if not alive and not groups and not fedshard_processes(run_id):
            return
        time.sleep(0.2)
    raise AssertionError(f"left behind: pids {alive}, groups {groups}, {fedshard_processes(run_id)}")


def _racer(uri: str, experiment: str, rounds: int, barrier, results) -> None:
    """One of several processes that claim the same configuration at the same instant, as sweeps do
    (sweep/claiming.py, with the sweep's pause before trying a contested claim again), once per round
    on a configuration of its own; the winner holds its claim until every racer has its answer."""
    import random

    os.environ["MLFLOW_TRACKING_URI"] = uri
    from fedshard import tracking
    from fedshard.core.config import ExperimentConfig
    from fedshard.sweep import claiming
    from fedshard.sweep.planning import Task

    parent, experiment_id = tracking.start_sweep_run(experiment, f"racer-{os.getpid()}", {})
    for r in range(rounds):
        task = Task(ExperimentConfig(world_size=1, rounds=1, seed=r, precision="fp32"))
        barrier.wait(timeout=120)
        while isinstance(got := claiming.claim(task, experiment_id, parent, 1), claiming.Busy):
            time.sleep(random.uniform(0.5, 2.0))
        results.put((r, type(got).__name__, got.run_id if isinstance(got, claiming.Claimed) else got.run.run_id))
        barrier.wait(timeout=120)
        if isinstance(got, claiming.Claimed):
            tracking.claims.end(got.run_id, got.hand, "FINISHED")
    tracking.end_run(parent, "FINISHED")


def claim_race(uri: str, experiment: str, racers: int = 3, rounds: int = 5) -> list[tuple[int, str, str]]:
    """`racers` processes released by a barrier at the same instant claim one configuration, `rounds`
    times (a configuration each time): [(round, 'Claimed' or 'Held', the run they name)]."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: nothing of this process's MLflow state
    barrier, results = ctx.Barrier(racers), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(uri, experiment, rounds, barrier, results)) for _ in range(racers)]
    for p in procs:
        p.start()
    outcomes, deadline = [], time.monotonic() + 300
    try:
        while len(outcomes) < racers * rounds:
            with contextlib.suppress(queue.Empty):
                outcomes.append(results.get(timeout=1))
                continue
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not failed and time.monotonic() < deadline, f"racers exited with {failed}, or took too long"
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0, f"racer exited with {p.exitcode}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return outcomes
