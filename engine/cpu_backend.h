// The CPU expert backends. Two implementations of the same math:
// - panel kernels (engine/panel_ffn.h): our AVX-512 kernels, a whole layer's
//   experts in one parallel region; the default where the CPU has AVX-512
//   (and AVX512_BF16 for bf16 compute);
// - oneDNN matmuls with weights prepacked at load, the activation and the GLU
//   product fused into the matmuls' epilogues, all cores inside each matmul;
//   the fallback on other CPUs.
// Both keep 16-bit weights 16-bit. Thread-safety: as ExpertBackend.
#ifndef MOE_ENGINE_CPU_BACKEND_H_
#define MOE_ENGINE_CPU_BACKEND_H_

#include <memory>

#include "absl/status/statusor.h"
#include "engine/expert_backend.h"
#include "engine/model_spec.h"

namespace moe {

enum class CpuKernels {
  kAuto,    // panel kernels where the CPU runs them, else oneDNN
  kPanel,   // panel kernels; creation fails on a CPU without them
  kOneDnn,  // oneDNN matmuls
};

struct CpuBackendOptions {
  // Compute dtype: kBF16 (bf16 inputs and weights, fp32 accumulation) or kF32.
  DType compute = DType::kBF16;
  // Which implementation computes the experts (default kAuto).
  CpuKernels kernels = CpuKernels::kAuto;
};

// Builds the backend from `model`'s expert weights (copied and packed; the
// definition need not outlive the backend).
absl::StatusOr<std::unique_ptr<ExpertBackend>> CreateCpuExpertBackend(const ModelDefinition& model,
                                                                      const CpuBackendOptions& options);

}  // namespace moe

#endif  // MOE_ENGINE_CPU_BACKEND_H_
