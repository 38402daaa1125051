"""Diagnostics through `logging`: the `fedshard` logger, its console, and a role's log file.

Every module logs to its own logger, `logging.getLogger(__name__)`, under `fedshard`. A record's
line is its message alone (format `%(message)s`): the lines fedshard printed before it used
logging, word for word, on the streams they went to. INFO goes to stdout (what a role reports, the
notes of `fedshard run`); WARNING and above go to stderr (warnings, a role's error, what fedshard
does on its own, such as downloading the data set); so does DEBUG, shown only with FEDSHARD_DEBUG=1:
what a broad `except` swallowed, and why.

A role the launcher started (metaserver, aggregator, trainer) writes its records to its log file
instead, through a FileHandler: the launcher names the file in FEDSHARD_LOG_FILE and sends the
role's stdout and stderr there too (a traceback of the interpreter, what C++ code prints), so the
file holds everything, in order. What a command prints as its result (the report of `analyze`, a
sweep's or a run's progress) is output, not a diagnostic: it stays click.echo.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER = "fedshard"
DEBUG_ENV = "FEDSHARD_DEBUG"
LOG_FILE_ENV = "FEDSHARD_LOG_FILE"  # set by the launcher for the roles it starts
_FORMAT = logging.Formatter("%(message)s")


class _Console(logging.StreamHandler):
    """A handler on sys.stdout or sys.stderr as they are when a record comes: click's test runner
    and pytest replace them after the handler was made."""

    def __init__(self, stream_name: str) -> None:
        super().__init__()
        self.stream_name = stream_name

    @property
    def stream(self) -> object:
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, _value: object) -> None:  # StreamHandler sets it; the stream is looked up instead
        pass


def _info_only(record: logging.LogRecord) -> bool:
    return record.levelno == logging.INFO


def _not_info(record: logging.LogRecord) -> bool:
    return record.levelno != logging.INFO


def _handlers(log_file: str | None) -> list[logging.Handler]:
    if log_file:
        return [logging.FileHandler(log_file, encoding="utf-8")]  # appends, beside the role's stdout
    out, err = _Console("stdout"), _Console("stderr")
    out.addFilter(_info_only)
    err.addFilter(_not_info)
    return [out, err]


def setup(log_file: str | None = None) -> logging.Logger:
    """Send the `fedshard` logger's records to the console, or to `log_file` (a role's log file):
    the console when fedshard is imported (fedshard/__init__.py), a role's file once it starts.
    Calling it again replaces the handlers."""
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    for handler in _handlers(log_file):
        handler.setFormatter(_FORMAT)
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if os.environ.get(DEBUG_ENV) else logging.INFO)
    logger.propagate = False  # MLflow or Ray may configure the root logger: no line twice
    return logger


def setup_role() -> None:
    """A role's logging: its log file when the launcher named one (FEDSHARD_LOG_FILE), else the
    console (a trainer started by hand on another machine)."""
    setup(os.environ.get(LOG_FILE_ENV))
