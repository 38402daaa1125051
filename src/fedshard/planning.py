"""The grid and what of it is left to train: pure, no processes, no MLflow calls.

`expand` turns grid axes into canonical configurations (so '0.00001' and '1e-05' are
one learning rate); `plan` compares them with the runs already in the store and says,
per configuration, whether it is done (a FINISHED run), and if not, where it starts:

- resume: a FAILED, KILLED or stale run of it has a checkpoint of round k: continue
  that run in place from k;
- extension: a run of the same configuration with fewer rounds R is FINISHED, or is
  planned here: start a new run from its final model at round R (copying rounds
  0..R in) and train only R+1.. (DESIGN §2: nothing in a round depends on how many
  rounds follow it, so this equals training from scratch);
- otherwise from round 0.

Whichever trains the fewest rounds wins. The default grid has every setting at 30
and 50 rounds: extension trains 1,350 rounds of it instead of 2,160.
"""

from __future__ import annotations

import itertools
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

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


def resumable(runs, stale=()) -> dict[ExperimentConfig, tuple[int, str]]:
    """Configuration -> (round, run id) of its most advanced checkpoint among FAILED, KILLED and
    stale (`stale`: ids of RUNNING runs whose owner is gone) runs."""
    best: dict[ExperimentConfig, tuple[int, str]] = {}
    for run in runs:
        if run.status in ("FAILED", "KILLED") or run.run_id in stale:
            with suppress(ConfigError):
                round_, cfg = run.checkpoint_round, run.config()
                if run.is_experiment and round_ > best.get(cfg, (0, ""))[0]:
                    best[cfg] = (round_, run.run_id)
    return best


def twin_key(cfg: ExperimentConfig) -> tuple:
    """What two configurations share when one extends the other: everything but the rounds."""
    return tuple(sorted((k, v) for k, v in cfg.params().items() if k != "rounds"))


@dataclass(frozen=True)
class Task:
    """One configuration to run, and where it starts: after round `start`, which is round 0 (from
    scratch), a checkpoint of run `resume`, the final model of FINISHED run `extends`, or the
    final model of the run this plan makes for `after` (which it then waits for)."""

    cfg: ExperimentConfig
    start: int = 0
    resume: str = ""
    extends: str = ""
    after: ExperimentConfig | None = None

    @property
    def rounds_to_train(self) -> int:
        return self.cfg.rounds - self.start

    def describe(self) -> str:
        if self.resume:
            return f"resume run {self.resume} from round {self.start}"
        if self.extends:
            return f"extend FINISHED run {self.extends} from round {self.start}"
        if self.after is not None:
            return f"extend the {self.after.rounds}-round run of this sweep from round {self.start}"
        return "from round 0"


@dataclass
class Plan:
    tasks: list[Task]
    skipped: list[tuple[ExperimentConfig, str]] = field(default_factory=list)  # (config, FINISHED run id)

    @property
    def rounds_to_train(self) -> int:
        return sum(t.rounds_to_train for t in self.tasks)

    @property
    def rounds_from_scratch(self) -> int:
        return sum(t.cfg.rounds for t in self.tasks)

    def rounds_line(self) -> str:
        """e.g. 'Rounds to train: 1350 (2160 without extending shorter runs)' for the default grid."""
        ways = [w for w, used in (("extending shorter runs", any(t.extends or t.after for t in self.tasks)),
                                  ("resuming", any(t.resume for t in self.tasks))) if used]
        return (f"Rounds to train: {self.rounds_to_train} ({self.rounds_from_scratch} without "
                f"{' or '.join(ways) or 'extending shorter runs or resuming'})")


def plan(configs, runs, resume: bool = True, extend: bool = True, stale=()) -> Plan:
    """What to run of `configs` given the store's `runs` (tracking.RunRecord-like), in grid order.
    Only a FINISHED run makes a configuration done; `resume` / `extend` False train every
    configuration that is not done from round 0."""
    done = finished_configs(runs)
    todo = [c for c in configs if c not in done]
    checkpoints = resumable(runs, stale) if resume else {}
    finished_twins: dict[tuple, list[tuple[int, str]]] = {}
    planned_twins: dict[tuple, list[ExperimentConfig]] = {}
    if extend:
        for cfg, run_id in done.items():
            finished_twins.setdefault(twin_key(cfg), []).append((cfg.rounds, run_id))
        for cfg in todo:
            planned_twins.setdefault(twin_key(cfg), []).append(cfg)
    tasks = []
    for cfg in todo:
        options = [Task(cfg)]
        if cfg in checkpoints:
            round_, run_id = checkpoints[cfg]
            options.append(Task(cfg, start=round_, resume=run_id))
        shorter = [(r, run_id) for r, run_id in finished_twins.get(twin_key(cfg), []) if r < cfg.rounds]
        if shorter:
            r, run_id = max(shorter)
            options.append(Task(cfg, start=r, extends=run_id))
        planned = [c for c in planned_twins.get(twin_key(cfg), []) if c.rounds < cfg.rounds]
        if planned:
            twin = max(planned, key=lambda c: c.rounds)
            options.append(Task(cfg, start=twin.rounds, after=twin))
        # The most rounds already in place wins; on a tie, what needs no new run or no waiting.
        preference = {"resume": 3, "extends": 2, "after": 1}
        tasks.append(max(options, key=lambda t: (t.start, max((v for k, v in preference.items()
                                                                 if getattr(t, k)), default=0))))
    return Plan(tasks, [(c, done[c]) for c in configs if c in done])


def describe(cfg: ExperimentConfig) -> str:
    return (f"world_size={cfg.world_size}, lr={cfg.learning_rate!r}, swap={cfg.enable_swapping}, "
            f"rounds={cfg.rounds}, seed={cfg.seed}")
