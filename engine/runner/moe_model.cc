#include "engine/api/moe_model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "absl/strings/str_cat.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/api/dispatch.h"
#include "engine/cpu/panel_ffn.h"
#include "engine/api/router.h"
#include "engine/api/status_macros.h"

namespace moe {

struct MoeModel::Layer {
  // Stacked gates, on the experts' kernel path.
  std::unique_ptr<PanelLinear> router;
  std::vector<float> router_bias;  // [E] or empty
  std::vector<float> norm;         // [d] or empty
  std::vector<float> shared_gate;  // [d] or empty
  bool has_shared = false;
};

MoeModel::MoeModel() = default;
MoeModel::~MoeModel() = default;

int MoeModel::routing_slots() const { return RoutingSlots(spec_.router); }

std::unique_ptr<MoeModel::Workspace> MoeModel::NewWorkspace() const {
  auto ws = std::make_unique<Workspace>();
  ws->backend_scratch = backend_->NewScratch();
  ws->task_out.resize(spec_.router.num_tasks);
  return ws;
}

absl::StatusOr<std::unique_ptr<MoeModel>> MoeModel::Create(const ModelDefinition& model, const Options& options) {
  // The packed weights come from the WeightArena, which reports memory it
  // cannot map as a Status; the conversions on the way (fp32 copies of one
  // tensor at a time) use the heap, which throws: a model too large for the
  // machine fails its load either way, and no exception leaves the engine.
  auto create = [&]() -> absl::StatusOr<std::unique_ptr<MoeModel>> {
    RETURN_IF_ERROR(ValidateModel(model));
    auto out = std::unique_ptr<MoeModel>(new MoeModel());
    out->spec_ = model.spec;
    out->observer_ = options.observer;
    out->compute_ = (options.force_fp32 || model.spec.weight_dtype == DType::kF32) ? DType::kF32 : DType::kBF16;
    ASSIGN_OR_RETURN(const CpuPath path, ResolveCpuPath(options.cpu_path, out->compute_));
    for (const LayerWeights& weights : model.layers) {
      Layer layer;
      std::vector<float> stacked;
      for (const HostTensor& gate : weights.router) {
        std::vector<float> values = gate.ToFloats();
        stacked.insert(stacked.end(), values.begin(), values.end());
      }
      const int64_t columns = RouterLogitColumns(model.spec.router);
      HostTensor router = HostTensor::FromFloats({columns, model.spec.hidden_size}, stacked);
      // A bf16 checkpoint's router sees bf16 weights and, after the pre-norm's
      // rounding, bf16 inputs: the bf16 kernel takes the same products (at
      // twice the fp32 kernel's rate on AVX-512 BF16, where the router was 1.5%
      // of a DeepSeek-like layer at 64 tokens).
      const bool bf16_values = out->compute_ == DType::kBF16 && model.spec.pre_norm &&
                               std::all_of(weights.router.begin(), weights.router.end(),
                                           [](const HostTensor& gate) { return gate.dtype() == DType::kBF16; });
      ASSIGN_OR_RETURN(layer.router, PanelLinear::Create(router, bf16_values ? DType::kBF16 : DType::kF32, path));
      if (!weights.router_bias.empty()) layer.router_bias = weights.router_bias.ToFloats();
      if (model.spec.pre_norm) layer.norm = weights.norm.ToFloats();
      if (!weights.shared_gate.empty()) layer.shared_gate = weights.shared_gate.ToFloats();
      layer.has_shared = weights.shared.has_value();
      out->layers_.push_back(std::move(layer));
      out->layer_names_.push_back(weights.name);
    }
    ASSIGN_OR_RETURN(out->backend_,
                     CreateCpuExpertBackend(model, CpuBackendOptions{.compute = out->compute_, .path = path}));
#if defined(__GLIBC__)
    // Packing frees conversion buffers as large as the weights; glibc keeps
    // freed heap memory mapped unless asked, which would double the resident
    // size of a loaded model.
    malloc_trim(0);
#endif
    return out;
  };
  try {
    return create();
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat("out of memory while packing the weights of model '", model.spec.name, "'"));
  }
}

namespace {

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

template <typename T>
T* Fit(std::vector<T>& buffer, size_t count) {
  if (buffer.size() < count) buffer.resize(count);
  return buffer.data();
}

}  // namespace

