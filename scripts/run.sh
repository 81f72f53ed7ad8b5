#!/usr/bin/env bash
# Sets up, builds and starts moe-serve on the built-in demo model (gRPC on
# port 8001). Extra arguments go to moe-serve, e.g. --model_repository=DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec build/server/moe-serve "$@"
