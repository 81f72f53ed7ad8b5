// ModelRegistry: the models a server serves, loaded at start-up from a
// Triton-style repository (several models and versions), one Hugging Face
// checkpoint directory, or the built-in demo model. Each model carries the
// ModelConfig that the ModelConfig RPC returns and that sets its batching,
// the server's batching overrides already applied.
//
// Immutable after Create (the models are handed out const): safe to read
// from any number of threads.
#ifndef MOE_SERVER_MODELS_MODEL_REGISTRY_H_
#define MOE_SERVER_MODELS_MODEL_REGISTRY_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/api/model_spec.h"
#include "engine/api/moe_model.h"
#include "engine/api/observer.h"
#include "proto/model_config.pb.h"
#include "remote/remote_experts.h"

namespace moe {

struct ServedModel {
  // Its position in ModelRegistry::models(): the model index by which the
  // server's observers (ObserverFactory, RequestObserver, SchedulerObserver)
  // know it.
  int index = 0;
  std::string name;
  int64_t version = 1;
  inference::ModelConfig config;  // as served by the ModelConfig RPC, and as batched
  // The workers of its placement, if any; destroyed after the model that
  // sends them rows.
  std::unique_ptr<RemoteExperts> remote;
  std::unique_ptr<MoeModel> model;
};

// Creates one engine observer per served model (for metrics); may return null.
// `model_index` is the ServedModel::index the model will have.
using ObserverFactory = std::function<EngineObserver*(int model_index, const std::string& name, int64_t version,
                                                      const ModelDefinition& definition)>;
// Creates the observer of a model's expert workers (for metrics), for a
// model with a placement; may return null.
using WorkerObserverFactory = std::function<WorkerObserver*(const std::string& name, int64_t version)>;

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
    // Batching for every model, whatever its config sets (the server's
    // flags). Written into each served config, so that the ModelConfig RPC
    // reports what the model is batched with.
    struct BatchingOverride {
      // max_batch_size (tokens per batch), at most 2^31 - 1. 0: each config's.
      int64_t max_batch_size = 0;
      // dynamic_batching.max_queue_delay_microseconds. -1: each config's.
      int64_t max_queue_delay_us = -1;
      // dynamic_batching.default_queue_policy.max_queue_size. 0: each config's.
      int max_queue_size = 0;
    };
    BatchingOverride batching_override{};
    // Compute every model in fp32.
    bool force_fp32 = false;
    // The CPU kernels' path for models whose config leaves it auto
    // (engine/api/cpu_path.h). kAuto: MOE_CPU_PATH if set, else the widest.
    CpuPath cpu_path = CpuPath::kAuto;
    // The executor of models whose config names none (no moe.executor, no
    // KIND_GPU instance group): moe-serve --device.
    std::string executor = "cpu";
    int device_index = 0;
    // The worker placement of models whose config has none (moe-serve
    // --workers; see server/models/placement.h). Empty: none.
    std::vector<inference::WorkerPlacement> workers{};
    // With `workers`: keep their experts here too, as a fallback
    // (MoeConfig.worker_fallback_local).
    bool worker_fallback_local = false;
    // With `workers`: MoeConfig.worker_deadline_ms (0: its default).
    int worker_deadline_ms = 0;
    // Observers of models' workers; may be empty.
    WorkerObserverFactory worker_observers{};
  };

  // Loads every model. A model that fails to load fails the whole start-up,
  // with a message naming it: a server that silently lacks a model is worse.
  // An override out of range is INVALID_ARGUMENT.
  static absl::StatusOr<std::unique_ptr<ModelRegistry>> Create(const Options& options,
                                                               const ObserverFactory& observers = nullptr);

  // The model `name` at `version` ("" = latest). NOT_FOUND names what is missing.
  absl::StatusOr<const ServedModel*> Find(const std::string& name, const std::string& version) const;
  // Versions of `name`, ascending; empty if unknown.
  std::vector<int64_t> Versions(const std::string& name) const;
  // Every model; models()[i]->index == i.
  const std::vector<std::unique_ptr<const ServedModel>>& models() const { return models_; }

 private:
  ModelRegistry() = default;
  std::vector<std::unique_ptr<const ServedModel>> models_;
};

// A complete ModelConfig for `model` (inputs, outputs, batching), keeping
// what `base` sets, except what defaults.batching_override replaces.
inference::ModelConfig CompleteConfig(const MoeModel& model, inference::ModelConfig base,
                                      const ModelRegistry::Options& defaults);

}  // namespace moe

#endif  // MOE_SERVER_MODELS_MODEL_REGISTRY_H_
