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
import time

import psutil
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from conftest import REPO, fedshard, fedshard_processes
from fedshard import cli, tracking
from fedshard.config import ExperimentConfig, field_names
from fedshard.planning import AXES, SweepError, describe, expand, make_grid, plan
from fedshard.sweep import child_command, cpus_per_experiment, pick_gpu, visible_gpus

SWEEP = str(REPO / "sweep.py")


# --------------------------------------------------------------------------- the grid (pure)


def test_default_grid_is_the_54_runs_of_design_section_1():
    configs = expand(make_grid({}))
    assert len(configs) == 54
    ws1 = [c for c in configs if c.world_size == 1]
    ws2 = [c for c in configs if c.world_size == 2]
    assert len(ws1) == 18 and len(ws2) == 36
    assert not any(c.enable_swapping for c in ws1)  # swapping only where world_size > 1
    assert sum(c.enable_swapping for c in ws2) == 18
    assert {c.learning_rate for c in configs} == {1e-5, 1e-4, 1e-3}
    assert {c.rounds for c in configs} == {30, 50} and {c.seed for c in configs} == {123, 456, 789}
    assert len(set(configs)) == 54
    assert configs[0].key() == (1, 1e-05, False, 30, 123)
    assert describe(configs[0]) == "world_size=1, lr=1e-05, swap=False, rounds=30, seed=123"
    # every other parameter is the experiment's default
    assert configs[-1] == ExperimentConfig(world_size=2, learning_rate=1e-3, enable_swapping=True, rounds=50, seed=789)


def test_grid_values_are_canonicalised_and_deduplicated():
    grid = make_grid({"world_sizes": "2", "learning_rates": "1e-5, 0.00001,1E-5", "swap": "true,false,yes",
                      "rounds": "3", "seeds": "1"})
    assert [c.key() for c in expand(grid)] == [(2, 1e-05, True, 3, 1), (2, 1e-05, False, 3, 1)]
    # fedavg trains whole models: swapping never applies, so swap=true collapses too
    fedavg = make_grid({"world_sizes": "2", "learning_rates": "1e-3", "rounds": "3", "seeds": "1"},
                       ["strategy=fedavg"])
    assert [c.key() for c in expand(fedavg)] == [(2, 1e-3, False, 3, 1)]


def test_fixed_params_and_grid_file(tmp_path):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({
        "world_sizes": [2], "learning_rates": "1e-4", "swap": [True], "rounds": [5, 7], "seeds": [1],
        "params": {"data_dir": "/data", "max_train_samples": 5000, "amp": False},
    }))
    # options given on the command line win over the file, -P over the file's params
    grid = make_grid({"rounds": "9"}, ["max_train_samples=100", "batch_size=16"], grid_file)
    (cfg,) = expand(grid)
    assert cfg.key() == (2, 1e-4, True, 9, 1)
    assert (cfg.data_dir, cfg.max_train_samples, cfg.batch_size, cfg.amp) == ("/data", 100, 16, False)


@pytest.mark.parametrize("options, assignments, message", [
    ({}, ["foo=1"], "unknown experiment parameter 'foo'; valid: local_epochs, batch_size"),
    ({}, ["data_dir"], "expected KEY=VALUE"),
    ({}, ["rounds=3"], "rounds is a grid axis; give it as --rounds"),
    ({}, ["batch_size=0"], "batch_size=0: must be an integer >= 1"),
    ({"learning_rates": "1e-3,fast"}, [], "learning_rate='fast': must be a number"),
    ({"world_sizes": "1,,2"}, [], "empty value"),
    ({"world_sizes": "0,97"}, [], "world_size=97: tensor_parallel slicing allows 1..96"),
])
def test_bad_grid_or_param_is_refused_before_anything_runs(options, assignments, message):
    with pytest.raises(SweepError) as err:
        expand(make_grid(options, assignments))
    assert message in str(err.value)


def test_bad_grid_file_is_refused(tmp_path):
    bad = tmp_path / "grid.yaml"
    bad.write_text("world_sizes: [1]\nlearning_rate: [1e-3]\n")
    with pytest.raises(SweepError, match="unknown key.*learning_rate; valid: world_sizes"):
        make_grid({}, [], bad)
    with pytest.raises(SweepError, match="cannot read"):
        make_grid({}, [], tmp_path / "missing.yaml")


