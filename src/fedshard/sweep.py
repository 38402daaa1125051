"""The grid as researchers run it: expand, skip what already finished, run the rest.

A sweep is one MLflow parent run; each experiment is a child run that the sweep
creates (params logged, tag mlflow.parentRunId) and hands to its own
`fedshard run` process through MLFLOW_RUN_ID. That process is the launcher of
the experiment: it owns the metaserver, aggregator and trainers, tears them
down on SIGTERM and marks the run KILLED. The sweep only ever stops the
launcher, and steps in itself (kill, mark KILLED) when one does not exit.
Where launchers run - child processes here, or Ray tasks on a cluster - is the
executor's business (executors.py).

Nothing here is tied to the default grid: `expand` takes any axes, `plan`
compares canonical configurations (so '0.00001' and '1e-05' are one learning
rate), and `Sweep` runs any list of configurations N at a time.
"""

from __future__ import annotations

import itertools
import os
import shlex
import signal
import sys
import tempfile
import time
from collections import deque
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from . import executors
from .config import ConfigError, ExperimentConfig, field_names

# Grid axis (option / grid-file key) -> the experiment parameter it varies.
AXES = {
    "world_sizes": "world_size",
    "learning_rates": "learning_rate",
    "swap": "enable_swapping",
    "rounds": "rounds",
    "seeds": "seed",
}
# DESIGN §1: 18 runs for world_size 1 (swapping does not apply), 36 for world_size 2.
DEFAULT_GRID = {
    "world_sizes": ["1", "2"],
    "learning_rates": ["1e-5", "1e-4", "1e-3"],
    "swap": ["false", "true"],
    "rounds": ["30", "50"],
    "seeds": ["123", "456", "789"],
}
GRID_FILE_KEYS = (*AXES, "params")

POLL_SECONDS = 0.2
# How long a launcher gets to tear its experiment down after SIGTERM before the
# sweep kills what is left itself.
STOP_GRACE_SECONDS = 30.0
LAUNCHER_LOG = "fedshard-run.log"


class SweepError(ValueError):
    """A bad grid, -P assignment or grid file; the message says what and what is valid."""


# --------------------------------------------------------------------------- the grid


