#include "engine/api/moe_model.h"

#include "absl/strings/str_cat.h"
#include "engine/api/executor_factory.h"
#include "engine/api/router.h"
#include "engine/api/status_macros.h"

namespace moe {

MoeModel::~MoeModel() = default;

int MoeModel::routing_slots() const { return RoutingSlots(spec_.router); }

DType MoeModel::ComputeDType(const ModelSpec& spec, const Options& options) {
  return (options.force_fp32 || spec.weight_dtype == DType::kF32) ? DType::kF32 : DType::kBF16;
}

absl::StatusOr<std::unique_ptr<MoeModel>> MoeModel::Create(const ModelDefinition& model, const Options& options) {
  ASSIGN_OR_RETURN(auto executor, CreateExecutor(model, {.kind = options.executor,
                                                         .compute = ComputeDType(model.spec, options),
                                                         .cpu_path = options.cpu_path,
                                                         .device_index = options.device_index,
                                                         .held = std::nullopt}));
  return Create(model, std::move(executor), options);
}

absl::StatusOr<std::unique_ptr<MoeModel>> MoeModel::Create(const ModelDefinition& model,
                                                           std::unique_ptr<LayerExecutor> executor,
                                                           const Options& options) {
  RETURN_IF_ERROR(ValidateModel(model));
  const ExpertSet& held = executor->held();
  if (held.num_layers() != static_cast<int>(model.layers.size()) ||
      held.num_experts() != model.spec.router.num_experts || !executor->RunsEveryExpert()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a model runs on an executor that runs all its experts; this one holds ", held.Summary(), " and no more"));
  }
  auto out = std::unique_ptr<MoeModel>(new MoeModel());
  out->spec_ = model.spec;
  out->observer_ = options.observer;
  for (const LayerWeights& layer : model.layers) out->layer_names_.push_back(layer.name);
  out->executor_ = std::move(executor);
  return out;
}

absl::StatusOr<std::unique_ptr<MoeModel::Workspace>> MoeModel::NewWorkspace(int max_tokens) const {
  auto ws = std::unique_ptr<Workspace>(new Workspace());
  ASSIGN_OR_RETURN(ws->executor, executor_->NewWorkspace(max_tokens));
  ws->outputs.reserve(num_outputs());
  return ws;
}

absl::Status MoeModel::Run(const float* input, int num_tokens, const RunOptions& options, Workspace* workspace,
                           RunResult* result) const {
  if (num_tokens < 1) return absl::InvalidArgumentError("a request needs at least one token");
  if (options.layer && (*options.layer < 0 || *options.layer >= num_layers())) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", *options.layer, " out of range: the model has ", num_layers(), " MoE layers (0-based)"));
  }
  const int d = spec_.hidden_size;
  ExecutorWorkspace& ws = *workspace->executor;
  RETURN_IF_ERROR(executor_->Begin({.data = input, .dtype = DType::kF32, .rows = num_tokens, .cols = d}, ws));

  const int first = options.layer.value_or(0);
  const int last = options.layer.value_or(num_layers() - 1);
  result->layers_run = last - first + 1;
  const int slots = routing_slots();
  const size_t routing_size = static_cast<size_t>(num_tokens) * result->layers_run * slots;
  result->expert_ids.assign(options.return_routing ? routing_size : 0, -1);
  result->expert_weights.assign(options.return_routing ? routing_size : 0, 0.0f);
  for (int layer = first; layer <= last; ++layer) {
    LayerStep step{.layer = layer, .all_tasks = layer == last};
    if (options.return_routing) {
      const size_t column = static_cast<size_t>(layer - first) * slots;
      step.expert_ids = result->expert_ids.data() + column;
      step.expert_weights = result->expert_weights.data() + column;
      step.row_stride = static_cast<int64_t>(result->layers_run) * slots;
    }
    RETURN_IF_ERROR(executor_->Enqueue(step, ws));
  }

  result->outputs.resize(num_outputs());
  workspace->outputs.clear();
  for (std::vector<float>& output : result->outputs) {
    output.resize(static_cast<size_t>(num_tokens) * d);
    workspace->outputs.push_back({.data = output.data(), .dtype = DType::kF32, .rows = num_tokens, .cols = d});
  }
  RETURN_IF_ERROR(executor_->Finish(workspace->outputs, ws));
  Report(ws);
  return absl::OkStatus();
}

void MoeModel::Report(const ExecutorWorkspace& workspace) const {
  if (!observer_) return;
  const bool per_expert = executor_->timing() == ExpertTiming::kPerExpert;
  for (const LayerRecord& record : workspace.records()) {
    observer_->OnLayer(LayerReport{
        .layer = record.layer,
        .num_tokens = record.num_tokens,
        .tokens_routed = record.tokens_routed,
        .tokens_dropped = record.tokens_dropped,
        .compute_seconds = per_expert ? std::span<const double>(record.expert_seconds) : std::span<const double>(),
        .experts_seconds = record.experts_seconds});
  }
}

}  // namespace moe
