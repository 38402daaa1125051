"""sweep.py: the grid (pure), skip-finished (canonical comparison), and small real sweeps through
real `fedshard run` processes and a real MLflow store: nesting, re-runs, Ctrl-C, failures."""

from __future__ import annotations

import itertools
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import pandas as pd
import psutil
import pytest
from click.testing import CliRunner
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from fedshard import cli, tracking
from fedshard.core import precision
from fedshard.core.config import ExperimentConfig, field_names
from fedshard.sweep import Job, Sweep, child_command, cpus_per_experiment, executors, pick_gpu, visible_gpus
from fedshard.sweep.grid import NAMED_AXES, expand, make_grid
from fedshard.sweep.planning import plan
from helpers import REPO, claim_race, fedshard, fedshard_processes

SWEEP = str(REPO / "sweep.py")


# --------------------------------------------------------------------------- the grid (pure)


def test_child_command_forwards_every_parameter_to_fedshard_run():
    cfg = ExperimentConfig(
        world_size=3,
        learning_rate=1e-5,
        rounds=4,
        seed=9,
        init_from="",
        precision="fp32",
        data_dir="/some where/data",
        partition="dirichlet",
        dirichlet_alpha=0.25,
    )
    argv = child_command(cfg)
    assert argv[:4] == [sys.executable, "-m", "fedshard", "run"]
    ctx = cli.run.make_context("run", argv[4:])
    values = {k: v for k, v in ctx.params.items() if k in field_names()}
    assert ExperimentConfig.from_mapping(values) == cfg
    assert len(values) == len(field_names())


def test_parallel_experiments_share_cores_and_spread_over_gpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("FEDSHARD_CPUS", raising=False)
    assert [cpus_per_experiment(n) for n in (1, 2, 3, 16, 40)] == [16, 8, 5, 1, 1]
    monkeypatch.setenv("FEDSHARD_CPUS", "4")  # a sweep given 4 of the cores
    assert [cpus_per_experiment(n) for n in (1, 2, 3)] == [4, 2, 1]
    assert pick_gpu([], []) is None and pick_gpu(["0"], ["0"]) is None  # one GPU or none: left alone
    gpus, running = ["0", "1", "2"], []
    for _ in range(4):
        running.append(pick_gpu(gpus, running))
    assert running == ["0", "1", "2", "0"]
    assert pick_gpu(gpus, ["0", "2", "0"]) == "1"  # the least busy, when experiments end out of order
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert visible_gpus() == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


# --------------------------------------------------------------------------- skip finished (no processes)


_ids = itertools.count()


def record(status="FINISHED", tags=None, **params):
    return tracking.RunRecord(f"run{next(_ids)}-{status}", "1", status, 0, params, tags or {})


def test_only_finished_runs_are_skipped_comparing_canonical_values():
    configs = expand(
        make_grid({"world_sizes": "1,2", "learning_rates": "1e-5,1e-3", "swap": "true", "rounds": "3", "seeds": "1"})
    )
    assert len(configs) == 4
    base = {"rounds": "3", "seed": "1"}
    runs = [
        # as `mlflow run -P learning_rate=0.00001 -P enable_swapping=True` would log them
        record(world_size="1", learning_rate="0.00001", enable_swapping="True", **base),
        record(world_size="2", learning_rate="0.001", enable_swapping="true", data_dir="'./data'", **base),
        record("FAILED", world_size="2", learning_rate="1e-05", enable_swapping="true", **base),
        record("KILLED", world_size="1", learning_rate="1e-3", enable_swapping="false", **base),
        # a sweep's parent run and a run with another setting do not count
        record(tags={"fedshard.sweep": "true"}, rounds="3"),
        record(world_size="1", learning_rate="1e-3", enable_swapping="false", batch_size="16", **base),
    ]
    work = plan(configs, runs)
    assert [t.cfg.key() for t in work.tasks] == [(1, 1e-3, False, 3, 1), (2, 1e-5, True, 3, 1)]
    assert all(t.start == 0 for t in work.tasks)  # no checkpoint, no shorter twin: from round 0
    assert [(c.key(), run_id) for c, run_id in work.skipped] == [
        ((1, 1e-5, False, 3, 1), runs[0].run_id),
        ((2, 1e-3, True, 3, 1), runs[1].run_id),
    ]


# --------------------------------------------------------------------------- CLI without processes


def fake_finished_run(experiment: str, **params) -> str:
    client = MlflowClient()
    exp_id = tracking.experiment_id(experiment)
    run_id = client.create_run(exp_id).info.run_id
    for k, v in params.items():
        client.log_param(run_id, k, v)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def all_runs(experiment: str):
    exp = MlflowClient().get_experiment_by_name(experiment)
    return [] if exp is None else MlflowClient().search_runs([exp.experiment_id])