def split_values(axis: str, value) -> list[str]:
    """'1e-5, 1e-4' or [1e-5, 0.0001] (YAML) -> ['1e-5', '1e-4']; booleans as true/false."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    out = []
    for item in items:
        text = ("true" if item else "false") if isinstance(item, bool) else str(item).strip()
        if not text:
            raise SweepError(f"--{axis.replace('_', '-')} {value!r}: empty value in the list")
        out.append(text)
    if not out:
        raise SweepError(f"--{axis.replace('_', '-')}: no values given")
    return out


def parse_assignments(items) -> dict[str, str]:
    """-P key=value pairs -> {key: value}; keys must be experiment parameters that are not grid axes."""
    fixed: dict[str, str] = {}
    valid = [n for n in field_names() if n not in AXES.values()]
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise SweepError(f"-P {item!r}: expected KEY=VALUE, e.g. -P data_dir=/data")
        if key in AXES.values():
            axis = next(a for a, f in AXES.items() if f == key)
            raise SweepError(f"-P {item!r}: {key} is a grid axis; give it as --{axis.replace('_', '-')} "
                             f"(a single value is a one-value axis)")
        if key not in valid:
            raise SweepError(f"-P {item!r}: unknown experiment parameter {key!r}; valid: {', '.join(valid)}")
        fixed[key] = value.strip()
    return fixed


def load_grid_file(path) -> dict:
    """A YAML grid: any of world_sizes, learning_rates, swap, rounds, seeds (lists or comma
    strings) and params (a mapping of fixed experiment parameters)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SweepError(f"grid file {path}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise SweepError(f"grid file {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SweepError(f"grid file {path}: expected a mapping with keys {', '.join(GRID_FILE_KEYS)}")
    unknown = sorted(set(map(str, data)) - set(GRID_FILE_KEYS))
    if unknown:
        raise SweepError(f"grid file {path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(GRID_FILE_KEYS)}")
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise SweepError(f"grid file {path}: params must be a mapping such as {{data_dir: /data}}")
    out = {axis: split_values(axis, data[axis]) for axis in AXES if data.get(axis) is not None}
    out["params"] = {str(k): ("true" if v else "false") if isinstance(v, bool) else ("" if v is None else str(v))
                     for k, v in params.items()}
    return out


@dataclass(frozen=True)
class Grid:
    axes: dict  # axis name -> list of value strings
    fixed: dict = field(default_factory=dict)  # experiment parameter -> value string, the same for every run

    def describe(self) -> str:
        parts = [f"{axis}={','.join(values)}" for axis, values in self.axes.items()]
        return " ".join(parts + [f"{k}={v}" for k, v in self.fixed.items()])


def make_grid(options: dict, assignments=(), grid_file=None) -> Grid:
    """Options given on the command line win over the grid file, which wins over DESIGN's default grid."""
    from_file = load_grid_file(grid_file) if grid_file else {}
    axes = {}
    for axis in AXES:
        given = options.get(axis)
        axes[axis] = (split_values(axis, given) if given not in (None, "") else
                      from_file.get(axis) or list(DEFAULT_GRID[axis]))
    fixed = parse_assignments(f"{k}={v}" for k, v in from_file.get("params", {}).items())
    fixed.update(parse_assignments(assignments))
    return Grid(axes, fixed)


def expand(grid: Grid) -> list[ExperimentConfig]:
    """Every configuration of the grid, validated, canonical and without duplicates, in grid order
    (world size, learning rate, swapping, rounds, seed). Swapping collapses to off wherever it
    does not apply (world_size 1, fedavg), so the default grid is 18 + 36 = 54 runs."""
    problems: list[str] = []

    def config(values: dict) -> ExperimentConfig | None:
        try:
            return ExperimentConfig.from_mapping(values)
        except ConfigError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines()]
            problems.extend(ln for ln in (lines[1:] or lines) if ln not in problems)
            return None

    # Each value alone first, so that one bad value is reported once, not once per combination.
    if config(grid.fixed) is not None:
        for axis, name in AXES.items():
            for value in grid.axes[axis]:
                config({**grid.fixed, name: value})
    if problems:
        raise SweepError("invalid sweep:\n  " + "\n  ".join(problems))
    configs, seen = [], set()
    for combo in itertools.product(*(grid.axes[axis] for axis in AXES)):
        cfg = config({**grid.fixed, **dict(zip(AXES.values(), combo))})
        if cfg is not None and cfg not in seen:
            seen.add(cfg)
            configs.append(cfg)
    if problems:
        raise SweepError("invalid sweep:\n  " + "\n  ".join(problems))
    return configs


# --------------------------------------------------------------------------- what is left


def finished_configs(runs) -> dict[ExperimentConfig, str]:
    """Canonical configuration -> id of a FINISHED experiment run (sweep parent runs excluded)."""
    done = {}
    for run in runs:
        if run.status == "FINISHED" and run.is_experiment:
            with suppress(ConfigError):
                done[run.config()] = run.run_id
    return done


def plan(configs, runs) -> tuple[list[ExperimentConfig], list[tuple[ExperimentConfig, str]]]:
    """(configurations to run, [(configuration, its finished run id)] to skip). Only a FINISHED run
    counts: FAILED and KILLED configurations run again."""
    done = finished_configs(runs)
    todo = [c for c in configs if c not in done]
    skipped = [(c, done[c]) for c in configs if c in done]
    return todo, skipped


def describe(cfg: ExperimentConfig) -> str:
    return (f"world_size={cfg.world_size}, lr={cfg.learning_rate!r}, swap={cfg.enable_swapping}, "
            f"rounds={cfg.rounds}, seed={cfg.seed}")


def child_command(cfg: ExperimentConfig) -> list[str]:
    """`fedshard run` with every parameter spelled out, so the process runs exactly this config."""
    args = [sys.executable, "-m", "fedshard", "run"]
    for name, value in cfg.params().items():
        args += [f"--{name.replace('_', '-')}", value]
    return args


# --------------------------------------------------------------------------- resources


def visible_gpus() -> list[str]:
    """The GPUs experiments may be spread over: $CUDA_VISIBLE_DEVICES when set, else all torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch build with CUDA, no driver: CPU only
        return []


def pick_gpu(gpus: list[str], busy: list[str | None]) -> str | None:
    """The GPU for the next experiment: the one running the fewest now (ties: the first), so
    parallel experiments go round-robin over the GPUs; None with fewer than two GPUs."""
    if len(gpus) < 2:
        return None
    return min(gpus, key=lambda g: (busy.count(g), gpus.index(g)))


def cpus_per_experiment(parallel: int) -> int:
    """Cores each of `parallel` experiments may use (FEDSHARD_CPUS), so they do not oversubscribe."""
    from .launcher import cpu_budget

    return max(1, cpu_budget() // parallel)


# --------------------------------------------------------------------------- running


@dataclass
class Job:
    cfg: ExperimentConfig
    index: int  # 1-based position among the configurations to run
    attempt: int = 1
    run_id: str = ""
    task: executors.LocalProcess | executors.RayTask | None = None
    log: Path | None = None
    gpu: str | None = None
    started: float = 0.0


@dataclass
class Outcome:
    cfg: ExperimentConfig
    run_id: str
    attempts: int
    reason: str = ""


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Sweep:
    """Runs configurations `parallel` at a time, each as its own cancellable `fedshard run`."""

    def __init__(self, configs, experiment_name: str, parallel: int = 1, max_retries: int = 1,
                 skipped=(), grid: Grid | None = None, echo=print, progress: bool = True, executor=None):
        self.configs, self.experiment_name = list(configs), experiment_name
        self.parallel, self.max_retries = parallel, max_retries
        self.skipped, self.grid, self.echo, self.progress = list(skipped), grid, echo, progress
        self.finished: list[Outcome] = []
        self.failed: list[Outcome] = []
        self.killed: list[Outcome] = []
        self.running: list[Job] = []
        self.pending: deque[Job] = deque(Job(c, i) for i, c in enumerate(self.configs, 1))
        self.stop_signal: int | None = None
        self.parent_run_id = self.experiment_id = ""
        self.gpus: list[str] = []
        self.env: dict[str, str] = {}
        self.bar = None  # the tqdm progress bar, on stderr
        self.executor = executor or executors.LocalExecutor()
        self.t0 = time.monotonic()

    # -- lifecycle ----------------------------------------------------------------------
    def run(self) -> int:
        """Run everything; return the exit code (0 all finished, 1 some failed, 128+signal)."""
        from . import tracking

        try:  # first: ray.init installs a SIGTERM handler of its own, which ours must replace
            self.executor.open(self.configs, self.say)
        except executors.ExecutorError as exc:
            self.executor.close()
            raise SweepError(str(exc)) from exc
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        self.logs = Path(tempfile.mkdtemp(prefix="fedshard-sweep-"))
        status, error = "FAILED", None
        try:
            self._prepare()
            self.say(f"Sweep run {self.parent_run_id} in experiment {self.experiment_name!r} "
                      f"({tracking.tracking_uri()}); logs in {self.logs}")
            self._loop()
            status = "KILLED" if self.stop_signal else ("FAILED" if self.failed else "FINISHED")
        except BaseException as exc:  # our own bug or a broken store: still leave no process behind
            error = exc
            raise
        finally:
            self._stop_all(f"interrupted by {signal.Signals(self.stop_signal).name}" if self.stop_signal
                           else f"sweep failed: {type(error).__name__}: {error}")
            self.executor.close()
            for s, h in handlers.items():
                signal.signal(s, h)
            if self.bar is not None:
                self.bar.close()
            if self.parent_run_id:
                with suppress(Exception):
                    tracking.log_round(self.parent_run_id, 0, {
                        "experiments_finished": len(self.finished), "experiments_failed": len(self.failed),
                        "experiments_killed": len(self.killed), "experiments_skipped": len(self.skipped)})
                reason = (f"interrupted by {signal.Signals(self.stop_signal).name}" if self.stop_signal else
                          f"{type(error).__name__}: {error}" if error else
                          f"{len(self.failed)} experiment(s) failed" if self.failed else None)
                with suppress(Exception):
                    tracking.end_run(self.parent_run_id, status, reason)
        self._summary()
        if not self.failed and not self.killed:
            import shutil

            shutil.rmtree(self.logs, ignore_errors=True)
        if self.stop_signal:
            return 128 + self.stop_signal
        return 1 if self.failed else 0

    def _prepare(self) -> None:
        from . import tracking

        per_cpu = cpus_per_experiment(self.parallel)
        self.env = executors.child_env({"MLFLOW_TRACKING_URI": tracking.tracking_uri(), "FEDSHARD_CPUS": str(per_cpu)})
        self.gpus = visible_gpus() if self.parallel > 1 and self.executor.spreads_gpus else []
        tags = {"fedshard.sweep.experiments": str(len(self.configs)),
                "fedshard.sweep.skipped": str(len(self.skipped))}
        if self.grid is not None:
            tags.update({f"fedshard.sweep.{axis}": ",".join(v) for axis, v in self.grid.axes.items()})
            tags["fedshard.sweep.params"] = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.grid.fixed.items())
        self.parent_run_id, self.experiment_id = tracking.start_sweep_run(
            self.experiment_name, f"sweep-{time.strftime('%Y%m%d-%H%M%S')}", tags)
        if self.progress:
            from tqdm import tqdm

            tqdm.monitor_interval = 0  # no monitor thread: children are started with a preexec_fn
            # On a terminal a live bar; redirected to a file (a sweep left to run), a line per
            # completed experiment instead (see _advance), as a bar is unreadable in a log.
            self.bar = tqdm(total=len(self.configs), unit="exp", desc="sweep", file=sys.stderr, disable=None,
                            dynamic_ncols=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                            "[{elapsed}<{remaining}{postfix}]")
            self.bar.set_postfix_str("0 failed")
        self.t0 = time.monotonic()

    def _on_signal(self, signum, _frame) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
        # A second Ctrl-C while stopping changes nothing: the teardown below always completes.

    def say(self, message: str) -> None:
        if self.bar is not None and not self.bar.disable:
            from tqdm import tqdm

            with tqdm.external_write_mode(file=sys.stdout):
                self.echo(message)
        else:
            self.echo(message)

    def _loop(self) -> None:
        while (self.pending or self.running) and not self.stop_signal:
            while self.pending and len(self.running) < self.parallel and not self.stop_signal:
                self._start(self.pending.popleft())
            for job in [j for j in self.running if j.task.done()]:
                self.running.remove(job)
                self._finish(job)
            if self.bar is not None and not self.bar.disable:
                self.bar.refresh()  # keeps the elapsed time ticking between completions
            time.sleep(POLL_SECONDS)

    # -- one experiment -------------------------------------------------------------------
    def _start(self, job: Job) -> None:
        from . import tracking

        total = len(self.configs)
        if job.attempt == 1:
            self.say(f"=== Running experiment {job.index}/{total} ===")
        else:
            self.say(f"=== Retrying experiment {job.index}/{total} (attempt {job.attempt}/{self.max_retries + 1}) ===")
        self.say(f"Starting experiment: {describe(job.cfg)}")
        job.run_id = tracking.create_child_run(job.cfg, self.experiment_id, self.parent_run_id,
                                               tags={"fedshard.sweep.attempt": str(job.attempt),
                                                     **tracking.owner_tags()})
        env = dict(self.env, MLFLOW_RUN_ID=job.run_id)
        job.gpu = pick_gpu(self.gpus, [j.gpu for j in self.running])
        if job.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = job.gpu
        job.log = self.logs / f"{job.index:03d}-{job.run_id[:8]}-attempt{job.attempt}.log"
        try:
            job.task = self.executor.start(job.cfg, child_command(job.cfg), env, job.log)
        except Exception as exc:
            tracking.end_run(job.run_id, "FAILED", f"sweep could not start the experiment: {exc}")
            raise
        job.started = time.monotonic()
        self.running.append(job)
        self.say(f"  MLflow run {job.run_id}" + (f" on GPU {job.gpu}" if job.gpu is not None else "")
                 + f", {job.task.where}, log {job.log}")

    def _finish(self, job: Job) -> None:
        from . import tracking

        record = tracking.run_record(job.run_id)
        self._upload_log(job)
        outcome = Outcome(job.cfg, job.run_id, job.attempt)
        if record.status == "FINISHED":
            self.say(f"Experiment completed successfully: {job.cfg.key()!r} "
                     f"({time.monotonic() - job.started:.0f}s)")
            self.finished.append(outcome)
            self._advance()
            return
        reason = record.tags.get(tracking.FAILURE_TAG) or self._log_tail(job)
        reason = f"{job.task.outcome()}: {reason}" if reason else job.task.outcome()
        if record.status == "RUNNING":  # the launcher died (or its node was lost) before it could end its run
            tracking.end_run(job.run_id, "FAILED", reason)
        outcome.reason = _one_line(reason)
        if job.attempt <= self.max_retries:
            self.say(f"Experiment failed: {job.cfg.key()!r}: {outcome.reason} (run {job.run_id}); "
                     f"will retry ({job.attempt}/{self.max_retries + 1} attempts used)")
            self.pending.append(Job(job.cfg, job.index, job.attempt + 1))
            return
        self.say(f"Experiment failed: {job.cfg.key()!r}: {outcome.reason} (run {job.run_id})")
        self.failed.append(outcome)
        self._advance()

    def _advance(self) -> None:
        done, total = len(self.finished) + len(self.failed), len(self.configs)
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix_str(f"{len(self.failed)} failed")
            self.bar.update(1)
        elif self.progress:
            elapsed = time.monotonic() - self.t0
            eta = elapsed / done * (total - done)
            self.say(f"Progress: {done}/{total} done ({len(self.failed)} failed), elapsed {_clock(elapsed)}, "
                     f"ETA {_clock(eta)}")

    @staticmethod
    def _log_tail(job: Job, n: int = 3) -> str:
        with suppress(OSError):
            lines = [ln for ln in job.log.read_text(errors="replace").splitlines() if ln.strip()]
            return " | ".join(lines[-n:])
        return ""

    @staticmethod
    def _upload_log(job: Job) -> None:
        from . import tracking

        with suppress(Exception), tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / LAUNCHER_LOG
            copy.write_bytes(job.log.read_bytes())
            tracking.log_artifact(job.run_id, copy, "logs")

    # -- stopping -------------------------------------------------------------------------
    def _stop_all(self, why: str) -> None:
        """Stop every launcher (SIGTERM, or a Ray cancel that sends it; each tears its experiment down
        and marks its run KILLED), kill whatever is left after the grace period, and make sure no
        run stays RUNNING."""
        from . import tracking

        jobs, self.running = self.running, []
        if not jobs:
            return
        self.say(f"Sweep {why}: stopping {len(jobs)} running experiment(s)...")
        for job in jobs:
            job.task.stop()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for job in jobs:
            job.task.wait(max(0.0, deadline - time.monotonic()))
            if not job.task.done():
                job.task.kill()
            reason = f"sweep {why}"
            with suppress(Exception):
                if tracking.run_status(job.run_id) == "RUNNING":
                    tracking.end_run(job.run_id, "KILLED", reason)
            self._upload_log(job)
            self.killed.append(Outcome(job.cfg, job.run_id, job.attempt, reason))
            self.say(f"Experiment stopped: {job.cfg.key()!r} (run {job.run_id} KILLED)")

    # -- report ---------------------------------------------------------------------------
    def _summary(self) -> None:
        say = self.say
        say("")
        say("=== Sweep summary ===")
        say(f"Finished: {len(self.finished)}")
        say(f"Failed: {len(self.failed)}")
        for o in self.failed:
            say(f"  {o.cfg.key()!r}: {o.reason} (run {o.run_id}, {o.attempts} attempt(s))")
        say(f"Skipped (already finished): {len(self.skipped)}")
        if self.killed:
            say(f"Interrupted: {len(self.killed)} (marked KILLED)")
            for o in self.killed:
                say(f"  {o.cfg.key()!r} (run {o.run_id})")
        not_started = len({j.index for j in self.pending})
        if self.stop_signal and not_started:
            say(f"Not started: {not_started}")
        if self.stop_signal:
            say("Run the same sweep again to continue with what is left.")
        if self.failed or self.killed:
            say(f"Logs of this sweep's experiments: {self.logs}")


# --------------------------------------------------------------------------- the command


def main(grid: Grid, experiment_name: str | None, parallel: int, max_retries: int, dry_run: bool,
         echo=print, progress: bool = True, executor=None) -> int:
    """What `python sweep.py` does, after the options were parsed; returns the exit code."""
    from . import tracking

    configs = expand(grid)
    tracking.ensure_store()
    parent = os.environ.get("MLFLOW_RUN_ID")
    if parent:  # under `mlflow run -e sweep`: that run is the parent, its experiment is ours
        mine = tracking.experiment_name_of_run(parent)
        if experiment_name and experiment_name != mine:
            raise SweepError(f"--experiment-name {experiment_name!r} differs from the experiment {mine!r} of "
                             f"MLFLOW_RUN_ID={parent}; choose the experiment with `mlflow run --experiment-name`")
        experiment_name = mine
    experiment_name = tracking.default_experiment_name(experiment_name)
    runs = tracking.list_runs(experiment_name)
    stale = [] if dry_run else reap_stale(runs)
    if stale:
        echo(f"Marked {len(stale)} stale RUNNING run(s) KILLED (their sweep or launcher on this host is gone): "
             + ", ".join(r.run_id for r in stale))
    todo, skipped = plan(configs, runs)
    echo(f"Total experiments to run: {len(todo)} ({len(skipped)} already finished)")
    stale_ids = {r.run_id for r in stale}
    running_elsewhere = {r.config() for r in runs if r.status == "RUNNING" and r.is_experiment
                         and r.run_id not in stale_ids
                         and _parses(r)} & set(todo)
    if running_elsewhere:
        echo(f"Note: {len(running_elsewhere)} of them have a RUNNING run (another sweep, or one that was "
             f"killed hard); they run again here.")
    if dry_run:
        echo(f"Dry run: experiment {experiment_name!r} in {tracking.tracking_uri()}; nothing is started.")
        if grid.fixed:
            echo("Fixed parameters: " + ", ".join(f"{k}={v}" for k, v in grid.fixed.items()))
        for i, cfg in enumerate(todo, 1):
            echo(f"Would run {i}/{len(todo)}: {describe(cfg)}")
        for cfg, run_id in skipped:
            echo(f"Skip (FINISHED run {run_id}): {describe(cfg)}")
        return 0
    if not todo:
        echo(f"Nothing to run: every configuration already has a FINISHED run in {experiment_name!r}.")
        return 0
    _ensure_data(todo)
    return Sweep(todo, experiment_name, parallel, max_retries, skipped, grid, echo, progress, executor).run()


def reap_stale(runs) -> list:
    """RUNNING runs owned by a process of this host that no longer exists (a sweep or launcher
    killed outright, which could not end its run): mark them KILLED so they run again."""
    import socket

    from . import tracking

    host = socket.gethostname()
    stale = []
    for run in runs:
        if run.status != "RUNNING" or run.tags.get(tracking.HOST_TAG) != host:
            continue
        pid = int(run.tags.get(tracking.PID_TAG) or 0)
        if pid and _is_fedshard_process(pid):
            continue
        tracking.end_run(run.run_id, "KILLED", f"stale: its owner (pid {pid} on {host}) is gone")
        stale.append(run)
    return stale


def _is_fedshard_process(pid: int) -> bool:
    """Alive, and still one of ours (not a new process that reuses the pid)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and any("fedshard" in a or "sweep" in a for a in proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _parses(run) -> bool:
    try:
        run.config()
        return True
    except ConfigError:
        return False


def _ensure_data(configs) -> None:
    """Download (or unpack) the data set once, before experiments run side by side and would
    each try to download it into the same directory."""
    from . import data

    for data_dir in dict.fromkeys(c.data_dir for c in configs):
        try:
            data.ensure_cifar100(data_dir)
        except data.DataError as exc:
            raise SweepError(str(exc)) from exc
