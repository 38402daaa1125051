"""What both benchmark scripts need: timing, torch threads, a description of the machine, and
running a command, a `fedshard run` experiment or a sweep in a store of its own and reading the
experiment's figures back from MLflow.

Only public tools time things (time.perf_counter, torch.cuda.synchronize, psutil), so a reader can
check any figure with the same tools. A timing that is repeated takes the best of its repeats
(`best_of`; other processes on a shared machine only ever add time, the timeit convention); the
figures that are not repeated say so where they are described (bench.py's docstring).
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import unittest.mock
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil
import torch

# Downloading a run's log would otherwise draw a progress bar into the benchmark's own output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
REPO = Path(__file__).resolve().parents[1]
RUN_ID_LINE = re.compile(r"fedshard: run ([0-9a-f]{32})")
FIRST_STEP_LINE = re.compile(r"first training step at unix time ([0-9.]+)")
ROLES = ("metaserver", "aggregator", "trainer")
# How long a command stopped at its time limit may take to tear down before it is killed.
GRACE_SECONDS = 10.0


# ----------------------------------------------------------------------------- timing and threads


def say(message: str) -> None:
    """Progress on stderr, so that stdout carries only the figures."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cores() -> int:
    return len(os.sched_getaffinity(0))


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work: without it a timer stops when the kernels are launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn, repeats: int, warmup: int = 0) -> tuple[float, list[float]]:
    """(best, all) seconds of `repeats` calls of fn(), after `warmup` calls that are not timed."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), times


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- the machine


def utc_date() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def machine(device: torch.device) -> dict:
    """What a reader needs to judge the figures: hardware, versions, and the load at the start."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "date": utc_date(),
        "cpu": cpu,
        "cores": cores(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "load_average_1min_start": round(os.getloadavg()[0], 2),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


# ----------------------------------------------------------------------------- commands


@dataclass
class Finished:
    """A command that ended: its exit code (124 when killed at its time limit, as timeout(1)
    reports it), stdout then stderr, when it started (unix time), how long it ran and, when
    watched, how many seconds after the start each fedshard role's process was first seen."""

    code: int
    output: str
    started: float
    seconds: float
    spawned: dict[str, float] = field(default_factory=dict)


def _note_roles(pid: int, spawned: dict[str, float], started: float) -> None:
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                role = next((a for a in child.cmdline() if a in ROLES), None)
                if role and role not in spawned:
                    spawned[role] = time.time() - started


def _read_back(*files) -> str:
    parts = []
    for f in files:
        f.seek(0)
        parts.append(f.read())
    return b"".join(parts).decode(errors="replace")


def stop(proc: subprocess.Popen, grace: float) -> None:
    """End `proc` as a user would: SIGTERM (a fedshard launcher or sweep then tears its experiments
    down and marks them KILLED), SIGKILL after `grace` seconds, and then whatever it started that
    is still there, so that no process of it is left behind."""
    family = []
    with contextlib.suppress(psutil.Error):
        family = psutil.Process(proc.pid).children(recursive=True)
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
    for child in family:
        with contextlib.suppress(psutil.Error):
            child.kill()


def run_command(
    command: list[str], timeout: float, cwd=None, env=None, watch_roles: bool = False, grace: float = GRACE_SECONDS
) -> Finished:
    """Run `command` to its end, or stop it (`stop`) after `timeout` seconds. With `watch_roles`, its child
    processes are polled every 50 ms (0.5 s after the first 30 s) for the startup breakdown:
    psutil's create_time comes from the boot time in whole seconds, up to a second off."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started, start = time.time(), time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        spawned: dict[str, float] = {}
        while proc.poll() is None and time.perf_counter() - start < timeout:
            if watch_roles:
                _note_roles(proc.pid, spawned, started)
            time.sleep(0.05 if time.perf_counter() - start < 30 else 0.5)
        timed_out = proc.poll() is None
        if timed_out:
            stop(proc, grace)
        code = proc.wait()
        seconds = time.perf_counter() - start
        output = _read_back(out, err)
    if timed_out:
        code, output = 124, f"timed out after {timeout:.0f}s\n{output}"
    return Finished(code, output, started, seconds, spawned)


def store_uri(store: Path) -> str:
    return f"sqlite:///{store / 'mlflow.db'}"


def store_env(store: Path, **extra: str) -> dict[str, str]:
    """The environment of a child that tracks into its own SQLite store in `store`: without this
    process's MLFLOW_ settings, which would point it elsewhere, and unbuffered, so that its
    output is complete when it is killed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=store_uri(store), PYTHONUNBUFFERED="1", **extra)
    return env


