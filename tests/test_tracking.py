"""tracking.py against a real SQLite store: what concurrent experiments do to it, and where a new
store keeps its artifacts."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from mlflow.tracking import MlflowClient

from fedshard import tracking
from fedshard.data import DatasetInput


def test_experiments_starting_together_record_the_same_datasets(store):
    """Runs of one sweep read the same test set: each records it, although the store refuses a
    second insert of one dataset (MLflow alone fails 5 of 6 such simultaneous calls here)."""
    client = MlflowClient()
    runs = [client.create_run(tracking.experiment_id("together")).info.run_id for _ in range(6)]
    inputs = [DatasetInput("cifar100-test", "evaluation", "0123456789ab", "/data/test", 10, {"num_rows": 10})]
    barrier, errors = threading.Barrier(len(runs)), []

    def record(run_id):
        barrier.wait()
        try:
            tracking.log_datasets(run_id, inputs)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=record, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [[d.dataset.name for d in client.get_run(r).inputs.dataset_inputs] for r in runs] == [["cifar100-test"]] * 6


def test_a_new_store_keeps_its_artifacts_beside_it_wherever_it_is_opened_from(tmp_path):
    """A store fedshard creates (here from another directory) puts even its Default experiment's
    artifacts beside the database, not into ./mlruns of the current directory."""
    where, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    where.mkdir()
    elsewhere.mkdir()
    uri = f"sqlite:///{where / 'mlflow.db'}"
    code = "from fedshard import tracking; tracking.ensure_store(); print(tracking.experiment_id('new'))"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    client = MlflowClient(uri)
    for exp_id in ("0", done.stdout.strip()):
        assert client.get_experiment(exp_id).artifact_location == (where / "mlartifacts" / exp_id).as_uri()
    assert list(elsewhere.iterdir()) == []


def test_a_sweep_run_that_mlflow_run_made_is_renamed_for_the_sweep(store, monkeypatch):
    """`mlflow run . -e sweep` names its run like wistful-ant-230; in the UI it carries the sweep's name."""
    client = MlflowClient()
    outer = client.create_run(tracking.experiment_id("named"), run_name="wistful-ant-230").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", outer)
    run_id, _ = tracking.start_sweep_run("named", "sweep-20261202-120000", {})
    assert run_id == outer and client.get_run(outer).info.run_name == "sweep-20261202-120000"
