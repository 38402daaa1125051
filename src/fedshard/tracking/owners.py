"""Who owns a run: the process responsible for ending it, recorded in the run's tags, so that a
later sweep or `fedshard run --resume` recognises a RUNNING run whose owner was killed outright
(SIGKILL, OOM) as stale, and leaves alone one whose owner still runs."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from fedshard.core.identity import process_alive, started_at

if TYPE_CHECKING:
    from fedshard.tracking.runs import RunRecord

HOST_TAG, PID_TAG = "fedshard.host", "fedshard.pid"
# The name this machine records as an owner's host: the hostname, unless FEDSHARD_HOST names it (where
# containers with pid namespaces of their own share one hostname, each needs a name of its own, or a
# pid would be judged in the wrong namespace).
HOST_ENV = "FEDSHARD_HOST"
# The owner's start time (seconds since the epoch, psutil's create_time): a pid is reused by later
# processes, a (pid, start time) pair names one process (core/identity.py).
PID_STARTED_TAG = "fedshard.pid_started"
# Python's options that take a value as the next argument (`python -W error -m fedshard`).
_PYTHON_OPTIONS_WITH_VALUE = {"-W", "-X", "--check-hash-based-pycs"}


def host() -> str:
    """This machine, as owners record it: $FEDSHARD_HOST, else the hostname."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


def owner_tags() -> dict[str, str]:
    """This process as a run's owner: its host, pid and start time."""
    return {HOST_TAG: host(), PID_TAG: str(os.getpid()), PID_STARTED_TAG: f"{started_at():.2f}"}


def owner_alive(run: RunRecord) -> bool | None:
    """Whether the process that owns a RUNNING run still runs: True or False on this host, None
    when it lives on another host (or never said where). The owner is the process with the
    recorded pid and start time; a run recorded without a start time (by an older fedshard) is
    owned by the process with its pid if that process runs fedshard."""
    import psutil

    if run.tags.get(HOST_TAG) != host():
        return None
    pid = int(run.tags.get(PID_TAG) or 0)
    if not pid:
        return False
    started = run.tags.get(PID_STARTED_TAG)
    if started is not None:
        return process_alive(pid, float(started))
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and runs_fedshard(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone, or another user's: not our owner
        return False


def runs_fedshard(cmdline: list[str]) -> bool:
    """Whether a command line runs fedshard: `python -m fedshard ...`, the `fedshard` console
    script, or fedshard's `sweep.py` as the script (by name: it may be another checkout's). Only
    the program and the script count, not words anywhere in its arguments."""
    if not cmdline:
        return False
    program = Path(cmdline[0]).name
    if program == "fedshard":  # the console script, run by its own name
        return True
    if not program.startswith("python"):
        return False
    args = iter(cmdline[1:])
    for arg in args:
        if arg == "-m":
            return next(args, None) == "fedshard"
        if arg.startswith("-m"):  # -mfedshard
            return arg[2:] == "fedshard"
        if arg in _PYTHON_OPTIONS_WITH_VALUE:
            next(args, None)
        elif arg == "-c" or arg == "-":  # a command or stdin: no script
            return False
        elif not arg.startswith("-"):  # the script; the console script runs as one too
            return Path(arg).name in ("fedshard", "sweep.py")
    return False