def test_child_command_forwards_every_parameter_to_fedshard_run():
    cfg = ExperimentConfig(world_size=3, learning_rate=1e-5, rounds=4, seed=9, init_from="", amp=False,
                           data_dir="/some where/data", partition="dirichlet", dirichlet_alpha=0.25)
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
    configs = expand(make_grid({"world_sizes": "1,2", "learning_rates": "1e-5,1e-3", "swap": "true",
                                "rounds": "3", "seeds": "1"}))
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
        ((1, 1e-5, False, 3, 1), runs[0].run_id), ((2, 1e-3, True, 3, 1), runs[1].run_id)]


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
    done = fake_finished_run("dry", world_size="1", learning_rate="0.00001", enable_swapping="false",
                             rounds="30", seed="123")
    result = CliRunner().invoke(cli.main, ["sweep", "--dry-run", "--experiment-name", "dry"])
    assert result.exit_code == 0, result.output
    assert "Total experiments to run: 53 (1 already finished)" in result.output
    assert "Would run 1/53: world_size=1, lr=1e-05, swap=False, rounds=30, seed=456" in result.output
    assert "Would run 53/53: world_size=2, lr=0.001, swap=True, rounds=50, seed=789" in result.output
    assert f"Skip (FINISHED run {done}): world_size=1, lr=1e-05, swap=False, rounds=30, seed=123" in result.output
    assert [r.info.run_id for r in all_runs("dry")] == [done]


