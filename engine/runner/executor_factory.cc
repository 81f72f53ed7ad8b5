#include "engine/api/executor_factory.h"

#include <algorithm>
#include <cctype>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "engine/api/status_macros.h"
#include "engine/cpu/cpu_executor.h"
#if defined(MOE_WITH_CUDA)
#include "engine/cuda/cuda_executor.h"
#endif

namespace moe {
namespace {

// The kinds the engine itself provides. A new executor folder adds its line.
void RegisterBuiltInKinds(std::map<std::string, ExecutorFactoryFn>& kinds) {
  kinds.emplace("cpu", CreateCpuExecutor);
#if defined(MOE_WITH_CUDA)
  kinds.emplace("cuda", CreateCudaExecutor);
#endif
}

class Registry {
 public:
  Registry() { RegisterBuiltInKinds(kinds_); }

  absl::Status Register(const std::string& kind, ExecutorFactoryFn factory) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    if (!kinds_.emplace(kind, std::move(factory)).second) {
      return absl::AlreadyExistsError(absl::StrCat("executor kind '", kind, "' is registered already"));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<ExecutorFactoryFn> Find(const std::string& kind) const ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    auto it = kinds_.find(kind);
    if (it == kinds_.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown executor '", kind, "'; this build has: ", absl::StrJoin(KindsLocked(), ", ")));
    }
    return it->second;
  }

  std::vector<std::string> Kinds() const ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return KindsLocked();
  }

 private:
  std::vector<std::string> KindsLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::vector<std::string> names;
    for (const auto& [name, factory] : kinds_) names.push_back(name);
    return names;
  }

  mutable absl::Mutex mu_;
  std::map<std::string, ExecutorFactoryFn> kinds_ ABSL_GUARDED_BY(mu_);
};

Registry& TheRegistry() {
  static Registry* registry = new Registry();  // never destroyed: used until exit
  return *registry;
}

}  // namespace

absl::Status RegisterExecutorKind(const std::string& kind, ExecutorFactoryFn factory) {
  return TheRegistry().Register(kind, std::move(factory));
}

absl::StatusOr<std::unique_ptr<LayerExecutor>> CreateExecutor(const ModelDefinition& model,
                                                              const ExecutorOptions& options) {
  RETURN_IF_ERROR(ValidateModel(model));
  absl::StatusOr<ExecutorFactoryFn> factory = TheRegistry().Find(options.kind);
  if (!factory.ok()) return factory.status();
  return (*factory)(model, options);
}

std::vector<std::string> ExecutorKinds() { return TheRegistry().Kinds(); }

absl::StatusOr<ExecutorDevice> ParseExecutorDevice(const std::string& text) {
  ExecutorDevice device;
  const size_t colon = text.find(':');
  device.kind = text.substr(0, colon);
  if (colon != std::string::npos) {
    const std::string index = text.substr(colon + 1);
    if (index.empty() || index.size() > 4 || !std::all_of(index.begin(), index.end(), ::isdigit) ||
        device.kind == "cpu") {
      return absl::InvalidArgumentError(
          absl::StrCat("'", text, "' is not a device: use cpu, or a kind with an index such as cuda:0"));
    }
    device.index = std::stoi(index);
  }
  const std::vector<std::string> kinds = ExecutorKinds();
  if (std::find(kinds.begin(), kinds.end(), device.kind) == kinds.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("this build has no '", device.kind, "' executor; it has: ", absl::StrJoin(kinds, ", "),
                     device.kind == "cuda" ? " (build with nvcc and cuBLAS present)" : ""));
  }
  return device;
}

}  // namespace moe
