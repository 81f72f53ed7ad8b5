#!/usr/bin/env bash
# A short perf_analyzer run against moe-serve on the demo model: its start-up
# calls (ModelMetadata, ModelConfig, ServerMetadata) must satisfy it, and
# every request of the measurement must succeed. Exits 77 (skipped) when
# perf_analyzer is not installed (scripts/setup_test_tools.sh installs it).
set -euo pipefail
SERVE="$1"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PA="$ROOT/.venv-test/bin/perf_analyzer"
if [ ! -x "$PA" ]; then
  echo "SKIP: perf_analyzer is not installed"
  exit 77
fi
LOG=$(mktemp)
OUT=$(mktemp)
"$SERVE" --grpc_port=0 --metrics_port=0 --host=127.0.0.1 > "$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; rm -f "$LOG" "$OUT"' EXIT
for _ in $(seq 100); do grep -q "listening" "$LOG" && break; sleep 0.1; done
PORT=$(sed -n 's/.*listening on gRPC port \([0-9]*\).*/\1/p' "$LOG")
[ -n "$PORT" ] || { echo "FAIL: the server did not start"; cat "$LOG"; exit 1; }
# -b 4: requests of 4 tokens (the batch dimension is T). Windows of 50
# requests, and any spread between them accepted: this checks that the tool
# works against the server, not how steady a shared CI machine is.
"$PA" -m demo -i grpc -u "127.0.0.1:$PORT" -b 4 --concurrency-range 4 \
  --measurement-mode count_windows --measurement-request-count 50 --stability-percentage 1000 --max-trials 3 \
  > "$OUT" 2>&1 || { cat "$OUT"; echo "FAIL: perf_analyzer exited $?"; exit 1; }
cat "$OUT"
count=$(sed -n 's/.*Request count: \([0-9]*\).*/\1/p' "$OUT" | head -1)
throughput=$(sed -n 's/.*Throughput: \([0-9.]*\) infer\/sec.*/\1/p' "$OUT" | head -1)
if grep -qiE "error|failed" "$OUT" || [ -z "$count" ] || [ "$count" -lt 50 ] || [ -z "$throughput" ]; then
  echo "FAIL: perf_analyzer reported errors or too few requests (count '$count')"
  exit 1
fi
echo "PASS: perf_analyzer measured $count requests at $throughput infer/s"
