"""What went wrong, in one line: how fedshard quotes an exception inside its own messages.

Messages name the value and what would be valid; when they quote an exception from a library
(MLflow, gloo, pickle, torch), they quote one line of it, never a traceback.

Every exception fedshard raises is a `FedshardError`, which carries the exit status a command ends
with when it is what stops the command: 1 for a failure, 2 for input that cannot be used (a usage
error). An entry point (cli/) says the message and exits with `exc.exit_code`, in one place.
"""

from __future__ import annotations


class FedshardError(Exception):
    """The base of fedshard's exceptions. Each class keeps its builtin base too (ValueError, OSError,
    RuntimeError), so that `except ValueError` around it keeps working."""

    exit_code: int = 1


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def last_line(exc: BaseException) -> str:
    """The last line of an exception's message (a ConfigError lists its problems below a heading),
    or its type's name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[-1].strip() if text else type(exc).__name__


def one_line(text: str, limit: int = 300) -> str:
    """Any text as one line of at most `limit` characters: whitespace runs become one space."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def described(exc: BaseException) -> str:
    """'OSError: [Errno 28] No space left on device': the exception's type and message, on one line."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())
