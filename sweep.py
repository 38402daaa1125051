#!/usr/bin/env python
"""Run the researchers' grid of experiments and skip what already finished: `python sweep.py --help`.

A thin entry point: the sweep itself is `fedshard sweep` (src/fedshard/sweep/).
"""

import sys
from pathlib import Path

try:
    import fedshard  # noqa: F401
except ImportError:  # a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from fedshard.cli import sweep

if __name__ == "__main__":
    sweep(prog_name="sweep.py")
