"""The `fedshard` command: the only code that parses argv.

`fedshard run` takes one option per ExperimentConfig field, generated from the
config itself so that no knob can be forgotten; the roles (`metaserver`,
`aggregator`, `trainer`) are what the launcher starts, and what a person starts
by hand to put a role on another machine.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from fedshard.core.config import RENAMED, ConfigError, ExperimentConfig
from fedshard.core.errors import FedshardError
from fedshard.core.settings_help import HELP
from fedshard.runtime import lifecycle

if TYPE_CHECKING:
    from fedshard.runtime.resume import Start

_TYPES = {"int": click.INT, "float": click.FLOAT, "bool": click.BOOL, "str": click.STRING}


def config_options(func):
    """One typed option per config field, e.g. --world-size, --enable-swapping [true|false]."""
    for f in reversed(fields(ExperimentConfig)):
        default = f.default if f.default is not MISSING else None
        extra: dict[str, Any] = {"is_flag": False, "flag_value": True} if f.type == "bool" else {}  # click.Option's
        func = click.option(
            f"--{f.name.replace('_', '-')}",
            f.name,
            type=_TYPES[f.type],
            default=default,
            show_default=True,
            help=HELP[f.name],
            **extra,
        )(func)
    return func


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"fedshard: error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def main():
    """Federated learning of width-wise model slices (AlexNet, ResNet-34) on CIFAR-100, tracked in MLflow."""


@main.command()
@config_options
@click.option("--experiment-name", default=None, help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME or Default)")
@click.option(
    "--remote-trainers",
    is_flag=True,
    help="start no trainers here: print the command that starts each on another machine, and wait",
)
@click.option(
    "--metaserver-host",
    default="127.0.0.1",
    help="address the metaserver binds; with --remote-trainers one that the trainers' machines reach",
)
@click.option("--metaserver-port", default=0, type=click.IntRange(0, 65535), help="0 = chosen by the OS")
@click.option(
    "--join-timeout",
    default=600.0,
    type=click.FloatRange(0, min_open=True),
    help="seconds the aggregator waits for every trainer to join",
)
@click.option(
    "--resume",
    "resume_id",
    default=None,
    metavar="RUN_ID",
    help="continue this FAILED, KILLED or stale RUNNING run in place, from its last checkpoint, with "
    "its own configuration (give no other experiment option)",
)
@click.option(
    "--extend",
    "extend_id",
    default=None,
    metavar="RUN_ID",
    help="start from the final model of this FINISHED run of the same configuration with fewer rounds; "
    "its rounds are copied in and only the later ones are trained",
)
@click.option(
    "--progress-every",
    default=30.0,
    type=click.FloatRange(0),
    metavar="SECONDS",
    help="progress inside a round: a line every SECONDS when the output is not a terminal (a live bar "
    "when it is); 0 turns it off",
)
@click.option(
    "--no-duplicate",
    "no_duplicate",
    type=click.BOOL,
    is_flag=False,
    flag_value=True,
    default=False,
    metavar="[true|false]",
    help="refuse (exit 2) to run a configuration that already has a FINISHED run "
    "or runs elsewhere; without it such a twin is named and the experiment runs again",
)
@click.option(
    "--amp",
    hidden=True,
    is_flag=False,
    flag_value="true",
    default=None,
    expose_value=False,
    callback=lambda ctx, param, value: value is None or _amp_is_gone(value),
)
def run(
    experiment_name: str | None,
    remote_trainers: bool,
    metaserver_host: str,
    metaserver_port: int,
    join_timeout: float,
    resume_id: str | None,
    extend_id: str | None,
    progress_every: float,
    no_duplicate: bool,
    **values: Any,
) -> None:
    """Run one experiment: a metaserver, an aggregator and WORLD_SIZE trainers as processes."""
    import os

    from fedshard.runtime import launcher  # not tracking yet: MLflow is imported while the metaserver starts
    from fedshard.tracking.claims import HAND_ENV

    given_hand = os.environ.get(HAND_ENV)  # set by a sweep that claimed the run for this launcher
    hand = int(given_hand) if given_hand else None
    start: Start | None
    try:
        if remote_trainers and metaserver_host in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "::", ""):
            raise lifecycle.refuse(
                f"--remote-trainers needs --metaserver-host ADDRESS: an address of this machine "
                f"that the trainers' machines reach (not {metaserver_host or 'empty'})"
            )
        if resume_id:
            _resume_alone(resume_id, extend_id, experiment_name, values)
            cfg, start, hand = lifecycle.resumed(resume_id, hand)
            click.echo(f"fedshard: resuming run {resume_id} after round {start.checkpoint.round} of {cfg.rounds}")
        else:
            try:
                cfg, notes = ExperimentConfig.with_notes(values)
            except ConfigError as exc:
                raise lifecycle.refuse(str(exc)) from None
            for note in notes:
                click.echo(f"fedshard: note: {note}")
            if extend_id:  # the shorter run computed in bf16 or fp32: so must its extension
                from fedshard.core import precision

                cfg = precision.resolved(cfg)
            start = lifecycle.extended(cfg, extend_id) if extend_id else None
            if start:
                click.echo(
                    f"fedshard: extending run {extend_id}: its rounds 0..{start.copied_rounds} are copied "
                    f"in, rounds {start.copied_rounds + 1}..{cfg.rounds} are trained here"
                )
        try:
            datasets = launcher.check(cfg, experiment_name)
        except launcher.CheckFailed as exc:
            raise lifecycle.refuse(str(exc)) from None
        open_run = functools.partial(
            lifecycle.open_run,
            cfg,
            datasets,
            experiment_name=experiment_name,
            resume_id=resume_id,
            extend_id=extend_id,
            start=start,
            hand=hand,
            no_duplicate=no_duplicate,
        )
        placement = launcher.Placement(metaserver_host, metaserver_port, remote_trainers, join_timeout)
        code = launcher.run(
            cfg,
            open_run,
            echo=click.echo,
            placement=placement,
            start=start,
            progress_every=progress_every,
            hand=hand or 0,
        )
    except lifecycle.StartRefused as exc:  # from open_run too: the launcher has stopped the metaserver again
        fail(str(exc), exc.exit_code)
    from fedshard.runtime.processes import exit_now

    exit_now(code)


def _resume_alone(run_id: str, extend_id: str | None, experiment_name: str | None, values: Iterable[str]) -> None:
    """--resume continues a run with its own configuration and experiment: any option that would
    change them is refused (exit 2)."""
    given = [
        f"--{name.replace('_', '-')}"
        for name in values
        if click.get_current_context().get_parameter_source(name) != click.core.ParameterSource.DEFAULT
    ]
    given += ["--extend"] * bool(extend_id) + ["--experiment-name"] * bool(experiment_name)
    if given:
        fail(f"--resume {run_id} continues the run with its own configuration and experiment; drop {', '.join(given)}")


def _amp_is_gone(value: str) -> NoReturn:
    """Scripts and `mlflow run -P amp=...` from before precision existed: say what replaced it (exit 2;
    a click callback: outside `run`'s handling of refusals)."""
    fail(
        str(
            lifecycle.refuse(
                f"--amp {value}: the setting is gone; it is now {RENAMED['amp']}: use --precision bf16, fp32 or auto"
            )
        )
    )


@main.command()
@click.option("--host", default="127.0.0.1", help="address to bind; loopback unless you open it on purpose")
@click.option("--port", default=0, type=click.IntRange(0, 65535), help="0 = chosen by the OS")
@click.option("--address-file", default=None, help="also write HOST:PORT to this file once listening")
@click.option("--threads", default=1, type=int, hidden=True)
def metaserver(host, port, address_file, threads):
    """The rendezvous service that aggregator and trainers meet at."""
    from fedshard.runtime import metaserver as role
    from fedshard.runtime.processes import role_process

    with role_process("metaserver"):
        role.serve(host, port, address_file)


_ROLE_OPTIONS = [
    click.option("--metaserver", "address", required=True, help="HOST:PORT of the metaserver"),
    click.option("--run-id", required=True, help="MLflow run id of the experiment"),
    click.option(
        "--secret",
        envvar="FEDSHARD_SECRET",
        default="",
        show_default=False,
        help="the experiment's secret (or $FEDSHARD_SECRET)",
    ),
    click.option("--threads", default=None, type=click.IntRange(1), help="torch threads of this process"),
]


def role_options(func):
    for option in reversed(_ROLE_OPTIONS):
        func = option(func)
    return func


@main.command()
@role_options
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--join-timeout",
    default=600.0,
    type=click.FloatRange(0, min_open=True),
    help="seconds to wait for every trainer to join",
)
@click.option(
    "--start-from",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="a checkpoint file: continue after its round instead of starting at round 0",
)
@click.option("--progress-file", default=None, help="relay the trainers' progress inside a round to this file")
def aggregator(address, run_id, secret, threads, config_path, join_timeout, start_from, progress_file):
    """Rank 0: send slices, collect them, assemble, evaluate and log every round."""
    from fedshard.runtime import aggregator as role
    from fedshard.runtime.processes import role_process, role_threads

    role_threads(threads)
    with role_process("aggregator"):
        role.run(
            ExperimentConfig.from_json(Path(config_path).read_text()),
            address,
            run_id,
            secret,
            join_timeout,
            start_from,
            progress_file,
        )


