#!/usr/bin/env python
"""The GPU check: every GPU figure fedshard claims, measured in one run on one GPU.

    bash benchmarks/gpu_check.sh            # from a fresh clone, on a machine with one NVIDIA GPU
    bash benchmarks/gpu_check.sh --dry      # the same steps on the CPU at toy sizes (plumbing only)

Steps, in this order, each timed and each allowed to fail without losing the others' figures:

  cuda_tests      the CUDA tests of the suite (pytest -k cuda): correctness of bf16, determinism,
                  a resumed run on CUDA.
  full_run        a real `fedshard run` at full size (common.run_experiment, as bench.py runs its
                  experiment): 50,000 training images of CIFAR-100-format data written here, the
                  full 10,000-image test set, world size 2, 3 rounds; the round times come from the
                  run's own metrics (round_seconds, eval_seconds, checkpoint_seconds), its startup
                  from trainer 0's first step, with the MLflow store created beforehand.
  packing         `sweep.py --parallel N` on the one GPU for each N in --pack (1 2 4 8), on a
                  small real grid; experiments per hour, and the GPU memory used at the peak.
  bench           benchmarks/bench.py --quick --no-sweeps --no-projection on the device:
                  eval_speedup, training images/s, TFLOP/s, and its other figures; without its
                  own packing measurement and grid projection, which this check makes from real
                  runs instead.

It writes every figure to benchmarks/results/<gpu-name>.json (on --dry: <cpu>-dry.json), once:
`figures` holds bench.py's figures and this check's own, full_round_seconds (the best of the
full run's rounds >= 2, as bench.py takes rounds), full_run_startup_seconds, best_parallel and
grid_projected_minutes: the default grid with extension (projection.py), each world-size-2
round taking the measured full-size round time, each world-size-1 round that time scaled by the
training FLOPs of its round against a world-size-2 round's (projection.round_flops, from the
model's layer shapes), plus each run's measured startup, divided by the speedup of the best
packing.
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


def project_grid(full_round_seconds: float, startup_seconds: float, packing: dict[int, dict]) -> dict:
    """Minutes for the default grid on one GPU, from the measured world-size-2 round time, the
    measured startup and the best packing's speedup over one at a time."""
    best = best_parallel(packing)
    speedup = (packing[best]["experiments_per_hour"] / packing[1]["experiments_per_hour"]
               if best is not None and packing.get(1, {}).get("ok") else 1.0)
    per_round = projection.rounds_scaled_by_flops(full_round_seconds, measured_world_size=2)
    return {**projection.project(per_round, startup_seconds, speedup), "best_parallel": best}


def verdicts(figures: dict, dry: bool = False) -> dict:
    """report.judge on the figures of this check that have a target; on a dry run (toy sizes on
    a CPU) none is judged."""
    return judge(figures, on_gpu=not dry, names=JUDGED)


# ----------------------------------------------------------------------------- the steps


class MemoryPeak:
    """The GPU memory in use (all processes, MiB), sampled through NVML while a step runs."""

    def __init__(self, enabled: bool):
        self.peak_mib, self.stop, self.thread = 0.0, threading.Event(), None
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


def step_cuda_tests(args) -> dict:
    if args.dry:
        return {"ok": None, "skipped": "no CUDA device on a dry run"}
    done = common.run_command([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "tests/"], args.timeout, cwd=REPO)
    tail = done.output.strip().splitlines()[-1] if done.output.strip() else ""
    return {"ok": done.code == 0, "seconds": done.seconds, "summary": tail, "output_tail": done.output[-4000:]}


def step_bench(args, work: Path) -> dict:
    path = work / "bench.json"
    done = common.run_command([sys.executable, str(REPO / "benchmarks" / "bench.py"), *BENCH_ARGS,
                               "--device", args.device, "--json", str(path)], args.timeout, cwd=REPO)
    result = {"ok": done.code == 0, "seconds": done.seconds, "output_tail": done.output[-4000:]}
    if done.code == 0:
        result["figures"] = json.loads(path.read_text())["figures"]
    return result


