"""The researchers' own study, run as their harness ran it: layerwise swapping through real
processes, and a pretrain run whose final model a grid starts from, in one sweep that survives
being stopped (docs/experiments.md, docs/sweeps.md)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from helpers import REPO, experiment_args, in_test_dir

pytestmark = pytest.mark.slow  # every test here starts processes

TINY = dict(world_size=2, max_train_samples=32, max_test_samples=16, batch_size=8, enable_swapping=False)


def history(run_id: str, metric: str = "test_loss") -> dict[int, float]:
    return {m.step: m.value for m in MlflowClient().get_metric_history(run_id, metric)}


def start_run(tmp_path, data_dir, **params) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedshard",
            "run",
            *experiment_args(data_dir, **params),
            "--experiment-name",
            "layerwise",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=in_test_dir(tmp_path),
    )


def finished_run_id(proc: subprocess.Popen) -> str:
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    return re.search(r"fedshard: run ([0-9a-f]{32}) FINISHED", output).group(1)


def test_layerwise_swapping_moves_changes_not_weights(tmp_path, data_dir, store):
    """Three world-size-2 runs side by side. With a learning rate so small that training changes
    nothing (1e-30), a layerwise run's test loss is the same in every round: its trainers hold
    other input blocks than their own in round 1, and only their (zero) changes come back. A rule
    that put the trained weights back would swap the blocks and change the loss. At 1e-3 a layerwise
    run differs from the same run without layerwise swapping."""
    still = start_run(tmp_path, data_dir, **TINY, rounds=2, learning_rate=1e-30, enable_layerwise_swapping=True)
    layerwise = start_run(tmp_path, data_dir, **TINY, rounds=1, learning_rate=1e-3, enable_layerwise_swapping=True)
    plain = start_run(tmp_path, data_dir, **TINY, rounds=1, learning_rate=1e-3)
    still, layerwise, plain = finished_run_id(still), finished_run_id(layerwise), finished_run_id(plain)

    losses = history(still)
    assert sorted(losses) == [0, 1, 2] and len(set(losses.values())) == 1, losses
    run = MlflowClient().get_run(layerwise)
    assert run.data.params["enable_layerwise_swapping"] == "true" and "-layerwise" in run.info.run_name
    assert history(layerwise)[0] == history(plain)[0] and history(layerwise)[1] != history(plain)[1]


PRETRAIN_GRID = """\
pretrain: {{world_size: 1, rounds: 2, seed: 77{pretrain_extra}}}
world_sizes: [2]
learning_rates: [1e-3]
swap: [false]
rounds: [1]
seeds: [1]
params: {{enable_layerwise_swapping: true, data_dir: {data_dir}, max_train_samples: 32, max_test_samples: 16,
          batch_size: 8, local_epochs: 1, precision: fp32}}
"""


def sweep(tmp_path, grid_file, experiment: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            str(REPO / "sweep.py"),
            "--grid-file",
            str(grid_file),
            "--no-progress",
            "--experiment-name",
            experiment,
            "--max-retries",
            "0",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=in_test_dir(tmp_path),
    )


def runs_by_name(experiment: str) -> dict[str, list]:
    client = MlflowClient()
    found: dict[str, list] = {}
    for run in client.search_runs([client.get_experiment_by_name(experiment).experiment_id]):
        if "world_size" in run.data.params:
            found.setdefault(run.info.run_name, []).append(run)
    return found


def test_a_pretrain_grid_runs_its_source_first_and_a_stopped_chain_continues(tmp_path, data_dir, store):
    """The researchers' second study in small: one world-size-1 run, then a layerwise world-size-2
    run from its final model. The sweep is stopped (SIGTERM) while the source trains; the next
    sweep resumes the source from its checkpoint and then runs what starts from it, whose round 0
    is the source's final model. A source that fails leaves what starts from it not started, not
    failed."""
    grid_file = tmp_path / "chain.yaml"
    grid_file.write_text(PRETRAIN_GRID.format(data_dir=data_dir, pretrain_extra=""))
    first = sweep(tmp_path, grid_file, "chain")
    for line in first.stdout:
        if "[1/2] round 1/2:" in line:  # the source's round 1 is stored: stop the sweep now
            first.send_signal(signal.SIGTERM)
            break
    output = first.communicate(timeout=120)[0]
    assert first.returncode == 128 + signal.SIGTERM, output
    assert "Not started: 1" in output

    second = sweep(tmp_path, grid_file, "chain")
    output = second.communicate(timeout=300)[0]
    assert second.returncode == 0, output
    assert re.search(r"Resuming experiment: world_size=1, .*from round 1", output), output
    runs = runs_by_name("chain")
    source_name = "ws1-lr0.001-swapfalse-r2-s77-ep1-bs8-train32-test16"
    (source,) = runs[source_name]
    (dependent,) = runs["ws2-lr0.001-swapfalse-r1-s1-layerwise-ep1-bs8-train32-test16-init"]
    assert source.info.status == dependent.info.status == "FINISHED"
    assert source.info.end_time < dependent.info.start_time
    assert dependent.data.params["init_from"] == f"run:{source_name}"
    assert dependent.data.tags["fedshard.init_from_run_id"] == source.info.run_id
    assert sorted(history(source.info.run_id)) == [0, 1, 2]  # resumed, no round trained twice
    assert history(dependent.info.run_id)[0] == history(source.info.run_id)[2]

    # A source that cannot run (its own init_from is missing): what starts from it is not started.
    grid_file.write_text(PRETRAIN_GRID.format(data_dir=data_dir, pretrain_extra=", init_from: missing.pt"))
    broken = sweep(tmp_path, grid_file, "broken")
    output = broken.communicate(timeout=300)[0]
    assert broken.returncode == 1, output
    assert "Failed: 1" in output and "Not started (the run they start from is not FINISHED here): 1" in output
    assert re.search(
        r"Not started: \(2, 0\.001, False, 1, 1\): the run it starts from, ws1-.*-init, did not "
        r"finish \(run [0-9a-f]{32}\)",
        output,
    ), output
    assert list(runs_by_name("broken")) == ["ws1-lr0.001-swapfalse-r2-s77-ep1-bs8-train32-test16-init"]
