#!/usr/bin/env bash
# Test tooling from PyPI in a project-local venv (.venv-test): tritonclient
# and numpy for the end-to-end tests, perf_analyzer where a real build is
# offered. Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-test
if [ ! -x "$VENV/bin/python" ]; then
  if ! python3 -m venv "$VENV" 2>/dev/null; then
    apt-get install -y -q python3-venv >/dev/null
    python3 -m venv "$VENV"
  fi
fi
if ! "$VENV/bin/python" -c "import tritonclient.grpc, numpy" 2>/dev/null; then
  "$VENV/bin/pip" install -q "tritonclient[grpc]" numpy
fi
# perf_analyzer ships as a binary inside the perf-analyzer package (2.x);
# version 0.1.0 is an empty placeholder, which is all some indexes offer.
if [ ! -x "$VENV/bin/perf_analyzer" ]; then
  "$VENV/bin/pip" install -q "perf-analyzer>=2" 2>/dev/null || echo "setup: no real perf-analyzer build available; its smoke test will skip"
fi
