#!/usr/bin/env bash
# Expert workers on other hosts: two network namespaces joined to this one by
# veth pairs, a moe-worker in each, moe-serve here sending them the demo
# model's experts over real interfaces. The answers must equal, byte for
# byte, those of moe-serve alone; after SIGKILL of one of two workers that
# both hold every expert, they still must.
#
# Usage: netns_workers.sh MOE_SERVE MOE_WORKER MOE_CLIENT
# Exits 77 (skipped) when namespaces cannot be made (not root, no `ip`).
set -euo pipefail
serve=$1 worker=$2 client=$3
tag=$$
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  for i in 1 2; do
    ip netns del "moe-w$i-$tag" 2>/dev/null || true
    ip link del "vh$i-$tag" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null || ! ip netns add "moe-w1-$tag" 2>/dev/null; then
  echo "SKIP: cannot make network namespaces here (needs root and iproute2)"
  exit 77
fi
ip netns add "moe-w2-$tag"
for i in 1 2; do
  ns="moe-w$i-$tag"
  ip link add "vh$i-$tag" type veth peer name "vw$i-$tag"
  ip link set "vw$i-$tag" netns "$ns"
  ip addr add "10.77.$i.1/24" dev "vh$i-$tag"
  ip link set "vh$i-$tag" up
  ip netns exec "$ns" ip addr add "10.77.$i.2/24" dev "vw$i-$tag"
  ip netns exec "$ns" ip link set "vw$i-$tag" up
  ip netns exec "$ns" ip link set lo up
done

# await_line FILE REGEX: the first group of REGEX once FILE has a matching line.
await_line() {
  for _ in $(seq 300); do
    if line=$(grep -oE "$2" "$1" | head -1) && [ -n "$line" ]; then
      grep -oE '[0-9]+$' <<<"$line"
      return 0
    fi
    sleep 0.1
  done
  echo "no '$2' in $1:" >&2
  cat "$1" >&2
  return 1
}

for i in 1 2; do
  ip netns exec "moe-w$i-$tag" "$worker" --host="10.77.$i.2" --port=8101 >"$work/worker$i.log" 2>&1 &
  pids+=($!)
  disown
  await_line "$work/worker$i.log" 'listening on gRPC port [0-9]+' >/dev/null
done
"$serve" --host=127.0.0.1 --grpc_port=0 --metrics_port=-1 \
  --workers='10.77.1.2:8101=all;10.77.2.2:8101=all' >"$work/front.log" 2>&1 &
pids+=($!)
disown
front=$(await_line "$work/front.log" 'listening on gRPC port [0-9]+')
"$serve" --host=127.0.0.1 --grpc_port=0 --metrics_port=-1 >"$work/alone.log" 2>&1 &
pids+=($!)
disown
alone=$(await_line "$work/alone.log" 'listening on gRPC port [0-9]+')

"$client" infer --server="127.0.0.1:$alone" --model=demo --tokens=16 --output="$work/alone.npy" >/dev/null
"$client" infer --server="127.0.0.1:$front" --model=demo --tokens=16 --output="$work/front.npy" >/dev/null
cmp "$work/alone.npy" "$work/front.npy"
echo "front end with workers in two namespaces: the same bytes as one process"

kill -9 "${pids[0]}"
for n in 1 2 3; do
  "$client" infer --server="127.0.0.1:$front" --model=demo --tokens=16 --output="$work/after$n.npy" >/dev/null
  cmp "$work/alone.npy" "$work/after$n.npy"
done
echo "after SIGKILL of one worker: still the same bytes"
