#!/usr/bin/env bash
# Runs the engine's path tests and a served request on an emulated CPU that
# lacks this machine's widest instructions (qemu-x86_64 -cpu MODEL, from
# Debian's qemu-user), so that a build whose code leaks wider instructions
# outside the kernels, or a dispatch that picks a path the CPU lacks, fails
# here rather than on a user's machine.
#
#   tests/e2e/cpu_masked.sh BUILD_DIR QEMU_CPU EXPECTED_PATH
#   tests/e2e/cpu_masked.sh build Haswell avx2      # AVX2 + FMA, no AVX-512
#   tests/e2e/cpu_masked.sh build Nehalem portable  # no AVX at all
#
# The served answer must be the same bits as the same request served natively
# with MOE_CPU_PATH=EXPECTED_PATH. Exits 77 (skipped) where qemu-x86_64 is
# missing or the host is not x86-64.
set -euo pipefail
build=$1 cpu=$2 expected=$3
[ "$(uname -m)" = x86_64 ] || { echo "skip: not an x86-64 host"; exit 77; }
command -v qemu-x86_64 >/dev/null || { echo "skip: qemu-x86_64 (Debian's qemu-user) is not installed"; exit 77; }
# qemu's warnings about host features its emulator lacks are noise here.
emulate() { qemu-x86_64 -cpu "$cpu" "$@" 2> >(grep -v "TCG doesn't support" >&2); }

# The tests that exercise the dispatch itself; the others run natively
# (and again with MOE_CPU_PATH forced, scripts/test.sh).
for test in cpu_path_test panel_kernels_test golden_test; do
  emulate "$build/tests/$test" --gtest_brief=1 >/dev/null || { echo "$test failed on $cpu"; exit 1; }
done

work=$(mktemp -d)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill -9 "$server_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Serves the demo model under the command given after the name (one that
# execs the server, so that $! is the server), answers one request from a
# fixed input and writes the output to $work/$name.npy.
serve_once() {
  local name=$1
  shift
  "$@" "$build/server/moe-serve" --grpc_port=0 --metrics_port=-1 --host=127.0.0.1 >"$work/$name.log" 2>&1 &
  server_pid=$!
  local port=""
  for _ in $(seq 1 600); do
    port=$(sed -n 's/.*listening on gRPC port \([0-9]*\).*/\1/p' "$work/$name.log")
    [ -n "$port" ] && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/$name.log"; echo "moe-serve ($name) exited"; exit 1; }
    sleep 0.2
  done
  [ -n "$port" ] || { cat "$work/$name.log"; echo "moe-serve ($name) did not start"; exit 1; }
  grep -q "cpu $expected kernels" "$work/$name.log" || {
    cat "$work/$name.log"
    echo "moe-serve ($name) does not run the $expected path"
    exit 1
  }
  "$build/client/moe-client" infer --server="127.0.0.1:$port" --model=demo --input="$work/input.npy" \
    --output="$work/$name.npy" >/dev/null
  kill -TERM "$server_pid"
  local status=0
  wait "$server_pid" || status=$?
  server_pid=""
  # qemu-user ends its guest on SIGTERM (143) rather than hand it to the
  # guest's sigwait; natively the server must exit 0.
  if [ "$status" -ne 0 ] && { [ "$name" = native ] || [ "$status" -ne 143 ]; }; then
    cat "$work/$name.log"
    echo "moe-serve ($name) exited with $status after SIGTERM"
    exit 1
  fi
}

# A fixed input: 5 tokens of the demo model's width, from the native server's metadata.
python3 - "$work/input.npy" <<'PY'
import struct, sys
tokens, hidden = 5, 256
header = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }" % (tokens, hidden)
header += " " * (63 - (len(header) + 10) % 64) + "\n"
with open(sys.argv[1], "wb") as f:
    f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())
    for i in range(tokens * hidden):
        f.write(struct.pack("<f", ((i * 37) % 101 - 50) / 25.0))
PY
serve_once native env MOE_CPU_PATH="$expected"
serve_once emulated qemu-x86_64 -cpu "$cpu"
cmp "$work/native.npy" "$work/emulated.npy" || { echo "the emulated $cpu server's answer differs"; exit 1; }
echo "qemu -cpu $cpu: the $expected path ran and served the same bits as natively"
