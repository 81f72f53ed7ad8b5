#include "engine/cuda/cuda_executor.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/api/dispatch.h"
#include "engine/api/router.h"
#include "engine/api/status_macros.h"
#include "engine/cuda/device_memory.h"
#include "engine/cuda/kernels.h"
#include "engine/cuda/quantized_pack.h"
#include "engine/cuda/selection_params.h"
#include "engine/cuda/workspace.h"

namespace moe {
namespace {

using cuda::DeviceBuffer;
using cuda::Storage;
namespace dm = ::moe::device_math;

// Batches of up to this many tokens take the decode path by default (the
// environment's MOE_CUDA_DECODE_MAX_TOKENS overrides it; 0 turns it off).
constexpr int kDefaultDecodeMaxTokens = 16;

int EnvInt(const char* name, int fallback) {
  const char* value = std::getenv(name);
  return value && *value ? std::atoi(value) : fallback;
}

cudaDataType_t CudaType(Storage storage) { return storage == Storage::kBF16 ? CUDA_R_16BF : CUDA_R_32F; }

// The routed experts of a layer (or its shared experts, as one slot) on the
// device: first [slots][width][hidden] (GLU: gate rows, then up rows), down
// [slots][hidden][inner], fp32 biases of an MLP. Quantized routed experts
// are kept as they are published instead: `quantized` holds their slots
// ([DEVICE_QUANT_LAYOUT]) and first and down are empty.
struct DeviceFfns {
  int slots = 0, width = 0, inner = 0, hidden = 0;
  Storage storage = Storage::kBF16;
  DeviceBuffer first, down, first_bias, down_bias;
  dm::QuantFfnLayout quant;      // kind kNone: not quantized
  DeviceBuffer quantized;        // [slots][quant.slot_bytes]
  std::vector<int32_t> slot_of;  // [E]: slot of each expert, -1 when not held
  DeviceBuffer slot_of_device;

