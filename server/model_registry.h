// ModelRegistry: the models a server serves, loaded at start-up from a
// Triton-style repository (several models and versions), one Hugging Face
// checkpoint directory, or the built-in demo model. Each model carries the
// ModelConfig that the ModelConfig RPC returns and that sets its batching.
//
// Immutable after Create: safe to read from any number of threads.
#ifndef MOE_SERVER_MODEL_REGISTRY_H_
#define MOE_SERVER_MODEL_REGISTRY_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model_spec.h"
#include "engine/moe_model.h"
#include "engine/observer.h"
#include "proto/model_config.pb.h"

namespace moe {

struct ServedModel {
  std::string name;
  int64_t version = 1;
  inference::ModelConfig config;  // as served by the ModelConfig RPC
  std::unique_ptr<MoeModel> model;
};

// Creates one engine observer per served model (for metrics); may return null.
using ObserverFactory =
    std::function<EngineObserver*(const std::string& name, int64_t version, const ModelDefinition& definition)>;

class ModelRegistry {
 public:
  struct Options {
    // A Triton-style repository; every model in it is loaded (versions per
    // each config's version_policy, default: the latest). Empty: unused.
    std::string model_repository{};
    // One Hugging Face checkpoint directory. Empty: unused.
    std::string model_path{};
    // Served name for model_path (default: the directory's name).
    std::string model_name{};
    // With neither source, serve the built-in demo model (named "demo").
    // Batching for models whose config does not set it:
    int64_t default_max_batch_tokens = 4096;
    int64_t default_max_queue_delay_us = 0;
    int default_max_queue_size = 1024;
    // Compute every model in fp32.
    bool force_fp32 = false;
    // The CPU kernels' path for models whose config leaves it auto
    // (engine/cpu_path.h). kAuto: MOE_CPU_PATH if set, else the widest.
    CpuPath cpu_path = CpuPath::kAuto;
  };

  // Loads every model. A model that fails to load fails the whole start-up,
  // with a message naming it: a server that silently lacks a model is worse.
  static absl::StatusOr<std::unique_ptr<ModelRegistry>> Create(const Options& options,
                                                               const ObserverFactory& observers = nullptr);

  // The model `name` at `version` ("" = latest). NOT_FOUND names what is missing.
  absl::StatusOr<const ServedModel*> Find(const std::string& name, const std::string& version) const;
  // Index of a model in models() (stable), for the scheduler.
  int IndexOf(const ServedModel* model) const;
  // Versions of `name`, ascending; empty if unknown.
  std::vector<int64_t> Versions(const std::string& name) const;
  const std::vector<std::unique_ptr<ServedModel>>& models() const { return models_; }

 private:
  ModelRegistry() = default;
  std::vector<std::unique_ptr<ServedModel>> models_;
};

// A complete ModelConfig for `model` (inputs, outputs, batching), keeping
// what `base` sets.
inference::ModelConfig CompleteConfig(const MoeModel& model, inference::ModelConfig base,
                                      const ModelRegistry::Options& defaults);

}  // namespace moe

#endif  // MOE_SERVER_MODEL_REGISTRY_H_
