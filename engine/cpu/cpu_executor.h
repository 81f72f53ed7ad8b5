// The CPU executor: the reference LayerExecutor (engine/api/layer_executor.h).
// A layer runs on the host: RMSNorm, the router's product on the panel
// kernels, selection and dispatch (engine/api/router.h, dispatch.h), every
// held expert with rows and the shared experts in one PanelFfnRunner call on
// the ThreadTeam (engine/cpu/panel_ffn.h), the shared-expert gate, then the
// combine. The kernels' path is chosen at creation (engine/api/cpu_path.h:
// AVX-512, AVX2 or portable). 16-bit weights stay 16-bit.
//
// Enqueue runs the layer before it returns; Finish copies the outputs.
// Per-expert timing: kPerExpert. Thread-safety: as LayerExecutor.
#ifndef MOE_ENGINE_CPU_CPU_EXECUTOR_H_
#define MOE_ENGINE_CPU_CPU_EXECUTOR_H_

#include <memory>

#include "absl/status/statusor.h"
#include "engine/api/executor_factory.h"
#include "engine/api/layer_executor.h"
#include "engine/api/model_spec.h"

namespace moe {

// Builds the CPU executor from `model` (weights copied and packed; the
// definition need not outlive it). Reads options.compute (kF32 or kBF16),
// options.cpu_path (fails when this CPU does not run it) and options.held
// (routed experts not held are not packed). RESOURCE_EXHAUSTED when the
// weights do not fit in memory.
absl::StatusOr<std::unique_ptr<LayerExecutor>> CreateCpuExecutor(const ModelDefinition& model,
                                                                 const ExecutorOptions& options);

}  // namespace moe

#endif  // MOE_ENGINE_CPU_CPU_EXECUTOR_H_