  const char* FirstOf(int slot) const {
    return first.as<char>() + static_cast<size_t>(slot) * width * hidden * cuda::StorageBytes(storage);
  }
  const char* DownOf(int slot) const {
    return down.as<char>() + static_cast<size_t>(slot) * hidden * inner * cuda::StorageBytes(storage);
  }
  bool is_quantized() const { return quant.kind != dm::QuantKind::kNone; }
  // Bytes of one expert expanded to the storage type.
  size_t ExpandedBytes() const {
    return (static_cast<size_t>(width) * hidden + static_cast<size_t>(hidden) * inner) * cuda::StorageBytes(storage);
  }
  size_t bytes() const {
    return first.bytes() + down.bytes() + first_bias.bytes() + down_bias.bytes() + quantized.bytes();
  }
};

struct DeviceLayer {
  DeviceBuffer norm;         // fp32 [hidden] or none
  DeviceBuffer router;       // fp32 [columns, hidden]
  DeviceBuffer router_bias;  // fp32 [E] or none: the selection's correction
  std::vector<float> router_bias_host;
  DeviceBuffer router_logit_bias;  // fp32 [E] or none: added to the logits
  std::vector<float> router_logit_bias_host;
  DeviceBuffer shared_gate;  // fp32 [hidden] or none
  DeviceFfns experts;
  std::optional<DeviceFfns> shared;
};

// The activation of the model's experts, as the kernels take it.
cuda::Activation ActivationOf(const ModelSpec& spec) {
  const cuda::FfnForm form = spec.expert_kind == ExpertKind::kGlu   ? cuda::FfnForm::kGlu
                             : spec.expert_kind == ExpertKind::kMlp ? cuda::FfnForm::kMlp
                                                                    : cuda::FfnForm::kClampedSwiglu;
  return {.form = form,
          .act = static_cast<dm::Act>(spec.activation),
          .alpha = spec.swiglu_alpha,
          .limit = spec.swiglu_limit};
}

// Whether the held FFNs among `ffns` are all quantized: then they stay so
// on the device.
bool AllQuantized(const std::vector<const FfnWeights*>& ffns) {
  bool any = false;
  for (const FfnWeights* ffn : ffns) {
    if (ffn && !ffn->quantized()) return false;
    any = any || ffn;
  }
  return any;
}

// The held FFNs' matrices, quantized, into out.quantized: one slot each,
// packed on the host one at a time.
absl::Status UploadQuantizedMatrices(const std::vector<const FfnWeights*>& ffns, bool two_products, DeviceFfns& out) {
  const FfnWeights* first_held = *std::find_if(ffns.begin(), ffns.end(), [](const FfnWeights* f) { return f; });
  ASSIGN_OR_RETURN(out.quant, cuda::PlanQuantizedFfn(*first_held, two_products));
  ASSIGN_OR_RETURN(out.quantized, DeviceBuffer::Allocate(out.slots * out.quant.slot_bytes, "quantized expert weights"));
  std::vector<uint8_t> slot(static_cast<size_t>(out.quant.slot_bytes));
  for (size_t e = 0; e < ffns.size(); ++e) {
    if (!ffns[e]) continue;
    const absl::Status packed = cuda::PackQuantizedFfn(*ffns[e], out.quant, slot.data());
    if (!packed.ok()) return absl::InvalidArgumentError(absl::StrCat("expert ", e, ": ", packed.message()));
    MOE_CUDA_RETURN_IF_ERROR(cudaMemcpy(out.quantized.as<uint8_t>() + out.slot_of[e] * out.quant.slot_bytes,
                                        slot.data(), slot.size(), cudaMemcpyHostToDevice),
                             "quantized expert weights");
  }
  return absl::OkStatus();
}

// The held FFNs' matrices in the storage type; quantized ones are expanded
// on the host by the published rule, one expert at a time.
absl::Status UploadStoredMatrices(const std::vector<const FfnWeights*>& ffns, bool two_products,
                                  cuda::WeightUploader& uploader, DeviceFfns& out) {
  const size_t value = cuda::StorageBytes(out.storage);
  const size_t first_bytes = static_cast<size_t>(out.width) * out.hidden * value;
  const size_t down_bytes = static_cast<size_t>(out.hidden) * out.inner * value;
  ASSIGN_OR_RETURN(out.first, DeviceBuffer::Allocate(out.slots * first_bytes, "expert weights"));
  ASSIGN_OR_RETURN(out.down, DeviceBuffer::Allocate(out.slots * down_bytes, "expert weights"));
  for (size_t e = 0; e < ffns.size(); ++e) {
    if (!ffns[e]) continue;
    const FfnWeights expanded = ffns[e]->quantized()
                                    ? ffns[e]->Dequantized(out.storage == Storage::kF32 ? DType::kF32 : DType::kBF16)
                                    : FfnWeights{};
    const FfnWeights* ffn = ffns[e]->quantized() ? &expanded : ffns[e];
    char* first = out.first.as<char>() + out.slot_of[e] * first_bytes;
    RETURN_IF_ERROR(uploader.Upload(ffn->w1, out.storage, first));
    if (two_products) RETURN_IF_ERROR(uploader.Upload(ffn->w3, out.storage, first + first_bytes / 2));
    RETURN_IF_ERROR(uploader.Upload(ffn->w2, out.storage, out.down.as<char>() + out.slot_of[e] * down_bytes));
  }
  return absl::OkStatus();
}

// Uploads the FFNs `ffns` (null entries: not held) as one DeviceFfns: the
// matrices (kept quantized when `keep_quantized` and all of them are), and
// the biases of the forms that have them (MLP: b1 and b2; clamped SwiGLU:
// b1 then b3, and b2).
absl::StatusOr<DeviceFfns> UploadFfns(const std::vector<const FfnWeights*>& ffns, const ModelSpec& spec, int inner,
                                      Storage storage, bool keep_quantized, cuda::WeightUploader& uploader) {
  DeviceFfns out;
  const cuda::FfnForm form = ActivationOf(spec).form;
  const bool two_products = form != cuda::FfnForm::kMlp, biased = form != cuda::FfnForm::kGlu;
  out.hidden = spec.hidden_size;
  out.inner = inner;
  out.width = cuda::FirstWidth(form, inner);
  out.storage = storage;
  for (const FfnWeights* ffn : ffns) {
    out.slot_of.push_back(ffn ? out.slots++ : -1);
  }
  if (keep_quantized && AllQuantized(ffns)) {
    RETURN_IF_ERROR(UploadQuantizedMatrices(ffns, two_products, out));
  } else {
    RETURN_IF_ERROR(UploadStoredMatrices(ffns, two_products, uploader, out));
  }
  const size_t first_biases = two_products ? 2 * static_cast<size_t>(inner) : inner;  // b1 (and b3)
  if (biased) {
    ASSIGN_OR_RETURN(out.first_bias, DeviceBuffer::Allocate(out.slots * first_biases * sizeof(float), "biases"));
    ASSIGN_OR_RETURN(out.down_bias,
                     DeviceBuffer::Allocate(out.slots * static_cast<size_t>(out.hidden) * sizeof(float), "biases"));
    for (size_t e = 0; e < ffns.size(); ++e) {
      if (!ffns[e]) continue;
      const FfnWeights& ffn = *ffns[e];
      float* bias = out.first_bias.as<float>() + out.slot_of[e] * first_biases;
      RETURN_IF_ERROR(uploader.Upload(ffn.b1, Storage::kF32, bias));
      if (two_products) RETURN_IF_ERROR(uploader.Upload(ffn.b3, Storage::kF32, bias + inner));
      RETURN_IF_ERROR(uploader.Upload(ffn.b2, Storage::kF32,
                                      out.down_bias.as<float>() + out.slot_of[e] * static_cast<size_t>(out.hidden)));
    }
  }
  ASSIGN_OR_RETURN(out.slot_of_device, DeviceBuffer::Allocate(out.slot_of.size() * sizeof(int32_t), "expert slots"));
  MOE_CUDA_RETURN_IF_ERROR(cudaMemcpy(out.slot_of_device.get(), out.slot_of.data(),
                                      out.slot_of.size() * sizeof(int32_t), cudaMemcpyHostToDevice),
                           "expert slots");
  return out;
}

// A host tensor as a device fp32 buffer.
absl::StatusOr<DeviceBuffer> UploadFloats(const HostTensor& tensor, const char* what, cuda::WeightUploader& uploader) {
  ASSIGN_OR_RETURN(DeviceBuffer buffer, DeviceBuffer::Allocate(tensor.num_elements() * sizeof(float), what));
  RETURN_IF_ERROR(uploader.Upload(tensor, Storage::kF32, buffer.get()));
  return buffer;
}

// Whether cublasGemmGroupedBatchedEx takes `storage` inputs with fp32
// output on the current device: one 16x16x16 group, tried once.
bool GroupedGemmRuns(Storage storage) {
  constexpr int kSide = 16;
  const size_t value = cuda::StorageBytes(storage);
  auto a = DeviceBuffer::Allocate(kSide * kSide * value, "a grouped GEMM probe");
  auto b = DeviceBuffer::Allocate(kSide * kSide * value, "a grouped GEMM probe");
  auto c = DeviceBuffer::Allocate(kSide * kSide * sizeof(float), "a grouped GEMM probe");
  auto pointers = DeviceBuffer::Allocate(3 * sizeof(void*), "a grouped GEMM probe");
  cublasHandle_t blas = nullptr;
  if (!a.ok() || !b.ok() || !c.ok() || !pointers.ok() || cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) return false;
  const void* host[3] = {a->get(), b->get(), c->get()};
  cudaMemcpy(pointers->get(), host, sizeof(host), cudaMemcpyHostToDevice);
  const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
  const int side = kSide, one_group = 1;
  const float alpha = 1.0f, beta = 0.0f;
  const void* const* device = pointers->as<const void*>();
  const cublasStatus_t status = cublasGemmGroupedBatchedEx(
      blas, &trans_a, &trans_b, &side, &side, &side, &alpha, device, CudaType(storage), &side, device + 1,
      CudaType(storage), &side, &beta, pointers->as<void*>() + 2, CUDA_R_32F, &side, 1, &one_group, CUBLAS_COMPUTE_32F);
  const bool ran = status == CUBLAS_STATUS_SUCCESS && cudaDeviceSynchronize() == cudaSuccess;
  cublasDestroy(blas);
  return ran;
}

class CudaExecutor : public LayerExecutor {
 public:
  static absl::StatusOr<std::unique_ptr<LayerExecutor>> Create(const ModelDefinition& model,
                                                               const ExecutorOptions& options);

  std::string Describe() const override;
  DType compute_dtype() const override { return compute_; }
  size_t WeightBytes() const override;
  const ExpertSet& held() const override { return held_; }
  bool RunsEveryExpert() const override { return held_.count() == int64_t{held_.num_layers()} * held_.num_experts(); }
  ExpertTiming timing() const override { return ExpertTiming::kPerExpert; }

  absl::StatusOr<std::unique_ptr<ExecutorWorkspace>> NewWorkspace(int max_tokens) const override;
  absl::Status Begin(const TensorRef& input, ExecutorWorkspace& workspace) const override;
  absl::Status Enqueue(const LayerStep& step, ExecutorWorkspace& workspace) const override;
  absl::Status Finish(std::span<const MutableTensorRef> outputs, ExecutorWorkspace& workspace) const override;
  absl::Status RunExperts(const ExpertRows& rows, ExecutorWorkspace& workspace) const override;

 private:
  CudaExecutor() = default;
  absl::Status UploadLayer(const LayerWeights& weights, int index, cuda::WeightUploader& uploader);
  // Sizes the expansion of quantized experts on the grouped path: as many
  // experts at a time as MOE_CUDA_EXPAND_MIB (default 1024) MiB hold, at
  // least one, at most ExpandSlots::kMax.
  void PlanExpansion();

