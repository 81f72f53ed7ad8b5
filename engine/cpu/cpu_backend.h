// The CPU expert backend: a layer's experts (and shared expert) on the panel
// kernels (engine/cpu/panel_ffn.h) in one parallel region, on the kernel path
// chosen at run time (engine/api/cpu_path.h: AVX-512, AVX2 or portable). 16-bit
// weights stay 16-bit. Thread-safety: as ExpertBackend.
#ifndef MOE_ENGINE_CPU_CPU_BACKEND_H_
#define MOE_ENGINE_CPU_CPU_BACKEND_H_

#include <memory>

#include "absl/status/statusor.h"
#include "engine/api/cpu_path.h"
#include "engine/api/expert_backend.h"
#include "engine/api/model_spec.h"

namespace moe {

struct CpuBackendOptions {
  // Compute dtype: kBF16 (bf16 inputs and weights, fp32 accumulation) or kF32.
  DType compute = DType::kBF16;
  // The kernels' path (default kAuto: ResolveCpuPath's choice); creation
  // fails when this CPU does not run it.
  CpuPath path = CpuPath::kAuto;
};

// Builds the backend from `model`'s expert weights (copied and packed; the
// definition need not outlive the backend).
absl::StatusOr<std::unique_ptr<ExpertBackend>> CreateCpuExpertBackend(const ModelDefinition& model,
                                                                      const CpuBackendOptions& options);

}  // namespace moe

#endif  // MOE_ENGINE_CPU_CPU_BACKEND_H_