@main.command()
@role_options
@click.option(
    "--rank",
    "trainer_index",
    required=True,
    type=click.IntRange(0),
    help="trainer index k (0-based; its process-group rank is k+1)",
)
@click.option("--timeout", default=600.0, help="seconds to wait for the aggregator to publish the experiment")
@click.option(
    "--data-dir", default=None, help="where this machine keeps CIFAR-100 [default: the experiment's data_dir]"
)
def trainer(address, run_id, secret, threads, trainer_index, timeout, data_dir):
    """Rank k+1: train the slice received each round on this trainer's own partition.

    On another machine: GLOO_SOCKET_IFNAME names the interface to use, by default the one
    that reaches the metaserver.
    """
    from fedshard.runtime import trainer as role
    from fedshard.runtime.processes import role_process, role_threads

    role_threads(threads)
    with role_process(f"trainer {trainer_index}"):
        role.run(address, run_id, trainer_index, secret, timeout, data_dir)


# --- the grid, the results pickle, the analysis ------------------------------------------

_GRID_HELP = "comma-separated values [default: {}]"


@main.command(context_settings={"show_default": False, "help_option_names": ["-h", "--help"]})
@click.option(
    "--axis",
    "axes",
    multiple=True,
    metavar="NAME=V1,V2",
    help="any other setting as an axis, e.g. --axis strategy=tensor_parallel,fedavg (repeatable)",
)
@click.option(
    "--axes",
    "axes_text",
    default="",
    metavar="'NAME=V,V NAME=V'",
    help="the same as --axis, several at once, space-separated (used by MLproject)",
)
@click.option("--world-sizes", default=None, help=_GRID_HELP.format("1,2"))
@click.option("--learning-rates", default=None, help=_GRID_HELP.format("1e-5,1e-4,1e-3"))
@click.option("--swap", default=None, help=_GRID_HELP.format("false,true") + "; only where world_size > 1")
@click.option("--rounds", default=None, help=_GRID_HELP.format("30,50"))
@click.option("--seeds", default=None, help=_GRID_HELP.format("123,456,789"))
@click.option(
    "-P",
    "--param",
    "assignments",
    multiple=True,
    metavar="KEY=VALUE",
    help="fix another experiment parameter for every run, e.g. -P data_dir=/data (repeatable)",
)
@click.option(
    "--params",
    "params_text",
    default="",
    metavar="'K=V K=V'",
    help="the same as -P, several at once, space-separated (used by MLproject)",
)
@click.option(
    "--grid-file",
    default=None,
    help="YAML with world_sizes, learning_rates, swap, rounds, seeds, "
    "axes (a mapping: setting -> values) and params; options given here win over it",
)
@click.option("--experiment-name", default=None, help="MLflow experiment [default: $MLFLOW_EXPERIMENT_NAME or Default]")
@click.option("--parallel", default=1, type=click.IntRange(1), show_default=True, help="experiments at once")
@click.option(
    "--max-retries", default=1, type=click.IntRange(0), show_default=True, help="extra attempts for a failed experiment"
)
@click.option("--dry-run", is_flag=True, help="print what would run and what is skipped; run nothing")
@click.option(
    "--no-resume",
    is_flag=True,
    help="train a failed or killed configuration from round 0 instead of resuming its run from its last checkpoint",
)
@click.option(
    "--no-extend",
    is_flag=True,
    help="train every configuration from round 0 instead of starting a "
    "longer run from the final model of its shorter twin",
)
@click.option(
    "--no-progress",
    is_flag=True,
    help="no progress bar (nor, when the output is not a terminal, a "
    "Progress line with the ETA after each experiment), and no lines on each experiment's steps "
    "inside a round; the lines on each round's result stay",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: child processes of this sweep; ray: Ray tasks on a cluster (pip install -e '.[ray]')",
)
@click.option(
    "--empty-is-default",
    is_flag=True,
    hidden=True,
    help="MLproject cannot leave an option out: an empty grid option means it was not given",
)
@click.option(
    "--ray-address",
    default=None,
    metavar="HOST:PORT",
    help="Ray cluster to use (ray start --head prints it) [default: $RAY_ADDRESS, else a local instance]",
)
@click.option(
    "--cpus-per-experiment",
    default=None,
    type=click.FloatRange(0, min_open=True),
    help="ray: CPUs each experiment asks for, e.g. 0.5 [default: world_size + 1, at most the cluster's "
    "CPUs / --parallel]",
)
@click.option(
    "--gpus-per-experiment",
    default=None,
    type=click.FloatRange(0),
    help="ray: GPUs each experiment asks for, e.g. 0.5 to share one [default: 1 on a cluster with GPUs, else 0]",
)
@click.option(
    "--wait",
    "wait",
    type=click.BOOL,
    is_flag=False,
    flag_value=True,
    default=False,
    metavar="[true|false]",
    help="also wait for the configurations that run elsewhere (another sweep or machine holds them) and "
    "count their results as this sweep's; without it the sweep ends with its own work and names them",
)
@click.option(
    "--claim-timeout",
    default=None,
    metavar="SECONDS",
    callback=lambda ctx, param, value: _seconds(value),
    help="a claim whose owner was silent this long is dead and taken over [default: $FEDSHARD_CLAIM_TIMEOUT, else 60]",
)
def sweep(
    axes: tuple[str, ...],
    axes_text: str,
    world_sizes: str | None,
    learning_rates: str | None,
    swap: str | None,
    rounds: str | None,
    seeds: str | None,
    assignments: tuple[str, ...],
    params_text: str,
    grid_file: str | None,
    experiment_name: str | None,
    parallel: int,
    max_retries: int,
    dry_run: bool,
    no_resume: bool,
    no_extend: bool,
    no_progress: bool,
    executor: str,
    empty_is_default: bool,
    ray_address: str | None,
    cpus_per_experiment: float | None,
    gpus_per_experiment: float | None,
    wait: bool,
    claim_timeout: float | None,
) -> None:
    """Run the grid of experiments: every configuration without a FINISHED run, as child runs of one sweep run.

    A failed or killed experiment continues from its last checkpoint, and a configuration at
    several round counts is trained once, up to the longest: the longer run starts from the
    shorter one's final model. Ctrl-C stops the running experiments (their runs end KILLED);
    running the same sweep again continues with what is left. Each configuration is claimed in the
    tracking store before it starts, so that sweeps side by side, on one machine or many, never
    train one twice: one held elsewhere is named, not run (--wait waits for it).
    """
    import os
    import shlex

    from fedshard import sweep as sweeping
    from fedshard import tracking
    from fedshard.sweep import executors
    from fedshard.sweep import grid as grids

    if claim_timeout is not None:  # for this sweep and the launchers it starts
        os.environ[tracking.claims.TIMEOUT_ENV] = repr(claim_timeout)
    options = {
        "world_sizes": world_sizes,
        "learning_rates": learning_rates,
        "swap": swap,
        "rounds": rounds,
        "seeds": seeds,
    }
    try:
        extra = shlex.split(params_text or "")
        extra_axes = shlex.split(axes_text or "")
    except ValueError as exc:
        fail(f"--params / --axes: {exc}")
    try:
        runner = executors.make(executor, ray_address, cpus_per_experiment, gpus_per_experiment)
        grid = grids.make_grid(
            options, [*extra, *assignments], grid_file or None, [*extra_axes, *axes], empty_is_default=empty_is_default
        )
        tracking.claims.timeout()  # a bad $FEDSHARD_CLAIM_TIMEOUT is refused before anything starts
        code = sweeping.main(
            grid,
            experiment_name or None,
            parallel,
            max_retries,
            dry_run,
            echo=click.echo,
            show_progress=not no_progress,
            executor=runner,
            resume=not no_resume,
            extend=not no_extend,
            wait=wait,
        )
    except FedshardError as exc:
        fail(str(exc), exc.exit_code)
    sys.exit(code)


