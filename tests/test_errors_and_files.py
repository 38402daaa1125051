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
