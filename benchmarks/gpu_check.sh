#!/usr/bin/env bash
# The GPU check, from a fresh clone: a virtual environment with fedshard and its GPU and
# test extras, then benchmarks/gpu_check.py, which writes benchmarks/results/<gpu-name>.json.
#
#   bash benchmarks/gpu_check.sh          # on a machine with one NVIDIA GPU; not timed yet: at most
#                                         # about 30 minutes (7 steps of at most 4 minutes, --timeout)
#   bash benchmarks/gpu_check.sh --dry    # every step on the CPU at toy sizes: checks the plumbing only
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FEDSHARD_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
pip install -q --upgrade pip
pip install -q -e '.[dev,gpu]'
exec python benchmarks/gpu_check.py "$@"
