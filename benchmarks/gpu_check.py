#!/usr/bin/env python
"""The GPU check: every GPU figure fedshard claims, measured in one call of at most --budget seconds.

    bash benchmarks/gpu_check.sh            # on the GPU machine, offline (docs/gpu.md)
    bash benchmarks/gpu_check.sh --dry      # the same steps on the CPU at toy sizes

Steps, in this order, each timed, each stopped when its share of the budget is spent (STEPS) and
each allowed to fail without losing the others' figures (the check exits 1 when a step failed,
0 when every step finished or was stopped by the budget):

  cuda_tests      the CUDA tests of the suite (pytest -k cuda): correctness of bf16, determinism,
                  a resumed run on CUDA (on a dry run they skip themselves: the plumbing only).
  full_run        a real `fedshard run` at full size (common.run_experiment, as bench.py runs its
                  experiment): 50,000 training images of CIFAR-100-format data written here, the
                  full 10,000-image test set, world size 2, 2 rounds of 1 local epoch; the round
                  times come from the run's own metrics (round_seconds, eval_seconds,
                  checkpoint_seconds), its startup from trainer 0's first step.
  packing         `sweep.py --parallel N` on the one GPU for each N in PACK (1 2 4), on a small
                  real grid (world sizes 1 and 2, two seeds, one round of 5,000 images); experiments
                  per hour, and the GPU memory used at the peak.
  bench           benchmarks/bench.py --quick --no-sweeps --no-projection on the device: eval_speedup,
                  training images/s, TFLOP/s and its other figures, as far as it got.

It writes every figure to OUTPUT/<gpu-name>.json (on --dry: <cpu>-dry.json) after each step, so a
check cut short keeps what it measured: `figures` holds bench.py's figures and this check's own,
full_round_seconds (the best of the full run's rounds >= 2, as bench.py takes rounds),
full_run_startup_seconds, best_parallel, grid_projected_minutes (the default grid) and
harness_projected_minutes (the harness's grid, projection.HARNESS): each grid's runs as `sweep`
plans them, each round the measured world-size-2 round scaled by its training FLOPs and local
epochs (projection.project), plus each run's measured startup, divided by the best packing's
speedup.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import common
import projection
from common import REPO, say
from report import judge

RESULTS = REPO / "benchmarks" / "results"
JUDGED = ("grid_projected_minutes", "eval_speedup")  # the figures of this check that have a target
# bench.py on the device: its quick sizes, without the sweeps and the grid projection this check makes itself
BENCH_ARGS = ("--quick", "--no-sweeps", "--no-projection")
# Each step's weight: what is left of the budget is split over the steps still to run by weight, so
# time a step does not use goes to those after it. From what they cost: the full run and the
# packing pay several experiments' startups (seconds each) and full-size rounds; the CUDA tests
# are a few small runs; bench.py --quick is many short measurements and keeps each one it finishes.
STEPS = {"cuda_tests": 0.15, "full_run": 0.30, "packing": 0.30, "bench": 0.25}
RESERVE_SECONDS = 15.0  # kept back from the steps: a stopped step's teardown, and the results
MIN_STEP_SECONDS = 5.0  # a step allotted less is not started
PACK_EXPERIMENTS_PER_SEED = 2  # world sizes 1 and 2


class Budget:
    """The seconds left of `seconds` from now, less `reserve`, and each step's share of them."""

    def __init__(self, seconds: float, reserve: float = 0.0):
        self.end = time.perf_counter() + seconds - reserve

    def left(self) -> float:
        return max(0.0, self.end - time.perf_counter())

    def allot(self, weight: float, weights_after: float) -> float:
        return self.left() * weight / (weight + weights_after)


