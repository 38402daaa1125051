"""The roles the launcher starts, and a person starts by hand to put one on another machine:
`fedshard metaserver`, `fedshard aggregator`, `fedshard trainer`."""

from __future__ import annotations

from pathlib import Path

import click

from fedshard.core.config import ExperimentConfig


@click.command()
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


@click.command()
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


@click.command()
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
