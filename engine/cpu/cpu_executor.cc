#include "engine/cpu/cpu_executor.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <new>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "absl/strings/str_cat.h"
#include "engine/api/dispatch.h"
#include "engine/api/router.h"
#include "engine/api/status_macros.h"
#include "engine/cpu/panel_ffn.h"

namespace moe {
namespace {

// One layer as the CPU executor holds it.
struct CpuLayer {
  // Stacked gates, on the experts' kernel path.
  std::unique_ptr<PanelLinear> router;
  std::vector<float> router_bias;                  // [E] or empty
  std::vector<float> router_logit_bias;            // [E] or empty
  std::vector<float> norm;                         // [d] or empty
  std::vector<float> shared_gate;                  // [d] or empty
  std::vector<std::unique_ptr<PanelFfn>> experts;  // [E]; null when not held
  std::unique_ptr<PanelFfn> shared;
};

// A caller's planned memory: every buffer sized for max_tokens at creation.
class CpuWorkspace : public ExecutorWorkspace {
 public:
  CpuWorkspace(int max_tokens, int num_layers, int num_experts)
      : ExecutorWorkspace(max_tokens, num_layers, num_experts) {}
  using ExecutorWorkspace::ClearRecords;
  using ExecutorWorkspace::NextRecord;

  int num_tokens = 0;
  // Tasks the last layer computed: outputs to copy at Finish.
  int tasks_ready = 1;
  // Activations [T, d]: the current ones in `hidden`, a layer writes `next`.
  // Uninitialised: pages are touched only as far as batches reach. When
  // routing weights scale the expert input, `normed` holds [T + T * slots, d]:
  // the layer input, then each plan row's scaled copy.
  std::unique_ptr<float[]> hidden, next, normed, shared_out;
  std::unique_ptr<float[]> logits;                 // [T, router columns]
  std::unique_ptr<float[]> expert_out;             // [T * slots, d]
  std::vector<std::unique_ptr<float[]>> task_out;  // tasks 1..: [T, d]; [0] unused
  std::vector<uint32_t> router_scratch;
  SelectionScratch selection;
  Routing routing;
  DispatchPlan plan;
  // Routing weights scale the expert input: `plan` with each row reading its
  // scaled copy (row_token = T + row), and `routing` with unit weights.
  DispatchPlan scaled_plan;
  Routing unit_routing;
  PanelFfnRunner runner;
  std::vector<PanelFfnTask> tasks;
  std::vector<int> task_expert;
  std::vector<double> task_seconds;
  std::unique_ptr<ExpertOffload::Batch> offload;  // when the executor offloads
  std::vector<int> unserved;                      // experts the offload could not run
  ExpertSet fallback_skip;                        // all but the unserved, for the fallback run
};

// HF's RMSNorm: normalise in fp32, cast to the model dtype, multiply by the
// weight (in the model dtype). With bf16 compute the two roundings are kept.
void RmsNorm(const float* x, int T, int d, const std::vector<float>& weight, float eps, bool round_bf16, float* out) {
  for (int t = 0; t < T; ++t) {
    const float* row = x + static_cast<size_t>(t) * d;
    float* y = out + static_cast<size_t>(t) * d;
    // Eight partial sums, so that the adds do not wait on each other (one
    // chain took 1 us a row of 1024).
    double partial[8] = {};
    int i = 0;
    for (; i + 8 <= d; i += 8) {
      for (int j = 0; j < 8; ++j) partial[j] += static_cast<double>(row[i + j]) * row[i + j];
    }
    for (; i < d; ++i) partial[0] += static_cast<double>(row[i]) * row[i];
    const double sum = ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
                       ((partial[4] + partial[5]) + (partial[6] + partial[7]));
    const float scale = 1.0f / std::sqrt(static_cast<float>(sum / d) + eps);
    for (int i = 0; i < d; ++i) {
      float normed = row[i] * scale;
      if (round_bf16) normed = RoundToBf16(normed);
      y[i] = weight[i] * normed;
      if (round_bf16) y[i] = RoundToBf16(y[i]);
    }
  }
}

// Qwen2-MoE: shared[t] *= sigmoid(x[t] . gate).
void GateShared(const float* normed, int T, int d, const std::vector<float>& gate, float* shared) {
  for (int t = 0; t < T; ++t) {
    const float* x = normed + static_cast<size_t>(t) * d;
    float dot = 0;
    for (int i = 0; i < d; ++i) dot += x[i] * gate[i];
    const float scale = 1.0f / (1.0f + std::exp(-dot));
    for (int i = 0; i < d; ++i) shared[static_cast<size_t>(t) * d + i] *= scale;
  }
}

std::unique_ptr<float[]> Floats(size_t count) { return std::unique_ptr<float[]>(new float[count]); }

// Llama 4: expert(w * x) summed unweighted. Writes each kept (token, slot)'s
// scaled input after the T input rows of `normed`, a plan whose rows read
// them, and unit weights to combine with. With bf16 compute the weight and
// the product are rounded to bf16, as transformers computes them.
void ScaleExpertInputs(const Routing& routing, const DispatchPlan& plan, int d, bool round_bf16, float* normed,
                       DispatchPlan* scaled_plan, Routing* unit_routing) {
  const int T = routing.num_tokens;
  const int S = routing.slots;
  const float* weights = routing.task_weights(0);
  for (int t = 0; t < T; ++t) {
    const float* x = normed + static_cast<size_t>(t) * d;
    for (int s = 0; s < S; ++s) {
      const size_t index = static_cast<size_t>(t) * S + s;
      const int32_t row = plan.slot_row[index];
      if (row < 0) continue;
      const float w = round_bf16 ? RoundToBf16(weights[index]) : weights[index];
      float* y = normed + (static_cast<size_t>(T) + row) * d;
      for (int i = 0; i < d; ++i) y[i] = round_bf16 ? RoundToBf16(x[i] * w) : x[i] * w;
    }
  }
  scaled_plan->num_experts = plan.num_experts;
  scaled_plan->offsets.assign(plan.offsets.begin(), plan.offsets.end());
  scaled_plan->slot_row.assign(plan.slot_row.begin(), plan.slot_row.end());
  scaled_plan->row_token.resize(plan.row_token.size());
  for (size_t row = 0; row < plan.row_token.size(); ++row) scaled_plan->row_token[row] = static_cast<int32_t>(T + row);
  unit_routing->num_tokens = T;
  unit_routing->slots = S;
  unit_routing->num_tasks = 1;
  unit_routing->expert.assign(routing.expert.begin(), routing.expert.end());
  unit_routing->weight.assign(static_cast<size_t>(T) * S, 1.0f);
}

class CpuExecutor : public LayerExecutor {
 public:
  static absl::StatusOr<std::unique_ptr<LayerExecutor>> Create(const ModelDefinition& model,
                                                               const ExecutorOptions& options);