  // One whole layer on ws.stream (step_index: the batch's step, for its records).
  absl::Status RunLayer(const LayerStep& step, int step_index, cuda::CudaWorkspace& ws) const;
  void Normalise(const DeviceLayer& layer, cuda::CudaWorkspace& ws) const;
  absl::Status RouterLogits(const DeviceLayer& layer, cuda::CudaWorkspace& ws) const;
  // Selection and dispatch on the device; the counts land in the step's record slot.
  absl::Status RouteOnDevice(const DeviceLayer& layer, int step_index, cuda::CudaWorkspace& ws) const;
  // Selection and dispatch on the host, from the logits (synchronises).
  absl::Status RouteOnHost(const DeviceLayer& layer, int step_index, cuda::CudaWorkspace& ws) const;
  // The shared experts of `tokens` rows of ws.normed on ws.side, after
  // ws.stream's work so far; `gated`: with Qwen's shared gate applied.
  absl::Status RunShared(const DeviceLayer& layer, int tokens, bool gated, cuda::CudaWorkspace& ws) const;
  // FAILED_PRECONDITION when `offsets` (host [E + 1]) give rows to an expert not held.
  absl::Status CheckHeld(const DeviceLayer& layer, int layer_index, const int64_t* offsets) const;
  // The routed experts with rows, grouped by `offsets` (host [E + 1]).
  // scale_inputs: rows are their token times its routing weight where the
  // model says so (a layer; RunExperts' rows come as they are).
  absl::Status RunGrouped(const DeviceLayer& layer, const int64_t* offsets, bool scale_inputs,
                          cuda::CudaWorkspace& ws) const;
  void RunDecode(const DeviceLayer& layer, cuda::CudaWorkspace& ws) const;
  // Fills ws's groups: one per expert with rows, its weights where they
  // are (quantized: where its chunk's expansion puts them).
  void AddExpertGroups(const DeviceFfns& ffns, const int64_t* offsets, cuda::CudaWorkspace& ws) const;
  // Groups [first_group, first_group + groups) (rows [rows_begin, rows_end)):
  // first product, activation, down product.
  absl::Status RunExpertChunk(const DeviceFfns& ffns, int first_group, int groups, int64_t rows_begin, int64_t rows_end,
                              cuda::CudaWorkspace& ws) const;
  // One product per group of [begin, begin + count): C[g] = A[g] B[g]^T as
  // the grouped GEMM's arrays (on the device already) say.
  absl::Status GroupedGemm(const cuda::GemmGroups& groups, int begin, int count, cuda::CudaWorkspace& ws) const;
  absl::Status DenseGemm(cublasHandle_t blas, int out_features, int64_t rows, int in_features, const void* weight,
                         Storage weight_storage, const void* input, float* output) const;
  void Combine(const LayerStep& step, cuda::CudaWorkspace& ws) const;
  // The most rows (kept selections) a batch of up to `max_tokens` has.
  int64_t MaxRows(int max_tokens) const;
  // Whether a batch of `tokens` runs on the decode path (and in a graph).
  bool UsesDecodePath(int tokens) const { return decode_enabled_ && tokens <= decode_max_tokens_; }
  absl::Status RunGraph(cuda::CudaWorkspace& ws) const;
  absl::Status CopyResults(std::span<const MutableTensorRef> outputs, cuda::CudaWorkspace& ws) const;
  void FillRecords(cuda::CudaWorkspace& ws) const;

