#!/usr/bin/env python
"""The GPU check (issue 12): every GPU figure fedshard claims, measured in one run on one GPU.

    bash benchmarks/gpu_check.sh            # from a fresh clone, on a machine with one NVIDIA GPU
    bash benchmarks/gpu_check.sh --dry      # the same steps on the CPU at toy sizes (plumbing only)

Steps, each timed and each allowed to fail without losing the others' figures:

  cuda_tests      the CUDA tests of the suite (pytest -k cuda): correctness of bf16, determinism,
                  a resumed run on CUDA.
  bench           benchmarks/bench.py --quick on the device: eval_speedup, training images/s,
                  TFLOP/s, packing of concurrent trainers.
  full_run        a real `fedshard run` at full size: 50,000 training images of CIFAR-100-format
                  data written here, the full 10,000-image test set, world size 2, 3 rounds; the
                  round times come from the run's own metrics (round_seconds, eval_seconds,
                  checkpoint_seconds) and its startup from the trainer's first step.
  packing         `sweep.py --parallel N` on the one GPU for each N in --pack (1 2 4 8), on a
                  small real grid; experiments per hour, and the GPU memory used at the peak.

It writes every figure to benchmarks/results/<gpu-name>.json (on --dry: <cpu>-dry.json), with
figures.full_round_seconds, figures.eval_speedup, figures.best_parallel and
figures.grid_projected_minutes: the default grid with extension (1,350 rounds: planning.plan),
each world-size-2 round taking the measured full-size round time, each world-size-1 round that
time scaled by the arithmetic of a full-width round against a half-width one (0.43 / 0.23 PFLOP),
plus each run's measured startup, divided by the speedup of the best packing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# PFLOP of one round over the full data set (issue 12): a full-width model (world size 1) against
# a world-size-2 round, whose two half-width slices each see half the data.
ROUND_PFLOP = {1: 0.43, 2: 0.23}
TARGETS = {"grid_projected_minutes": ("<=", 30.0), "eval_speedup": (">=", 20.0)}
RUN_ID = re.compile(r"fedshard: run ([0-9a-f]{32})")
FIRST_STEP = re.compile(r"first training step at unix time ([0-9.]+)")


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


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
    """Minutes for the default grid with extension on one GPU, from the measured world-size-2
    round time, the measured startup and the best packing's speedup over one at a time."""
    sys.path.insert(0, str(REPO / "src"))
    from fedshard import grid, planning

    work = planning.plan(grid.expand(grid.make_grid({})), [])
    per_round = {n: full_round_seconds * ROUND_PFLOP[n] / ROUND_PFLOP[2] for n in ROUND_PFLOP}
    serial = sum(startup_seconds + t.rounds_to_train * per_round[t.cfg.world_size] for t in work.tasks)
    best = best_parallel(packing)
    speedup = (packing[best]["experiments_per_hour"] / packing[1]["experiments_per_hour"]
               if best is not None and packing.get(1, {}).get("ok") else 1.0)
    return {"runs": len(work.tasks), "rounds": work.rounds_to_train, "round_seconds": per_round,
            "serial_minutes": serial / 60, "best_parallel": best, "packing_speedup": speedup,
            "grid_projected_minutes": serial / speedup / 60}


def verdicts(figures: dict, dry: bool = False) -> dict:
    """Each target met or not; None where unmeasured, and on a dry run (toy sizes on a CPU)."""
    out = {}
    for name, (op, bound) in TARGETS.items():
        value = figures.get(name)
        met = None if value is None or dry else (value <= bound if op == "<=" else value >= bound)
        out[name] = {"op": op, "bound": bound, "value": value, "met": met}
    return out


# ----------------------------------------------------------------------------- running steps


def env_for(store: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{store / 'mlflow.db'}", PYTHONUNBUFFERED="1",
               MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    return env


def run(command: list[str], timeout: float, **kwargs) -> tuple[int, str, float]:
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        code, output = 124, f"timed out after {timeout:.0f}s\n{exc.stdout or ''}{exc.stderr or ''}"
    return code, output, time.perf_counter() - start


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
    code, out, seconds = run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "tests/"], args.timeout, cwd=REPO)
    tail = out.strip().splitlines()[-1] if out.strip() else ""
    return {"ok": code == 0, "seconds": seconds, "summary": tail, "output_tail": out[-4000:]}


def step_bench(args, work: Path) -> dict:
    path = work / "bench.json"
    # Without bench.py's own extension sweeps: the packing step below runs sweeps of its own.
    code, out, seconds = run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--quick", "--no-sweeps",
                              "--device", args.device, "--json", str(path)], args.timeout, cwd=REPO)
    result = {"ok": code == 0, "seconds": seconds, "output_tail": out[-4000:]}
    if code == 0:
        result["figures"] = json.loads(path.read_text())["figures"]
    return result