  std::string Describe() const override {
    std::string text =
        absl::StrCat("cpu ", CpuPathName(path_), " kernels, ", compute_ == DType::kBF16 ? "bf16" : "fp32", " compute");
    if (held_.count() != static_cast<int64_t>(held_.num_layers()) * held_.num_experts()) {
      absl::StrAppend(&text, ", holds ", held_.Summary());
    }
    return text;
  }
  DType compute_dtype() const override { return compute_; }
  size_t WeightBytes() const override;
  const ExpertSet& held() const override { return held_; }
  bool RunsEveryExpert() const override;
  ExpertTiming timing() const override { return ExpertTiming::kPerExpert; }

  absl::StatusOr<std::unique_ptr<ExecutorWorkspace>> NewWorkspace(int max_tokens) const override;
  absl::Status Begin(const TensorRef& input, ExecutorWorkspace& workspace) const override;
  absl::Status Enqueue(const LayerStep& step, ExecutorWorkspace& workspace) const override;
  absl::Status Finish(std::span<const MutableTensorRef> outputs, ExecutorWorkspace& workspace) const override;
  absl::Status RunExperts(const ExpertRows& rows, ExecutorWorkspace& workspace) const override;

 private:
  // The experts with rows, but those in `skip` (null: none), and the shared
  // experts, on the panel runner. Every one run must be held.
  absl::Status RunHeldExperts(const ExpertRows& rows, const ExpertSet* skip, CpuWorkspace& ws) const;
  // Whether `plan` of `layer` has rows for an offloaded expert.
  bool NeedsOffload(const DispatchPlan& plan, int layer) const;
  // Runs here the experts the offload could not (ws.unserved), when all are held.
  absl::Status FallBack(const ExpertRows& rows, const absl::Status& offloaded, CpuWorkspace& ws) const;
  // The layer's experts: the held ones here, the others offloaded meanwhile.
  absl::Status RunLayerExperts(int layer, float* shared, LayerRecord& record, CpuWorkspace& ws) const;
  CpuExecutor() = default;
  absl::Status PackLayer(const LayerWeights& weights, int index, const PanelFfn::Options& ffn_options);
  std::unique_ptr<CpuWorkspace> PlanWorkspace(int max_tokens) const;
  void Route(const CpuLayer& layer, CpuWorkspace& ws) const;
  void CombineTasks(const LayerStep& step, CpuWorkspace& ws) const;
  void WriteRouting(const LayerStep& step, const CpuWorkspace& ws) const;

