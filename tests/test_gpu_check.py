"""benchmarks/gpu_check.py: what it computes from its measurements (the measuring itself needs a
GPU; `bash benchmarks/gpu_check.sh --dry` runs its steps on the CPU)."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_results_file_is_named_after_the_device():
    assert gpu_check.file_name("NVIDIA H200", dry=False) == "nvidia-h200.json"
    assert gpu_check.file_name("NVIDIA H100 80GB HBM3", dry=False) == "nvidia-h100-80gb-hbm3.json"
    assert gpu_check.file_name("x86_64", dry=True) == "x86-64-dry.json"


def packing(**rates):
    return {int(n[1:]): {"ok": rate is not None, "experiments_per_hour": rate} for n, rate in rates.items()}


def test_the_best_packing_runs_the_most_experiments_per_hour():
    assert gpu_check.best_parallel(packing(n1=100.0, n2=180.0, n4=260.0, n8=250.0)) == 4
    assert gpu_check.best_parallel(packing(n1=100.0, n2=100.0)) == 1  # a tie: fewer at once
    assert gpu_check.best_parallel(packing(n1=100.0, n8=None)) == 1  # a failed sweep does not count
    assert gpu_check.best_parallel({}) is None


def test_grid_projection_uses_the_extended_grid_the_round_arithmetic_and_the_packing():
    grid = gpu_check.project_grid(full_round_seconds=2.3, startup_seconds=10.0,
                                  packing=packing(n1=100.0, n2=150.0, n4=300.0))
    assert (grid["runs"], grid["rounds"]) == (54, 1350)
    assert grid["round_seconds"] == {1: pytest.approx(4.3), 2: pytest.approx(2.3)}
    # 18 world-size-1 runs train 30+20 rounds per (lr, seed) pair: 9 x 50 = 450 rounds; world size 2: 900.
    serial = 54 * 10.0 + 450 * 4.3 + 900 * 2.3
    assert grid["serial_minutes"] == pytest.approx(serial / 60)
    assert grid["best_parallel"] == 4 and grid["packing_speedup"] == pytest.approx(3.0)
    assert grid["grid_projected_minutes"] == pytest.approx(serial / 3.0 / 60)


def test_targets_are_judged_only_when_measured():
    judged = gpu_check.verdicts({"grid_projected_minutes": 29.0, "eval_speedup": None})
    assert judged["grid_projected_minutes"]["met"] is True and judged["eval_speedup"]["met"] is None
    assert gpu_check.verdicts({"grid_projected_minutes": 31.0, "eval_speedup": 20.0})["grid_projected_minutes"][
        "met"] is False
    dry = gpu_check.verdicts({"grid_projected_minutes": 29.0, "eval_speedup": 25.0}, dry=True)
    assert [v["met"] for v in dry.values()] == [None, None]  # toy sizes on a CPU prove nothing
