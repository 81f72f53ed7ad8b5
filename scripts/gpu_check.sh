#!/usr/bin/env bash
# The CUDA executor's proof on a machine with an NVIDIA GPU, in one run: the
# kernels' logic, the CUDA executor's own tests (golden fixtures, decode vs
# grouped, graph replays, batch invariance, exact counts), the conformance
# suite against the CPU reference, compute-sanitizer's memcheck, and the
# bench beside its references (dense cuBLAS, the copy bandwidth, PyTorch).
# Every test that needs the GPU must run (MOE_REQUIRE_CUDA=1): one that
# finds no device fails instead of skipping.
#   scripts/gpu_bundle.sh   # where the project builds: packs gpu-bundle/
#   scripts/gpu_check.sh    # on the GPU machine, from the repository root
# Logs and the figures go to $OUT (default gpu-check-out/). Exits non-zero
# when a check fails.
set -uo pipefail
cd "$(dirname "$0")/.."
bundle="${BUNDLE:-gpu-bundle}"
out="${OUT:-gpu-check-out}"
mkdir -p "$out"
export PATH="/usr/local/cuda/bin:$PATH"
export LD_LIBRARY_PATH="$PWD/$bundle/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export MOE_SOURCE_DIR="$PWD" MOE_REQUIRE_CUDA=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
failed=0
check() {
  local name="$1"
  shift
  local start=$SECONDS
  if "$@" >"$out/$name.log" 2>&1; then
    echo "gpu_check: $name passed ($((SECONDS - start)) s)"
  else
    echo "gpu_check: $name FAILED (exit $?, $((SECONDS - start)) s); the end of $out/$name.log:"
    tail -40 "$out/$name.log"
    failed=1
  fi
}
check device_math "$bundle/cuda_device_math_test"
check quantized_layout "$bundle/cuda_quantized_layout_test"
check cuda_executor "$bundle/cuda_executor_test"
check conformance "$bundle/executor_conformance_test" --gtest_filter='*_cuda'
check memcheck compute-sanitizer --tool memcheck --error-exitcode 9 "$bundle/cuda_executor_test" \
  --gtest_filter='*DecodePath*:*Counts*:*RunExperts*:*Quantized*'
check racecheck compute-sanitizer --tool racecheck --error-exitcode 9 "$bundle/cuda_executor_test" \
  --gtest_filter='*GraphReplays*'
check bench "$bundle/cuda_bench"
check torch_peer python3 bench/cuda_torch_peer.py
# The bench's figures beside the peer's, as ratios (> 1: moe-serve faster).
python3 - "$out/bench.log" "$out/torch_peer.log" <<'PY' | tee "$out/summary.txt"
import sys
def rows(path):
    table, header = {}, None
    for line in open(path):
        if line.startswith("#") or not line.strip():
            continue
        fields = line.rstrip("\n").split("\t")
        if fields[0] == "shape":
            header = fields
        elif header and len(fields) == len(header):
            table[(fields[0], fields[1])] = dict(zip(header, fields))
    return table
ours, peer = rows(sys.argv[1]), rows(sys.argv[2])
print("shape\ttokens\tlayer_us\tof_dense\tof_hbm\tvs_hf_loop\tvs_grouped_mm\tvs_our_bf16")
for key, row in ours.items():
    other = peer.get(key, {})
    ratio = lambda name: (f"{float(other[name]) / float(row['layer_us']):.2f}" if name in other and other[name] != "nan" else "-")
    # Quantized rows ("mixtral_fp8") beside the same shape's bf16 row.
    bf16 = ours.get((key[0].split("_")[0], key[1])) if "_" in key[0] else None
    vs_bf16 = f"{float(bf16['layer_us']) / float(row['layer_us']):.2f}" if bf16 else "-"
    print(f"{key[0]}\t{key[1]}\t{row['layer_us']}\t{row['of_dense']}\t{row['of_hbm']}\t{ratio('hf_loop_us')}\t{ratio('grouped_mm_us')}\t{vs_bf16}")
PY
exit "$failed"