  ModelSpec spec_;
  DType compute_ = DType::kBF16;
  CpuPath path_ = CpuPath::kPortable;
  ExpertSet held_;
  const ExpertOffload* offload_ = nullptr;
  ExpertSet offloaded_;  // sent to offload_
  ExpertSet local_;      // the others: run here
  std::vector<CpuLayer> layers_;
  // What one runner call may hold at most, over the layers.
  PanelRunLimits run_limits_per_token_;
  size_t router_scratch_words_ = 0;
};

absl::StatusOr<std::unique_ptr<LayerExecutor>> CpuExecutor::Create(const ModelDefinition& model,
                                                                   const ExecutorOptions& options) {
  if (options.compute != DType::kF32 && options.compute != DType::kBF16) {
    return absl::InvalidArgumentError("the CPU executor computes in fp32 or bf16");
  }
  const int num_layers = static_cast<int>(model.layers.size());
  const int E = model.spec.router.num_experts;
  if (options.held && (options.held->num_layers() != num_layers || options.held->num_experts() != E)) {
    return absl::InvalidArgumentError(absl::StrCat("the experts to hold are given for ", options.held->num_layers(),
                                                   " layers of ", options.held->num_experts(),
                                                   " experts; the model has ", num_layers, " of ", E));
  }
  if (model.spec.routing_weights_scale_input && options.offload) {
    return absl::InvalidArgumentError(absl::StrCat("model '", model.spec.name,
                                                   "': experts whose input the routing weights scale (",
                                                   model.spec.source_type, ") cannot be offloaded"));
  }
  auto executor = std::unique_ptr<CpuExecutor>(new CpuExecutor());
  executor->spec_ = model.spec;
  executor->compute_ = options.compute;
  ASSIGN_OR_RETURN(executor->path_, ResolveCpuPath(options.cpu_path, options.compute));
  executor->held_ = options.held.value_or(ExpertSet::All(num_layers, E));
  executor->offload_ = options.offload;
  executor->local_ = executor->held_;
  executor->offloaded_ = ExpertSet::None(num_layers, E);
  for (int layer = 0; layer < num_layers; ++layer) {
    for (int e = 0; e < E; ++e) {
      const bool offloaded =
          options.offloaded ? options.offloaded->Contains(layer, e) : !executor->held_.Contains(layer, e);
      if (offloaded && options.offload) {
        executor->offloaded_.Add(layer, e);
        executor->local_.Remove(layer, e);
      }
    }
  }
  const PanelFfn::Options ffn_options{.kind = model.spec.expert_kind,
                                      .activation = model.spec.activation,
                                      .compute = options.compute,
                                      .path = executor->path_,
                                      .swiglu = {.alpha = model.spec.swiglu_alpha, .limit = model.spec.swiglu_limit}};
  for (int index = 0; index < num_layers; ++index) {
    RETURN_IF_ERROR(executor->PackLayer(model.layers[index], index, ffn_options));
  }
  return std::unique_ptr<LayerExecutor>(std::move(executor));
}

absl::Status CpuExecutor::PackLayer(const LayerWeights& weights, int index, const PanelFfn::Options& ffn_options) {
  CpuLayer layer;
  std::vector<float> stacked;
  for (const HostTensor& gate : weights.router) {
    std::vector<float> values = gate.ToFloats();
    stacked.insert(stacked.end(), values.begin(), values.end());
  }
  const int64_t columns = RouterLogitColumns(spec_.router);
  HostTensor router = HostTensor::FromFloats({columns, spec_.hidden_size}, stacked);
  // A bf16 checkpoint's router sees bf16 weights and, after the pre-norm's
  // rounding, bf16 inputs: the bf16 kernel takes the same products (at twice
  // the fp32 kernel's rate on AVX-512 BF16, where the router was 1.5% of a
  // DeepSeek-like layer at 64 tokens).
  const bool bf16_values = compute_ == DType::kBF16 && spec_.pre_norm &&
                           std::all_of(weights.router.begin(), weights.router.end(),
                                       [](const HostTensor& gate) { return gate.dtype() == DType::kBF16; });
  ASSIGN_OR_RETURN(layer.router, PanelLinear::Create(router, bf16_values ? DType::kBF16 : DType::kF32, path_));
  router_scratch_words_ = std::max(router_scratch_words_, layer.router->ScratchWords());
  if (!weights.router_bias.empty()) layer.router_bias = weights.router_bias.ToFloats();
  if (!weights.router_logit_bias.empty()) layer.router_logit_bias = weights.router_logit_bias.ToFloats();
  if (spec_.pre_norm) layer.norm = weights.norm.ToFloats();
  if (!weights.shared_gate.empty()) layer.shared_gate = weights.shared_gate.ToFloats();

  PanelRunLimits limits{.tasks = weights.experts.size() + 1};
  auto count = [&limits](const PanelFfn& ffn) {
    limits.panels += ffn.panels();
    limits.first_steps = std::max(limits.first_steps, ffn.first_steps());
    limits.down_steps = std::max(limits.down_steps, ffn.down_steps());
  };
  layer.experts.resize(weights.experts.size());
  for (size_t e = 0; e < weights.experts.size(); ++e) {
    if (!held_.Contains(index, static_cast<int>(e))) continue;
    ASSIGN_OR_RETURN(layer.experts[e], PanelFfn::Create(weights.experts[e], ffn_options));
    count(*layer.experts[e]);
  }
  if (weights.shared) {
    ASSIGN_OR_RETURN(layer.shared, PanelFfn::Create(*weights.shared, ffn_options));
    count(*layer.shared);
  }
  PanelRunLimits& most = run_limits_per_token_;
  most.tasks = std::max(most.tasks, limits.tasks);
  most.panels = std::max(most.panels, limits.panels);
  most.first_steps = std::max(most.first_steps, limits.first_steps);
  most.down_steps = std::max(most.down_steps, limits.down_steps);
  layers_.push_back(std::move(layer));
  return absl::OkStatus();
}

bool CpuExecutor::RunsEveryExpert() const {
  for (int layer = 0; layer < held_.num_layers(); ++layer) {
    for (int e = 0; e < held_.num_experts(); ++e) {
      if (!local_.Contains(layer, e) && !(offloaded_.Contains(layer, e) && offload_->Hosts(layer, e))) return false;
    }
  }
  return true;
}

size_t CpuExecutor::WeightBytes() const {
  size_t bytes = 0;
  for (const CpuLayer& layer : layers_) {
    for (const auto& ffn : layer.experts) bytes += ffn ? ffn->weight_bytes() : 0;
    if (layer.shared) bytes += layer.shared->weight_bytes();
  }
  return bytes;
}

std::unique_ptr<CpuWorkspace> CpuExecutor::PlanWorkspace(int max_tokens) const {
  const int E = spec_.router.num_experts;
  const size_t T = static_cast<size_t>(max_tokens);
  const size_t d = static_cast<size_t>(spec_.hidden_size);
  const size_t slots = static_cast<size_t>(RoutingSlots(spec_.router));
  const int tasks = spec_.router.num_tasks;
  auto ws = std::make_unique<CpuWorkspace>(max_tokens, static_cast<int>(layers_.size()), E);
  ws->hidden = Floats(T * d);
  ws->next = Floats(T * d);
  ws->normed = Floats(T * d * (spec_.routing_weights_scale_input ? 1 + slots : 1));
  if (spec_.shared_intermediate_size > 0) ws->shared_out = Floats(T * d);
  ws->logits = Floats(T * RouterLogitColumns(spec_.router));
  // Every family selects at most `slots` experts per token, so a plan has
  // at most T * slots rows.
  ws->expert_out = Floats(T * slots * d);
  ws->task_out.resize(tasks);
  for (int task = 1; task < tasks; ++task) ws->task_out[task] = Floats(T * d);
  ws->router_scratch.resize(router_scratch_words_);
  ws->selection.Plan(spec_.router, max_tokens);
  ws->routing.expert.reserve(T * slots);
  ws->routing.weight.reserve(T * slots * tasks);
  ws->plan.offsets.reserve(E + 1);
  ws->plan.row_token.reserve(T * slots);
  ws->plan.slot_row.reserve(T * slots);
  ws->plan.tokens_routed.reserve(E);
  ws->plan.tokens_dropped.reserve(E);
  ws->plan.cursor.reserve(E + 1);
  if (spec_.routing_weights_scale_input) {
    ws->scaled_plan.offsets.reserve(E + 1);
    ws->scaled_plan.row_token.reserve(T * slots);
    ws->scaled_plan.slot_row.reserve(T * slots);
    ws->unit_routing.expert.reserve(T * slots);
    ws->unit_routing.weight.reserve(T * slots);
  }
  PanelRunLimits limits = run_limits_per_token_;
  limits.rows = static_cast<int64_t>(T * (slots + 1));  // routed rows and the shared experts' tokens
  ws->runner.Reserve(limits);
  ws->tasks.reserve(limits.tasks);
  ws->task_expert.reserve(limits.tasks);
  ws->task_seconds.reserve(limits.tasks);
  if (offload_) {
    ws->offload = offload_->NewBatch();
    ws->unserved.reserve(E);
    ws->fallback_skip = ExpertSet::All(static_cast<int>(layers_.size()), E);
  }
  return ws;
}

absl::StatusOr<std::unique_ptr<ExecutorWorkspace>> CpuExecutor::NewWorkspace(int max_tokens) const {
  if (max_tokens < 1) return absl::InvalidArgumentError(absl::StrCat("max_tokens must be >= 1, got ", max_tokens));
  try {
    return std::unique_ptr<ExecutorWorkspace>(PlanWorkspace(max_tokens));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat("out of memory planning a workspace for batches of ", max_tokens,
                                                     " tokens of model '", spec_.name, "'"));
  }
}

absl::Status CpuExecutor::Begin(const TensorRef& input, ExecutorWorkspace& workspace) const {
  auto& ws = static_cast<CpuWorkspace&>(workspace);
  if (input.device != Device::kHost || input.dtype != DType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat("the cpu executor takes host fp32 input, got ",
                                                   DeviceName(input.device), " ", std::string(DTypeName(input.dtype))));
  }
  if (input.cols != spec_.hidden_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("input rows have ", input.cols, " values; the model's hidden size is ", spec_.hidden_size));
  }
  if (input.rows < 1 || input.rows > ws.max_tokens()) {
    return absl::InvalidArgumentError(
        absl::StrCat("a batch of ", input.rows, " tokens; the workspace is planned for 1 to ", ws.max_tokens()));
  }
  ws.num_tokens = static_cast<int>(input.rows);
  ws.tasks_ready = 1;
  ws.ClearRecords();
  std::memcpy(ws.hidden.get(), input.data, static_cast<size_t>(input.rows) * input.cols * sizeof(float));
  return absl::OkStatus();
}