absl::Status MoeModel::Run(const float* input, int num_tokens, const RunOptions& options, Workspace* workspace,
                           RunResult* result) const {
  if (num_tokens < 1) return absl::InvalidArgumentError("a request needs at least one token");
  if (options.layer && (*options.layer < 0 || *options.layer >= num_layers())) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", *options.layer, " out of range: the model has ", num_layers(), " MoE layers (0-based)"));
  }
  Workspace& ws = *workspace;
  const int d = spec_.hidden_size;
  const size_t size = static_cast<size_t>(num_tokens) * d;
  ws.hidden.assign(input, input + size);
  ws.result = result;
  ws.return_routing = options.return_routing;
  const int first = options.layer.value_or(0);
  const int last = options.layer.value_or(num_layers() - 1);
  result->layers_run = last - first + 1;
  const int slots = routing_slots();
  if (options.return_routing) {
    result->expert_ids.assign(static_cast<size_t>(num_tokens) * result->layers_run * slots, -1);
    result->expert_weights.assign(result->expert_ids.size(), 0.0f);
  } else {
    result->expert_ids.clear();
    result->expert_weights.clear();
  }
  for (int layer = first; layer <= last; ++layer) {
    ws.layer_position = layer - first;
    RETURN_IF_ERROR(RunLayer(layer, ws, num_tokens, layer == last));
  }
  result->outputs.resize(num_outputs());
  for (int task = 0; task < num_outputs(); ++task) {
    const std::vector<float>& source = num_outputs() == 1 ? ws.hidden : ws.task_out[task];
    result->outputs[task].assign(source.begin(), source.begin() + size);
  }
  return absl::OkStatus();
}

absl::Status MoeModel::RunLayer(int index, Workspace& ws, int T, bool last) const {
  const Layer& layer = layers_[index];
  const int d = spec_.hidden_size;
  const int E = spec_.router.num_experts;
  const bool bf16 = compute_ == DType::kBF16;
  const size_t size = static_cast<size_t>(T) * d;

  // Normalise.
  float* normed = Fit(ws.normed, size);
  if (spec_.pre_norm) {
    RmsNorm(ws.hidden.data(), T, d, layer.norm, spec_.norm_eps, bf16, normed);
  } else {
    std::copy(ws.hidden.begin(), ws.hidden.begin() + size, normed);
  }

  // Route.
  const int columns = static_cast<int>(layer.router->out_features());
  float* logits = Fit(ws.logits, static_cast<size_t>(T) * columns);
  layer.router->Run(normed, T, logits, &ws.router_scratch);
  if (bf16 && spec_.router.logits_in_compute_dtype) {
    for (size_t i = 0; i < static_cast<size_t>(T) * columns; ++i) logits[i] = RoundToBf16(logits[i]);
  }
  SelectExperts(spec_.router, logits, T, layer.router_bias.empty() ? nullptr : layer.router_bias.data(), &ws.routing);
  PlanDispatch(ws.routing, E, ExpertCapacity(spec_.router, T), &ws.plan);

  // Experts.
  float* expert_out = Fit(ws.expert_out, static_cast<size_t>(ws.plan.num_rows()) * d);
  double* seconds = Fit(ws.expert_seconds, static_cast<size_t>(E));
  float* shared = layer.has_shared ? Fit(ws.shared_out, size) : nullptr;
  ExpertBackend::Batch batch{.layer = index,
                             .tokens = normed,
                             .num_tokens = T,
                             .plan = &ws.plan,
                             .expert_out = expert_out,
                             .expert_seconds = seconds,
                             .shared_out = shared};
  RETURN_IF_ERROR(backend_->RunExperts(batch, ws.backend_scratch.get()));
  if (shared) {
    if (!layer.shared_gate.empty()) {
      for (int t = 0; t < T; ++t) {
        const float* x = normed + static_cast<size_t>(t) * d;
        float dot = 0;
        for (int i = 0; i < d; ++i) dot += x[i] * layer.shared_gate[i];
        const float gate = 1.0f / (1.0f + std::exp(-dot));
        for (int i = 0; i < d; ++i) shared[static_cast<size_t>(t) * d + i] *= gate;
      }
    }
  }

  // Combine, per task: residual + shared + routed.
  for (int task = 0; task < spec_.router.num_tasks; ++task) {
    std::vector<float>& out = ws.task_out[task];
    out.resize(size);
    Combine(ws.routing, ws.plan, expert_out, spec_.residual ? ws.hidden.data() : nullptr, shared, d, task, out.data());
  }
  if (!last || spec_.router.num_tasks == 1) ws.hidden.swap(ws.task_out[0]);

  if (ws.return_routing) {
    const int slots = ws.routing.slots;
    const int layers_run = ws.result->layers_run;
    const float* weights = ws.routing.task_weights(0);
    for (int t = 0; t < T; ++t) {
      for (int s = 0; s < slots; ++s) {
        const size_t from = static_cast<size_t>(t) * slots + s;
        const size_t to = (static_cast<size_t>(t) * layers_run + ws.layer_position) * slots + s;
        const bool kept = ws.plan.slot_row[from] >= 0;
        ws.result->expert_ids[to] = kept ? ws.routing.expert[from] : -1;
        ws.result->expert_weights[to] = kept ? weights[from] : 0.0f;
      }
    }
  }
  if (observer_) {
    observer_->OnLayer(LayerReport{.layer = index,
                                   .num_tokens = T,
                                   .tokens_routed = ws.plan.tokens_routed,
                                   .tokens_dropped = ws.plan.tokens_dropped,
                                   .compute_seconds = {seconds, static_cast<size_t>(E)}});
  }
  return absl::OkStatus();
}

}  // namespace moe
