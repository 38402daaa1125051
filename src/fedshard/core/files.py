"""Files written whole or not at all, and the last lines of a log.

Standard library only, so that every process (the metaserver included, which must start in
a fraction of a second) can use it.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import suppress
from pathlib import Path


def not_a_directory(path: str | Path) -> str | None:
    """Why `path` cannot be made a directory ('PART is a file, not a directory', where mkdir -p would
    say 'File exists'), or None when it can: every part that exists is a directory."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists():
            return None if part.is_dir() else f"{part} is a file, not a directory"
    return None


def make_dirs(path: str | Path) -> Path:
    """mkdir -p; a part of the path that is a file is a NotADirectoryError saying so (not_a_directory)."""
    if (problem := not_a_directory(path)) is not None:
        raise NotADirectoryError(problem)
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def write_atomic(path: str | Path, data: bytes, mode: int | None = None) -> Path:
    """Write `data` to `path` through a temporary file in the same directory and os.replace: a
    reader sees the previous file or the complete new one, never half of it, and no temporary
    file is left. The file keeps the mode of the one it replaces, else `mode`, else the umask's."""
    path = Path(path)
    make_dirs(path.parent)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def tail(path: str | Path, n: int = 5) -> str:
    """The last `n` non-empty lines of a log, joined with ' | ' (a failure's reason in one line);
    '' when the file cannot be read."""
    with suppress(OSError):
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
        return " | ".join(lines[-n:])
    return ""
