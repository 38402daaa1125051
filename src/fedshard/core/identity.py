"""Which process is which: a pid is reused by later processes, a (pid, start time) pair names one.
Runs record their owner so (tracking/owners.py), and work directories theirs (runtime/launcher.py)."""

from __future__ import annotations

# How far a recorded start time may be from the process's own and still be its: psutil's create_time
# is the boot time plus the ticks since boot, and the boot time follows steps of the system clock (NTP).
# A process that reuses the pid starts after the first one ended, not within a second of its start.
START_TOLERANCE = 1.0


def started_at() -> float:
    """This process's start time (seconds since the epoch): with its pid, it names this process."""
    import psutil

    return psutil.Process().create_time()


def process_alive(pid: int, started: float) -> bool:
    """Whether the process with this pid and start time still runs (on this host); a pid is reused
    by later processes, a (pid, start time) pair is not."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - started) <= START_TOLERANCE
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone, or another user's: not the one meant
        return False