def _seconds(value: str | None) -> float | None:
    """A number of seconds > 0, or None for nothing given ('' from MLproject)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not (0 < seconds < float("inf")):
        raise click.BadParameter(f"{value!r} is not a number of seconds > 0")
    return seconds


@main.command()
@click.option(
    "--experiment-name",
    default=None,
    help="MLflow experiment to export [default: $MLFLOW_EXPERIMENT_NAME, the `mlflow run` experiment, or Default]",
)
@click.option(
    "--output",
    "-o",
    default=None,
    help="file to write [default: experiment_results.pkl, or experiment_results.csv with --format csv]",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["pickle", "csv"]),
    default="pickle",
    help="pickle: {(world_size, learning_rate, enable_swapping, rounds, seed): [(round, test_loss, "
    "test_accuracy), ...]}; csv: one row per run and round, a column for every setting, and the bytes",
)
@click.option(
    "--key-format",
    type=click.Choice(["5", "6"]),
    default="5",
    help="the pickle's key: 5 as above, or 6, the harness's (world_size, learning_rate, enable_swapping, "
    "enable_layerwise_swapping, rounds, seed); a 5-tuple pickle holds no run with layerwise swapping",
)
@click.option(
    "--where",
    multiple=True,
    metavar="NAME=VALUE",
    help="only runs with this setting, e.g. --where strategy=fedavg (repeatable)",
)
def export(experiment_name: str | None, output: str | None, fmt: str, key_format: str, where: tuple[str, ...]) -> None:
    """Rebuild the results pickle (or a CSV) from the FINISHED runs of an experiment."""
    from fedshard import tracking
    from fedshard.results import export as exporter

    output = output or exporter.DEFAULT_OUTPUT[fmt]
    folder = Path(output).parent
    new_folder = not folder.exists()
    try:
        name = tracking.default_experiment_name(experiment_name or None)
        path, exported = exporter.export(name, output, fmt, where, key_format=int(key_format))
    except FedshardError as exc:
        fail(str(exc), exc.exit_code)
    configs = len({tuple(kv for kv in identity if kv[0] != "seed") for identity in exported})
    if new_folder:
        click.echo(f"Created the folder {folder} (it did not exist)")
    click.echo(
        f"Exported {_count(len(exported), 'finished run')} ({_count(configs, 'configuration')}) "
        f"of experiment {name!r} to {path}"
    )
    lifecycle.keep_with_outer_run(path)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


@main.command()
@click.option(
    "--results-file",
    "results_files",
    multiple=True,
    default=["experiment_results.pkl"],
    show_default=True,
    help="a results pickle {(world_size, learning_rate, enable_swapping, rounds, seed): "
    "[(round, test_loss, test_accuracy), ...]} (or the harness's 6-tuple key, enable_layerwise_swapping "
    "fourth) or the CSV of `fedshard export --format csv` (told apart by content); repeatable: the runs "
    "of each file are labelled by a source, its stem, and compared",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="NAME=FILE",
    help="call the runs of results file FILE NAME, e.g. --label harness=experiment_results_random.pkl (repeatable)",
)
@click.option(
    "--no-plots",
    "no_plots",
    type=click.BOOL,
    is_flag=False,
    flag_value=True,
    default=False,
    show_default=True,
    metavar="[true|false]",
    help="print the tables only, write no file at all",
)
@click.option(
    "--output-dir",
    default="plots",
    show_default=True,
    help="where report.md, comparisons.csv, targets.csv and the plots go",
)
@click.option("--top", default=5, type=click.IntRange(1), show_default=True, help="configurations in the ranking")
@click.option(
    "--target",
    "target",
    multiple=True,
    metavar="ACC[,ACC...]",
    help="target test accuracy in (0, 1] for rounds-to-target, e.g. 0.3 or 0.3,0.5 (repeatable; "
    "replaces the default 50/75/90 % of the best mean final accuracy; '' = the defaults)",
)
def analyze(
    results_files: tuple[str, ...],
    labels: tuple[str, ...],
    no_plots: bool,
    output_dir: str,
    top: int,
    target: tuple[str, ...],
) -> None:
    """Summary statistics, ranking, paired comparisons, rounds to target, report.md and plots from
    results pickles or CSVs (no MLflow needed)."""
    from fedshard.results import report as reporting

    try:
        targets = reporting.parse_targets(target)
    except ValueError as exc:  # a usage error: exit 2 with click's usage line
        raise click.BadParameter(str(exc), param_hint="'--target'") from None
    try:
        reporting.report(
            results_files, output_dir, top, plots=not no_plots, targets=targets, echo=click.echo, labels=labels
        )
    except FedshardError as exc:
        fail(str(exc), exc.exit_code)
    except NotADirectoryError as exc:  # bad input: a path that cannot be a directory
        fail(f"--output-dir {output_dir}: {exc.strerror or exc}")
    except OSError as exc:
        fail(f"cannot write the report to {output_dir}: {exc.strerror or exc}", 1)
    if not no_plots:
        lifecycle.keep_with_outer_run(output_dir, "plots")


if __name__ == "__main__":
    main()
