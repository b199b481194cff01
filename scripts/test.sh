#!/usr/bin/env bash
# Set up (once) a virtual environment with the test extras and run lint, types and the test suite.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/pytest ] || [ pyproject.toml -nt .venv/.installed ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[test]"
  touch .venv/.installed
fi
.venv/bin/ruff check gateway tests bench scripts
.venv/bin/mypy gateway
.venv/bin/python -m pytest "$@"
