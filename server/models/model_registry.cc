#include "server/models/model_registry.h"

#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "engine/api/directory.h"
#include "engine/api/executor_factory.h"
#include "engine/api/hf_loader.h"
#include "engine/api/model_builder.h"
#include "engine/api/repository_model.h"
#include "engine/api/status_macros.h"
#include "server/models/placement.h"

namespace moe {
namespace fs = std::filesystem;

namespace {

absl::Status Prefix(const absl::Status& status, const std::string& what) {
  return absl::Status(status.code(), absl::StrCat(what, ": ", status.message()));
}

// Versions of a repository model chosen by its version_policy.
std::vector<int64_t> ChooseVersions(const inference::ModelConfig& config, const std::vector<int64_t>& available) {
  const auto& policy = config.version_policy();
  if (policy.has_all()) return available;
  if (policy.has_specific()) {
    std::vector<int64_t> chosen;
    for (int64_t v : policy.specific().versions()) {
      if (std::find(available.begin(), available.end(), v) != available.end()) chosen.push_back(v);
    }
    return chosen;
  }
  const size_t keep = policy.has_latest() && policy.latest().num_versions() > 0 ? policy.latest().num_versions() : 1;
  return std::vector<int64_t>(available.end() - std::min(keep, available.size()), available.end());
}

absl::Status ValidateOverride(const ModelRegistry::Options::BatchingOverride& forced) {
  if (forced.max_batch_size < 0 || forced.max_batch_size > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("batching_override.max_batch_size must be in [0, ",
                                                   std::numeric_limits<int32_t>::max(), "], got ",
                                                   forced.max_batch_size));
  }
  if (forced.max_queue_delay_us < -1) {
    return absl::InvalidArgumentError(
        absl::StrCat("batching_override.max_queue_delay_us must be >= -1, got ", forced.max_queue_delay_us));
  }
  if (forced.max_queue_size < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("batching_override.max_queue_size must be >= 0, got ", forced.max_queue_size));
  }
  return absl::OkStatus();
}

// The executor a config asks for: moe.executor by name, else the first
// instance group (KIND_GPU: "cuda" on its first GPU), else the CPU.
void ChooseExecutor(const inference::ModelConfig& config, MoeModel::Options* options) {
  if (config.has_moe() && !config.moe().executor().empty()) {
    options->executor = config.moe().executor();
  } else if (config.instance_group_size() > 0 &&
             config.instance_group(0).kind() == inference::ModelInstanceGroup::KIND_GPU) {
    options->executor = "cuda";
  }
  if (config.instance_group_size() > 0 && config.instance_group(0).gpus_size() > 0) {
    options->device_index = config.instance_group(0).gpus(0);
  }
}

// The model on the executor its config chooses; with a worker placement, on
// an executor that holds the experts left here and sends the others to the
// workers, whose RemoteExperts goes to `remote` (to outlive the model).
absl::StatusOr<std::unique_ptr<MoeModel>> CreateServedModel(const ModelDefinition& definition,
                                                            const inference::ModelConfig& config,
                                                            const MoeModel::Options& options,
                                                            WorkerObserver* worker_observer,
                                                            std::unique_ptr<RemoteExperts>* remote) {
  const DType compute = MoeModel::ComputeDType(definition.spec, options);
  ASSIGN_OR_RETURN(*remote, RemoteExpertsFromConfig(config.moe(), definition, compute, worker_observer));
  if (!*remote) return MoeModel::Create(definition, options);
  // With a local fallback this process holds every expert and still sends
  // the placed ones to their workers.
  const bool fallback = config.moe().worker_fallback_local();
  const ExpertSet left_here = ExpertsLeftHere(**remote);
  ASSIGN_OR_RETURN(
      auto executor,
      CreateExecutor(definition,
                     {.kind = options.executor,
                      .compute = compute,
                      .cpu_path = options.cpu_path,
                      .device_index = options.device_index,
                      .held = fallback ? ExpertSet::All(left_here.num_layers(), left_here.num_experts()) : left_here,
                      .offload = remote->get(),
                      .offloaded = (*remote)->hosted()}));
  return MoeModel::Create(definition, std::move(executor), options);
}

}  // namespace

