#!/usr/bin/env bash
# Run the test suite under CPython 3.8, JetPack 5's Python, in a venv with the station runtime only.
#
#   tools/py38_check.sh [--fresh] [pytest args...]      e.g. tools/py38_check.sh -x -q
#
# The venv gets what a JetPack 5 station gets from pip: this package (pip install -e ., so the
# metadata must build with the last setuptools for 3.8) and its runtime dependencies under
# 'numpy<2' (as deploy/jetson/install.sh), plus pytest and onnx (the tests build tiny ONNX models), and the
# 'openvino' extra (on 3.8 pip resolves it to OpenVINO 2024.4, the last release with cp38 wheels), so the
# OpenVINO backend is tested on 3.8 for real.
# No torch: workstation tests skip themselves (importorskip), everything else must pass on 3.8,
# including tests/test_py38.py's real 3.8 run.
#
# Environment:
#   PY38                 the interpreter (default: python3.8 on PATH, else ~/.pyenv/versions/3.8*/bin/python3.8)
#   HEMAEDGE_PY38_VENV   where the venv lives (default ~/.cache/hemaedge/py38-venv; reused, --fresh remakes it)
# Exit status: pytest's; 2 when no CPython 3.8 is found.
set -euo pipefail
cd "$(dirname "$0")/.."

FRESH=0
if [ "${1:-}" = "--fresh" ]; then FRESH=1; shift; fi
VENV=${HEMAEDGE_PY38_VENV:-$HOME/.cache/hemaedge/py38-venv}

is_py38() { [ -n "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 8))' >/dev/null 2>&1; }

PY=${PY38:-}
if ! is_py38 "$PY"; then
  PY=""
  for cand in "$(command -v python3.8 || true)" "$HOME"/.pyenv/versions/3.8*/bin/python3.8; do
    if is_py38 "$cand"; then PY=$cand; break; fi
  done
fi
if [ -z "$PY" ]; then
  echo "py38_check: no CPython 3.8 found (set PY38=/path/to/python3.8; e.g. pyenv install 3.8)" >&2
  exit 2
fi

start=$SECONDS
if [ "$FRESH" -eq 1 ] || ! is_py38 "$VENV/bin/python"; then
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo 'numpy<2' >"$CONSTRAINTS"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS" -e '.[openvino]' pytest onnx
"$VENV/bin/python" -m hemaedge --version
echo "py38_check: venv ready in $((SECONDS - start)) s ($("$VENV/bin/python" -V), $VENV)"

HEMAEDGE_PY38="$VENV/bin/python" "$VENV/bin/python" -m pytest -p no:cacheprovider "$@" tests
