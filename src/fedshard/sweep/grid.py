"""The grid: which configurations a sweep covers. Pure: strings in, validated configurations out.

The five axes of the researchers' original harness keep an option each (`--world-sizes`,
`--learning-rates`, `--swap`, `--rounds`, `--seeds`) and a default, the 54 runs below. Every
other setting that makes up a configuration (config.RESULT_SETTINGS: strategy, partition,
batch_size, ...) can be an axis too, `--axis strategy=tensor_parallel,fedavg`, as in Ray Tune,
W&B sweeps or Hydra's multirun; the rest (`-P data_dir=/data`) is the same for every run.
Values are canonicalised through ExperimentConfig, so '0.00001' and '1e-05' are one learning
rate and a setting that does not apply (swapping for FedAvg) never makes a second run.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedshard.core.config import (
    KEY_SETTINGS,
    RENAMED,
    RESULT_SETTINGS,
    RUN_PREFIX,
    ConfigError,
    ExperimentConfig,
    field_names,
)
from fedshard.core.errors import FedshardError, first_line

# Option (and grid-file key) of the five classic axes -> the setting it varies.
NAMED_AXES = {
    "world_sizes": "world_size",
    "learning_rates": "learning_rate",
    "swap": "enable_swapping",
    "rounds": "rounds",
    "seeds": "seed",
}
# The researchers' grid: 18 runs for world_size 1 (swapping does not apply), 36 for world_size 2.
DEFAULT_GRID = {
    "world_size": ["1", "2"],
    "learning_rate": ["1e-5", "1e-4", "1e-3"],
    "enable_swapping": ["false", "true"],
    "rounds": ["30", "50"],
    "seed": ["123", "456", "789"],
}
GRID_FILE_KEYS = (*NAMED_AXES, "axes", "params", "pretrain")


class SweepError(FedshardError, ValueError):
    """A bad grid, axis, -P assignment or grid file; the message says what and what is valid."""

    exit_code = 2


def split_values(label: str, value: object) -> list[str]:
    """'1e-5, 1e-4' or [1e-5, 0.0001] (YAML) -> ['1e-5', '1e-4']; booleans as true/false. An empty
    string is a value only where a YAML list says "" (init_from: ["", torchvision:DEFAULT]); in a
    comma-separated list it is a typo."""
    listed = isinstance(value, (list, tuple))
    items: Sequence[object] = value if isinstance(value, (list, tuple)) else str(value).split(",")
    if not listed and not str(value).strip():
        items = []  # '' is no list of values, not a list of one empty value
    out = []
    for item in items:
        text = ("true" if item else "false") if isinstance(item, bool) else str(item).strip()
        if not text and not (listed and item == ""):
            raise SweepError(f"{label} {value!r}: empty value in the list")
        out.append(text)
    if not out:
        raise SweepError(f"{label} {value!r}: no values given; give one or more, comma-separated")
    return out


def _option(name: str) -> str:
    """The command-line option of an axis or parameter name: world_sizes -> --world-sizes."""
    return f"--{name.replace('_', '-')}"


def _axis_setting(name: str, where: str) -> str:
    setting = name.strip().replace("-", "_")
    if setting not in RESULT_SETTINGS:
        raise SweepError(
            f"{where}: unknown setting {name.strip()!r}; an axis can be any of {', '.join(RESULT_SETTINGS)}"
        )
    return setting


def parse_axes(items: Iterable[object]) -> dict[str, list[str]]:
    """['strategy=tensor_parallel,fedavg', ...] (--axis, repeatable) -> {setting: values}."""
    axes: dict[str, list[str]] = {}
    for item in items:
        name, sep, values = str(item).partition("=")
        if not sep or not name.strip():
            raise SweepError(f"--axis {item!r}: expected NAME=V1,V2, e.g. --axis strategy=tensor_parallel,fedavg")
        setting = _axis_setting(name, f"--axis {item!r}")
        if setting in axes:
            raise SweepError(f"--axis {item!r}: {setting} is given twice")
        axes[setting] = split_values(f"--axis {setting}=", values)
    return axes


def parse_assignments(items: Iterable[object], axes: Collection[str] = (), where: str | None = None) -> dict[str, str]:
    """-P key=value pairs -> {key: value}; keys must be experiment parameters that are not axes.
    `where` names the pairs' origin in messages ('grid file g.yaml: params'), else each is -P 'k=v'."""
    fixed: dict[str, str] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.strip().replace("-", "_")
        origin = where or f"-P {item!r}"
        if not sep or not key:
            raise SweepError(f"{origin}: expected KEY=VALUE, e.g. -P data_dir=/data")
        if key in axes or key in KEY_SETTINGS:
            option = next((_option(o) for o, s in NAMED_AXES.items() if s == key), "--axis")
            if where:  # in a grid file, an axis is a key of its own (the five) or one under axes
                option = next((f"{o}: [...]" for o, s in NAMED_AXES.items() if s == key), f"axes: {{{key}: [...]}}")
            raise SweepError(
                f"{origin}: {key} is a grid axis; give it as {option} (a single value is a one-value axis)"
            )
        if key not in field_names():
            valid = [n for n in field_names() if n not in KEY_SETTINGS]
            renamed = f"; {key} is now {RENAMED[key]}" if key in RENAMED else ""
            raise SweepError(f"{origin}: unknown experiment parameter {key!r}; valid: {', '.join(valid)}{renamed}")
        fixed[key] = value.strip()
    return fixed


