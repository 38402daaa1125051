"""What every command shares: refusals that exit with a code, and one option per experiment setting."""

from __future__ import annotations

import sys
from dataclasses import MISSING, fields
from typing import Any, NoReturn

import click

from fedshard.core.config import ExperimentConfig
from fedshard.core.settings_help import HELP

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
