"""benchmarks/gpu_check.py and the grid projection it shares with bench.py (benchmarks/projection.py):
what they compute from their measurements (the measuring itself needs a GPU; `bash
benchmarks/gpu_check.sh --dry` runs the check's steps on the CPU)."""

from __future__ import annotations

import functools
import importlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from fedshard.core.models import get as model_entry
from fedshard.core.models.alexnet import AlexNet
from helpers import REPO

slice_widths = model_entry("alexnet").slice_widths

# The benchmark scripts import their sibling modules by name, as `python benchmarks/X.py` lets them.
sys.path.append(str(REPO / "benchmarks"))
gpu_check = importlib.import_module("gpu_check")
projection = importlib.import_module("projection")
report = importlib.import_module("report")


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


@functools.lru_cache
def counted_forward_flops(widths: tuple | None) -> int:
    """PyTorch's own count of one image's forward pass through AlexNet at these widths."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):  # weights allocated below without their initialisation: only shapes count
        model = AlexNet(dict(widths) if widths else None)
    with FlopCounterMode(display=False) as counter:
        model.to_empty(device="cpu")(torch.zeros(1, 3, 32, 32))
    return counter.get_total_flops()


def counted_training_flops(widths: dict | None, images: int) -> float:
    """x 3 for forward and backward (the usual estimate: the backward pass computes gradients of
    both activations and weights), x the images trained."""
    return 3 * counted_forward_flops(tuple(sorted(widths.items())) if widths else None) * images


def world_size_2_round() -> float:
    """Two half-width slices, each trained on half the 50,000 images."""
    return sum(counted_training_flops(slice_widths(2, k), 25_000) for k in range(2))


def test_a_rounds_flops_are_those_pytorch_counts_for_each_trainers_slice_and_share_of_the_data():
    assert projection.round_flops(1) == counted_training_flops(None, 50_000)
    assert projection.round_flops(2) == world_size_2_round()
    # Each layer is split along one dimension only, so the slices' arithmetic adds up to the model's.
    assert projection.round_flops(1) == pytest.approx(2 * projection.round_flops(2))


def test_grid_projection_uses_the_extended_grid_the_round_arithmetic_and_the_packing():
    grid = gpu_check.project_grid(
        full_round_seconds=2.3, startup_seconds=10.0, packing=packing(n1=100.0, n2=150.0, n4=300.0)
    )
    assert (grid["runs"], grid["rounds"]) == (54, 1350)
    ratio = counted_training_flops(None, 50_000) / world_size_2_round()
    assert grid["round_seconds"] == {1: pytest.approx(2.3 * ratio), 2: pytest.approx(2.3)}
    # 18 world-size-1 runs train 30+20 rounds per (lr, seed) pair: 9 x 50 = 450 rounds; world size 2: 900;
    # each round of 3 local epochs (the default).
    serial = 54 * 10.0 + 3 * (450 * 2.3 * ratio + 900 * 2.3)
    assert grid["serial_minutes"] == pytest.approx(serial / 60)
    assert grid["best_parallel"] == 4 and grid["packing_speedup"] == pytest.approx(3.0)
    assert grid["grid_projected_minutes"] == pytest.approx(serial / 3.0 / 60)


def test_the_harness_grid_is_projected_with_its_world_sizes_and_local_epochs():
    """63 runs of 10 rounds (9 at world size 1, 18 each at 2, 4 and 8), each round of 3 local
    epochs, each world size's round the measured one scaled by the FLOPs PyTorch counts."""
    grid = gpu_check.project_grid(2.0, 10.0, packing(n1=100.0, n4=200.0), projection.harness_plan())
    assert (grid["runs"], grid["rounds"]) == (63, 630)
    measured = world_size_2_round()
    per_round = {
        n: 2.0 * sum(counted_training_flops(slice_widths(n, k), 50_000 // n) for k in range(n)) / measured
        for n in (1, 2, 4, 8)
    }
    assert grid["round_seconds"] == pytest.approx(per_round)
    serial = 63 * 10.0 + sum(runs * 10 * 3 * per_round[n] for n, runs in {1: 9, 2: 18, 4: 18, 8: 18}.items())
    assert grid["serial_minutes"] == pytest.approx(serial / 60)
    assert grid["grid_projected_minutes"] == pytest.approx(serial / 2.0 / 60)


def test_the_budget_gives_each_step_its_share_of_what_is_left():
    budget = gpu_check.Budget(1000.0, reserve=100.0)
    weights = list(gpu_check.STEPS.values())
    first = budget.allot(weights[0], sum(weights[1:]))
    assert first == pytest.approx(900.0 * weights[0] / sum(weights), rel=0.01)
    assert budget.allot(1.0, 0.0) == pytest.approx(900.0, rel=0.01)  # the last step gets all that is left
    assert gpu_check.Budget(10.0, reserve=20.0).allot(1.0, 0.0) == 0.0  # spent: nothing, never less


@pytest.mark.slow
def test_a_stopped_step_leaves_no_process_behind():
    """common.stop, as the budget stops a step: SIGTERM, then SIGKILL after the grace period (here
    the command ignores SIGTERM), then whatever the command started."""
    common = importlib.import_module("common")
    script = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        "print(child.pid, flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    grandchild = psutil.Process(int(proc.stdout.readline()))
    common.stop(proc, grace=1.0)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    deadline = time.monotonic() + 30  # SIGKILL is sent; the kernel ends the process at once, or nearly
    while not ended(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ended(grandchild)


def ended(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # killed, not yet reaped by its new parent
    except psutil.NoSuchProcess:
        return True


def test_a_failed_single_sweep_leaves_the_projection_unpacked():
    grid = gpu_check.project_grid(2.0, 5.0, packing(n1=None, n4=300.0))
    assert grid["packing_speedup"] == 1.0
    assert grid["grid_projected_minutes"] == pytest.approx(grid["serial_minutes"])


def test_rounds_from_their_parts_add_training_evaluation_and_the_exchange_there_and_back():
    # 50,000 images at 10,000 img/s (world size 1) or 5,000 img/s (a slice); 10,000 test images at
    # 20,000 img/s; 2 x 220 MB at 1.1 GB/s.
    per_round = projection.rounds_from_rates(
        {1: 10_000.0, 2: 5_000.0}, eval_images_per_s=20_000.0, exchange_gbytes_per_s=1.1, model_bytes=220_000_000
    )
    assert per_round == {1: pytest.approx(5 + 0.5 + 0.4), 2: pytest.approx(10 + 0.5 + 0.4)}
    grid = projection.project(per_round, startup_seconds=6.0, packing_speedup=2.0)
    serial = 54 * 6.0 + 3 * (450 * 5.9 + 900 * 10.9)  # rounds of 3 local epochs (the default)
    assert grid["serial_minutes"] == pytest.approx(serial / 60)
    assert grid["grid_projected_minutes"] == pytest.approx(serial / 2.0 / 60)


def test_both_scripts_judge_the_grid_by_the_one_target():
    assert report.TARGETS["grid_projected_minutes"] == ("<=", 30.0, "H200")
    assert gpu_check.verdicts({"grid_projected_minutes": 30.0})["grid_projected_minutes"]["bound"] == 30.0
    assert report.verdict("grid_projected_minutes", 31.0, on_gpu=True) == ("<= 30 (H200)", "NO")
    assert report.verdict("grid_projected_minutes", 29.0, on_gpu=False) == ("<= 30 (H200)", "n/a")


def test_targets_are_judged_only_when_measured():
    judged = gpu_check.verdicts({"grid_projected_minutes": 29.0, "eval_speedup": None})
    assert judged["grid_projected_minutes"]["met"] is True and judged["eval_speedup"]["met"] is None
    assert (
        gpu_check.verdicts({"grid_projected_minutes": 31.0, "eval_speedup": 20.0})["grid_projected_minutes"]["met"]
        is False
    )
    dry = gpu_check.verdicts({"grid_projected_minutes": 29.0, "eval_speedup": 25.0}, dry=True)
    assert [v["met"] for v in dry.values()] == [None, None]  # toy sizes on a CPU prove nothing


def test_gpu_check_runs_bench_without_the_packing_and_projection_it_makes_itself():
    bench = importlib.import_module("bench")
    args = bench.parse_args(list(gpu_check.BENCH_ARGS))
    assert args.quick and args.no_sweeps and args.no_projection


def packing_step(n: int, rate: float) -> dict:
    return {"ok": True, "experiments_per_hour": rate, "gpu_memory_peak_mib": 1000.0 * n}


def test_the_results_hold_each_figure_once_and_project_both_grids_from_the_full_run():
    steps = {
        "bench": {"ok": True, "figures": {"eval_speedup": 25.0, "startup_seconds": 5.0, "train_images_per_s": 9000.0}},
        "full_run": {"ok": True, "full_round_seconds": 2.0, "startup_seconds": 12.0},
        "packing": {1: packing_step(1, 100.0), 2: packing_step(2, 150.0)},
    }
    figures, grids = gpu_check.summarise(steps)
    assert "figures" not in steps["bench"]  # moved to the top level, not copied
    assert figures["startup_seconds"] == 5.0 and figures["full_run_startup_seconds"] == 12.0
    assert figures["eval_speedup"] == 25.0 and figures["train_images_per_s"] == 9000.0
    assert grids["default"] == gpu_check.project_grid(2.0, 12.0, steps["packing"])
    assert figures["grid_projected_minutes"] == grids["default"]["grid_projected_minutes"]
    assert figures["harness_projected_minutes"] == grids["harness"]["grid_projected_minutes"]
    assert figures["gpu_memory_peak_mib"] == {1: 1000.0, 2: 2000.0} and figures["best_parallel"] == 2


def test_a_check_cut_before_a_steady_round_projects_nothing_and_says_so(tmp_path):
    steps = {
        "cuda_tests": {"ok": True},
        "full_run": {"ok": False, "cut_at_budget": True, "startup_seconds": 9.0, "full_round_seconds": None},
        "packing": {1: gpu_check.skipped(2.0)},
        "bench": gpu_check.skipped(1.0),
    }
    figures, grids = gpu_check.summarise(steps)
    assert grids == {} and "grid_projected_minutes" not in figures and figures["best_parallel"] is None
    lines = gpu_check.closing_lines(tmp_path / "r.json", grids)
    assert lines[0] == f"results: {tmp_path / 'r.json'}"
    assert [line.split(":")[0] for line in lines[1:]] == ["default grid", "harness grid (grids/harness.yaml)"]
    assert all("not projected" in line for line in lines[1:])


def test_only_a_step_that_failed_by_itself_fails_the_check():
    steps = {
        "cuda_tests": {"ok": True, "cut_at_budget": False},
        "full_run": {"ok": False, "cut_at_budget": True},
        "packing": {1: {"ok": True, "cut_at_budget": False}, 2: gpu_check.skipped(3.0)},
        "bench": {"ok": False, "cut_at_budget": False},
    }
    assert gpu_check.outcome(steps) == (["bench"], ["full_run", "packing 2"])


def test_the_closing_lines_give_the_results_path_and_both_grids_minutes(tmp_path):
    grids = {
        "default": {"runs": 54, "grid_projected_minutes": 21.04, "best_parallel": 4},
        "harness": {"runs": 63, "grid_projected_minutes": 35.96, "best_parallel": 4},
    }
    assert gpu_check.closing_lines(tmp_path / "r.json", grids)[1:] == [
        "default grid: 54 runs, 21.0 min projected (best --parallel 4)",
        "harness grid (grids/harness.yaml): 63 runs, 36.0 min projected (best --parallel 4)",
    ]


def test_both_scripts_record_verdicts_with_the_one_helper():
    figures = {"grid_projected_minutes": 29.0, "eval_speedup": 12.0, "startup_seconds": 5.0}
    assert gpu_check.verdicts(figures) == {n: report.judge(figures, on_gpu=True)[n] for n in gpu_check.JUDGED}
    assert gpu_check.verdicts(figures)["eval_speedup"] == {
        "op": ">=",
        "bound": 20.0,
        "where": "H200",
        "value": 12.0,
        "met": False,
    }
    bench_report = report.Report({"load_average_1min_start": 0.0}, quick=True, sizes={}, on_gpu=False)
    bench_report.figures.update(figures)
    bench_report.finish()
    assert bench_report.results["targets"] == report.judge(figures, on_gpu=False)
    assert bench_report.results["targets"]["startup_seconds"]["met"] is True


def test_the_results_describe_the_machine_as_bench_does(tmp_path):
    common = importlib.import_module("common")
    results, output = gpu_check.start_results(gpu_check.parse_args(["--dry"]))
    described = common.machine(torch.device("cpu"))
    assert {k: v for k, v in results["machine"].items() if k not in ("date", "load_average_1min_start")} == {
        k: v for k, v in described.items() if k not in ("date", "load_average_1min_start")
    }
    assert output == gpu_check.RESULTS / gpu_check.file_name(described["cpu"], dry=True)
    assert gpu_check.start_results(gpu_check.parse_args(["--dry", "--output", str(tmp_path)]))[1] == (
        tmp_path / gpu_check.file_name(described["cpu"], dry=True)
    )


@pytest.mark.slow
def test_the_full_run_step_runs_and_times_its_experiment_as_bench_does(data_dir, tmp_path, monkeypatch):
    """A real `fedshard run` at toy sizes: world size 2, 2 rounds, through common.run_experiment."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = gpu_check.parse_args(["--dry"])
    args.data, args.train_images, args.test_images = data_dir, 16, 8
    result = gpu_check.step_full_run(args, tmp_path, 300.0)
    assert result["ok"] and not result["cut_at_budget"], result["output_tail"]
    assert (tmp_path / "full" / "mlflow.db").exists() and "MLFLOW_TRACKING_URI" not in os.environ
    assert sorted(result["round_seconds"]) == [1, 2]
    assert result["full_round_seconds"] == result["round_seconds"][2]  # the best of rounds >= 2
    assert 0 < result["startup_seconds"] < result["seconds"]
    assert {"metaserver_spawned_s", "aggregator_spawned_s", "trainer_spawned_s"} <= set(result["startup_breakdown"])