  ModelSpec spec_;
  DType compute_ = DType::kBF16;
  Storage storage_ = Storage::kBF16;
  int device_ = 0;
  std::string device_name_;
  ExpertSet held_;
  std::vector<DeviceLayer> layers_;
  dm::SelectionParams selection_;
  // Whether selection runs on the device (softmax top-k and the group-limited
  // families, one task, at most dm::kMaxExperts experts).
  bool device_selects_ = false;
  bool decode_enabled_ = false;
  int decode_max_tokens_ = kDefaultDecodeMaxTokens;
  bool graphs_enabled_ = true;
  // Whether cuBLAS runs the grouped GEMM for the storage type with fp32
  // output (asked once, at creation); else one GEMM per expert.
  bool grouped_ = true;
  // Quantized routed experts: how many the grouped path expands at a time
  // (0: none are quantized), and the bytes of one expanded.
  int expand_chunk_ = 0;
  size_t expanded_expert_bytes_ = 0;
};

std::string CudaExecutor::Describe() const {
  std::string text =
      absl::StrCat("cuda:", device_, " ", device_name_, ", ", compute_ == DType::kBF16 ? "bf16" : "fp32", " compute, ",
                   grouped_ ? "grouped GEMMs" : "a GEMM per expert (cuBLAS has no grouped GEMM for these types)");
  if (decode_enabled_) absl::StrAppend(&text, ", decode kernels up to ", decode_max_tokens_, " tokens");
  if (decode_enabled_ && graphs_enabled_) absl::StrAppend(&text, " in CUDA graphs");
  if (expand_chunk_ > 0) {
    absl::StrAppend(&text, ", ", std::string(QuantFormatName(spec_.expert_format)), " experts kept quantized (",
                    decode_enabled_ ? "decoded as the decode kernels read them; " : "", "expanded ", expand_chunk_,
                    " at a time for grouped products)");
  }
  if (!RunsEveryExpert()) absl::StrAppend(&text, ", holds ", held_.Summary());
  return text;
}

size_t CudaExecutor::WeightBytes() const {
  size_t bytes = 0;
  for (const DeviceLayer& layer : layers_) {
    bytes += layer.experts.bytes();
    if (layer.shared) bytes += layer.shared->bytes();
  }
  return bytes;
}

absl::StatusOr<std::unique_ptr<LayerExecutor>> CudaExecutor::Create(const ModelDefinition& model,
                                                                    const ExecutorOptions& options) {
  ASSIGN_OR_RETURN(const int devices, CudaDeviceCount());
  if (options.device_index < 0 || options.device_index >= devices) {
    return absl::InvalidArgumentError(
        absl::StrCat("no CUDA device ", options.device_index, ": this machine has ", devices));
  }
  if (options.offload) {
    return absl::InvalidArgumentError("the CUDA executor holds every expert it runs: it takes no offload");
  }
  if (options.compute != DType::kF32 && options.compute != DType::kBF16) {
    return absl::InvalidArgumentError("the CUDA executor computes in fp32 or bf16");
  }
  const int num_layers = static_cast<int>(model.layers.size());
  const RouterSpec& router = model.spec.router;
  if (options.held && (options.held->num_layers() != num_layers || options.held->num_experts() != router.num_experts)) {
    return absl::InvalidArgumentError(absl::StrCat("the experts to hold are given for ", options.held->num_layers(),
                                                   " layers of ", options.held->num_experts(),
                                                   " experts; the model has ", num_layers, " of ", router.num_experts));
  }
  auto executor = std::unique_ptr<CudaExecutor>(new CudaExecutor());
  executor->spec_ = model.spec;
  executor->compute_ = options.compute;
  executor->storage_ = options.compute == DType::kF32 ? Storage::kF32 : Storage::kBF16;
  executor->device_ = options.device_index;
  ASSIGN_OR_RETURN(executor->device_name_, CudaDeviceName(options.device_index));
  executor->held_ = options.held.value_or(ExpertSet::All(num_layers, router.num_experts));

  executor->device_selects_ = dm::SelectsOnDevice(router);
  executor->selection_ =
      dm::SelectionParamsOf(router, options.compute == DType::kBF16 && router.logits_in_compute_dtype);
  executor->decode_max_tokens_ = EnvInt("MOE_CUDA_DECODE_MAX_TOKENS", kDefaultDecodeMaxTokens);
  executor->decode_enabled_ =
      executor->device_selects_ && executor->RunsEveryExpert() && executor->decode_max_tokens_ > 0;
  executor->graphs_enabled_ = EnvInt("MOE_CUDA_GRAPHS", 1) != 0;

  MOE_CUDA_RETURN_IF_ERROR(cudaSetDevice(options.device_index), "selecting the CUDA device");
  // Decode rows of these sizes must fit a block's shared memory; else every
  // batch takes the grouped path.
  executor->decode_enabled_ =
      executor->decode_enabled_ && cuda::PrepareDecodeKernels(model.spec.hidden_size, model.spec.intermediate_size);
  executor->grouped_ = GroupedGemmRuns(executor->storage_);
  ASSIGN_OR_RETURN(cuda::WeightUploader uploader, cuda::WeightUploader::Create());
  for (int index = 0; index < num_layers; ++index) {
    RETURN_IF_ERROR(executor->UploadLayer(model.layers[index], index, uploader));
  }
  RETURN_IF_ERROR(uploader.Wait());
  executor->PlanExpansion();
  return std::unique_ptr<LayerExecutor>(std::move(executor));
}

void CudaExecutor::PlanExpansion() {
  int most_slots = 0;  // a chunk never needs more experts than a layer holds
  for (const DeviceLayer& layer : layers_) {
    if (!layer.experts.is_quantized()) continue;
    expanded_expert_bytes_ = layer.experts.ExpandedBytes();
    most_slots = std::max(most_slots, layer.experts.slots);
  }
  if (most_slots == 0) return;
  const size_t budget = static_cast<size_t>(std::max(EnvInt("MOE_CUDA_EXPAND_MIB", 1024), 0)) << 20;
  const size_t fits = std::max<size_t>(budget / expanded_expert_bytes_, 1);
  expand_chunk_ = static_cast<int>(
      std::min<size_t>({fits, static_cast<size_t>(cuda::ExpandSlots::kMax), static_cast<size_t>(most_slots)}));
}

absl::Status CudaExecutor::UploadLayer(const LayerWeights& weights, int index, cuda::WeightUploader& uploader) {
  DeviceLayer layer;
  if (spec_.pre_norm) {
    ASSIGN_OR_RETURN(layer.norm, UploadFloats(weights.norm, "norm", uploader));
  }
  const int64_t columns = RouterLogitColumns(spec_.router);
  ASSIGN_OR_RETURN(layer.router, DeviceBuffer::Allocate(columns * spec_.hidden_size * sizeof(float), "router weights"));
  float* router = layer.router.as<float>();
  for (const HostTensor& gate : weights.router) {
    RETURN_IF_ERROR(uploader.Upload(gate, Storage::kF32, router));
    router += gate.num_elements();
  }
  if (!weights.router_bias.empty()) {
    ASSIGN_OR_RETURN(layer.router_bias, UploadFloats(weights.router_bias, "router bias", uploader));
    layer.router_bias_host = weights.router_bias.ToFloats();
  }
  if (!weights.router_logit_bias.empty()) {
    ASSIGN_OR_RETURN(layer.router_logit_bias, UploadFloats(weights.router_logit_bias, "router bias", uploader));
    layer.router_logit_bias_host = weights.router_logit_bias.ToFloats();
  }
  if (!weights.shared_gate.empty()) {
    ASSIGN_OR_RETURN(layer.shared_gate, UploadFloats(weights.shared_gate, "shared gate", uploader));
  }
  std::vector<const FfnWeights*> experts;
  for (size_t e = 0; e < weights.experts.size(); ++e) {
    experts.push_back(held_.Contains(index, static_cast<int>(e)) ? &weights.experts[e] : nullptr);
  }
  ASSIGN_OR_RETURN(layer.experts, UploadFfns(experts, spec_, spec_.intermediate_size, storage_,
                                             /*keep_quantized=*/true, uploader));
  if (weights.shared) {
    // A layer's shared experts run beside its routed ones on a stream of
    // their own; held expanded, they need no expansion buffer of their own
    // (one expert of many: DeepSeek-V3's is 1/257 of a layer's experts).
    ASSIGN_OR_RETURN(layer.shared, UploadFfns({&*weights.shared}, spec_, spec_.shared_intermediate_size, storage_,
                                              /*keep_quantized=*/false, uploader));
  }
  layers_.push_back(std::move(layer));
  return absl::OkStatus();
}

int64_t CudaExecutor::MaxRows(int max_tokens) const {
  const RouterSpec& router = spec_.router;
  const int64_t selections = static_cast<int64_t>(max_tokens) * RoutingSlots(router);
  if (router.kind != RouterKind::kExpertChoice) return selections;
  // Each expert takes at most ceil(capacity_factor * T / E) tokens, and at
  // least a token's worth of rows is kept for RunExperts' one row per token.
  const int64_t per_expert = std::min<int64_t>(
      max_tokens, static_cast<int64_t>(std::ceil(router.capacity_factor * max_tokens / router.num_experts)));
  return std::max<int64_t>(std::min(selections, per_expert * router.num_experts), max_tokens);
}

absl::StatusOr<std::unique_ptr<ExecutorWorkspace>> CudaExecutor::NewWorkspace(int max_tokens) const {
  if (max_tokens < 1) return absl::InvalidArgumentError("a workspace needs room for at least one token");
  MOE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_), "selecting the CUDA device");
  const cuda::WorkspaceShape shape{
      .max_tokens = max_tokens,
      .num_layers = static_cast<int>(layers_.size()),
      .hidden = spec_.hidden_size,
      .inner = spec_.intermediate_size,
      .shared_inner = spec_.shared_intermediate_size,
      .first_width = cuda::FirstWidth(ActivationOf(spec_).form, spec_.intermediate_size),
      .shared_first_width = cuda::FirstWidth(ActivationOf(spec_).form, spec_.shared_intermediate_size),
      .num_experts = spec_.router.num_experts,
      .slots = RoutingSlots(spec_.router),
      .max_rows = MaxRows(max_tokens),
      .tasks = spec_.router.num_tasks,
      .logit_columns = RouterLogitColumns(spec_.router),
      .storage = storage_,
      .expanded_bytes = static_cast<size_t>(expand_chunk_) * expanded_expert_bytes_};
  ASSIGN_OR_RETURN(auto ws, cuda::CudaWorkspace::Create(shape));
  ws->selection.Plan(spec_.router, max_tokens);
  return std::unique_ptr<ExecutorWorkspace>(std::move(ws));
}

