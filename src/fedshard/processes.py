"""The kernel's part in leaving no process behind: parent-death signals, and how a child ended.

Every process fedshard starts asks the kernel for a signal when its parent dies (prctl
PR_SET_PDEATHSIG), so that even a SIGKILLed launcher or sweep takes its children down. Which
signal is the choice: a role (metaserver, aggregator, trainer) has nothing to clean up and is
killed; a launcher must end its MLflow run, so it is asked to terminate.
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def signal_when_parent_dies(sig: int) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig)


def killed_with_parent() -> None:
    """preexec_fn of an experiment's role: SIGKILL when the launcher dies (runs between fork and exec)."""
    signal_when_parent_dies(signal.SIGKILL)


def terminated_with_parent() -> None:
    """preexec_fn of a launcher started by a sweep or a Ray worker: SIGTERM when that parent dies,
    so the launcher tears its experiment down and marks its run KILLED. Ray's processes block
    SIGINT, and a signal mask survives exec: the launcher must get its signals."""
    signal_when_parent_dies(signal.SIGTERM)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def terminate_with_parent() -> None:
    """For a launcher started by `mlflow run`: SIGTERM when that process dies, even by SIGKILL.
    If it died before the request was in place, terminate now."""
    parent = os.getppid()
    signal_when_parent_dies(signal.SIGTERM)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def describe_exit(code: int) -> str:
    """'exited with code 1', 'killed by SIGKILL': a return code as Popen gives it, in words."""
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"
