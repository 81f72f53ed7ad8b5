#!/usr/bin/env bash
# Test tooling from PyPI in a project-local venv (.venv-test): tritonclient
# and numpy for the end-to-end tests, perf_analyzer where a real build is
# offered. Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages: a real Prometheus server and promtool for the monitoring
# tests, iproute2 for ss.
missing=()
for pkg in prometheus iproute2 python3-venv; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q >/dev/null || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
    || echo "setup: could not install ${missing[*]}; the tests that need them will skip"
fi

VENV=.venv-test
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import tritonclient.grpc, numpy, yaml" 2>/dev/null; then
  "$VENV/bin/pip" install -q "tritonclient[grpc]" numpy pyyaml
fi
# perf_analyzer ships as a binary inside the perf-analyzer package (2.x);
# version 0.1.0 is an empty placeholder, which is all some indexes offer.
if [ ! -x "$VENV/bin/perf_analyzer" ]; then
  "$VENV/bin/pip" install -q "perf-analyzer>=2" 2>/dev/null || echo "setup: no real perf-analyzer build available; its smoke test will skip"
fi
