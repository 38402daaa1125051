"""What each experiment's process is given: its command line, its share of the cores, its GPU.

An experiment is a `fedshard run` that must run exactly the configuration the sweep planned, so
its command spells out every parameter. Experiments that run side by side split the cores
between them (FEDSHARD_CPUS) and go round-robin over the GPUs, so that N at a time do not
oversubscribe one device or one core.
"""

from __future__ import annotations

import logging
import os
import sys

from fedshard.core.config import ExperimentConfig
from fedshard.core.errors import described
from fedshard.runtime.processes import cpu_budget
from fedshard.sweep.planning import Task

log = logging.getLogger(__name__)


def child_command(cfg: ExperimentConfig) -> list[str]:
    """`fedshard run` with every parameter spelled out, so the process runs exactly this config."""
    args = [sys.executable, "-m", "fedshard", "run"]
    for name, value in cfg.params().items():
        args += [f"--{name.replace('_', '-')}", value]
    return args


def task_command(task: Task) -> list[str]:
    """The `fedshard run` that carries out a task: resuming its run, or a run of its configuration,
    extending a FINISHED run when the task says so."""
    if task.resume:
        return [sys.executable, "-m", "fedshard", "run", "--resume", task.resume]
    return child_command(task.cfg) + (["--extend", task.extends] if task.extends else [])


def visible_gpus() -> list[str]:
    """The GPUs experiments may be spread over: $CUDA_VISIBLE_DEVICES when set, else all torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception as exc:  # no torch build with CUDA, no driver: CPU only
        log.debug(f"no GPU is used: {described(exc)}")
        return []


def pick_gpu(gpus: list[str], busy: list[str | None]) -> str | None:
    """The GPU for the next experiment: the one running the fewest now (ties: the first), so
    parallel experiments go round-robin over the GPUs; None with fewer than two GPUs."""
    if len(gpus) < 2:
        return None
    return min(gpus, key=lambda g: (busy.count(g), gpus.index(g)))


def cpus_per_experiment(parallel: int) -> int:
    """Cores each of `parallel` experiments may use (FEDSHARD_CPUS), so they do not oversubscribe."""
    return max(1, cpu_budget() // parallel)