inference::ModelConfig CompleteConfig(const MoeModel& model, inference::ModelConfig config,
                                      const ModelRegistry::Options& defaults) {
  const ModelSpec& spec = model.spec();
  if (config.name().empty()) config.set_name(spec.name);
  if (config.platform().empty()) config.set_platform("moe");
  if (config.backend().empty()) config.set_backend("moe");
  if (config.max_batch_size() <= 0) config.set_max_batch_size(static_cast<int>(defaults.default_max_batch_tokens));
  config.clear_input();
  auto* input = config.add_input();
  input->set_name("hidden_states");
  input->set_data_type(inference::TYPE_FP32);
  input->add_dims(spec.hidden_size);
  config.clear_output();
  for (int task = 0; task < model.num_outputs(); ++task) {
    auto* output = config.add_output();
    output->set_name(model.num_outputs() == 1 ? "output" : absl::StrCat("output_", task));
    output->set_data_type(inference::TYPE_FP32);
    output->add_dims(spec.hidden_size);
  }
  auto* batching = config.mutable_dynamic_batching();
  if (batching->max_queue_delay_microseconds() == 0) {
    batching->set_max_queue_delay_microseconds(defaults.default_max_queue_delay_us);
  }
  if (batching->default_queue_policy().max_queue_size() == 0) {
    batching->mutable_default_queue_policy()->set_max_queue_size(defaults.default_max_queue_size);
  }
  const ModelRegistry::Options::BatchingOverride& forced = defaults.batching_override;
  if (forced.max_batch_size > 0) config.set_max_batch_size(static_cast<int32_t>(forced.max_batch_size));
  if (forced.max_queue_delay_us >= 0) batching->set_max_queue_delay_microseconds(forced.max_queue_delay_us);
  if (forced.max_queue_size > 0) batching->mutable_default_queue_policy()->set_max_queue_size(forced.max_queue_size);
  return config;
}

