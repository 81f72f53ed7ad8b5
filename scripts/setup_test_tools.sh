#!/usr/bin/env bash
# Test tooling from PyPI (tritonclient, perf_analyzer) in a project-local venv,
# so tests that use real peers can run. Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-test
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import numpy" 2>/dev/null; then
  "$VENV/bin/pip" install -q numpy
fi
