#!/usr/bin/env bash
# The folders are layers (docs/ARCHITECTURE.md); this checks the includes
# that would break them, and names every offending line:
#   - engine/ includes nothing of gRPC, Prometheus, server/ or client/;
#   - the engine's public headers (engine/api/) include only each other of
#     the engine, and no CUDA header;
#   - CUDA headers appear only under engine/cuda/;
#   - server/, remote/, tools/ and client/ reach the engine only through
#     engine/api/; remote/ knows nothing of the server.
set -uo pipefail
root="${1:-$(dirname "$0")/../..}"
cd "$root" || exit 2
failed=0
# check DESCRIPTION PATTERN FILES...: fails when a file has an #include line matching PATTERN.
check() {
  local description="$1" pattern="$2"
  shift 2
  local found
  found=$(grep -HnE "^#include .*($pattern)" "$@" 2>/dev/null)
  if [ -n "$found" ]; then
    echo "layering: $description:"
    echo "$found" | sed 's/^/  /'
    failed=1
  fi
}
sources() { find "$@" -name '*.h' -o -name '*.cc' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null; }

check "engine/ must not know gRPC, Prometheus, the server or the client" \
  'grpc|prometheus|"server/|"client/|\.grpc\.pb\.h' $(sources engine)
check "engine/api/ headers include only engine/api/ of the engine" \
  '"engine/(cpu|cuda|model|loading|routing|runner)/' $(sources engine/api)
check "CUDA headers belong under engine/cuda/" \
  '<(cuda|cublas|cuda_runtime|cuda_bf16|cuda_fp16)[a-zA-Z_]*\.h>' $(sources engine server tools client | grep -v '^engine/cuda/')
check "server/, remote/, tools/ and client/ use the engine through engine/api/ only" \
  '"engine/(cpu|cuda|model|loading|routing|runner)/' $(sources server remote tools client)
check "engine/ and remote/ know nothing of the server" '"server/' $(sources remote)
[ "$failed" = 0 ] && echo "layering: every include respects the layers"
exit "$failed"
