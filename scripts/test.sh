#!/usr/bin/env bash
# Sets up, builds and runs every test (unit, integration, end-to-end).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/setup_test_tools.sh
build="${BUILD_DIR:-build}"
# Every path the CPU runs: where it has a path wider than AVX2, the whole
# suite first with the engine held to AVX2 (MOE_CPU_PATH), so that the path
# most CPUs take is never the one nobody ran; then the suite as it comes (the
# widest path). The path tests run every supported path each time, and
# tests/e2e/cpu_masked.sh runs on emulated CPUs that lack AVX-512 or AVX.
if grep -qw avx512f /proc/cpuinfo 2>/dev/null && grep -qw avx2 /proc/cpuinfo; then
  echo "test: the whole suite with MOE_CPU_PATH=avx2"
  MOE_CPU_PATH=avx2 ctest --test-dir "$build" --output-on-failure -j"$(nproc)" -E '^cpu_masked' "$@"
  echo "test: the whole suite on the widest path"
fi
ctest --test-dir "$build" --output-on-failure -j"$(nproc)" "$@"