def step_full_run(args, work: Path) -> dict:
    store = work / "full"
    store.mkdir()
    with MemoryPeak(not args.dry) as memory:
        done, run = common.run_experiment(args.data, store, world_size=2, rounds=args.full_rounds,
                                          train_images=args.train_images, test_images=args.test_images,
                                          device=args.device, timeout=args.timeout, experiment="gpu-check",
                                          MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    result = {"ok": done.code == 0, "seconds": done.seconds, "gpu_memory_peak_mib": memory.peak_mib,
              "output_tail": done.output[-4000:]}
    if run is None:
        return result
    result.update({k: run[k] for k in ("run_id", "round_seconds", "eval_seconds", "checkpoint_seconds",
                                       "trainer_seconds", "startup_seconds", "startup_breakdown")},
                  full_round_seconds=common.best_steady_round(run["round_seconds"]))
    return result


def step_packing(args, work: Path, n: int) -> dict:
    """One sweep of the small grid with --parallel n on the one GPU, in a fresh store."""
    store = work / f"pack{n}"
    store.mkdir()
    seeds = ",".join(str(s) for s in range(1, args.pack_seeds + 1))
    command = common.sweep(args.data, args.device, args.pack_images, args.test_images, "--world-sizes", "1,2",
                           "--learning-rates", "1e-3", "--swap", "true", "--rounds", "1", "--seeds", seeds,
                           "--parallel", str(n))
    env = common.store_env(store, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    with MemoryPeak(not args.dry) as memory:
        done = common.run_command(command, args.timeout, cwd=store, env=env)
    experiments = 2 * args.pack_seeds
    return {"ok": done.code == 0, "parallel": n, "experiments": experiments, "seconds": done.seconds,
            "experiments_per_hour": experiments_per_hour(experiments, done.seconds) if done.code == 0 else None,
            "gpu_memory_peak_mib": memory.peak_mib, "output_tail": done.output[-2000:]}


def run_steps(args, work: Path, steps: dict, save) -> None:
    """Every step in turn, saving the results after each: a check cut short by its time limit
    keeps what it measured."""
    say("CUDA tests")
    steps["cuda_tests"] = step_cuda_tests(args)
    save()
    say(f"full-size run: world size 2, {args.full_rounds} rounds")
    steps["full_run"] = step_full_run(args, work)
    save()
    steps["packing"] = {}
    for n in args.pack:
        say(f"sweep with --parallel {n}")
        steps["packing"][n] = step_packing(args, work, n)
        save()
    say("bench.py on the device")
    steps["bench"] = step_bench(args, work)


# ----------------------------------------------------------------------------- main


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="run every step on the CPU at toy sizes")
    parser.add_argument("--pack", type=int, nargs="+", default=None, help="--parallel values [1 2 4 8; dry: 1 2]")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per step [240; dry: 600]")
    parser.add_argument("--output", type=Path, default=None, help="results file [benchmarks/results/<gpu>.json]")
    args = parser.parse_args(argv)
    args.device = "cpu" if args.dry else "cuda"
    args.pack = args.pack or ([1, 2] if args.dry else [1, 2, 4, 8])
    args.timeout = args.timeout or (600.0 if args.dry else 240.0)
    # Full size on the GPU; on a dry run small enough for a 2-core CPU.
    args.train_images, args.test_images = (256, 64) if args.dry else (50_000, 10_000)
    args.full_rounds = 2 if args.dry else 3
    args.pack_images, args.pack_seeds = (64, 1) if args.dry else (5_000, 4)  # 8 experiments a sweep
    return args


def summarise(steps: dict) -> tuple[dict, dict | None]:
    """Every figure of the check, each once: bench.py's (moved out of its step) and this check's
    own; and the grid projection, where the full run measured a round and a startup."""
    full, packing = steps["full_run"], steps["packing"]
    own = {"full_round_seconds": full.get("full_round_seconds"),
           "full_run_startup_seconds": full.get("startup_seconds"),
           "experiments_per_hour": {n: p["experiments_per_hour"] for n, p in packing.items()},
           "gpu_memory_peak_mib": {n: p["gpu_memory_peak_mib"] for n, p in packing.items()},
           "best_parallel": best_parallel(packing)}
    figures = {**steps["bench"].pop("figures", {}), **own}
    if not own["full_round_seconds"] or own["full_run_startup_seconds"] is None:
        return figures, None
    grid = project_grid(own["full_round_seconds"], own["full_run_startup_seconds"], packing)
    figures["grid_projected_minutes"] = grid["grid_projected_minutes"]
    return figures, grid


def start_results(args) -> tuple[dict, Path]:
    """The results so far (the machine, as bench.py describes it) and the file they go to."""
    info = common.machine(torch.device(args.device))
    output = args.output or RESULTS / file_name(info.get("gpu", info["cpu"]), args.dry)
    return {"machine": info, "dry": args.dry, "steps": {}}, output


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    results, output = start_results(args)
    say(f"machine: {results['machine']}{' (dry run: CPU, toy sizes)' if args.dry else ''}")
    output.parent.mkdir(parents=True, exist_ok=True)

    def save():
        results["wall_seconds"] = time.perf_counter() - t0
        output.write_text(json.dumps(results, indent=2, default=str) + "\n")

    with tempfile.TemporaryDirectory(prefix="fedshard-gpu-check-") as tmp:
        from fedshard.synthetic import write_synthetic_cifar100

        args.data = Path(tmp) / "data"
        say(f"writing CIFAR-100-format data: {args.train_images} training, {args.test_images} test images")
        write_synthetic_cifar100(args.data, n_train=args.train_images, n_test=args.test_images, n_classes=100)
        run_steps(args, Path(tmp), results["steps"], save)
        shutil.rmtree(args.data, ignore_errors=True)

    steps = results["steps"]
    figures, grid = summarise(steps)
    if grid is not None:
        results["grid"] = grid
    results["figures"] = figures
    results["targets"] = verdicts(figures, args.dry)
    save()
    print(json.dumps({"figures": figures, "targets": results["targets"],
                      "wall_seconds": round(results["wall_seconds"], 1)}, indent=2, default=str))
    print(f"written to {output}")
    failed = [k for k, v in steps.items() if isinstance(v, dict) and v.get("ok") is False]
    failed += [f"packing {n}" for n, p in steps["packing"].items() if not p["ok"]]
    if failed:
        say(f"failed steps: {', '.join(failed)} (their output is in the results file)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
