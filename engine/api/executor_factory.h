// The executor factory: builds the LayerExecutor (engine/api/layer_executor.h)
// a model runs on from the model's options. Each kind of executor registers
// one function under its name: the engine registers "cpu" (and "cuda" in a
// build with CUDA); a process may register more at start-up (the server's
// remote executor, which needs gRPC, lives outside the engine). Adding an
// executor is one folder and one registration.
//
// Thread-safety: every function here is thread-safe.
#ifndef MOE_ENGINE_API_EXECUTOR_FACTORY_H_
#define MOE_ENGINE_API_EXECUTOR_FACTORY_H_

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/api/cpu_path.h"
#include "engine/api/expert_offload.h"
#include "engine/api/expert_set.h"
#include "engine/api/layer_executor.h"
#include "engine/api/model_spec.h"

namespace moe {

struct ExecutorOptions {
  // The registered kind to build (default "cpu").
  std::string kind = "cpu";
  // kBF16 (default: bf16 products, fp32 accumulation) or kF32.
  DType compute = DType::kBF16;
  // CPU executor: the kernels' path (default kAuto: MOE_CPU_PATH if set,
  // else the widest this CPU runs).
  CpuPath cpu_path = CpuPath::kAuto;
  // Device executors: which device of their kind (default 0).
  int device_index = 0;
  // The routed experts to hold (default: all of them).
  std::optional<ExpertSet> held = std::nullopt;
  // Where the routed experts not held run (engine/api/expert_offload.h).
  // Borrowed: must outlive the executor. Null: nowhere, and a layer that
  // selects one fails.
  const ExpertOffload* offload = nullptr;
  // The experts sent to the offload (default: those not held). One both held
  // and offloaded runs here when the offload cannot run it: a fallback.
  std::optional<ExpertSet> offloaded = std::nullopt;
};

// Builds an executor from `model`'s weights (copied: the definition need
// not outlive it). CreateExecutor validates the model first (ValidateModel);
// INVALID_ARGUMENT for an unknown kind (the message lists the registered
// ones); otherwise the kind's own errors.
using ExecutorFactoryFn = std::function<absl::StatusOr<std::unique_ptr<LayerExecutor>>(const ModelDefinition& model,
                                                                                       const ExecutorOptions& options)>;

// Registers `kind`. ALREADY_EXISTS when it is taken.
absl::Status RegisterExecutorKind(const std::string& kind, ExecutorFactoryFn factory);

absl::StatusOr<std::unique_ptr<LayerExecutor>> CreateExecutor(const ModelDefinition& model,
                                                              const ExecutorOptions& options);

// The registered kinds, sorted.
std::vector<std::string> ExecutorKinds();

// Where a process runs its models, as a --device flag names it: "cpu", or a
// device kind with an optional index ("cuda", "cuda:1").
struct ExecutorDevice {
  std::string kind = "cpu";
  int index = 0;
};
// INVALID_ARGUMENT, naming what this build has, for a kind it lacks (a
// build without MOE_CUDA has no "cuda") or a malformed index.
absl::StatusOr<ExecutorDevice> ParseExecutorDevice(const std::string& text);

}  // namespace moe

#endif  // MOE_ENGINE_API_EXECUTOR_FACTORY_H_