absl::Status CudaExecutor::Begin(const TensorRef& input, ExecutorWorkspace& workspace) const {
  auto& ws = static_cast<cuda::CudaWorkspace&>(workspace);
  if (input.dtype != DType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat("the CUDA executor takes fp32 input (",
                                                   std::string(DTypeName(input.dtype)), " on ",
                                                   DeviceName(input.device), " given)"));
  }
  if (input.cols != spec_.hidden_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("input rows have ", input.cols, " values; the model's hidden size is ", spec_.hidden_size));
  }
  if (input.rows < 1 || input.rows > ws.max_tokens()) {
    return absl::InvalidArgumentError(
        absl::StrCat("a batch of ", input.rows, " tokens; the workspace is planned for 1 to ", ws.max_tokens()));
  }
  MOE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_), "selecting the CUDA device");
  ws.StartBatch(static_cast<int>(input.rows), UsesDecodePath(static_cast<int>(input.rows)) && graphs_enabled_);
  const size_t bytes = static_cast<size_t>(input.rows) * input.cols * sizeof(float);
  const cudaMemcpyKind kind = input.device == Device::kCuda ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice;
  // Pageable host input is staged by the driver before this returns; the
  // caller may reuse it at once.
  MOE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ws.hidden(), input.data, bytes, kind, ws.stream), "copying the input");
  return absl::OkStatus();
}

absl::Status CudaExecutor::Enqueue(const LayerStep& step, ExecutorWorkspace& workspace) const {
  auto& ws = static_cast<cuda::CudaWorkspace&>(workspace);
  if (step.layer < 0 || step.layer >= static_cast<int>(layers_.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", step.layer, " out of range: the model has ", layers_.size(), " MoE layers (0-based)"));
  }
  ASSIGN_OR_RETURN(const int step_index, ws.AddStep(step));
  if (ws.in_graph) return absl::OkStatus();  // recorded: runs at Finish, in the batch's graph
  MOE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_), "selecting the CUDA device");
  return RunLayer(step, step_index, ws);
}

absl::Status CudaExecutor::RunLayer(const LayerStep& step, int step_index, cuda::CudaWorkspace& ws) const {
  const DeviceLayer& layer = layers_[step.layer];
  Normalise(layer, ws);
  RETURN_IF_ERROR(RouterLogits(layer, ws));
  const bool decode = UsesDecodePath(ws.num_tokens);
  if (device_selects_) {
    RETURN_IF_ERROR(RouteOnDevice(layer, step_index, ws));
  } else {
    RETURN_IF_ERROR(RouteOnHost(layer, step_index, ws));
  }
  MOE_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.expert_start[step_index], ws.stream), "timing the experts");
  if (layer.shared) RETURN_IF_ERROR(RunShared(layer, ws.num_tokens, /*gated=*/true, ws));
  if (decode) {
    RunDecode(layer, ws);
  } else {
    // The layer's one host sync: the grouped GEMM takes its sizes on the host.
    if (device_selects_) MOE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(ws.stream), "routing on the device");
    const int64_t* offsets = ws.counts_of(step_index);
    absl::Status held = CheckHeld(layer, step.layer, offsets);
    if (!held.ok()) {
      cudaStreamSynchronize(ws.side);  // the shared experts' work must not outlive the batch
      return held;
    }
    RETURN_IF_ERROR(RunGrouped(layer, offsets, /*scale_inputs=*/true, ws));
  }
  if (layer.shared) {
    MOE_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.shared_done, ws.side), "shared experts");
    MOE_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(ws.stream, ws.shared_done, 0), "shared experts");
  }
  MOE_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.expert_stop[step_index], ws.stream), "timing the experts");
  Combine(step, ws);
  if (step.expert_ids) {
    const int64_t selections = static_cast<int64_t>(ws.num_tokens) * ws.shape.slots;
    cuda::LaunchRoutingOut(selections, ws.expert, ws.weights, ws.dispatch.slot_row, ws.routing_ids_of(step_index),
                           ws.routing_weights_of(step_index), ws.stream);
  }
  return cuda::CudaStatus(cudaGetLastError(), absl::StrCat("layer ", step.layer));
}

void CudaExecutor::Normalise(const DeviceLayer& layer, cuda::CudaWorkspace& ws) const {
  const int T = ws.num_tokens, d = spec_.hidden_size;
  if (spec_.pre_norm) {
    cuda::LaunchRmsNorm(ws.hidden(), T, d, layer.norm.as<float>(), spec_.norm_eps, storage_, ws.normed, ws.stream);
  } else {
    cudaMemcpyAsync(ws.normed, ws.hidden(), static_cast<size_t>(T) * d * sizeof(float), cudaMemcpyDeviceToDevice,
                    ws.stream);
  }
}

absl::Status CudaExecutor::RouterLogits(const DeviceLayer& layer, cuda::CudaWorkspace& ws) const {
  return DenseGemm(ws.blas, ws.shape.logit_columns, ws.num_tokens, spec_.hidden_size, layer.router.get(), Storage::kF32,
                   ws.normed, ws.logits);
}

absl::Status CudaExecutor::DenseGemm(cublasHandle_t blas, int out_features, int64_t rows, int in_features,
                                     const void* weight, Storage weight_storage, const void* input,
                                     float* output) const {
  // Row-major y[rows, out] = x[rows, in] W[out, in]^T is, column-major,
  // y^T[out, rows] = W^T x^T: A = W (transposed), B = x.
  const float one = 1.0f, zero = 0.0f;
  const cudaDataType_t type = CudaType(weight_storage);
  MOE_CUBLAS_RETURN_IF_ERROR(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, out_features, static_cast<int>(rows),
                                          in_features, &one, weight, type, in_features, input, type, in_features, &zero,
                                          output, CUDA_R_32F, out_features, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                             "dense product");
  return absl::OkStatus();
}

absl::Status CudaExecutor::RouteOnDevice(const DeviceLayer& layer, int step_index, cuda::CudaWorkspace& ws) const {
  const int T = ws.num_tokens, S = ws.shape.slots, E = spec_.router.num_experts;
  cuda::LaunchSelect(selection_, ws.logits, T, ws.shape.logit_columns, layer.router_logit_bias.as<float>(),
                     layer.router_bias.as<float>(), ws.expert, ws.weights, ws.stream);
  cuda::LaunchDispatch(ws.expert, T, S, E, ExpertCapacity(spec_.router, T), ws.dispatch, ws.stream);
  MOE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(ws.counts_of(step_index), ws.dispatch.counts_out,
                      (3 * static_cast<size_t>(E) + 1) * sizeof(int64_t), cudaMemcpyDeviceToHost, ws.stream),
      "copying the expert counts");
  return absl::OkStatus();
}

