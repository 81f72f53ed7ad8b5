// The CPU expert backend: oneDNN matmuls with weights prepacked at load
// (16-bit weights stay 16-bit), the activation and the GLU product fused into
// the matmuls' epilogues, and all cores used inside each matmul.
// Thread-safety: as ExpertBackend.
#ifndef MOE_ENGINE_CPU_BACKEND_H_
#define MOE_ENGINE_CPU_BACKEND_H_

#include <memory>

#include "absl/status/statusor.h"
#include "engine/expert_backend.h"
#include "engine/model_spec.h"

namespace moe {

struct CpuBackendOptions {
  // Compute dtype: kBF16 (bf16 inputs and weights, fp32 accumulation) or kF32.
  DType compute = DType::kBF16;
};

// Builds the backend from `model`'s expert weights (copied and packed; the
// definition need not outlive the backend).
absl::StatusOr<std::unique_ptr<ExpertBackend>> CreateCpuExpertBackend(const ModelDefinition& model,
                                                                      const CpuBackendOptions& options);

}  // namespace moe

#endif  // MOE_ENGINE_CPU_BACKEND_H_
