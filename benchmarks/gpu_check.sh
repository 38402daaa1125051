#!/usr/bin/env bash
# The GPU check (docs/gpu.md): benchmarks/gpu_check.py, which writes OUTPUT/<gpu-name>.json.
#
#   bash benchmarks/gpu_check.sh --bundle        # here, with PyPI: .whl/, the wheels the GPU machine lacks
#   bash benchmarks/gpu_check.sh [--budget S] [--output DIR]
#                                                # on the GPU machine, with .whl/ copied over: offline,
#                                                # on its own python3 and PyTorch, in at most S seconds (420)
#   bash benchmarks/gpu_check.sh --dry [--budget S]
#                                                # here: the same steps on the CPU at toy sizes, in .venv
#   bash benchmarks/gpu_check.sh --dry --offline [--budget S]
#                                                # here: the GPU machine's way (a bundle for this Python,
#                                                # a stand-in for its image, no index), then --dry
set -euo pipefail
cd "$(dirname "$0")/.."

# What the GPU machine runs, and the rehearsal with it: fedshard installed from the bundle alone
# (PIP_NO_INDEX, without pip's configuration), then the check with that Python.
offline_check() {  # PYTHON WHEELS [--strict] CHECK-ARGS...
    local python=$1 wheels=$2 fallback=--fallback status=0
    shift 2
    if [ "${1:-}" = --strict ]; then fallback=""; shift; fi
    "$python" benchmarks/gpu_bundle.py install --wheels "$wheels" $fallback || status=$?
    case $status in
        0) installed="from $wheels alone, dependencies checked" ;;
        3) installed="from $wheels alone, WITHOUT dependency checks (pip could not resolve them)" ;;
        *) exit "$status" ;;
    esac
    exec "$python" benchmarks/gpu_check.py --install "$installed" "$@"
}

# The developers' environment (.venv, or FEDSHARD_VENV), made and brought up to date with PyPI.
dev_python() {
    local venv=${FEDSHARD_VENV:-.venv}
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install -q -e '.[dev,gpu]' -c .ci/constraints.txt >&2
    echo "$venv/bin/python"
}

# The options, checked before anything is installed or built.
usage="usage: bash benchmarks/gpu_check.sh --bundle | [--dry [--offline]] [--budget SECONDS] [--output DIR]"
refuse() { echo "gpu_check.sh: $1; $usage" >&2; exit 2; }
args=() bundle=0 dry=0 offline=0
while [ $# -gt 0 ]; do
    case $1 in
        --bundle) bundle=1 ;;
        --offline) offline=1 ;;
        --dry) dry=1; args+=("$1") ;;
        --budget) [[ ${2:-} =~ ^[0-9]+([.][0-9]*)?$ ]] || refuse "--budget '${2:-}': expected seconds, e.g. 420"
                  args+=("$1" "$2"); shift ;;
        --output) [ -n "${2:-}" ] || refuse "--output needs a directory"
                  args+=("$1" "$2"); shift ;;
        *) refuse "unknown option '$1'" ;;
    esac
    shift
done
if [ $bundle = 1 ] && { [ ${#args[@]} -gt 0 ] || [ $offline = 1 ]; }; then refuse "--bundle takes no other option"; fi

if [ $bundle = 1 ]; then
    exec "$(dev_python)" benchmarks/gpu_bundle.py build
elif [ $dry = 1 ] && [ $offline = 1 ]; then
    python=$(dev_python)
    "$python" benchmarks/gpu_bundle.py build --python-version "$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
        --dest .whl-rehearsal
    rehearsal=$("$python" benchmarks/gpu_bundle.py rehearsal-env .venv-rehearsal --wheels .whl-rehearsal)
    offline_check "$rehearsal" .whl-rehearsal --strict "${args[@]}"
elif [ $dry = 1 ]; then
    exec "$(dev_python)" benchmarks/gpu_check.py "${args[@]}"
else
    offline_check python3 .whl "${args[@]}"
fi