def test_dry_run_prints_what_would_run_and_what_is_skipped_and_runs_nothing(tmp_path, store, monkeypatch):
    monkeypatch.chdir(tmp_path)
    key = dict(world_size="1", learning_rate="0.00001", enable_swapping="false")
    done = fake_finished_run("dry", **key, rounds="30", seed="123", precision="fp32")
    # Recorded before fedshard recorded its precision: on device=cpu it computed in fp32 whatever amp
    # said, so it counts; on device=auto which precision it used cannot be known, so it never does.
    legacy_cpu = fake_finished_run("dry", **key, rounds="30", seed="456", amp="true", device="cpu")
    fake_finished_run("dry", **key, rounds="50", seed="123", amp="true", device="auto")
    result = CliRunner().invoke(cli.main, ["sweep", "--dry-run", "-P", "precision=fp32", "--experiment-name", "dry"])
    assert result.exit_code == 0, result.output
    assert "Total experiments to run: 52 (2 already finished)" in result.output
    assert "Would run 1/52: world_size=1, lr=1e-05, swap=False, rounds=30, seed=789" in result.output
    assert (
        "Would run 2/52: world_size=1, lr=1e-05, swap=False, rounds=50, seed=123 (extend FINISHED run "
        f"{done} from round 30: 20 rounds to train)"
    ) in result.output
    assert "Would run 52/52: world_size=2, lr=0.001, swap=True, rounds=50, seed=789" in result.output
    assert f"Skip (FINISHED run {done}): world_size=1, lr=1e-05, swap=False, rounds=30, seed=123" in result.output
    assert f"Skip (FINISHED run {legacy_cpu}): world_size=1, lr=1e-05, swap=False, rounds=30, seed=456" in result.output
    assert len(all_runs("dry")) == 3  # a dry run creates nothing