void CpuExecutor::Route(const CpuLayer& layer, CpuWorkspace& ws) const {
  const int T = ws.num_tokens;
  const int columns = static_cast<int>(layer.router->out_features());
  float* logits = ws.logits.get();
  layer.router->Run(ws.normed.get(), T, logits, &ws.router_scratch);
  if (!layer.router_logit_bias.empty()) {  // gpt-oss: a linear with a bias, rounded once with it
    for (int t = 0; t < T; ++t) {
      for (int e = 0; e < columns; ++e) logits[static_cast<size_t>(t) * columns + e] += layer.router_logit_bias[e];
    }
  }
  if (compute_ == DType::kBF16 && spec_.router.logits_in_compute_dtype) {
    for (size_t i = 0; i < static_cast<size_t>(T) * columns; ++i) logits[i] = RoundToBf16(logits[i]);
  }
  SelectExperts(spec_.router, logits, T, layer.router_bias.empty() ? nullptr : layer.router_bias.data(), &ws.routing,
                &ws.selection);
  PlanDispatch(ws.routing, spec_.router.num_experts, ExpertCapacity(spec_.router, T), &ws.plan);
}

absl::Status CpuExecutor::Enqueue(const LayerStep& step, ExecutorWorkspace& workspace) const {
  auto& ws = static_cast<CpuWorkspace&>(workspace);
  if (step.layer < 0 || step.layer >= static_cast<int>(layers_.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", step.layer, " out of range: the model has ", layers_.size(), " MoE layers (0-based)"));
  }
  const CpuLayer& layer = layers_[step.layer];
  const int T = ws.num_tokens;
  const int d = spec_.hidden_size;
  if (spec_.pre_norm) {
    RmsNorm(ws.hidden.get(), T, d, layer.norm, spec_.norm_eps, compute_ == DType::kBF16, ws.normed.get());
  } else {
    std::memcpy(ws.normed.get(), ws.hidden.get(), static_cast<size_t>(T) * d * sizeof(float));
  }
  Route(layer, ws);
  if (spec_.routing_weights_scale_input) {
    ScaleExpertInputs(ws.routing, ws.plan, d, compute_ == DType::kBF16, ws.normed.get(), &ws.scaled_plan,
                      &ws.unit_routing);
  }

  LayerRecord& record = ws.NextRecord(step.layer, T);
  float* shared = layer.shared ? ws.shared_out.get() : nullptr;
  const auto start = std::chrono::steady_clock::now();
  RETURN_IF_ERROR(RunLayerExperts(step.layer, shared, record, ws));
  record.experts_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::copy(ws.plan.tokens_routed.begin(), ws.plan.tokens_routed.end(), record.tokens_routed.begin());
  std::copy(ws.plan.tokens_dropped.begin(), ws.plan.tokens_dropped.end(), record.tokens_dropped.begin());
  if (shared && !layer.shared_gate.empty()) GateShared(ws.normed.get(), T, d, layer.shared_gate, shared);

  CombineTasks(step, ws);
  WriteRouting(step, ws);
  return absl::OkStatus();
}

bool CpuExecutor::NeedsOffload(const DispatchPlan& plan, int layer) const {
  if (!offload_) return false;
  for (int e = 0; e < plan.num_experts; ++e) {
    if (plan.rows_of(e) > 0 && offloaded_.Contains(layer, e)) return true;
  }
  return false;
}

absl::Status CpuExecutor::RunLayerExperts(int layer, float* shared, LayerRecord& record, CpuWorkspace& ws) const {
  const ExpertRows rows{.layer = layer,
                        .tokens = ws.normed.get(),
                        .num_tokens = ws.num_tokens,
                        .plan = spec_.routing_weights_scale_input ? &ws.scaled_plan : &ws.plan,
                        .expert_out = ws.expert_out.get(),
                        .expert_seconds = record.expert_seconds.data(),
                        .shared_out = shared};
  if (!NeedsOffload(*rows.plan, layer)) return RunHeldExperts(rows, /*skip=*/nullptr, ws);
  RETURN_IF_ERROR(offload_->Start({.layer = layer,
                                   .tokens = rows.tokens,
                                   .num_tokens = rows.num_tokens,
                                   .hidden = spec_.hidden_size,
                                   .plan = rows.plan,
                                   .local = &local_,
                                   .expert_out = rows.expert_out,
                                   .expert_seconds = rows.expert_seconds},
                                  *ws.offload));
  // Finish is owed after a Start whatever happens here: the offload's rows
  // are in flight into this workspace.
  const absl::Status local = RunHeldExperts(rows, &offloaded_, ws);
  const absl::Status offloaded = offload_->Finish(*ws.offload, &ws.unserved);
  if (!local.ok()) return local;
  return offloaded.ok() ? offloaded : FallBack(rows, offloaded, ws);
}

absl::Status CpuExecutor::FallBack(const ExpertRows& rows, const absl::Status& offloaded, CpuWorkspace& ws) const {
  if (ws.unserved.empty()) return offloaded;
  for (int e : ws.unserved) {
    if (!held_.Contains(rows.layer, e)) return offloaded;
  }
  for (int e : ws.unserved) ws.fallback_skip.Remove(rows.layer, e);
  ExpertRows unserved = rows;
  unserved.shared_out = nullptr;  // ran already
  const absl::Status status = RunHeldExperts(unserved, &ws.fallback_skip, ws);
  for (int e : ws.unserved) ws.fallback_skip.Add(rows.layer, e);
  return status;
}

void CpuExecutor::CombineTasks(const LayerStep& step, CpuWorkspace& ws) const {
  const int tasks = step.all_tasks ? spec_.router.num_tasks : 1;
  const float* residual = spec_.residual ? ws.hidden.get() : nullptr;
  const float* shared = layers_[step.layer].shared ? ws.shared_out.get() : nullptr;
  // Tasks 1.. first: task 0's output replaces the activations the residual reads.
  for (int task = tasks - 1; task >= 0; --task) {
    float* out = task == 0 ? ws.next.get() : ws.task_out[task].get();
    Combine(spec_.routing_weights_scale_input ? ws.unit_routing : ws.routing, ws.plan, ws.expert_out.get(), residual,
            shared, spec_.hidden_size, task, out);
  }
  std::swap(ws.hidden, ws.next);
  ws.tasks_ready = tasks;
}

void CpuExecutor::WriteRouting(const LayerStep& step, const CpuWorkspace& ws) const {
  if (!step.expert_ids) return;
  const int slots = ws.routing.slots;
  const float* weights = ws.routing.task_weights(0);
  for (int t = 0; t < ws.num_tokens; ++t) {
    for (int s = 0; s < slots; ++s) {
      const size_t from = static_cast<size_t>(t) * slots + s;
      const size_t to = static_cast<size_t>(t) * step.row_stride + s;
      const bool kept = ws.plan.slot_row[from] >= 0;
      step.expert_ids[to] = kept ? ws.routing.expert[from] : -1;
      step.expert_weights[to] = kept ? weights[from] : 0.0f;
    }
  }
}

absl::Status CpuExecutor::Finish(std::span<const MutableTensorRef> outputs, ExecutorWorkspace& workspace) const {
  auto& ws = static_cast<CpuWorkspace&>(workspace);
  if (outputs.size() != static_cast<size_t>(ws.tasks_ready)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the batch has ", ws.tasks_ready, " outputs; ", outputs.size(), " were given"));
  }
  const size_t count = static_cast<size_t>(ws.num_tokens) * spec_.hidden_size;
  for (size_t task = 0; task < outputs.size(); ++task) {
    const MutableTensorRef& out = outputs[task];
    if (out.device != Device::kHost || out.dtype != DType::kF32 || out.rows != ws.num_tokens ||
        out.cols != spec_.hidden_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("output ", task, " must be host fp32 [", ws.num_tokens, ", ", spec_.hidden_size, "]"));
    }
    const float* source = task == 0 ? ws.hidden.get() : ws.task_out[task].get();
    std::memcpy(out.data, source, count * sizeof(float));
  }
  return absl::OkStatus();
}

