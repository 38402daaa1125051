"""`fedshard sweep`: the grid's options; the sweep itself is fedshard.sweep."""

from __future__ import annotations

import sys

import click

from fedshard.cli.common import fail
from fedshard.core.errors import FedshardError

# --- the grid, the results pickle, the analysis ------------------------------------------

_GRID_HELP = "comma-separated values [default: {}]"


@click.command(context_settings={"show_default": False, "help_option_names": ["-h", "--help"]})
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
