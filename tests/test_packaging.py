"""What installing and importing fedshard relies on: the conda environment is pyproject.toml's at
CI's versions, and reading results (analyze, export) needs nothing Linux-only."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0].lower()


def test_conda_yaml_is_pyprojects_environment_at_the_versions_ci_tests():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {
        _name(line): line.strip()
        for line in (REPO / ".ci" / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    (pip,) = [d["pip"] for d in conda["dependencies"] if isinstance(d, dict)]
    expected = [pins.get(_name(r), r) for r in project["dependencies"]]
    assert sorted(r for r in pip if r != "-e .") == sorted(expected)
    python = next(d for d in conda["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert project["requires-python"] == ">=" + python.removeprefix("python=")


ANALYZE_WITHOUT_PRCTL = r"""
import ctypes, sys
class NoPrctl:  # a libc without prctl, as on macOS
    def __init__(self, *args, **kwargs): pass
    def __getattr__(self, name): raise AttributeError(f"dlsym: {name}: symbol not found")
ctypes.CDLL = NoPrctl
from click.testing import CliRunner
from fedshard import cli
result = CliRunner().invoke(cli.main, ["analyze", "--results-file", sys.argv[1], "--output-dir", sys.argv[2]])
print(result.output)
assert result.exit_code == 0, result.output
assert "fedshard.runtime.processes" not in sys.modules, "analyze imported the module that starts processes"
"""


@pytest.mark.slow
def test_the_cli_imports_and_analyze_runs_without_prctl(tmp_path):
    results = tmp_path / "r.pkl"
    results.write_bytes(pickle.dumps({(2, 0.001, True, 2, 1): [(0, 4.6, 0.01), (1, 4.0, 0.1), (2, 3.5, 0.2)]}))
    done = subprocess.run(
        [sys.executable, "-c", ANALYZE_WITHOUT_PRCTL, str(results), str(tmp_path / "report")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1. World Size: 2, LR: 0.001, Swap: True, Rounds: 2, Accuracy: 0.2000 (n=1)" in done.stdout
    assert (tmp_path / "report" / "report.md").is_file()
