#!/usr/bin/env bash
# Encodes the protobuf seeds (seeds/<target>.<name>.txtpb, text format) into
# the binary seeds of corpus/<target>/ with protoc. Run after editing a seed.
set -euo pipefail
cd "$(dirname "$0")"
for seed in seeds/*.txtpb; do
  base=$(basename "$seed" .txtpb)
  target=${base%%.*}
  case "$target" in
    fuzz_infer_request) type=inference.ModelInferRequest proto=inference.proto ;;
    fuzz_worker_request) type=moe.worker.ExpertRowsRequest proto=expert_worker.proto ;;
    *) echo "make_seeds: no message type for $target" >&2; exit 1 ;;
  esac
  protoc -I ../proto --encode="$type" "../proto/$proto" <"$seed" >"corpus/$target/${base#*.}"
done
