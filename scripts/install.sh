#!/usr/bin/env bash
# Create .venv and install the project. torch==2.13.0 goes first so pip takes the CPU wheel and never
# pulls CUDA packages; the project's own range (torch>=2.4) is then already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# Mirrors configured with extra indexes print one warning per package; keep the log readable.
quiet() {
  local log rc=0
  log=$(mktemp)
  "$@" >"$log" 2>&1 || rc=$?
  grep -v "is ignored: it is neither a file nor a directory" "$log" || true
  rm -f "$log"
  return "$rc"
}
quiet .venv/bin/python -m pip install -q torch==2.13.0
quiet .venv/bin/python -m pip install -q -e '.[dev]'
touch .venv/.installed
