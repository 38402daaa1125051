"""`fedshard export` and `fedshard analyze`: the results pickle or CSV from MLflow, and the study read
from results files. They import nothing Linux-only (no process is started here)."""

from __future__ import annotations

from pathlib import Path

import click

from fedshard.cli.common import fail
from fedshard.core.errors import FedshardError
from fedshard.runtime import lifecycle


@click.command()
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


@click.command()
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
