// The entry point of libmoe_cuda.so (engine/cuda/plugin.h).
#include "engine/cuda/plugin.h"

#include "engine/cuda/cuda_executor.h"

extern "C" __attribute__((visibility("default"))) absl::Status MoeCreateCudaExecutor(
    const moe::ModelDefinition& model, const moe::ExecutorOptions& options, std::unique_ptr<moe::LayerExecutor>* out) {
  absl::StatusOr<std::unique_ptr<moe::LayerExecutor>> executor = moe::CreateCudaExecutor(model, options);
  if (!executor.ok()) return executor.status();
  *out = std::move(executor).value();
  return absl::OkStatus();
}

// The plugin's entry point has the type the factory looks it up as.
static_assert(std::is_same_v<decltype(&MoeCreateCudaExecutor), MoeCreateCudaExecutorFn>);