@pytest.mark.parametrize(
    "args, message",
    [
        (["-P", "dataset=/data"], "unknown experiment parameter 'dataset'; valid:"),
        (["--seeds", "1,-2"], "seed=-2: must be an integer >= 0"),
        (["--swap", "maybe"], "enable_swapping='maybe': must be true or false"),
        (["--parallel", "0"], "0 is not in the range x>=1"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message_and_creates_no_run(tmp_path, store, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.main, ["sweep", *args, "--experiment-name", "bad-input"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert MlflowClient().get_experiment_by_name("bad-input") is None


def test_bf16_where_this_cpu_cannot_is_refused_before_any_run(tmp_path, data_dir, store, monkeypatch):
    """Not one refused launcher per configuration (each retried): the sweep refuses, and creates nothing."""
    monkeypatch.setenv(precision.OVERRIDE, "0")  # this CPU computes no bf16 natively
    result = CliRunner().invoke(
        cli.main,
        [
            "sweep",
            "--world-sizes",
            "1",
            "--learning-rates",
            "1e-4",
            "--swap",
            "false",
            "--rounds",
            "1",
            "--seeds",
            "1",
            "--axis",
            "precision=fp32,bf16",
            "-P",
            "device=cpu",
            "-P",
            f"data_dir={data_dir}",
            "-P",
            "max_train_samples=16",
            "-P",
            "max_test_samples=16",
            "--experiment-name",
            "bf16",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "precision=bf16: this CPU does not compute bf16 natively" in result.output
    assert "Traceback" not in result.output
    assert MlflowClient().get_experiment_by_name("bf16") is None


def test_mlproject_entry_points_forward_their_parameters():
    from mlflow.projects._project_spec import load_project

    project = load_project(str(REPO))
    assert set(project._entry_points) >= {"main", "sweep", "export", "analyze"}
    for name in ("sweep", "export", "analyze"):
        entry = project.get_entry_point(name)
        for param in entry.parameters:
            assert "{" + param + "}" in entry.command, (name, param)

    def parse(name, params):
        argv = shlex.split(project.get_entry_point(name).compute_command(params, None))
        assert argv[:2] == ["fedshard", name]
        return getattr(cli, name).make_context(name, argv[2:]).params

    sweep = parse(
        "sweep",
        {
            "params": "data_dir=/d max_train_samples=5",
            "rounds": "2",
            "parallel": 2,
            "axes": "strategy=tensor_parallel,fedavg partition=iid,dirichlet",
        },
    )
    grid = make_grid(
        {a: sweep[a] for a in NAMED_AXES},
        shlex.split(sweep["params_text"]),
        sweep["grid_file"] or None,
        shlex.split(sweep["axes_text"]),
        empty_is_default=sweep["empty_is_default"],
    )
    assert grid.axes["rounds"] == ["2"] and grid.axes["world_size"] == ["1", "2"]
    assert grid.axes["strategy"] == ["tensor_parallel", "fedavg"] and grid.axes["partition"] == ["iid", "dirichlet"]
    assert grid.fixed == {"data_dir": "/d", "max_train_samples": "5"} and sweep["parallel"] == 2
    assert parse("export", {"format": "csv", "where": "strategy=fedavg"}) == {
        "experiment_name": "",
        "output": "experiment_results.pkl",
        "fmt": "csv",
        "key_format": "5",
        "where": ("strategy=fedavg",),
    }
    assert parse("export", {"key_format": "6"})["key_format"] == "6"
    analyze = parse("analyze", {"no_plots": "true", "top": 3, "target": "0.3,0.5"})
    assert analyze == {
        "results_files": ("experiment_results.pkl",),
        "labels": (),
        "no_plots": True,
        "output_dir": "plots",
        "top": 3,
        "target": ("0.3,0.5",),
    }


# --------------------------------------------------------------------------- real sweeps


def tiny(data_dir, train=16) -> list[str]:
    return [
        "-P",
        f"data_dir={data_dir}",
        "-P",
        "precision=fp32",
        "-P",
        f"max_train_samples={train}",
        "-P",
        "max_test_samples=16",
        "-P",
        "batch_size=16",
        "-P",
        "local_epochs=1",
    ]


def sweep_env(tmp_path) -> dict:
    # Temporary files (sweep logs, launcher work directories) go under the test's directory,
    # so every process of this test has the test's path on its command line.
    return dict(os.environ, TMPDIR=str(tmp_path))


def run_sweep(tmp_path, *args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SWEEP, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=sweep_env(tmp_path),
    )


def split_runs(experiment: str):
    runs = all_runs(experiment)
    parents = [r for r in runs if r.data.tags.get("fedshard.sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("fedshard.sweep") != "true"]
    return parents, children


def linked_data(tmp_path, data_dir):
    link = tmp_path / "data"
    link.symlink_to(data_dir, target_is_directory=True)
    return link


@pytest.mark.slow
def test_small_grid_runs_in_parallel_nested_then_skips_then_exports(tmp_path, data_dir, store):
    """A sweep of two configurations, run two at a time; the same sweep started 3 s later with --wait
    trains nothing (each configuration is claimed by the first), says where each runs and waits for
    their results; run again, nothing is left to run; the export has each configuration once."""
    grid = [
        "--world-sizes",
        "1",
        "--swap",
        "false,true",
        "--rounds",
        "1",
        "--seeds",
        "123",
        *tiny(linked_data(tmp_path, data_dir)),
        "--experiment-name",
        "grid",
    ]
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, SWEEP, *grid, "--learning-rates", "1e-4,1e-3", "--parallel", "2"],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=sweep_env(tmp_path),
        )
    try:
        time.sleep(3)
        wait_for_claims("grid", 2, proc, (tmp_path / "first.log"))  # the first sweep holds both configurations
        waiting = run_sweep(tmp_path, *grid, "--learning-rates", "1e-4,1e-3", "--wait")
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = (tmp_path / "first.log").read_text()
    assert proc.returncode == 0, out
    assert_the_waiting_sweep_reported_the_first_ones_results(waiting, out)
    assert "Total experiments to run: 2 (0 already finished)" in out
    assert "=== Running experiment 1/2 ===" in out and "=== Running experiment 2/2 ===" in out
    assert "Starting experiment: world_size=1, lr=0.0001, swap=False, rounds=1, seed=123" in out
    assert "Experiment completed successfully: (1, 0.0001, False, 1, 123)" in out
    assert "Experiment completed successfully: (1, 0.001, False, 1, 123)" in out
    assert "Finished: 2\nFailed: 0\n" in out and "Skipped (already finished): 0" in out

    parents, children = split_runs("grid")
    (parent,) = [r for r in parents if f"Sweep run {r.info.run_id} " in out]
    assert {r.info.status for r in parents} == {"FINISHED"}
    assert len(children) == 2, [(r.info.run_name, r.info.status, r.data.tags, r.data.params) for r in children]
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["max_train_samples"] == "16"
    a, b = children  # the two experiments ran at the same time
    assert a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time
    assert_sweep_run_worth_opening(parent, out)

    # Again, the learning rates spelled differently: nothing left to run, no new run.
    second = run_sweep(tmp_path, *grid, "--learning-rates", "0.00010,1E-3")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Total experiments to run: 0 (2 already finished)" in second.stdout
    assert len(all_runs("grid")) == 4  # the two sweeps' runs and the two experiments: withdrawn claims are deleted

    exported = fedshard("export", "--experiment-name", "grid", "--output", "results.pkl", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    results = pickle.loads((tmp_path / "results.pkl").read_bytes())
    assert set(results) == {(1, 0.0001, False, 1, 123), (1, 0.001, False, 1, 123)}
    for key, entries in results.items():
        assert [type(v) for v in key] == [int, float, bool, int, int]
        assert [r for r, _, _ in entries] == [0, 1]
        assert all([type(v) for v in e] == [int, float, float] for e in entries)
        (run,) = [r for r in children if float(r.data.params["learning_rate"]) == key[1]]
        assert entries[-1][2] == run.data.metrics["test_accuracy"]
        assert entries[-1][1] == run.data.metrics["test_loss"]


def wait_for_claims(experiment: str, n: int, proc, log, timeout: float = 120) -> None:
    """Until `n` experiment runs of the experiment are held claims (tracking/claims.py)."""
    deadline = time.monotonic() + timeout
    while len([r for r in (all_runs(experiment)) if r.data.tags.get("fedshard.claim.state") == "held"]) < n:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def assert_the_waiting_sweep_reported_the_first_ones_results(waiting, first_out):
    """The sweep started 3 s after the first: each configuration runs elsewhere (the first sweep's
    run, host and launcher or sweep pid), it waits, and counts their results as its own."""
    out = waiting.stdout
    assert waiting.returncode == 0, out + waiting.stderr
    assert (
        "Note: 2 of them are running elsewhere now (claimed by another sweep or machine); this sweep waits "
        "for them (--wait)" in out
    )
    for lr in ("0.0001", "0.001"):
        held = re.search(
            rf"Experiment running elsewhere: \(1, {lr}, False, 1, 123\) \(run ([0-9a-f]{{32}}), pid \d+ "
            rf"on {re.escape(tracking.host())}, heartbeat \d+s ago\); waiting for it",
            out,
        )
        assert held, out
        assert f"MLflow run {held.group(1)}" in first_out  # the first sweep's experiment
        assert f"Experiment completed elsewhere: (1, {lr}, False, 1, 123) (run {held.group(1)})" in out
    assert "Experiment completed successfully" not in out and "=== Running experiment" not in out
    assert "Finished: 2\nFailed: 0\n" in out


def assert_sweep_run_worth_opening(parent, out):
    """The sweep's run carries its grid as params, its counters as they grew, the analysis of its
    experiments (table, ranking, plots) and a description naming the best configuration; the
    console showed each experiment's rounds as they came."""
    client, run_id = MlflowClient(), parent.info.run_id
    params = parent.data.params
    assert params["grid.world_sizes"] == "1" and params["grid.learning_rates"] == "1e-4,1e-3"
    assert params["grid.swap"] == "false,true" and params["grid.rounds"] == "1" and params["grid.seeds"] == "123"
    assert params["fixed.max_train_samples"] == "16" and params["sweep.parallel"] == "2"
    assert params["sweep.rounds_to_train"] == "2"
    finished = [m.value for m in client.get_metric_history(run_id, "sweep/finished")]
    running = [m.value for m in client.get_metric_history(run_id, "sweep/running")]
    assert finished[0] == 0 and finished[-1] == 2 and max(running) == 2  # logged while it ran
    assert client.get_metric_history(run_id, "sweep/rounds_done")[-1].value == 2
    artifacts = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(run_id, "analysis")}
    assert {"summary.json", "ranking.txt", "report.md", "comparisons.csv", "targets.csv"} <= artifacts
    assert {
        "learning_curves.png",
        "accuracy_vs_lr.png",
        "best_accuracy_vs_rounds.png",
        "accuracy_vs_bytes.png",
    } <= artifacts  # the plots, beside the report that names them
    table = client.load_table(parent.info.experiment_id, "analysis/summary.json", run_ids=[run_id])
    assert sorted(table["learning_rate"]) == [1e-4, 1e-3] and list(table["n"]) == [1, 1]
    ranking = client.download_artifacts(run_id, "analysis/ranking.txt")
    best = open(ranking).read().splitlines()[1].split(". ", 1)[1]
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("fedshard sweep over world_sizes=1 (1) x learning_rates=1e-4,1e-3 (2)")
    assert note.endswith(f"Best configuration: {best}.")
    assert re.search(r"  \[[12]/2\] round 1/1: test_accuracy=0\.\d{4} \(run [0-9a-f]{8}\)", out), out


@pytest.mark.slow
def test_sigint_stops_everything_and_the_next_sweep_finishes_the_rest(tmp_path, data_dir, store):
    data = linked_data(tmp_path, data_dir)
    grid = [
        "--world-sizes",
        "1",
        "--learning-rates",
        "1e-4",
        "--rounds",
        "1",
        "--seeds",
        "1,2,3",
        *tiny(data),
        "--experiment-name",
        "sig",
    ]
    # Seed 1 finished earlier (logged as `mlflow run -P learning_rate=0.00010` would): skipped, never touched.
    earlier = ExperimentConfig(
        world_size=1,
        learning_rate=1e-4,
        rounds=1,
        seed=1,
        data_dir=str(data),
        max_train_samples=16,
        max_test_samples=16,
        batch_size=16,
        local_epochs=1,
        precision="fp32",
    )
    done = fake_finished_run("sig", **{**earlier.params(), "learning_rate": "0.00010"})
    before = MlflowClient().get_run(done).info

    log = (tmp_path / "sweep.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, SWEEP, *grid, "--parallel", "1"],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=sweep_env(tmp_path),
    )
    try:
        # Wait until the first experiment's processes (metaserver, aggregator, trainer) are up.
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "sweep.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "sweep.log").read_text()
            _, children = split_runs("sig")
            running = [r for r in children if r.info.status == "RUNNING"]
            if running and len(fedshard_processes(running[0].info.run_id)) >= 2:
                break
            time.sleep(0.1)
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len(family) >= 3  # fedshard run, and the processes it started
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=45)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = (tmp_path / "sweep.log").read_text()
    assert code == 128 + signal.SIGINT, out
    _, alive = psutil.wait_procs(family, timeout=5)
    assert alive == []
    assert fedshard_processes(str(tmp_path)) == []

    (parent,), children = split_runs("sig")
    assert parent.info.status == "KILLED"
    (killed,) = [r for r in children if r.info.run_id != done]  # the third configuration never started
    assert killed.info.status == "KILLED" and killed.data.params["seed"] == "2"
    assert "interrupted by SIG" in killed.data.tags["fedshard.failure_reason"]
    assert "Total experiments to run: 2 (1 already finished)" in out
    assert "Interrupted: 1 (marked KILLED)" in out and "Not started: 1" in out

    again = run_sweep(tmp_path, *grid, "--parallel", "2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Total experiments to run: 2 (1 already finished)" in again.stdout
    _, children = split_runs("sig")
    assert sorted(int(r.data.params["seed"]) for r in children if r.info.status == "FINISHED") == [1, 2, 3]
    assert not [r for r in all_runs("sig") if r.info.status == "RUNNING"]
    after = MlflowClient().get_run(done).info
    assert (after.status, after.end_time) == ("FINISHED", before.end_time)  # a finished run is never touched


@pytest.mark.slow
def test_a_refused_configuration_is_reported_with_reason_and_run_id_and_not_retried(tmp_path, data_dir, store):
    # Four trainers cannot share three training images: the launcher refuses the input (exit 2), and
    # another attempt would be refused the same way. (Retrying: test_a_refused_experiment_is_not_retried...)
    result = run_sweep(
        tmp_path,
        "--world-sizes",
        "4",
        "--learning-rates",
        "1e-4",
        "--swap",
        "false",
        "--rounds",
        "1",
        "--seeds",
        "123",
        *tiny(data_dir, train=3),
        "--max-retries",
        "1",
        "--experiment-name",
        "failing",
    )
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    (parent,), children = split_runs("failing")
    assert parent.info.status == "FAILED"
    assert len(children) == 1  # the first attempt, no retry
    for run in children:
        assert run.info.status == "FAILED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert "cannot split N=3 samples into n=4" in run.data.tags["fedshard.failure_reason"]
    assert "=== Retrying experiment" not in out and "will retry" not in out
    last = max(children, key=lambda r: r.info.start_time).info.run_id
    assert "Finished: 0\nFailed: 1\n" in out
    summary = out.split("=== Sweep summary ===")[1]
    assert "(4, 0.0001, False, 1, 123): " in summary and "cannot split N=3 samples" in summary
    assert f"(run {last}, 1 attempt(s))" in summary


# --------------------------------------------------------------------------- scheduling, with stand-in launchers


def started_sweep(tmp_path, experiments: int, lines: list) -> Sweep:
    """A sweep of `experiments` configurations with its parent run made and no job started or pending."""
    configs = [ExperimentConfig(world_size=1, rounds=3, seed=s, precision="fp32") for s in range(experiments)]
    sweep = Sweep(plan(configs, []), "scheduling", echo=lines.append, show_progress=False)
    sweep.logs = tmp_path
    sweep.parent_run_id, sweep.experiment_id = sweep.report.start_parent_run()
    sweep.pending.clear()
    return sweep


def launched(sweep: Sweep, index: int, code: str) -> Job:
    """Job `index` with its child run, its launcher a Python process running `code`."""
    job = Job(sweep.plan.tasks[index], index + 1)
    job.run_id = tracking.create_child_run(job.cfg, sweep.experiment_id, sweep.parent_run_id)
    job.log = sweep.logs / f"{index}.log"
    job.handle = executors.LocalProcess([sys.executable, "-c", code], dict(os.environ), job.log)
    return job


def test_a_refused_experiment_is_not_retried_a_failed_one_is(tmp_path, store):
    lines = []
    sweep = started_sweep(tmp_path, 2, lines)  # --max-retries 1
    refused = launched(sweep, 0, "import sys; sys.exit(2)")
    crashed = launched(sweep, 1, "import sys; print('trainer 0 died'); sys.exit(1)")
    for job in (refused, crashed):
        job.handle.wait(60)
        sweep._finish(job)
    assert [(o.run_id, o.reason) for o in sweep.failed] == [(refused.run_id, "exited with code 2")]
    assert [(j.index, j.attempt) for j in sweep.pending] == [(2, 2)]  # the crashed one, a second time
    assert tracking.run_status(refused.run_id) == tracking.run_status(crashed.run_id) == "FAILED"
    assert (
        f"Experiment failed: (1, 0.001, False, 3, 1): exited with code 1: trainer 0 died (run {crashed.run_id}); "
        "will retry, from round 0 (1/2 attempts used)" in lines
    )


def test_an_experiment_that_ended_while_the_sweep_stopped_counts_as_it_ended(tmp_path, store):
    """A signal came; meanwhile one launcher had finished its run and one had failed it: only the one
    still running is stopped and counted Interrupted."""
    lines = []
    sweep = started_sweep(tmp_path, 3, lines)
    done, failed = launched(sweep, 0, "pass"), launched(sweep, 1, "import sys; sys.exit(1)")
    busy = launched(sweep, 2, "import time; time.sleep(120)")
    for job, status in ((done, "FINISHED"), (failed, "FAILED")):
        job.handle.wait(60)
        tracking.end_run(job.run_id, status, "round 1 timed out" if status == "FAILED" else None)
    sweep.running, sweep.stop_signal = [done, failed, busy], signal.SIGINT
    sweep._stop_all(None)
    assert [o.run_id for o in sweep.finished] == [done.run_id]
    assert [o.run_id for o in sweep.failed] == [failed.run_id] and not sweep.pending  # stopping: no retry
    assert [o.run_id for o in sweep.killed] == [busy.run_id]
    assert [tracking.run_status(j.run_id) for j in (done, failed, busy)] == ["FINISHED", "FAILED", "KILLED"]
    assert tracking.run_record(busy.run_id).tags[tracking.FAILURE_TAG] == "sweep interrupted by SIGINT"
    assert "Sweep interrupted by SIGINT: stopping 3 running experiment(s)..." in lines
    assert [line for line in lines if line.startswith("Experiment stopped")] == [
        f"Experiment stopped: (1, 0.001, False, 3, 2) (run {busy.run_id} KILLED)"
    ]
    assert "Experiment completed successfully: (1, 0.001, False, 3, 0)" in " ".join(lines)


def test_an_error_that_coincides_with_a_signal_is_what_the_sweep_says(tmp_path, store):
    lines = []
    sweep = started_sweep(tmp_path, 1, lines)
    busy = launched(sweep, 0, "import time; time.sleep(120)")
    sweep.running, sweep.stop_signal = [busy], signal.SIGINT
    error = OSError(28, "No space left on device")
    sweep._stop_all(error)
    assert "Sweep failed: OSError: [Errno 28] No space left on device: stopping 1 running experiment(s)..." in lines
    assert (
        tracking.run_record(busy.run_id).tags[tracking.FAILURE_TAG]
        == "sweep failed: OSError: [Errno 28] No space left on device"
    )
    assert sweep._end_reason(error) == "OSError: [Errno 28] No space left on device"  # the parent run's reason


def test_a_sweep_that_cannot_start_leaves_no_log_directory(tmp_path, store, monkeypatch):
    # Its parent run would be the one `mlflow run` made, which has already ended: refused.
    ended = MlflowClient().create_run(tracking.experiment_id("scheduling")).info.run_id
    MlflowClient().set_terminated(ended, "FINISHED")
    monkeypatch.setenv("MLFLOW_RUN_ID", ended)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    sweep = Sweep(plan([ExperimentConfig(rounds=1, precision="fp32")], []), "scheduling", echo=print)
    with pytest.raises(tracking.TrackingError, match="not RUNNING"):
        sweep.run()
    assert list(tmp_path.glob("fedshard-sweep-*")) == []


# The layer table of docs/experiments.md, written out here independently of fedshard.model: (out, in, kernel) and the
# dimension a layer is split along (0: its outputs and bias; 1: its inputs, the bias kept whole).
LAYERS = {
    "conv1": (96, 3, 5, 0),
    "conv2": (256, 96, 5, 1),
    "conv3": (384, 256, 3, 0),
    "conv4": (384, 384, 3, 1),
    "conv5": (256, 384, 3, 0),
    "conv6": (256, 256, 3, 1),
    "fc1": (4096, 4096, 1, 0),
    "fc2": (4096, 4096, 1, 1),
    "fc3": (4096, 4096, 1, 0),
    "fc4": (100, 4096, 1, 1),
}


def slice_numel(n: int) -> int:
    """Parameters of one of n even slices: a split dimension divided by n, a whole-kept bias not."""
    total = 0
    for out, inp, k, dim in LAYERS.values():
        total += (out // n if dim == 0 else out) * (inp // n if dim == 1 else inp) * k * k
        total += out // n if dim == 0 else out
    return total


@pytest.mark.slow
def test_any_setting_is_an_axis_results_never_mix_and_bytes_are_counted(tmp_path, data_dir, store):
    """A baseline next to the method in one sweep: both run, the pickle refuses to mix them (its key has
    no strategy), --where selects, the CSV keeps them all; each round's bytes are those of the tensors
    sent (FedProx's trainers are told their proximal_mu too, one float64 a round). FedProx is FedAvg
    plus that record (tests/test_fedprox.py); FedAvg's own real runs are in tests/test_experiment.py."""
    grid = [
        "--world-sizes",
        "2",
        "--learning-rates",
        "1e-3",
        "--swap",
        "false",
        "--rounds",
        "1",
        "--seeds",
        "123",
        "--axis",
        "strategy=tensor_parallel,fedprox",
        *tiny(linked_data(tmp_path, data_dir)),
        "--experiment-name",
        "mix",
    ]
    first = run_sweep(tmp_path, *grid, "--parallel", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    assert (
        "Starting experiment: world_size=2, lr=0.001, swap=False, rounds=1, seed=123, strategy=fedprox" in first.stdout
    )
    assert "Experiment completed successfully: (2, 0.001, False, 1, 123) strategy=fedprox" in first.stdout
    (parent,), children = split_runs("mix")
    runs = {r.data.params["strategy"]: r for r in children}
    assert set(runs) == {"tensor_parallel", "fedprox"} and {r.info.status for r in children} == {"FINISHED"}
    assert runs["fedprox"].data.params["proximal_mu"] == "0.01" == runs["tensor_parallel"].data.params["proximal_mu"]
    assert runs["fedprox"].info.run_name == "ws2-lr0.001-swapfalse-r1-s123-ep1-bs16-fedprox-train16-test16"
    assert runs["tensor_parallel"].info.run_name == "ws2-lr0.001-swapfalse-r1-s123-ep1-bs16-train16-test16"
    assert parent.data.params["grid.strategy"] == "tensor_parallel,fedprox"

    # Bytes: what the aggregator sent and received, against the tensors' sizes from the layer table
    # (float32 weights, plus a 3 x int64 header down and 4 x float64 numbers up per trainer).
    client = MlflowClient()
    sent = {}
    for strategy, n, settings in (("tensor_parallel", 2, 0), ("fedprox", 1, 8)):
        run = client.get_run(runs[strategy].info.run_id)
        weights = 4 * slice_numel(n)
        for k in range(2):
            assert run.data.metrics[f"trainer_{k}/bytes_down"] == weights + 24 + settings
            assert run.data.metrics[f"trainer_{k}/bytes_up"] == weights + 32
        assert run.data.metrics["comm/bytes_down"] == 2 * (weights + 24 + settings)
        assert run.data.metrics["comm/bytes_up"] == 2 * (weights + 32)
        sent[strategy] = run.data.metrics["comm/bytes_total"]
        assert sent[strategy] == 4 * weights + 112 + 2 * settings
        assert run.data.params["model.params_per_trainer"] == str(slice_numel(n))
        assert run.data.params["model.params_full"] == str(slice_numel(1))
    assert 0.5 < sent["tensor_parallel"] / sent["fedprox"] < 0.51  # half, and the biases kept whole on each slice

    # The pickle's key cannot tell the two apart: refused, naming the setting, nothing written.
    refused = fedshard("export", "--experiment-name", "mix", "--output", "r.pkl", cwd=tmp_path)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "differ in strategy (fedprox, tensor_parallel)" in refused.stderr
    assert "--where strategy=fedprox" in refused.stderr and "--format csv" in refused.stderr
    assert not (tmp_path / "r.pkl").exists()
    only = fedshard(
        "export", "--experiment-name", "mix", "--output", "r.pkl", "--where", "strategy=fedprox", cwd=tmp_path
    )
    assert only.returncode == 0, only.stderr
    results = pickle.loads((tmp_path / "r.pkl").read_bytes())
    assert list(results) == [(2, 0.001, False, 1, 123)]
    assert results[(2, 0.001, False, 1, 123)][-1][2] == runs["fedprox"].data.metrics["test_accuracy"]
    both = fedshard("export", "--experiment-name", "mix", "--format", "csv", "--output", "r.csv", cwd=tmp_path)
    assert both.returncode == 0, both.stderr
    table = pd.read_csv(tmp_path / "r.csv")
    assert sorted(set(table["strategy"])) == ["fedprox", "tensor_parallel"] and len(table) == 4
    at_1 = table[table["round"] == 1].set_index("strategy")["bytes_total"]
    assert at_1.to_dict() == sent

    # The sweep's run compares them: one row per metric, strategy fedprox -> tensor_parallel, one seed.
    comparisons = pd.read_csv(client.download_artifacts(parent.info.run_id, "analysis/comparisons.csv"))
    row = comparisons[
        (comparisons["setting"] == "strategy")
        & (comparisons["metric"] == "final_accuracy")
        & (comparisons["value_b"] == "tensor_parallel")
        & (comparisons["value_a"] == "fedprox")
    ]
    assert (row["value_a"].item(), row["value_b"].item(), row["n"].item()) == ("fedprox", "tensor_parallel", 1)
    accs = {s: r.data.metrics["test_accuracy"] for s, r in runs.items()}
    assert row["mean_difference"].item() == pytest.approx(accs["tensor_parallel"] - accs["fedprox"])
    assert pd.isna(row["ci_low"].item())  # one seed: no interval

    again = run_sweep(tmp_path, *grid)
    assert again.returncode == 0 and "Total experiments to run: 0 (2 already finished)" in again.stdout


# --------------------------------------------------------------------------- two sweeps at once (claims)


@pytest.mark.slow
def test_sweeps_released_at_the_same_instant_claim_each_configuration_once(store):
    """Three processes claim one configuration at the same instant, with the sweep's own code, five times
    over: exactly one wins each time, the others are told who holds it, and every losing claim is
    withdrawn: no run of theirs is left FINISHED, FAILED or RUNNING, nor seen by export or a sweep."""
    outcomes = claim_race(store, "race", racers=3, rounds=5)
    for r in range(5):
        (winner,) = [run for rnd, kind, run in outcomes if rnd == r and kind == "Claimed"]
        assert sorted((kind, run) for rnd, kind, run in outcomes if rnd == r) == [
            ("Claimed", winner),
            ("Held", winner),
            ("Held", winner),
        ]
    exp_id = tracking.experiment_id("race")
    runs = MlflowClient().search_runs([exp_id], run_view_type=ViewType.ALL)
    experiments = [r for r in runs if r.data.tags.get("fedshard.sweep") != "true"]
    kept = [r for r in experiments if r.info.lifecycle_stage == "active"]
    assert sorted(r.info.run_id for r in kept) == sorted(run for _, kind, run in outcomes if kind == "Claimed")
    assert {r.info.status for r in kept} == {"FINISHED"}
    assert sorted(int(r.data.params["seed"]) for r in kept) == [0, 1, 2, 3, 4]
    withdrawn = [r for r in experiments if r.info.lifecycle_stage == "deleted"]
    assert len(withdrawn) >= 10  # each loser's claim (a contested one tries again: one more)
    assert {(r.info.status, r.data.tags["fedshard.claim.state"]) for r in withdrawn} == {("KILLED", "withdrawn")}
    assert len(tracking.list_runs("race")) == 5 + 3  # what export and sweeps read: the winners and the racers' runs