absl::Status CudaExecutor::RouteOnHost(const DeviceLayer& layer, int step_index, cuda::CudaWorkspace& ws) const {
  const int T = ws.num_tokens, E = spec_.router.num_experts, columns = ws.shape.logit_columns;
  std::vector<float>& logits = ws.host_logits;
  MOE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(logits.data(), ws.logits, static_cast<size_t>(T) * columns * sizeof(float),
                                           cudaMemcpyDeviceToHost, ws.stream),
                           "copying the router logits");
  MOE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(ws.stream), "router logits");
  const std::vector<float>& logit_bias = layer.router_logit_bias_host;
  for (int t = 0; !logit_bias.empty() && t < T; ++t) {
    for (int c = 0; c < columns; ++c) logits[static_cast<size_t>(t) * columns + c] += logit_bias[c];
  }
  if (selection_.round_logits) {
    for (size_t i = 0; i < static_cast<size_t>(T) * columns; ++i) logits[i] = RoundToBf16(logits[i]);
  }
  SelectExperts(spec_.router, logits.data(), T,
                layer.router_bias_host.empty() ? nullptr : layer.router_bias_host.data(), &ws.routing, &ws.selection);
  PlanDispatch(ws.routing, E, ExpertCapacity(spec_.router, T), &ws.plan);
  return ws.UploadHostRouting(step_index);
}

absl::Status CudaExecutor::RunShared(const DeviceLayer& layer, int tokens, bool gated, cuda::CudaWorkspace& ws) const {
  const DeviceFfns& ffn = *layer.shared;
  const int T = tokens, d = spec_.hidden_size;
  MOE_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.shared_ready, ws.stream), "shared experts");
  MOE_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(ws.side, ws.shared_ready, 0), "shared experts");
  cuda::LaunchGatherConvert(ws.normed, nullptr, nullptr, T, d, storage_, ws.shared_in, ws.side);
  RETURN_IF_ERROR(DenseGemm(ws.side_blas, ffn.width, T, d, ffn.FirstOf(0), storage_, ws.shared_in, ws.shared_h));
  cuda::LaunchActivate(ws.shared_h, T, ffn.inner, ActivationOf(spec_), ffn.first_bias.as<float>(), nullptr, storage_,
                       ws.shared_act, ws.side);
  RETURN_IF_ERROR(DenseGemm(ws.side_blas, d, T, ffn.inner, ffn.DownOf(0), storage_, ws.shared_act, ws.shared_out));
  if (ffn.down_bias.get()) cuda::LaunchAddRowBias(ws.shared_out, T, d, ffn.down_bias.as<float>(), nullptr, ws.side);
  if (gated && layer.shared_gate.get()) {
    cuda::LaunchGateShared(ws.normed, T, d, layer.shared_gate.as<float>(), ws.shared_out, ws.side);
  }
  return absl::OkStatus();
}