absl::StatusOr<std::unique_ptr<ModelRegistry>> ModelRegistry::Create(const Options& options,
                                                                     const ObserverFactory& observers) {
  RETURN_IF_ERROR(ValidateOverride(options.batching_override));
  auto registry = std::unique_ptr<ModelRegistry>(new ModelRegistry());
  auto add = [&](const ModelDefinition& definition, inference::ModelConfig config, int64_t version) -> absl::Status {
    auto served = std::make_unique<ServedModel>();
    served->index = static_cast<int>(registry->models_.size());
    served->name = config.name().empty() ? definition.spec.name : config.name();
    served->version = version;
    const bool fp32 = options.force_fp32 || (config.has_moe() && config.moe().force_fp32_compute());
    CpuPath path = options.cpu_path;
    if (config.has_moe() && !config.moe().cpu_path().empty()) {
      auto parsed = ParseCpuPath(config.moe().cpu_path());
      if (!parsed.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("model '", served->name, "': moe.cpu_path: ", parsed.status().message()));
      }
      if (*parsed != CpuPath::kAuto) path = *parsed;
    }
    MoeModel::Options model_options{
        .force_fp32 = fp32, .executor = options.executor, .cpu_path = path, .device_index = options.device_index};
    ChooseExecutor(config, &model_options);
    if (config.moe().workers_size() == 0 && !options.workers.empty()) {
      for (const inference::WorkerPlacement& placed : options.workers) *config.mutable_moe()->add_workers() = placed;
      config.mutable_moe()->set_worker_fallback_local(options.worker_fallback_local);
      config.mutable_moe()->set_worker_deadline_ms(options.worker_deadline_ms);
    }
    if (observers) model_options.observer = observers(served->index, served->name, version, definition);
    WorkerObserver* worker_observer = nullptr;
    if (options.worker_observers && config.moe().workers_size() > 0) {
      worker_observer = options.worker_observers(served->name, version);
    }
    ASSIGN_OR_RETURN(served->model,
                     CreateServedModel(definition, config, model_options, worker_observer, &served->remote));
    served->config = CompleteConfig(*served->model, std::move(config), options);
    served->config.set_name(served->name);
    registry->models_.push_back(std::move(served));
    return absl::OkStatus();
  };

  if (!options.model_repository.empty()) {
    std::error_code ec;
    if (!fs::is_directory(options.model_repository, ec)) {
      return absl::NotFoundError(absl::StrCat("model repository '", options.model_repository, "' is not a directory"));
    }
    ASSIGN_OR_RETURN(const std::vector<DirectoryEntry> listed, ListDirectory(options.model_repository));
    // A model is a directory with a config.pbtxt; an entry whose type
    // cannot be read (a dangling link, a link loop) is not one.
    std::vector<fs::path> entries;
    for (const DirectoryEntry& entry : listed) {
      if (entry.is_directory && fs::exists(entry.path / "config.pbtxt", ec)) entries.push_back(entry.path);
    }
    std::sort(entries.begin(), entries.end());
    for (const fs::path& dir : entries) {
      std::ifstream in(dir / "config.pbtxt");
      if (!in) return absl::NotFoundError(absl::StrCat((dir / "config.pbtxt").string(), ": cannot open"));
      std::stringstream text;
      text << in.rdbuf();
      ASSIGN_OR_RETURN(inference::ModelConfig config, ParseModelConfig(text.str(), (dir / "config.pbtxt").string()));
      if (config.name().empty()) config.set_name(dir.filename().string());
      if (config.name() != dir.filename().string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(dir.string(), ": config name '", config.name(), "' differs from the directory name"));
      }
      ASSIGN_OR_RETURN(const std::vector<int64_t> available, ListVersions(dir.string()));
      const std::vector<int64_t> versions = ChooseVersions(config, available);
      if (versions.empty())
        return absl::InvalidArgumentError(absl::StrCat(dir.string(), ": no version directory to serve"));
      for (int64_t version : versions) {
        auto definition = LoadRepositoryModel(dir.string(), version, config);
        if (!definition.ok())
          return Prefix(definition.status(), absl::StrCat("model '", config.name(), "' version ", version));
        RETURN_IF_ERROR(add(*definition, config, version));
      }
    }
  }
  if (!options.model_path.empty()) {
    auto definition = LoadHuggingFaceModel(options.model_path, options.model_name);
    if (!definition.ok()) return definition.status();
    inference::ModelConfig config;
    config.set_name(definition->spec.name);
    RETURN_IF_ERROR(add(*definition, config, 1));
  }
  if (options.model_repository.empty() && options.model_path.empty()) {
    ModelDefinition demo = DemoModel();
    inference::ModelConfig config;
    config.set_name("demo");
    RETURN_IF_ERROR(add(demo, config, 1));
  }
  if (registry->models_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("no models found in '", options.model_repository, "'"));
  }
  return registry;
}

absl::StatusOr<const ServedModel*> ModelRegistry::Find(const std::string& name, const std::string& version) const {
  const ServedModel* latest = nullptr;
  for (const auto& model : models_) {
    if (model->name != name) continue;
    if (version.empty()) {
      if (!latest || model->version > latest->version) latest = model.get();
    } else if (absl::StrCat(model->version) == version) {
      return model.get();
    }
  }
  if (latest) return latest;
  if (Versions(name).empty()) return absl::NotFoundError(absl::StrCat("unknown model '", name, "'"));
  return absl::NotFoundError(absl::StrCat("model '", name, "' has no version '", version, "'"));
}

std::vector<int64_t> ModelRegistry::Versions(const std::string& name) const {
  std::vector<int64_t> versions;
  for (const auto& model : models_) {
    if (model->name == name) versions.push_back(model->version);
  }
  std::sort(versions.begin(), versions.end());
  return versions;
}

}  // namespace moe