def file_name(device_name: str, dry: bool) -> str:
    """'NVIDIA H200' -> 'nvidia-h200.json': the results file of one kind of device."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "unknown"
    return f"{slug}{'-dry' if dry else ''}.json"


def experiments_per_hour(experiments: int, seconds: float) -> float:
    return experiments * 3600.0 / seconds


def best_parallel(packing: dict[int, dict]) -> int | None:
    """The --parallel that ran the most experiments per hour (the smaller one on a tie)."""
    done = {n: p for n, p in packing.items() if p.get("ok")}
    return max(sorted(done), key=lambda n: done[n]["experiments_per_hour"]) if done else None


def project_grid(full_round_seconds: float, startup_seconds: float, packing: dict[int, dict], work=None) -> dict:
    """Minutes for a grid (the default one unless `work`, a planning.Plan) on one GPU, from the
    measured world-size-2 round (1 local epoch), the measured startup and the best packing's
    speedup over one at a time."""
    work = work or projection.default_plan()
    best = best_parallel(packing)
    speedup = (
        packing[best]["experiments_per_hour"] / packing[1]["experiments_per_hour"]
        if best is not None and packing.get(1, {}).get("ok")
        else 1.0
    )
    world_sizes = sorted({task.cfg.world_size for task in work.tasks})
    per_round = projection.rounds_scaled_by_flops(full_round_seconds, measured_world_size=2, world_sizes=world_sizes)
    return {**projection.project(per_round, startup_seconds, speedup, work), "best_parallel": best}


def verdicts(figures: dict, dry: bool = False) -> dict:
    """report.judge on the figures of this check that have a target; on a dry run (toy sizes on
    a CPU) none is judged."""
    return judge(figures, on_gpu=not dry, names=JUDGED)


# ----------------------------------------------------------------------------- the steps


class MemoryPeak:
    """The GPU memory in use (all processes, MiB), sampled through NVML while a step runs; None
    where not sampled (a dry run)."""

    def __init__(self, enabled: bool):
        self.peak_mib, self.stop, self.thread = (0.0 if enabled else None), threading.Event(), None
        if enabled:
            self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        while not self.stop.wait(0.2):
            self.peak_mib = max(self.peak_mib, pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)

    def __enter__(self):
        if self.thread:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread:
            self.thread.join(timeout=2)


def ended(done: common.Finished, seconds: float) -> dict:
    """How a step's command ended, and whether the budget stopped it."""
    return {
        "ok": done.code == 0,
        "seconds": done.seconds,
        "allotted_seconds": seconds,
        "cut_at_budget": done.code == 124,
    }


def step_cuda_tests(args, work: Path, seconds: float) -> dict:
    done = common.run_command([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "tests/"], seconds, cwd=REPO)
    tail = done.output.strip().splitlines()[-1] if done.output.strip() else ""
    return {**ended(done, seconds), "summary": tail, "output_tail": done.output[-4000:]}


def step_bench(args, work: Path, seconds: float) -> dict:
    """bench.py writes its JSON after each section, so a bench stopped by the budget keeps the
    figures of the sections it finished."""
    path = work / "bench.json"
    done = common.run_command(
        [
            sys.executable,
            str(REPO / "benchmarks" / "bench.py"),
            *BENCH_ARGS,
            "--device",
            args.device,
            "--json",
            str(path),
        ],
        seconds,
        cwd=REPO,
    )
    result = {**ended(done, seconds), "output_tail": done.output[-4000:]}
    if path.exists():
        result["figures"] = json.loads(path.read_text())["figures"]
    return result


def step_full_run(args, work: Path, seconds: float) -> dict:
    store = work / "full"
    store.mkdir()
    with MemoryPeak(not args.dry) as memory:
        done, run = common.run_experiment(
            args.data,
            store,
            world_size=2,
            rounds=args.full_rounds,
            train_images=args.train_images,
            test_images=args.test_images,
            device=args.device,
            timeout=seconds,
            experiment="gpu-check",
            extra=("--local-epochs", "1"),
            partial=True,
            MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1",
        )
    result = {**ended(done, seconds), "gpu_memory_peak_mib": memory.peak_mib, "output_tail": done.output[-4000:]}
    if run is None:
        return result
    steady = {r: s for r, s in run["round_seconds"].items() if r >= 2}
    result.update(
        {
            k: run[k]
            for k in (
                "run_id",
                "round_seconds",
                "eval_seconds",
                "checkpoint_seconds",
                "trainer_seconds",
                "startup_seconds",
                "startup_breakdown",
            )
        },
        full_round_seconds=common.best_steady_round(steady) if steady else None,
    )
    return result