absl::Status CudaExecutor::CheckHeld(const DeviceLayer& layer, int layer_index, const int64_t* offsets) const {
  for (int e = 0; e < spec_.router.num_experts; ++e) {
    if (offsets[e + 1] > offsets[e] && layer.experts.slot_of[e] < 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "layer ", layer_index, " expert ", e, " is not held by this executor (it holds ", held_.Summary(), ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status CudaExecutor::RunGrouped(const DeviceLayer& layer, const int64_t* offsets, bool scale_inputs,
                                      cuda::CudaWorkspace& ws) const {
  const DeviceFfns& ffns = layer.experts;
  const int E = spec_.router.num_experts, d = spec_.hidden_size;
  const int64_t rows = offsets[E];
  // Llama 4: each row is its token times its routing weight, expert(w * x).
  const float* row_scale = nullptr;
  if (spec_.routing_weights_scale_input && scale_inputs) {
    cuda::LaunchRowScales(static_cast<int64_t>(ws.num_tokens) * ws.shape.slots, ws.dispatch.slot_row, ws.weights,
                          compute_ == DType::kBF16, ws.row_scale, ws.stream);
    row_scale = ws.row_scale;
  }
  cuda::LaunchGatherConvert(ws.normed, ws.dispatch.row_token, row_scale, rows, d, storage_, ws.rows, ws.stream);
  cuda::LaunchRowSlots(ws.dispatch.row_expert, ffns.slot_of_device.as<int32_t>(), rows, ws.row_slot, ws.stream);
  if (rows == 0) return absl::OkStatus();
  AddExpertGroups(ffns, offsets, ws);
  RETURN_IF_ERROR(ws.first_groups.UploadPointers(ws.stream));
  RETURN_IF_ERROR(ws.down_groups.UploadPointers(ws.stream));
  // The experts with rows, a chunk at a time: all of them at once, or as
  // many quantized ones as ws.expanded holds, expanded there first.
  const int chunk = ffns.is_quantized() ? expand_chunk_ : E;
  cuda::ExpandSlots expand;
  int group = 0, chunk_groups = 0;
  int64_t chunk_rows_begin = 0;
  for (int e = 0; e < E; ++e) {
    if (offsets[e + 1] == offsets[e]) continue;
    if (chunk_groups == 0) chunk_rows_begin = offsets[e];
    if (ffns.is_quantized()) expand.slot[chunk_groups] = ffns.slot_of[e];
    ++chunk_groups;
    ++group;
    if (chunk_groups < chunk && group < ws.first_groups.count()) continue;
    if (ffns.is_quantized()) {
      expand.count = chunk_groups;
      cuda::LaunchExpandQuantized(ffns.quant, ffns.quantized.get(), expand, storage_, ws.expanded, ws.stream);
    }
    RETURN_IF_ERROR(RunExpertChunk(ffns, group - chunk_groups, chunk_groups, chunk_rows_begin, offsets[e + 1], ws));
    chunk_groups = 0;
  }
  if (ffns.down_bias.get()) {
    cuda::LaunchAddRowBias(ws.expert_out, rows, d, ffns.down_bias.as<float>(), ws.row_slot, ws.stream);
  }
  return absl::OkStatus();
}

void CudaExecutor::AddExpertGroups(const DeviceFfns& ffns, const int64_t* offsets, cuda::CudaWorkspace& ws) const {
  const int E = spec_.router.num_experts, d = spec_.hidden_size;
  const size_t value = cuda::StorageBytes(storage_);
  ws.first_groups.Clear();
  ws.down_groups.Clear();
  for (int e = 0; e < E; ++e) {
    const int64_t count = offsets[e + 1] - offsets[e];
    if (count == 0) continue;
    // A quantized expert is where LaunchExpandQuantized puts it: its place
    // in its chunk.
    const char* first = ffns.is_quantized() ? static_cast<const char*>(ws.expanded) +
                                                  (ws.first_groups.count() % expand_chunk_) * ffns.ExpandedBytes()
                                            : ffns.FirstOf(ffns.slot_of[e]);
    const char* down =
        ffns.is_quantized() ? first + static_cast<size_t>(ffns.width) * d * value : ffns.DownOf(ffns.slot_of[e]);
    // First product: h[rows, width] = rows[rows, d] W1^T; then out = act W2^T.
    ws.first_groups.Add(ffns.width, count, d, first, static_cast<const char*>(ws.rows) + offsets[e] * d * value,
                        ws.expert_h + offsets[e] * ffns.width);
    ws.down_groups.Add(d, count, ffns.inner, down, static_cast<const char*>(ws.act) + offsets[e] * ffns.inner * value,
                       ws.expert_out + offsets[e] * d);
  }
}

absl::Status CudaExecutor::RunExpertChunk(const DeviceFfns& ffns, int first_group, int groups, int64_t rows_begin,
                                          int64_t rows_end, cuda::CudaWorkspace& ws) const {
  const size_t value = cuda::StorageBytes(storage_);
  RETURN_IF_ERROR(GroupedGemm(ws.first_groups, first_group, groups, ws));
  cuda::LaunchActivate(ws.expert_h + rows_begin * ffns.width, rows_end - rows_begin, ffns.inner, ActivationOf(spec_),
                       ffns.first_bias.as<float>(), ws.row_slot + rows_begin, storage_,
                       static_cast<char*>(ws.act) + rows_begin * ffns.inner * value, ws.stream);
  return GroupedGemm(ws.down_groups, first_group, groups, ws);
}

absl::Status CudaExecutor::GroupedGemm(const cuda::GemmGroups& groups, int begin, int count,
                                       cuda::CudaWorkspace& ws) const {
  const cudaDataType_t type = CudaType(storage_);
  if (grouped_) {
    MOE_CUBLAS_RETURN_IF_ERROR(
        cublasGemmGroupedBatchedEx(
            ws.blas, groups.trans_a.data() + begin, groups.trans_b.data() + begin, groups.m.data() + begin,
            groups.n.data() + begin, groups.k.data() + begin, groups.alpha.data() + begin, groups.a_device() + begin,
            type, groups.k.data() + begin, groups.b_device() + begin, type, groups.k.data() + begin,
            groups.beta.data() + begin, groups.c_device() + begin, CUDA_R_32F, groups.m.data() + begin, count,
            groups.group_size.data() + begin, CUBLAS_COMPUTE_32F),
        "grouped expert product");
    return absl::OkStatus();
  }
  for (int g = begin; g < begin + count; ++g) {
    RETURN_IF_ERROR(DenseGemm(ws.blas, groups.m[g], groups.n[g], groups.k[g], groups.a_host()[g], storage_,
                              groups.b_host()[g], static_cast<float*>(groups.c_host()[g])));
  }
  return absl::OkStatus();
}

void CudaExecutor::RunDecode(const DeviceLayer& layer, cuda::CudaWorkspace& ws) const {
  const DeviceFfns& ffns = layer.experts;
  const cuda::DecodeFfn ffn{.first = ffns.is_quantized() ? ffns.quantized.get() : ffns.first.get(),
                            .first_bias = ffns.first_bias.as<float>(),
                            .down = ffns.down.get(),
                            .down_bias = ffns.down_bias.as<float>(),
                            .slot_of = ffns.slot_of_device.as<int32_t>(),
                            .hidden = spec_.hidden_size,
                            .inner = ffns.inner,
                            .activation = ActivationOf(spec_),
                            .storage = storage_,
                            .input_scale = spec_.routing_weights_scale_input ? ws.weights : nullptr,
                            .round_scale = compute_ == DType::kBF16,
                            .quant = ffns.quant};
  const int selections = ws.num_tokens * ws.shape.slots;
  cuda::LaunchDecodeFirst(ffn, ws.normed, ws.expert, ws.dispatch.slot_row, selections, ws.shape.slots, ws.act,
                          ws.stream);
  cuda::LaunchDecodeDown(ffn, ws.act, ws.expert, ws.dispatch.slot_row, selections, ws.expert_out, ws.stream);
}

void CudaExecutor::Combine(const LayerStep& step, cuda::CudaWorkspace& ws) const {
  const int tasks = step.all_tasks ? spec_.router.num_tasks : 1;
  const int T = ws.num_tokens, S = ws.shape.slots, d = spec_.hidden_size;
  const float* residual = spec_.residual ? ws.hidden() : nullptr;
  const float* shared = layers_[step.layer].shared ? ws.shared_out : nullptr;
  for (int task = tasks - 1; task >= 0; --task) {
    float* out = task == 0 ? ws.next() : ws.task_out[task];
    // Experts whose input the weights scaled are summed unweighted.
    const float* weights = spec_.routing_weights_scale_input ? nullptr : ws.weights + static_cast<size_t>(task) * T * S;
    cuda::LaunchCombine(T, S, d, ws.dispatch.slot_row, weights, ws.expert_out, residual, shared, out, ws.stream);
  }
  ws.SwapActivations();
  ws.tasks_ready = tasks;
}

absl::Status CudaExecutor::RunGraph(cuda::CudaWorkspace& ws) const {
  const auto run_layers = [this, &ws]() -> absl::Status {
    for (size_t i = 0; i < ws.steps.size(); ++i) RETURN_IF_ERROR(RunLayer(ws.steps[i], static_cast<int>(i), ws));
    return absl::OkStatus();
  };
  cudaGraphExec_t* graph = ws.FindGraph();
  if (!graph) {
    // A shape's first batch runs as it is: kernels load, cuBLAS sets itself
    // up and the device sizes its local memory outside any capture. (A
    // workspace that holds as many shapes as it may runs the others so.)
    ws.RememberShape();
    return run_layers();
  }
  if (!*graph) RETURN_IF_ERROR(ws.CaptureGraph(run_layers, graph));
  ws.AfterGraph(static_cast<int>(ws.steps.size()));
  MOE_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.graph_start, ws.stream), "timing the batch");
  MOE_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(*graph, ws.stream), "launching the batch's graph");
  MOE_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.graph_stop, ws.stream), "timing the batch");
  ws.graph_ran = true;
  return absl::OkStatus();
}

