#!/usr/bin/env bash
# A short perf_analyzer run against moe-serve on the demo model.
# Exits 77 (skipped) when the real perf_analyzer is not installed: the
# package index reachable here may offer only a placeholder of it.
set -euo pipefail
SERVE="$1"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PA="$ROOT/.venv-test/bin/perf_analyzer"
if [ ! -x "$PA" ]; then
  echo "SKIP: perf_analyzer is not installed (pip offered no real perf-analyzer build here)"
  exit 77
fi
PORT=$((20000 + RANDOM % 20000))
"$SERVE" --grpc_port=$PORT --host=127.0.0.1 > /tmp/perf_analyzer_smoke_$$.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "listening" /tmp/perf_analyzer_smoke_$$.log && break; sleep 0.1; done
"$PA" -m demo -i grpc -u 127.0.0.1:$PORT --shape hidden_states:4,256 --concurrency-range 4 \
  --measurement-interval 1000 --measurement-request-count 50
