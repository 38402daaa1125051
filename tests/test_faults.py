"""Faults with real processes: whatever dies or hangs, the experiment ends within seconds, no
process is left (checked by pid and process group), and the run records why."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from helpers import Launcher, assert_gone, experiment_args, fedshard, fedshard_processes

pytestmark = pytest.mark.slow  # every test here starts processes


def run_info(run_id):
    run = MlflowClient().get_run(run_id)
    return run.info.status, run.data.tags.get("fedshard.failure_reason", "")


SLOW_ROUNDS = dict(world_size=2, rounds=20, max_train_samples=128)  # rounds of a few seconds each
ALL_UP = r"aggregator: trainer 1 joined"  # every process is up; round 1 is starting


def test_hung_trainer_times_out_the_round(tmp_path, data_dir, store):
    # short rounds (16 images per trainer) so that only the stopped trainer misses the deadline
    exp = Launcher(
        tmp_path,
        data_dir,
        world_size=2,
        rounds=20,
        max_train_samples=32,
        round_timeout=12,
        launcher_args=["--progress-every", "1"],
    )
    exp.wait_for(r"round 0/")  # in a round: every process group member is connected
    os.kill(exp.trainers[0], signal.SIGSTOP)  # alive, but never answers
    # the progress lines say so while the run still waits (a third of round_timeout on, here 4 s)
    silent = exp.wait_for(r"round \d+/20: .*; trainer 0 silent for (\d+)s", timeout=30)
    assert 4 <= int(silent.group(1)) < 12 and exp.proc.poll() is None
    elapsed = exp.finish(timeout=60)
    assert exp.proc.returncode == 1
    assert elapsed < 40, elapsed
    status, reason = run_info(exp.run_id)
    assert status == "FAILED"
    assert "trainer(s) [0] did not answer within round_timeout=12s" in reason, reason
    assert_gone(exp.children(), exp.run_id)


@pytest.mark.parametrize("victim", ["aggregator", "metaserver"])
def test_aggregator_or_metaserver_killed_fails_the_run(tmp_path, data_dir, store, victim):
    exp = Launcher(tmp_path, data_dir, **SLOW_ROUNDS)
    exp.wait_for(ALL_UP)
    if victim == "aggregator":
        pid = exp.aggregator
    else:
        pid = next(p.pid for p in fedshard_processes(" metaserver ") if p.ppid() == exp.proc.pid)
    os.kill(pid, signal.SIGKILL)
    elapsed = exp.finish()
    assert exp.proc.returncode == 1 and elapsed < 15
    status, reason = run_info(exp.run_id)
    assert status == "FAILED" and reason.startswith(f"{victim} died (killed by SIGKILL)"), reason
    assert_gone(exp.children() + [pid], exp.run_id)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_the_launcher_kills_the_run(tmp_path, data_dir, store, sig):
    exp = Launcher(tmp_path, data_dir, **SLOW_ROUNDS)
    exp.wait_for(ALL_UP)
    exp.proc.send_signal(sig)
    elapsed = exp.finish()
    assert exp.proc.returncode == 128 + sig and elapsed < 15
    status, reason = run_info(exp.run_id)
    assert status == "KILLED" and reason == f"interrupted by {sig.name}"
    assert_gone(exp.children(), exp.run_id)


def test_stray_trainer_with_the_wrong_secret_is_refused(tmp_path, data_dir, store):
    exp = Launcher(tmp_path, data_dir, world_size=1, rounds=2)
    exp.wait_for(r"aggregator: trainer 0 joined")
    address = re.search(r"metaserver (\S+),", "".join(exp.output)).group(1)
    env = dict(os.environ, FEDSHARD_SECRET="not-the-secret")
    stray = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedshard",
            "trainer",
            "--metaserver",
            address,
            "--run-id",
            exp.run_id,
            "--rank",
            "0",
            "--timeout",
            "20",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert stray.returncode == 1
    assert f"refused: the secret given does not match experiment {exp.run_id}" in stray.stderr
    exp.finish(timeout=300)
    assert exp.proc.returncode == 0
    assert run_info(exp.run_id)[0] == "FINISHED"


def metaservers(tmp_path) -> set[int]:
    """This test's metaservers: their work directory (the address file) is under its directory, so
    metaservers of other experiments on the machine do not count."""
    return {p.pid for p in fedshard_processes(str(tmp_path)) if "metaserver" in p.cmdline()}


def test_locked_store_is_a_clear_error_and_starts_no_experiment(tmp_path, data_dir, store):
    db = store.removeprefix("sqlite:///")
    lock = sqlite3.connect(db)
    lock.execute("BEGIN EXCLUSIVE")
    before = metaservers(tmp_path)
    try:
        result = fedshard("run", *experiment_args(data_dir, world_size=1, rounds=1), cwd=tmp_path)
    finally:
        lock.rollback()
        lock.close()
    assert result.returncode == 2
    assert f"cannot use the MLflow tracking store {store}: " in result.stderr and "locked" in result.stderr
    assert "aggregator pid" not in result.stdout
    assert metaservers(tmp_path) <= before  # the metaserver started alongside the store check is gone again


def test_unreachable_tracking_server_is_a_clear_error(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    before = metaservers(tmp_path)
    start = time.monotonic()
    result = fedshard("run", *experiment_args(data_dir, world_size=1, rounds=1), cwd=tmp_path)
    assert result.returncode == 2 and time.monotonic() - start < 30
    assert "cannot use the MLflow tracking store http://127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr
    assert metaservers(tmp_path) <= before


def test_sigterm_to_mlflow_run_tears_everything_down_and_kills_the_run(tmp_path, data_dir, store):
    """`mlflow run` dies on SIGTERM without telling its command; the launcher notices its parent
    is gone (PR_SET_PDEATHSIG), tears the experiment down and marks the run KILLED."""
    from helpers import REPO

    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    params = [
        f"data_dir={data_dir}",
        "world_size=2",
        "rounds=20",
        "max_train_samples=128",
        "max_test_samples=32",
        "batch_size=16",
        "local_epochs=1",
    ]
    proc = subprocess.Popen(
        [
            mlflow,
            "run",
            str(REPO),
            "--env-manager",
            "local",
            "--experiment-name",
            "mlterm",
            *[a for p in params for a in ("-P", p)],
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = MlflowClient()
    deadline = time.monotonic() + 180
    run_id, trainers = None, []
    while time.monotonic() < deadline and not (
        run_id and len(trainers) == 2 and client.get_metric_history(run_id, "test_accuracy")
    ):
        time.sleep(0.5)
        exp = client.get_experiment_by_name("mlterm")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        run_id = runs[0].info.run_id if runs else None
        trainers = [p.pid for p in fedshard_processes(f"--run-id {run_id}") if " trainer " in " ".join(p.cmdline())]
    assert run_id and len(trainers) == 2, "experiment did not start under mlflow run"
    children = [p.pid for p in fedshard_processes(f"--run-id {run_id}")]
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert_gone(children, run_id)
    end = time.monotonic() + 30
    while client.get_run(run_id).info.status == "RUNNING" and time.monotonic() < end:
        time.sleep(0.2)
    status, reason = run_info(run_id)
    assert status == "KILLED" and reason == "interrupted by SIGTERM"


def test_a_launcher_killed_outright_leaves_its_directory_and_the_next_one_removes_it(tmp_path, monkeypatch):
    import json
    import tempfile

    import psutil

    from fedshard.runtime import launcher

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(gone.pid).create_time()
    gone.wait()
    dirs = {name: tmp_path / f"fedshard-{name}" for name in ("killed", "alive", "reused", "making")}
    for d in dirs.values():
        d.mkdir()
        (d / "start.pt").write_bytes(b"x" * 1000)
    owners = {
        "killed": (gone.pid, started),
        "alive": (os.getpid(), psutil.Process().create_time()),
        "reused": (os.getpid(), psutil.Process().create_time() - 3600),
    }  # this pid, an older process
    for name, (pid, when) in owners.items():
        (dirs[name] / "owner.json").write_text(json.dumps({"pid": pid, "started": when}))
    mine = launcher.make_workdir()
    # "making": no owner file yet (a launcher between mkdtemp and writing it): left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, "fedshard-alive", "fedshard-making"])
    assert json.loads((mine / "owner.json").read_text())["pid"] == os.getpid()
