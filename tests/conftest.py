"""Shared fixtures: small learnable data in the official CIFAR-100 layout, a private MLflow store
per test, and the reference run of CONFIG. What tests share beyond fixtures is in helpers.py."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fedshard.core.synthetic import write_synthetic_cifar100
from helpers import CONFIG, experiment_args, history

# Experiments here last seconds: sample their system metrics every second (MLflow's own variable).
os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
# The suite's own cache (dataset digests), not the user's.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="fedshard-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """128 training and 64 test images of 4 colour classes (labels 0, 25, 50, 75)."""
    root = tmp_path_factory.mktemp("cifar")
    write_synthetic_cifar100(root, n_train=128, n_test=64, n_classes=4, seed=0)
    return root


@pytest.fixture(scope="session")
def _empty_store(tmp_path_factory) -> Path:
    """One empty SQLite MLflow store, made once: creating a store runs MLflow's migrations, which
    takes over a second each time."""
    root = tmp_path_factory.mktemp("empty-store")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        from fedshard import tracking

        tracking.ensure_store()
    return root / "mlflow.db"


@pytest.fixture
def store(_empty_store, tmp_path, monkeypatch) -> str:
    """A fresh SQLite MLflow store of this test's own (a copy of the empty one), in place before
    any process uses it. The test runs in its own directory, so artifacts land there as well."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(_empty_store, db)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:  # the copy's Default experiment is ours too
        conn.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
            ((tmp_path / "mlartifacts" / "0").as_uri(),),
        )
    uri = f"sqlite:///{db}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return uri


@pytest.fixture(scope="session")
def _session_store_uri(_empty_store, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("shared-store") / "mlflow.db"
    shutil.copyfile(_empty_store, path)
    return f"sqlite:///{path}"


@pytest.fixture
def shared_store(_session_store_uri, monkeypatch) -> str:
    """One store for tests that must create no run at all (creating a store costs seconds)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _session_store_uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return _session_store_uri


@pytest.fixture(scope="session")
def reference(data_dir, _empty_store, tmp_path_factory):
    """One uninterrupted run of CONFIG (its own store): what every continued run must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    shutil.copyfile(_empty_store, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "MLFLOW_TRACKING_URI": uri}
    result = subprocess.run(
        [sys.executable, "-m", "fedshard", "run", *experiment_args(data_dir, **CONFIG)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs(["0"])
    found = history(run.info.run_id, client)
    assert sorted(found["test_loss"]) == [0, 1, 2, 3]
    return found