def step_packing(args, work: Path, n: int, seconds: float) -> dict:
    """One sweep of the small grid with --parallel n on the one GPU, in a fresh store."""
    store = work / f"pack{n}"
    store.mkdir()
    seeds = ",".join(str(s) for s in range(1, args.pack_seeds + 1))
    command = common.sweep(
        args.data,
        args.device,
        args.pack_images,
        args.test_images,
        "--world-sizes",
        "1,2",
        "--learning-rates",
        "1e-3",
        "--swap",
        "true",
        "--rounds",
        "1",
        "--seeds",
        seeds,
        "--parallel",
        str(n),
    )
    env = common.store_env(store, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    with MemoryPeak(not args.dry) as memory:
        done = common.run_command(command, seconds, cwd=store, env=env)
    experiments = PACK_EXPERIMENTS_PER_SEED * args.pack_seeds
    return {
        **ended(done, seconds),
        "parallel": n,
        "experiments": experiments,
        "experiments_per_hour": experiments_per_hour(experiments, done.seconds) if done.code == 0 else None,
        "gpu_memory_peak_mib": memory.peak_mib,
        "output_tail": done.output[-2000:],
    }


def skipped(seconds: float) -> dict:
    return {"ok": None, "allotted_seconds": seconds, "skipped": f"the budget was spent ({seconds:.0f} s left for it)"}


def run_steps(args, budget: Budget, work: Path, steps: dict, save) -> None:
    """Every step in turn, each within its share of what is left of the budget, saving the results
    after each: a check cut short keeps what it measured."""
    weights = list(STEPS.values())
    simple = {
        "cuda_tests": ("CUDA tests", step_cuda_tests),
        "full_run": (f"full-size run: world size 2, {args.full_rounds} rounds", step_full_run),
        "bench": ("bench.py on the device", step_bench),
    }
    for k, name in enumerate(STEPS):
        seconds = budget.allot(weights[k], sum(weights[k + 1 :]))
        if name == "packing":
            steps["packing"] = run_packing(args, work, seconds, save)
            continue
        title, step = simple[name]
        say(f"{title} (at most {seconds:.0f} s)")
        steps[name] = step(args, work, seconds) if seconds >= MIN_STEP_SECONDS else skipped(seconds)
        save()


def run_packing(args, work: Path, seconds: float, save) -> dict:
    """The sweeps of the packing step, within `seconds` together: each one's share is what is left
    of them split by what it costs (experiments one after the other: 4, 2, 1 at --parallel 1, 2, 4)."""
    budget, packing = Budget(seconds), {}
    costs = [-(-PACK_EXPERIMENTS_PER_SEED * args.pack_seeds // n) for n in args.pack]
    for k, n in enumerate(args.pack):
        share = budget.allot(costs[k], sum(costs[k + 1 :]))
        say(f"sweep with --parallel {n} (at most {share:.0f} s)")
        packing[n] = step_packing(args, work, n, share) if share >= MIN_STEP_SECONDS else skipped(share)
        save()
    return packing


# ----------------------------------------------------------------------------- main


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="run every step on the CPU at toy sizes")
    parser.add_argument(
        "--budget",
        type=float,
        default=420.0,
        help="seconds the whole check may take; each step is stopped at its share [420]",
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS, help="directory of the results file [benchmarks/results]"
    )
    parser.add_argument("--install", default="", help="how gpu_check.sh installed fedshard (recorded in the results)")
    args = parser.parse_args(argv)
    if args.budget < 2 * RESERVE_SECONDS:
        parser.error(f"--budget {args.budget:g}: must be at least {2 * RESERVE_SECONDS:g} seconds")
    args.device = "cpu" if args.dry else "cuda"
    args.pack = [1, 2] if args.dry else [1, 2, 4]
    # Full size on the GPU; on a dry run small enough for a 2-core CPU.
    args.train_images, args.test_images = (256, 64) if args.dry else (50_000, 10_000)
    args.full_rounds = 2
    args.pack_images, args.pack_seeds = (64, 1) if args.dry else (5_000, 2)
    return args


def summarise(steps: dict) -> tuple[dict, dict]:
    """Every figure of the check, each once: bench.py's (moved out of its step) and this check's
    own; and the grids' projections, where the full run measured a steady round and a startup."""
    full, packing = steps.get("full_run", {}), steps.get("packing", {})
    own = {
        "full_round_seconds": full.get("full_round_seconds"),
        "full_run_startup_seconds": full.get("startup_seconds"),
        "experiments_per_hour": {n: p.get("experiments_per_hour") for n, p in packing.items()},
        "gpu_memory_peak_mib": {n: p.get("gpu_memory_peak_mib") for n, p in packing.items()},
        "best_parallel": best_parallel(packing),
    }
    figures = {**steps.get("bench", {}).pop("figures", {}), **own}
    if not own["full_round_seconds"] or own["full_run_startup_seconds"] is None:
        return figures, {}
    grids = {
        "default": project_grid(own["full_round_seconds"], own["full_run_startup_seconds"], packing),
        "harness": project_grid(
            own["full_round_seconds"], own["full_run_startup_seconds"], packing, projection.harness_plan()
        ),
    }
    figures["grid_projected_minutes"] = grids["default"]["grid_projected_minutes"]
    figures["harness_projected_minutes"] = grids["harness"]["grid_projected_minutes"]
    return figures, grids


def start_results(args) -> tuple[dict, Path]:
    """The results so far (the machine, as bench.py describes it) and the file they go to."""
    info = common.machine(torch.device(args.device))
    output = args.output / file_name(info.get("gpu", info["cpu"]), args.dry)
    return {
        "machine": info,
        "dry": args.dry,
        "budget_seconds": args.budget,
        "install": args.install,
        "steps": {},
    }, output


def closing_lines(output: Path, grids: dict) -> list[str]:
    """The path of the results and each grid's projected minutes: what the caller collects."""
    lines = [f"results: {output}"]
    for name, label in (("default", "default grid"), ("harness", "harness grid (grids/harness.yaml)")):
        grid = grids.get(name)
        packed = (
            f"best --parallel {grid['best_parallel']}"
            if grid and grid["best_parallel"]
            else "one at a time: no packing measured"
        )
        lines.append(
            f"{label}: {grid['runs']} runs, {grid['grid_projected_minutes']:.1f} min projected ({packed})"
            if grid
            else f"{label}: not projected (the full run measured no round >= 2, or no startup)"
        )
    return lines


def outcome(steps: dict) -> tuple[list[str], list[str]]:
    """The steps that failed by themselves, and those the budget stopped or skipped."""
    every = {
        **{k: v for k, v in steps.items() if k != "packing"},
        **{f"packing {n}": p for n, p in steps["packing"].items()},
    }
    failed = [k for k, v in every.items() if v.get("ok") is False and not v.get("cut_at_budget")]
    return failed, [k for k, v in every.items() if v.get("cut_at_budget") or "skipped" in v]


def main(argv=None) -> int:
    args = parse_args(argv)
    t0, budget = time.perf_counter(), Budget(args.budget, RESERVE_SECONDS)
    results, output = start_results(args)
    say(f"machine: {results['machine']}{' (dry run: CPU, toy sizes)' if args.dry else ''}; budget {args.budget:g} s")
    output.parent.mkdir(parents=True, exist_ok=True)

    def save():
        results["wall_seconds"] = time.perf_counter() - t0
        output.write_text(json.dumps(results, indent=2, default=str) + "\n")

    with tempfile.TemporaryDirectory(prefix="fedshard-gpu-check-") as tmp:
        from fedshard.core.synthetic import write_synthetic_cifar100

        args.data = Path(tmp) / "data"
        say(f"writing CIFAR-100-format data: {args.train_images} training, {args.test_images} test images")
        write_synthetic_cifar100(args.data, n_train=args.train_images, n_test=args.test_images, n_classes=100)
        results["data_seconds"] = time.perf_counter() - t0
        run_steps(args, budget, Path(tmp), results["steps"], save)
        shutil.rmtree(args.data, ignore_errors=True)

    steps = results["steps"]
    figures, grids = summarise(steps)
    results.update(grids=grids, figures=figures, targets=verdicts(figures, args.dry))
    save()
    print(
        json.dumps(
            {"figures": figures, "targets": results["targets"], "wall_seconds": round(results["wall_seconds"], 1)},
            indent=2,
            default=str,
        )
    )
    failed, cut = outcome(steps)
    if cut:
        say(f"stopped or skipped at the budget, with what they measured: {', '.join(cut)}")
    if failed:
        say(f"failed: {', '.join(failed)} (their output is in the results file)")
    print("\n".join(closing_lines(output, grids)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
