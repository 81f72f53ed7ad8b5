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
#include <dlfcn.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>

#include "engine/cuda/plugin.h"
#endif

namespace moe {
namespace {

#if defined(MOE_WITH_CUDA)
// The directory of this process's executable, with a trailing slash.
std::string ExecutableDirectory() {
  char path[PATH_MAX];
  const ssize_t length = readlink("/proc/self/exe", path, sizeof(path) - 1);
  if (length <= 0) return "";
  const std::string executable(path, static_cast<size_t>(length));
  return executable.substr(0, executable.rfind('/') + 1);
}

// Loads libmoe_cuda.so (engine/cuda/plugin.h) once: from MOE_CUDA_PLUGIN if
// set, else beside the executable, in ../lib from it, or where the build
// put it. Null, with the reasons in `error`, when none loads (CUDA's
// libraries missing on this machine, say).
MoeCreateCudaExecutorFn LoadCudaPlugin(std::string* error) {
  std::vector<std::string> candidates;
  if (const char* chosen = std::getenv("MOE_CUDA_PLUGIN"); chosen && *chosen) candidates.push_back(chosen);
  const std::string directory = ExecutableDirectory();
  candidates.push_back(directory + MOE_CUDA_PLUGIN_FILE);
  candidates.push_back(directory + "../lib/" MOE_CUDA_PLUGIN_FILE);
  candidates.push_back(MOE_CUDA_PLUGIN_BUILD_PATH);
  for (const std::string& candidate : candidates) {
    if (access(candidate.c_str(), F_OK) != 0) continue;
    void* handle = dlopen(candidate.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
      absl::StrAppend(error, error->empty() ? "" : "; ", dlerror());
      continue;
    }
    if (void* entry = dlsym(handle, MOE_CUDA_PLUGIN_ENTRY)) return reinterpret_cast<MoeCreateCudaExecutorFn>(entry);
    absl::StrAppend(error, error->empty() ? "" : "; ", candidate, " has no ", MOE_CUDA_PLUGIN_ENTRY);
  }
  if (error->empty()) *error = absl::StrCat("no ", MOE_CUDA_PLUGIN_FILE, " beside the executable or in the build");
  return nullptr;
}

// Kind "cuda": the plugin's executor; UNAVAILABLE when the plugin cannot load.
absl::StatusOr<std::unique_ptr<LayerExecutor>> CreateFromCudaPlugin(const ModelDefinition& model,
                                                                    const ExecutorOptions& options) {
  static std::string* load_error = new std::string();  // never destroyed: read until exit
  static const MoeCreateCudaExecutorFn create = LoadCudaPlugin(load_error);
  if (!create) return absl::UnavailableError(absl::StrCat("no CUDA executor: ", *load_error));
  std::unique_ptr<LayerExecutor> executor;
  RETURN_IF_ERROR(create(model, options, &executor));
  return executor;
}
#endif

// The kinds the engine itself provides. A new executor folder adds its line.
void RegisterBuiltInKinds(std::map<std::string, ExecutorFactoryFn>& kinds) {
  kinds.emplace("cpu", CreateCpuExecutor);
#if defined(MOE_WITH_CUDA)
  kinds.emplace("cuda", CreateFromCudaPlugin);
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