absl::Status CudaExecutor::Finish(std::span<const MutableTensorRef> outputs, ExecutorWorkspace& workspace) const {
  auto& ws = static_cast<cuda::CudaWorkspace&>(workspace);
  MOE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_), "selecting the CUDA device");
  if (ws.in_graph) {
    // The tasks a graph's batch computes are those of its last step.
    ws.tasks_ready = ws.steps.empty() || !ws.steps.back().all_tasks ? 1 : spec_.router.num_tasks;
  }
  if (outputs.size() != static_cast<size_t>(ws.tasks_ready)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the batch has ", ws.tasks_ready, " outputs; ", outputs.size(), " were given"));
  }
  for (size_t task = 0; task < outputs.size(); ++task) {
    const MutableTensorRef& out = outputs[task];
    if (out.dtype != DType::kF32 || out.rows != ws.num_tokens || out.cols != spec_.hidden_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("output ", task, " must be fp32 [", ws.num_tokens, ", ", spec_.hidden_size, "]"));
    }
  }
  if (ws.in_graph) RETURN_IF_ERROR(RunGraph(ws));
  RETURN_IF_ERROR(CopyResults(outputs, ws));
  FillRecords(ws);
  return absl::OkStatus();
}

absl::Status CudaExecutor::CopyResults(std::span<const MutableTensorRef> outputs, cuda::CudaWorkspace& ws) const {
  const size_t bytes = static_cast<size_t>(ws.num_tokens) * spec_.hidden_size * sizeof(float);
  for (size_t task = 0; task < outputs.size(); ++task) {
    const float* source = task == 0 ? ws.hidden() : ws.task_out[task];
    const cudaMemcpyKind kind =
        outputs[task].device == Device::kCuda ? cudaMemcpyDeviceToDevice : cudaMemcpyDeviceToHost;
    MOE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(outputs[task].data, source, bytes, kind, ws.stream), "copying outputs");
  }
  MOE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(ws.stream), "running the batch");
  ws.CopyRouting();
  return absl::OkStatus();
}

void CudaExecutor::FillRecords(cuda::CudaWorkspace& ws) const {
  const int E = spec_.router.num_experts;
  float graph_ms = 0;
  if (ws.graph_ran) cudaEventElapsedTime(&graph_ms, ws.graph_start, ws.graph_stop);
  for (size_t i = 0; i < ws.steps.size(); ++i) {
    LayerRecord& record = ws.Record(static_cast<int>(i));
    const int64_t* counts = ws.counts_of(static_cast<int>(i));
    float ms = 0;
    if (ws.graph_ran) {
      ms = graph_ms / static_cast<float>(ws.steps.size());  // a graph is timed as a whole: an even share
    } else {
      cudaEventElapsedTime(&ms, ws.expert_start[i], ws.expert_stop[i]);
    }
    record.experts_seconds = ms / 1000.0;
    const int64_t kept = counts[E];
    for (int e = 0; e < E; ++e) {
      record.tokens_routed[e] = counts[E + 1 + e];
      record.tokens_dropped[e] = counts[2 * E + 1 + e];
      const int64_t rows = counts[e + 1] - counts[e];
      record.expert_seconds[e] = kept > 0 ? record.experts_seconds * static_cast<double>(rows) / kept : 0.0;
    }
  }
}

absl::Status CudaExecutor::RunExperts(const ExpertRows& rows, ExecutorWorkspace& workspace) const {
  auto& ws = static_cast<cuda::CudaWorkspace&>(workspace);
  const DispatchPlan& plan = *rows.plan;
  if (rows.layer < 0 || rows.layer >= static_cast<int>(layers_.size()) ||
      plan.num_experts != spec_.router.num_experts) {
    return absl::InvalidArgumentError(absl::StrCat("no layer ", rows.layer, " of ", plan.num_experts, " experts"));
  }
  if (rows.num_tokens < 1 || rows.num_tokens > ws.max_tokens() ||
      plan.num_rows() > static_cast<int64_t>(ws.max_tokens()) * ws.shape.slots) {
    return absl::InvalidArgumentError(absl::StrCat("", rows.num_tokens, " tokens and ", plan.num_rows(),
                                                   " rows; the workspace is planned for ", ws.max_tokens(), " tokens"));
  }
  const DeviceLayer& layer = layers_[rows.layer];
  if (rows.shared_out && !layer.shared) {
    return absl::FailedPreconditionError(absl::StrCat("layer ", rows.layer, " has no shared experts"));
  }
  RETURN_IF_ERROR(CheckHeld(layer, rows.layer, plan.offsets.data()));
  MOE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_), "selecting the CUDA device");
  const int d = spec_.hidden_size;
  MOE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ws.normed, rows.tokens, static_cast<size_t>(rows.num_tokens) * d * 4,
                                           cudaMemcpyHostToDevice, ws.stream),
                           "copying the tokens");
  RETURN_IF_ERROR(ws.UploadPlan(plan));
  MOE_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.run_start, ws.stream), "timing the experts");
  if (rows.shared_out) RETURN_IF_ERROR(RunShared(layer, rows.num_tokens, /*gated=*/false, ws));
  RETURN_IF_ERROR(RunGrouped(layer, plan.offsets.data(), /*scale_inputs=*/false, ws));
  if (rows.shared_out) {
    MOE_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.shared_done, ws.side), "shared experts");
    MOE_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(ws.stream, ws.shared_done, 0), "shared experts");
  }
  MOE_CUDA_RETURN_IF_ERROR(cudaEventRecord(ws.run_stop, ws.stream), "timing the experts");
  MOE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(rows.expert_out, ws.expert_out, plan.num_rows() * d * sizeof(float),
                                           cudaMemcpyDeviceToHost, ws.stream),
                           "copying the expert rows");
  if (rows.shared_out) {
    MOE_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(rows.shared_out, ws.shared_out, static_cast<size_t>(rows.num_tokens) * d * sizeof(float),
                        cudaMemcpyDeviceToHost, ws.stream),
        "copying the shared rows");
  }
  MOE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(ws.stream), "running the experts");
  if (rows.expert_seconds) {
    float ms = 0;
    cudaEventElapsedTime(&ms, ws.run_start, ws.run_stop);
    const int64_t total = plan.num_rows();
    for (int e = 0; e < plan.num_experts; ++e) {
      rows.expert_seconds[e] = total > 0 ? ms / 1000.0 * static_cast<double>(plan.rows_of(e)) / total : 0.0;
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<int> CudaDeviceCount() {
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) {
    cudaGetLastError();  // clear it: the runtime keeps the first error sticky for this thread
    return absl::UnavailableError(
        absl::StrCat("no CUDA device: ", cudaGetErrorName(error), " (", cudaGetErrorString(error), ")"));
  }
  if (count == 0) return absl::UnavailableError("no CUDA device: the driver reports none");
  return count;
}

absl::StatusOr<std::string> CudaDeviceName(int index) {
  cudaDeviceProp properties{};
  MOE_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&properties, index), absl::StrCat("CUDA device ", index));
  return absl::StrCat(properties.name, " (sm_", properties.major, properties.minor, ", ",
                      properties.totalGlobalMem >> 30, " GiB)");
}

absl::StatusOr<std::unique_ptr<LayerExecutor>> CreateCudaExecutor(const ModelDefinition& model,
                                                                  const ExecutorOptions& options) {
  return CudaExecutor::Create(model, options);
}

}  // namespace moe
