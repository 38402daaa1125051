"""benchmarks/bench.py's helpers: the one timing helper, the one way to take an experiment's rounds,
the MLflow store made before a run, and the sizes of --quick (the measuring itself is a benchmark,
not a test: `python benchmarks/bench.py --quick`)."""

from __future__ import annotations

import importlib
import os
import sys

import pytest

from helpers import REPO

sys.path.append(str(REPO / "benchmarks"))
bench = importlib.import_module("bench")
common = importlib.import_module("common")
experiment = importlib.import_module("experiment")
precision_figures = importlib.import_module("precision_figures")


def test_best_of_times_only_the_calls_after_the_warm_up():
    calls = []
    best, times = common.best_of(lambda: calls.append(1), 3, warmup=2)
    assert len(calls) == 5 and len(times) == 3 and best == min(times)


def test_an_experiments_round_is_its_best_round_from_round_2():
    assert common.best_steady_round({1: 9.0, 2: 6.0, 3: 7.0, 4: 8.0}) == 6.0  # not the median, 7.0
    exp = {
        "round_seconds": {1: 9.0, 2: 6.0, 3: 7.0},
        "trainer_seconds": {1: 8.0, 2: 5.5, 3: 5.0},
        "eval_seconds": {},
        "checkpoint_seconds": {1: 0.2, 2: 0.4},
    }
    figures = experiment.round_figures(exp, {"best_seconds": 5.0})
    assert figures["round_overhead_ratio"] == pytest.approx(6.0 / 5.0)
    assert figures["round_over_trainer_seconds"] == pytest.approx(6.0 / 5.0)
    assert figures["checkpoint_seconds"] == pytest.approx(0.3)  # the mean, as bench.py's docstring says


def test_the_store_is_made_before_a_run_with_the_tracking_uri_set_only_meanwhile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    store = tmp_path / "store"
    store.mkdir()
    assert common.open_store(store) == common.store_uri(store)
    assert (store / "mlflow.db").exists() and not (tmp_path / "elsewhere.db").exists()
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///elsewhere.db"


def test_quick_times_fewer_precision_steps_over_fewer_images_at_a_trainers_batch():
    quick, full = bench.choose_sizes(quick=True, on_cuda=False), bench.choose_sizes(quick=False, on_cuda=False)
    assert (quick["precision_steps"], quick["precision_eval_images"]) == (3, 256)
    assert (full["precision_steps"], full["precision_eval_images"]) == (4, 1000)
    assert precision_figures.BATCH == 64


def test_precision_figures_take_the_best_of_their_timed_steps():
    # the full AlexNet evaluating 8 images, 2 warm-ups and 1 timed step: the code path, not a figure
    assert precision_figures.eval_images_per_s(False, images=8, steps=1) > 0


def test_every_models_training_figure_runs_its_recipe():
    # ResNet-34's world-size-2 slice, one batch at 32x32 after one untimed pass: the code path, not a figure
    model_figures = importlib.import_module("model_figures")
    assert model_figures.train_images_per_s("resnet34", 32, 2, steps=1, repeats=1) > 0
