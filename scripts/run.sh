#!/usr/bin/env bash
# Sets up, builds and starts moe-serve's main program on the built-in demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec build/tools/moe-run --routing "$@"