absl::Status CpuExecutor::RunExperts(const ExpertRows& rows, ExecutorWorkspace& workspace) const {
  return RunHeldExperts(rows, /*skip=*/nullptr, static_cast<CpuWorkspace&>(workspace));
}

absl::Status CpuExecutor::RunHeldExperts(const ExpertRows& rows, const ExpertSet* skip, CpuWorkspace& ws) const {
  const DispatchPlan& plan = *rows.plan;
  if (rows.layer < 0 || rows.layer >= static_cast<int>(layers_.size()) ||
      plan.num_experts != spec_.router.num_experts) {
    return absl::InvalidArgumentError(absl::StrCat("no layer ", rows.layer, " of ", plan.num_experts, " experts"));
  }
  const CpuLayer& layer = layers_[rows.layer];
  const int64_t d = spec_.hidden_size;
  ws.tasks.clear();
  ws.task_expert.clear();
  for (int e = 0; e < plan.num_experts; ++e) {
    const int64_t count = plan.rows_of(e);
    if (skip && skip->Contains(rows.layer, e)) continue;  // run elsewhere, which writes its seconds
    if (rows.expert_seconds) rows.expert_seconds[e] = 0;
    if (count == 0) continue;
    if (!layer.experts[e]) {
      return absl::FailedPreconditionError(absl::StrCat(
          "layer ", rows.layer, " expert ", e, " is not held by this executor (it holds ", held_.Summary(), ")"));
    }
    ws.tasks.push_back({.ffn = layer.experts[e].get(),
                        .rows = count,
                        .row_token = plan.row_token.data() + plan.offsets[e],
                        .out = rows.expert_out + plan.offsets[e] * d});
    ws.task_expert.push_back(e);
  }
  if (rows.shared_out) {
    if (!layer.shared) {
      return absl::FailedPreconditionError(absl::StrCat("layer ", rows.layer, " has no shared experts"));
    }
    ws.tasks.push_back({.ffn = layer.shared.get(), .rows = rows.num_tokens, .out = rows.shared_out});
    ws.task_expert.push_back(-1);
  }
  ws.task_seconds.resize(ws.tasks.size());
  ws.runner.Run(rows.tokens, ws.tasks.data(), ws.tasks.size(), ws.task_seconds.data());
  if (rows.expert_seconds) {
    for (size_t t = 0; t < ws.tasks.size(); ++t) {
      if (ws.task_expert[t] >= 0) rows.expert_seconds[ws.task_expert[t]] = ws.task_seconds[t];
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<LayerExecutor>> CreateCpuExecutor(const ModelDefinition& model,
                                                                 const ExecutorOptions& options) {
  // The packed weights come from the WeightArena, which reports memory it
  // cannot map as a Status; the conversions on the way (fp32 copies of one
  // tensor at a time) use the heap, which throws: a model too large for the
  // machine fails its load either way, and no exception leaves the engine.
  absl::StatusOr<std::unique_ptr<LayerExecutor>> executor;
  try {
    executor = CpuExecutor::Create(model, options);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat("out of memory while packing the weights of model '", model.spec.name, "'"));
  }
#if defined(__GLIBC__)
  // Packing frees conversion buffers as large as the weights; glibc keeps
  // freed heap memory mapped unless asked, which would double the resident
  // size of a loaded model.
  malloc_trim(0);
#endif
  return executor;
}

}  // namespace moe