# ----------------------------------------------------------------------------- experiments and sweeps


def fedshard_run(
    data_dir: Path,
    device: str,
    world_size: int,
    rounds: int,
    train_images: int,
    test_images: int,
    experiment: str,
    *extra: str,
) -> list[str]:
    """`fedshard run` as a user starts it."""
    return [
        sys.executable,
        "-m",
        "fedshard",
        "run",
        "--world-size",
        str(world_size),
        "--rounds",
        str(rounds),
        "--data-dir",
        str(data_dir),
        "--max-train-samples",
        str(train_images),
        "--max-test-samples",
        str(test_images),
        "--experiment-name",
        experiment,
        "--device",
        device,
        *extra,
    ]


def sweep(data_dir: Path, device: str, train_images: int, test_images: int, *axes: str) -> list[str]:
    """`sweep.py` over the grid `axes`, every experiment on `device` with these many images."""
    return [
        sys.executable,
        str(REPO / "sweep.py"),
        *axes,
        "-P",
        f"data_dir={data_dir}",
        "-P",
        f"max_train_samples={train_images}",
        "-P",
        f"max_test_samples={test_images}",
        "-P",
        f"device={device}",
        "--no-progress",
    ]


def read_run(output: str, uri: str, workdir: Path) -> dict:
    """What a finished `fedshard run` logged: its run id (from its output), the per-round metrics,
    and the unix time trainer 0 took its first training step (from its log, an artifact; None
    when the log has no such line)."""
    from mlflow.tracking import MlflowClient

    match = RUN_ID_LINE.search(output)
    if not match:
        raise RuntimeError(f"no run id in the output of fedshard run:\n{output[-3000:]}")
    run_id = match.group(1)
    client = MlflowClient(uri)

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    log = Path(client.download_artifacts(run_id, "logs/trainer_0.log", str(workdir)))
    first_step = FIRST_STEP_LINE.search(log.read_text())
    return {
        "run_id": run_id,
        "round_seconds": history("round_seconds"),
        "trainer_seconds": history("trainer_0/seconds"),
        "eval_seconds": history("eval_seconds"),
        "checkpoint_seconds": history("checkpoint_seconds"),
        "first_step": float(first_step.group(1)) if first_step else None,
    }


def open_store(store: Path) -> str:
    """Create the SQLite MLflow store in `store` now, as a user's exists before their runs: its
    one-time creation is not start-up. MLFLOW_TRACKING_URI points at it only meanwhile."""
    from fedshard import tracking

    with unittest.mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": store_uri(store)}):
        return tracking.ensure_store()


def run_experiment(
    data_dir: Path,
    store: Path,
    *,
    world_size: int,
    rounds: int,
    train_images: int,
    test_images: int,
    device: str,
    timeout: float,
    experiment: str,
    extra: tuple = (),
    partial: bool = False,
    **env: str,
) -> tuple[Finished, dict | None]:
    """The one way both benchmark scripts run and time an experiment: `fedshard run` as a user
    starts it, in `store` (an existing MLflow store, `open_store`). Returns how the command ended
    and, when it logged a run, what `read_run` reads with startup_seconds (from the command's
    start to trainer 0's first training step; None without one) and startup_breakdown (when
    each role's process was first seen). With `partial`, also what a run that did not finish (one
    stopped at `timeout`) logged before it ended, where its store can say."""
    open_store(store)
    command = fedshard_run(data_dir, device, world_size, rounds, train_images, test_images, experiment, *extra)
    done = run_command(command, timeout, cwd=store, env=store_env(store, **env), watch_roles=True)
    if not RUN_ID_LINE.search(done.output) or (done.code != 0 and not partial):
        return done, None
    from mlflow.exceptions import MlflowException

    try:
        run = read_run(done.output, store_uri(store), store)
    except (MlflowException, OSError):  # a stopped run may have left its log unwritten: nothing to read
        if done.code == 0:
            raise
        return done, None
    startup = run["first_step"] - done.started if run["first_step"] is not None else None
    in_order = sorted(done.spawned.items(), key=lambda kv: kv[1])
    return done, {
        **run,
        "startup_seconds": startup,
        "startup_breakdown": {f"{role}_spawned_s": s for role, s in in_order},
    }


def best_steady_round(seconds_by_round: dict[int, float]) -> float:
    """The best of rounds >= 2 (round 1 also pays the warm-ups): the best, not a median, as for
    every repeated timing here."""
    return min(s for r, s in seconds_by_round.items() if r >= 2)
