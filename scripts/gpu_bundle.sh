#!/usr/bin/env bash
# Builds the GPU tests and bench here, where the project's Debian libraries
# are, and packs them into gpu-bundle/ with the shared libraries they load
# that a CUDA machine does not have (Abseil, protobuf, GoogleTest, ...; not
# the C library, nor CUDA's own, which that machine has), for
# scripts/gpu_check.sh to run there:
#   scripts/gpu_bundle.sh            # then carry gpu-bundle/ to the GPU machine
#   scripts/gpu_check.sh             # there, from the repository root
set -euo pipefail
cd "$(dirname "$0")/.."
build="${BUILD_DIR:-build-gpu}"
targets=(cuda_device_math_test cuda_quantized_layout_test cuda_executor_test executor_conformance_test cuda_bench moe_cuda)
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DMOE_CUDA=ON >/dev/null
cmake --build "$build" -j"$(nproc)" --target "${targets[@]}"
rm -rf gpu-bundle
mkdir -p gpu-bundle/lib
for target in "${targets[@]}"; do
  find "$build" -type f -name "$target" -perm -u+x -exec cp {} gpu-bundle/ \;
done
# The CUDA executor's plugin, beside the binaries that load it.
cp "$build/lib/libmoe_cuda.so" gpu-bundle/
# Libraries by resolved path, but the system's and CUDA's.
for binary in gpu-bundle/*; do
  [ -f "$binary" ] && ldd "$binary" | awk '/=> \// { print $3 }'
done | sort -u |
  grep -vE '/(libc|libm|libdl|libpthread|librt|libgcc_s|libstdc\+\+|ld-linux[^/]*|libcuda|libcudart|libcublas|libcublasLt)\.so' |
  xargs -r cp -L -t gpu-bundle/lib
echo "gpu_bundle: $(du -sh gpu-bundle | cut -f1) in gpu-bundle/ ($(ls gpu-bundle/lib | wc -l) libraries)"