def _yaml_problem(exc: BaseException) -> str:
    """'line 3, column 5: mapping values are not allowed here' of a YAML error (its marks count from 0)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or first_line(exc)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


@dataclass(frozen=True)
class GridFile:
    """What a grid file says: its axes (the five named ones by setting, then those under `axes`), its
    fixed `params` and the settings of its `pretrain` run."""

    axes: dict[str, list[str]] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    pretrain: dict[str, str] = field(default_factory=dict)


def _strings(mapping: Mapping[object, object]) -> dict[str, str]:
    """A grid file's mapping of settings to values, as strings: booleans as true/false, null as ''."""
    return {
        str(k): ("true" if v else "false") if isinstance(v, bool) else ("" if v is None else str(v))
        for k, v in mapping.items()
    }


def load_grid_file(path: str | Path) -> GridFile:
    """A YAML grid: any of world_sizes, learning_rates, swap, rounds, seeds (lists or comma strings),
    axes (a mapping of further settings to their values), params (a mapping of fixed settings) and
    pretrain (the settings of one run that goes first, whose final model every configuration of
    the grid starts from)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SweepError(f"grid file {path}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise SweepError(f"grid file {path}: not valid YAML: {_yaml_problem(exc)}") from None
    if data is None:
        return GridFile()
    if not isinstance(data, dict):
        raise SweepError(f"grid file {path}: expected a mapping with keys {', '.join(GRID_FILE_KEYS)}")
    unknown = sorted(set(map(str, data)) - set(GRID_FILE_KEYS))
    if unknown:
        raise SweepError(f"grid file {path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(GRID_FILE_KEYS)}")
    axes: dict[str, list[str]] = {
        NAMED_AXES[key]: split_values(f"grid file {path}: {key}", data[key])
        for key in NAMED_AXES
        if data.get(key) is not None
    }
    examples = {
        "axes": "{strategy: [tensor_parallel, fedavg]}",
        "params": "{data_dir: /data}",
        "pretrain": "{world_size: 1, learning_rate: 1e-4, rounds: 10, seed: 77}",
    }
    for key, example in examples.items():
        if not isinstance(data.get(key) or {}, dict):
            raise SweepError(f"grid file {path}: {key} must be a mapping such as {example}")
    for name, values in (data.get("axes") or {}).items():
        setting = _axis_setting(str(name), f"grid file {path}: axes")
        if setting in axes:
            raise SweepError(f"grid file {path}: {setting} is given twice")
        axes[setting] = split_values(f"grid file {path}: axes {setting}", values)
    params, pretrain = _strings(data.get("params") or {}), _strings(data.get("pretrain") or {})
    unknown = sorted(set(pretrain) - set(field_names()))
    if unknown:
        raise SweepError(
            f"grid file {path}: pretrain: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(field_names())}"
        )
    return GridFile(axes, params, pretrain)


@dataclass(frozen=True)
class Grid:
    axes: dict[str, list[str]]  # setting -> its values: the five named axes first, then any others
    fixed: dict[str, str] = field(default_factory=dict)  # experiment parameter -> value, the same for every run
    # The settings of one run that goes first (with the fixed ones); every configuration of the grid
    # starts from its final model (init_from=run:<its name>). Empty: no such run.
    pretrain: dict[str, str] = field(default_factory=dict)

    @property
    def extra_axes(self) -> list[str]:
        """The axes beyond the classic five (strategy, partition, ...)."""
        return [s for s in self.axes if s not in KEY_SETTINGS]


def label(setting: str) -> str:
    """How an axis is named in options, grid files and the sweep run's params: world_sizes, ..., strategy."""
    return next((option for option, s in NAMED_AXES.items() if s == setting), setting)


