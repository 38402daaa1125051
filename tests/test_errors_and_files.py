"""errors.py and files.py: one line of any exception (an empty message included), files written
whole or not at all, and a log's last lines."""

from __future__ import annotations

import os

import pytest

from fedshard.core import errors, files


def test_an_exception_is_quoted_in_one_line_even_without_a_message():
    assert errors.first_line(ValueError("bad\nsecond line")) == "bad"
    assert (
        errors.last_line(ValueError("invalid:\n  world_size=0: must be an integer >= 1"))
        == "world_size=0: must be an integer >= 1"
    )
    # an empty message once raised IndexError where the aggregator quoted it
    assert errors.first_line(RuntimeError()) == "RuntimeError" == errors.last_line(RuntimeError("  "))
    assert errors.described(OSError(28, "No space left on device")) == "OSError: [Errno 28] No space left on device"
    assert errors.one_line("a\n  b", limit=300) == "a b" and len(errors.one_line("x" * 500)) == 300


def test_an_atomic_write_replaces_a_file_whole_or_leaves_it(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "f.bin"
    files.write_atomic(path, b"one", mode=0o640)
    assert path.read_bytes() == b"one" and path.stat().st_mode & 0o777 == 0o640
    files.write_atomic(path, b"two")
    assert path.read_bytes() == b"two" and path.stat().st_mode & 0o777 == 0o640  # keeps the file's mode

    def full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        files.write_atomic(path, b"three")
    assert path.read_bytes() == b"two" and sorted(p.name for p in path.parent.iterdir()) == ["f.bin"]


def test_a_log_tail_is_its_last_non_empty_lines(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("a\n\nb\nc\n\n")
    assert files.tail(log, 2) == "b | c" and files.tail(tmp_path / "missing.log") == ""


# The exit status a command ends with when each of fedshard's exceptions stops it: 2 for input that
# cannot be used, 1 for a failure, 3 for a launcher whose run changed hands.
EXIT_CODES = {
    "fedshard.core.checkpoint.CheckpointError": 1,
    "fedshard.core.config.ConfigError": 2,
    "fedshard.core.data.DataError": 2,
    "fedshard.core.precision.PrecisionError": 2,
    "fedshard.results.export.ExportError": 1,
    "fedshard.results.export.SelectionError": 2,
    "fedshard.results.formats.ResultsError": 2,
    "fedshard.runtime.launcher.CheckFailed": 2,
    "fedshard.runtime.lifecycle.StartRefused": 2,
    "fedshard.runtime.processes.ExperimentFailed": 1,
    "fedshard.runtime.resume.ContinueError": 2,
    "fedshard.runtime.transport.JoinRefused": 1,
    "fedshard.runtime.transport.RoundFailed": 1,
    "fedshard.runtime.transport.TrainersMissing": 1,
    "fedshard.sweep.executors.ExecutorError": 2,
    "fedshard.sweep.grid.SweepError": 2,
    "fedshard.tracking.checkpoints.CheckpointWriteError": 1,
    "fedshard.tracking.claims.ClaimError": 2,
    "fedshard.tracking.claims.ClaimLost": 3,
    "fedshard.tracking.store.TrackingError": 1,
}


def _exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in a fedshard module, by its full name."""
    import importlib
    import inspect
    import pkgutil

    import fedshard

    found = {}
    for info in pkgutil.walk_packages(fedshard.__path__, "fedshard."):
        if info.name == "fedshard.__main__":  # runs the command when imported
            continue
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{obj.__qualname__}"] = obj
    return found


def test_every_exception_is_a_fedshard_error_that_carries_the_exit_code_users_get():
    from fedshard.runtime import launcher, lifecycle
    from fedshard.tracking.claims import ClaimLost

    found = _exception_classes()
    assert found.pop("fedshard.core.errors.FedshardError") is errors.FedshardError
    # A signal stops the launcher: no `except Exception` may swallow it, so it is no FedshardError.
    interrupted = found.pop("fedshard.runtime.launcher.Interrupted")
    assert not issubclass(interrupted, Exception)
    assert [name for name, cls in found.items() if not issubclass(cls, errors.FedshardError)] == []
    assert {name: cls.exit_code for name, cls in found.items()} == EXIT_CODES
    assert ClaimLost.exit_code == lifecycle.CLAIM_LOST
    assert lifecycle.StartRefused("could not prepare the run", 1).exit_code == 1
    # the builtin bases stay, so that `except ValueError` (or OSError) around them keeps working
    assert issubclass(found["fedshard.core.config.ConfigError"], ValueError)
    assert issubclass(found["fedshard.tracking.checkpoints.CheckpointWriteError"], OSError)
    assert launcher.CheckFailed("x").exit_code == 2