def step_full_run(args, work: Path) -> dict:
    store = work / "full"
    store.mkdir()
    command = [sys.executable, "-m", "fedshard", "run", "--world-size", "2", "--rounds", str(args.full_rounds),
               "--data-dir", str(args.data), "--device", args.device, "--experiment-name", "gpu-check",
               "--max-train-samples", str(args.train_images), "--max-test-samples", str(args.test_images)]
    start = time.time()
    with MemoryPeak(not args.dry) as memory:
        code, out, seconds = run(command, args.timeout, cwd=store, env=env_for(store))
    result = {"ok": code == 0, "seconds": seconds, "gpu_memory_peak_mib": memory.peak_mib,
              "output_tail": out[-4000:]}
    match = RUN_ID.search(out)
    if code != 0 or not match:
        return result
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env_for(store)["MLFLOW_TRACKING_URI"])
    run_id = match.group(1)

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    rounds = history("round_seconds")
    steady = [s for r, s in sorted(rounds.items()) if r >= 2] or list(rounds.values())
    log = Path(client.download_artifacts(run_id, "logs/trainer_0.log", str(store)))
    first = [float(m.group(1)) for m in FIRST_STEP.finditer(log.read_text())]
    result.update(run_id=run_id, round_seconds=rounds, eval_seconds=history("eval_seconds"),
                  checkpoint_seconds=history("checkpoint_seconds"), trainer_seconds=history("trainer_0/seconds"),
                  full_round_seconds=sorted(steady)[len(steady) // 2],  # the median of the steady rounds
                  startup_seconds=(first[0] - start) if first else None)
    return result


def step_packing(args, work: Path, n: int) -> dict:
    """One sweep of the small grid with --parallel n on the one GPU, in a fresh store."""
    store = work / f"pack{n}"
    store.mkdir()
    grid = ["--world-sizes", "1,2", "--learning-rates", "1e-3", "--swap", "true", "--rounds", "1",
            "--seeds", ",".join(str(s) for s in range(1, args.pack_seeds + 1)), "--parallel", str(n),
            "-P", f"data_dir={args.data}", "-P", f"max_train_samples={args.pack_images}",
            "-P", f"max_test_samples={args.test_images}", "-P", f"device={args.device}", "--no-progress"]
    with MemoryPeak(not args.dry) as memory:
        code, out, seconds = run([sys.executable, str(REPO / "sweep.py"), *grid], args.timeout, cwd=store,
                                 env=env_for(store))
    experiments = 2 * args.pack_seeds
    return {"ok": code == 0, "parallel": n, "experiments": experiments, "seconds": seconds,
            "experiments_per_hour": experiments_per_hour(experiments, seconds) if code == 0 else None,
            "gpu_memory_peak_mib": memory.peak_mib, "output_tail": out[-2000:]}


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
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

    t0 = time.perf_counter()
    name = device_name(args.device)
    say(f"device: {name}{' (dry run: CPU, toy sizes)' if args.dry else ''}")
    results = {"device": name, "dry": args.dry,
               "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "python": platform.python_version(), "steps": {}}
    with tempfile.TemporaryDirectory(prefix="fedshard-gpu-check-") as tmp:
        work = Path(tmp)
        sys.path.insert(0, str(REPO / "src"))
        from fedshard.synthetic import write_synthetic_cifar100

        args.data = work / "data"
        say(f"writing CIFAR-100-format data: {args.train_images} training, {args.test_images} test images")
        write_synthetic_cifar100(args.data, n_train=args.train_images, n_test=args.test_images, n_classes=100)
        steps = results["steps"]
        output = args.output or RESULTS / file_name(name, args.dry)
        output.parent.mkdir(parents=True, exist_ok=True)

        def save():  # after every step: a run cut short by its time limit keeps what it measured
            results["wall_seconds"] = time.perf_counter() - t0
            output.write_text(json.dumps(results, indent=2, default=str) + "\n")

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
        shutil.rmtree(args.data, ignore_errors=True)

    figures = {"eval_speedup": (steps["bench"].get("figures") or {}).get("eval_speedup"),
               "full_round_seconds": steps["full_run"].get("full_round_seconds"),
               "startup_seconds": steps["full_run"].get("startup_seconds"),
               "experiments_per_hour": {n: p["experiments_per_hour"] for n, p in steps["packing"].items()},
               "gpu_memory_peak_mib": {n: p["gpu_memory_peak_mib"] for n, p in steps["packing"].items()},
               "best_parallel": best_parallel(steps["packing"])}
    if figures["full_round_seconds"] and figures["startup_seconds"] is not None:
        grid = project_grid(figures["full_round_seconds"], figures["startup_seconds"], steps["packing"])
        results["grid"] = grid
        figures["grid_projected_minutes"] = grid["grid_projected_minutes"]
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