def make_grid(
    options: Mapping[str, object],
    assignments: Iterable[object] = (),
    grid_file: str | Path | None = None,
    axes: Iterable[object] = (),
    empty_is_default: bool = False,
) -> Grid:
    """Options (the five named axes, by option name) and --axis items given on the command line win
    over the grid file, which wins over the default grid. An option that is None was not given; one
    given with no values ('') is refused, as the grid file's `world_sizes: []` is, unless
    empty_is_default (MLproject, which cannot leave an option out, passes '' for "not given")."""
    from_file = load_grid_file(grid_file) if grid_file else GridFile()
    given = parse_axes(axes)
    for option, setting in NAMED_AXES.items():
        if options.get(option) is not None and not (empty_is_default and not str(options[option]).strip()):
            if setting in given:
                raise SweepError(f"{setting} is given twice: as {_option(option)} and as --axis {setting}")
            given[setting] = split_values(_option(option), options[option])
    grid_axes = {s: given.get(s) or from_file.axes.get(s) or list(DEFAULT_GRID[s]) for s in KEY_SETTINGS}
    for setting in list(from_file.axes) + list(given):
        if setting not in KEY_SETTINGS:
            grid_axes[setting] = given.get(setting) or from_file.axes[setting]
    fixed = parse_assignments(
        (f"{k}={v}" for k, v in from_file.params.items()), grid_axes, f"grid file {grid_file}: params"
    )
    fixed.update(parse_assignments(assignments, grid_axes))
    pretrain = from_file.pretrain
    if pretrain and ("init_from" in grid_axes or "init_from" in fixed):
        raise SweepError(
            f"grid file {grid_file}: pretrain sets init_from of every configuration (the pretrain run); "
            f"init_from cannot also be an axis or a parameter"
        )
    return Grid(grid_axes, fixed, pretrain)


def expand(grid: Grid, resolve: Callable[[ExperimentConfig], ExperimentConfig] | None = None) -> list[ExperimentConfig]:
    """Every configuration of the grid, validated, canonical and without duplicates, in grid order
    (the five named axes, then the others). Settings that do not apply collapse (swapping for world
    size 1 and FedAvg, ...), so the default grid is 18 + 36 = 54 runs. A value is checked in each
    combination it is part of, never against the defaults of the other axes (world size 128 is
    fine where only fedavg runs); a problem is reported once, however many combinations have it.
    `resolve` (a configuration -> the one that runs) is applied to each, the pretrain run first, so
    that what starts from it names the run it really is (its precision decided, say)."""
    problems: list[str] = []

    def config(values: dict[str, str]) -> ExperimentConfig | None:
        try:
            cfg = ExperimentConfig.from_mapping(values)
            return resolve(cfg) if resolve is not None else cfg
        except (ConfigError, SweepError) as exc:
            lines = [ln.strip() for ln in str(exc).splitlines()]
            problems.extend(ln for ln in (lines[1:] or lines) if ln not in problems)
            return None

    configs: list[ExperimentConfig] = []
    seen: set[ExperimentConfig] = set()
    start: dict[str, str] = {}
    if grid.pretrain:  # the run that goes first, and what every other configuration starts from
        first = config({**grid.fixed, **grid.pretrain})
        if first is not None:
            seen.add(first)
            configs.append(first)
            start = {"init_from": RUN_PREFIX + first.run_name()}
    for combo in itertools.product(*grid.axes.values()):
        cfg = config({**grid.fixed, **dict(zip(grid.axes, combo)), **start})
        if cfg is not None and cfg not in seen:
            seen.add(cfg)
            configs.append(cfg)
    if problems:
        raise SweepError("invalid sweep:\n  " + "\n  ".join(problems))
    return configs


def describe(cfg: ExperimentConfig, extra: Iterable[str] = ()) -> str:
    """The harness's words for a configuration, plus the settings of any further axes:
    'world_size=2, lr=0.001, swap=False, rounds=1, seed=123, strategy=fedavg'."""
    settings = cfg.settings()
    return (
        f"world_size={cfg.world_size}, lr={cfg.learning_rate!r}, swap={cfg.enable_swapping}, "
        f"rounds={cfg.rounds}, seed={cfg.seed}" + "".join(f", {s}={settings[s]}" for s in extra)
    )


def named(cfg: ExperimentConfig, extra: Iterable[str] = ()) -> str:
    """The pickle key, plus the settings of any further axes: '(2, 0.001, False, 1, 123) strategy=fedavg'."""
    settings = cfg.settings()
    return " ".join([repr(cfg.key()), *(f"{s}={settings[s]}" for s in extra)])
