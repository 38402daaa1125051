"""`fedshard run`: one experiment, its run opened, resumed or extended in MLflow."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NoReturn

import click

from fedshard.cli.common import config_options, fail
from fedshard.core.config import RENAMED, ConfigError, ExperimentConfig
from fedshard.runtime import lifecycle

if TYPE_CHECKING:
    from fedshard.runtime.resume import Start


@click.command()
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
