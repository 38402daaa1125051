"""The `fedshard` command: the only code that parses argv.

`fedshard run` takes one option per ExperimentConfig field, generated from the
config itself so that no knob can be forgotten; the roles (`metaserver`,
`aggregator`, `trainer`) are what the launcher starts, and what a person starts
by hand to put a role on another machine.
"""

import click

from fedshard.cli.experiment import run
from fedshard.cli.results import analyze, export
from fedshard.cli.roles import aggregator, metaserver, trainer
from fedshard.cli.sweeping import sweep


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def main() -> None:
    """Federated learning of width-wise model slices (AlexNet, ResNet-34) on CIFAR-100, tracked in MLflow."""


for command in (run, metaserver, aggregator, trainer, sweep, export, analyze):
    main.add_command(command)


if __name__ == "__main__":
    main()