@pytest.mark.parametrize("args, message", [
    (["-P", "dataset=/data"], "unknown experiment parameter 'dataset'; valid:"),
    (["--seeds", "1,-2"], "seed=-2: must be an integer >= 0"),
    (["--swap", "maybe"], "enable_swapping='maybe': must be true or false"),
    (["--parallel", "0"], "0 is not in the range x>=1"),
])
def test_bad_input_exits_2_with_a_clear_message_and_creates_no_run(tmp_path, store, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.main, ["sweep", *args, "--experiment-name", "bad-input"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert MlflowClient().get_experiment_by_name("bad-input") is None


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

    sweep = parse("sweep", {"params": "data_dir=/d max_train_samples=5", "rounds": "2", "parallel": 2})
    grid = make_grid({a: sweep[a] for a in AXES}, shlex.split(sweep["params_text"]), sweep["grid_file"] or None)
    assert grid.axes["rounds"] == ["2"] and grid.axes["world_sizes"] == ["1", "2"]
    assert grid.fixed == {"data_dir": "/d", "max_train_samples": "5"} and sweep["parallel"] == 2
    assert parse("export", {"format": "csv"}) == {"experiment_name": "", "output": "experiment_results.pkl",
                                                            "fmt": "csv"}
    analyze = parse("analyze", {"no_plots": "true", "top": 3})
    assert analyze == {"results_file": "experiment_results.pkl", "no_plots": True, "output_dir": "plots", "top": 3}


# --------------------------------------------------------------------------- real sweeps


def tiny(data_dir, train=16) -> list[str]:
    return ["-P", f"data_dir={data_dir}", "-P", f"max_train_samples={train}", "-P", "max_test_samples=16",
            "-P", "batch_size=16"]


def sweep_env(tmp_path) -> dict:
    # Temporary files (sweep logs, launcher work directories) go under the test's directory,
    # so every process of this test has the test's path on its command line.
    return dict(os.environ, TMPDIR=str(tmp_path))


def run_sweep(tmp_path, *args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SWEEP, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout, env=sweep_env(tmp_path))


def split_runs(experiment: str):
    runs = all_runs(experiment)
    parents = [r for r in runs if r.data.tags.get("fedshard.sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("fedshard.sweep") != "true"]
    return parents, children


def linked_data(tmp_path, data_dir):
    link = tmp_path / "data"
    link.symlink_to(data_dir, target_is_directory=True)
    return link


def test_small_grid_runs_in_parallel_nested_then_skips_then_exports(tmp_path, data_dir, store):
    grid = ["--world-sizes", "1", "--swap", "false,true", "--rounds", "1", "--seeds", "123",
            *tiny(linked_data(tmp_path, data_dir)), "--experiment-name", "grid"]
    first = run_sweep(tmp_path, *grid, "--learning-rates", "1e-4,1e-3", "--parallel", "2")
    out = first.stdout
    assert first.returncode == 0, out + first.stderr
    assert "Total experiments to run: 2 (0 already finished)" in out
    assert "=== Running experiment 1/2 ===" in out and "=== Running experiment 2/2 ===" in out
    assert "Starting experiment: world_size=1, lr=0.0001, swap=False, rounds=1, seed=123" in out
    assert "Experiment completed successfully: (1, 0.0001, False, 1, 123)" in out
    assert "Experiment completed successfully: (1, 0.001, False, 1, 123)" in out
    assert "Finished: 2\nFailed: 0\n" in out and "Skipped (already finished): 0" in out

    (parent,), children = split_runs("grid")
    assert parent.info.status == "FINISHED"
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
    assert len(all_runs("grid")) == 3

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
    artifacts = {a.path for a in client.list_artifacts(run_id, "analysis")}
    assert {"analysis/summary.json", "analysis/ranking.txt", "analysis/plots"} <= artifacts
    plots = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(run_id, "analysis/plots")}
    assert {"learning_curves.png", "accuracy_vs_lr.png", "best_accuracy_vs_rounds.png"} <= plots
    table = client.load_table(parent.info.experiment_id, "analysis/summary.json", run_ids=[run_id])
    assert sorted(table["learning_rate"]) == [1e-4, 1e-3] and list(table["n"]) == [1, 1]
    ranking = client.download_artifacts(run_id, "analysis/ranking.txt")
    best = open(ranking).read().splitlines()[1].split(". ", 1)[1]
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("fedshard sweep over world_sizes 1 x learning_rates 1e-4,1e-3")
    assert note.endswith(f"Best configuration: {best}.")
    assert re.search(r"  \[[12]/2\] round 1/1: test_accuracy=0\.\d{4} \(run [0-9a-f]{8}\)", out), out


def test_sigint_stops_everything_and_the_next_sweep_finishes_the_rest(tmp_path, data_dir, store):
    data = linked_data(tmp_path, data_dir)
    grid = ["--world-sizes", "1", "--learning-rates", "1e-4", "--rounds", "1", "--seeds", "1,2,3", *tiny(data),
            "--experiment-name", "sig"]
    # Seed 1 finished earlier (logged as `mlflow run -P learning_rate=0.00010` would): skipped, never touched.
    earlier = ExperimentConfig(world_size=1, learning_rate=1e-4, rounds=1, seed=1, data_dir=str(data),
                               max_train_samples=16, max_test_samples=16, batch_size=16)
    done = fake_finished_run("sig", **{**earlier.params(), "learning_rate": "0.00010"})
    before = MlflowClient().get_run(done).info

    log = (tmp_path / "sweep.log").open("w")
    proc = subprocess.Popen([sys.executable, SWEEP, *grid, "--parallel", "1"], cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, env=sweep_env(tmp_path))
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


def test_a_failing_configuration_is_retried_then_reported_with_reason_and_run_id(tmp_path, data_dir, store):
    # Four trainers cannot share three training images: each attempt fails its input check.
    result = run_sweep(tmp_path, "--world-sizes", "4", "--learning-rates", "1e-4", "--swap", "false",
                       "--rounds", "1", "--seeds", "123", *tiny(data_dir, train=3), "--max-retries", "1",
                       "--experiment-name", "failing")
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    (parent,), children = split_runs("failing")
    assert parent.info.status == "FAILED"
    assert len(children) == 2  # the first attempt and one retry
    for run in children:
        assert run.info.status == "FAILED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert "cannot split N=3 samples into n=4" in run.data.tags["fedshard.failure_reason"]
    assert "=== Retrying experiment 1/1 (attempt 2/2) ===" in out
    last = max(children, key=lambda r: r.info.start_time).info.run_id
    assert "Finished: 0\nFailed: 1\n" in out
    summary = out.split("=== Sweep summary ===")[1]
    assert "(4, 0.0001, False, 1, 123): " in summary and "cannot split N=3 samples" in summary
    assert f"(run {last}, 2 attempt(s))" in summary
