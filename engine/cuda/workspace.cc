#include "engine/cuda/workspace.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/api/status_macros.h"

namespace moe::cuda {
namespace {

// cuBLAS's own scratch per handle, given to it so that it never allocates
// while a batch runs (or is captured).
constexpr size_t kBlasWorkspaceBytes = size_t{32} << 20;

// Decode batch shapes (token count and layer sequence) a workspace keeps a
// graph for; batches of other shapes run their layers directly.
constexpr size_t kMaxGraphs = 64;

bool SameSteps(const std::vector<LayerStep>& a, const std::vector<LayerStep>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].layer != b[i].layer || a[i].all_tasks != b[i].all_tasks ||
        (a[i].expert_ids != nullptr) != (b[i].expert_ids != nullptr)) {
      return false;
    }
  }
  return true;
}

}  // namespace

absl::StatusOr<GemmGroups> GemmGroups::Create(int max_groups) {
  GemmGroups groups;
  groups.max_groups_ = max_groups;
  groups.trans_a.assign(max_groups, CUBLAS_OP_T);
  groups.trans_b.assign(max_groups, CUBLAS_OP_N);
  groups.m.resize(max_groups);
  groups.n.resize(max_groups);
  groups.k.resize(max_groups);
  groups.group_size.assign(max_groups, 1);
  groups.alpha.assign(max_groups, 1.0f);
  groups.beta.assign(max_groups, 0.0f);
  const size_t bytes = 3 * static_cast<size_t>(max_groups) * sizeof(void*);
  ASSIGN_OR_RETURN(groups.host_, PinnedBuffer::Allocate(bytes, "grouped product pointers"));
  ASSIGN_OR_RETURN(groups.device_, DeviceBuffer::Allocate(bytes, "grouped product pointers"));
  return groups;
}

void GemmGroups::Add(int m_rows, int64_t n_rows, int k_depth, const void* a, const void* b, void* c) {
  const int g = count_++;
  m[g] = m_rows;
  n[g] = static_cast<int>(n_rows);
  k[g] = k_depth;
  host_.as<const void*>()[g] = a;
  host_.as<const void*>()[max_groups_ + g] = b;
  host_.as<void*>()[2 * max_groups_ + g] = c;
}

absl::Status GemmGroups::UploadPointers(cudaStream_t stream) {
  MOE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(device_.get(), host_.as<void*>(), host_.bytes(), cudaMemcpyHostToDevice, stream),
      "grouped product pointers");
  return absl::OkStatus();
}

CudaWorkspace::CudaWorkspace(const WorkspaceShape& shape)
    : ExecutorWorkspace(shape.max_tokens, shape.num_layers, shape.num_experts), shape(shape) {}

absl::StatusOr<std::unique_ptr<CudaWorkspace>> CudaWorkspace::Create(const WorkspaceShape& shape) {
  auto ws = std::unique_ptr<CudaWorkspace>(new CudaWorkspace(shape));
  MOE_CUDA_RETURN_IF_ERROR(cudaGetDevice(&ws->device), "the CUDA device");
  RETURN_IF_ERROR(ws->MakeStreams());
  RETURN_IF_ERROR(ws->Allocate());
  return ws;
}

CudaWorkspace::~CudaWorkspace() {
  cudaSetDevice(device);
  if (stream) cudaStreamSynchronize(stream);
  if (side) cudaStreamSynchronize(side);
  for (Graph& graph : graphs_) {
    if (graph.exec) cudaGraphExecDestroy(graph.exec);
  }
  for (cublasHandle_t handle : {blas, side_blas}) {
    if (handle) cublasDestroy(handle);
  }
  for (cudaEvent_t event : {shared_ready, shared_done, graph_start, graph_stop, run_start, run_stop}) {
    if (event) cudaEventDestroy(event);
  }
  for (cudaEvent_t event : expert_start) cudaEventDestroy(event);
  for (cudaEvent_t event : expert_stop) cudaEventDestroy(event);
  if (stream) cudaStreamDestroy(stream);
  if (side) cudaStreamDestroy(side);
}

absl::Status CudaWorkspace::MakeStreams() {
  MOE_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
  MOE_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking), "stream");
  for (cudaEvent_t* event : {&shared_ready, &shared_done}) {
    MOE_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(event, cudaEventDisableTiming), "event");
  }
  for (cudaEvent_t* event : {&graph_start, &graph_stop, &run_start, &run_stop}) {
    MOE_CUDA_RETURN_IF_ERROR(cudaEventCreate(event), "event");
  }
  expert_start.resize(shape.num_layers);
  expert_stop.resize(shape.num_layers);
  for (int i = 0; i < shape.num_layers; ++i) {
    MOE_CUDA_RETURN_IF_ERROR(cudaEventCreate(&expert_start[i]), "event");
    MOE_CUDA_RETURN_IF_ERROR(cudaEventCreate(&expert_stop[i]), "event");
  }
  cublasHandle_t* handles[] = {&blas, &side_blas};
  cudaStream_t streams[] = {stream, side};
  for (int i = 0; i < 2; ++i) {
    MOE_CUBLAS_RETURN_IF_ERROR(cublasCreate(handles[i]), "cuBLAS handle");
    MOE_CUBLAS_RETURN_IF_ERROR(cublasSetStream(*handles[i], streams[i]), "cuBLAS stream");
    ASSIGN_OR_RETURN(blas_workspace_[i], DeviceBuffer::Allocate(kBlasWorkspaceBytes, "cuBLAS workspace"));
    MOE_CUBLAS_RETURN_IF_ERROR(cublasSetWorkspace(*handles[i], blas_workspace_[i].get(), kBlasWorkspaceBytes),
                               "cuBLAS workspace");
  }
  return absl::OkStatus();
}

template <typename T>
absl::StatusOr<T*> CudaWorkspace::Device(size_t count, const char* what) {
  ASSIGN_OR_RETURN(DeviceBuffer buffer, DeviceBuffer::Allocate(std::max<size_t>(count, 1) * sizeof(T), what));
  T* data = buffer.as<T>();
  buffers_.push_back(std::move(buffer));
  return data;
}

absl::Status CudaWorkspace::Allocate() {
  const size_t T = shape.max_tokens, d = shape.hidden, E = shape.num_experts;
  const size_t selections = T * shape.slots;
  const size_t value = StorageBytes(shape.storage);
  const size_t width = shape.first_width;
  const size_t shared_width = shape.shared_first_width;
  for (float*& activations : activations_) {
    ASSIGN_OR_RETURN(activations, Device<float>(T * d, "activations"));
  }
  ASSIGN_OR_RETURN(normed, Device<float>(T * d, "activations"));
  ASSIGN_OR_RETURN(logits, Device<float>(T * shape.logit_columns, "router logits"));
  ASSIGN_OR_RETURN(expert, Device<int32_t>(selections, "routing"));
  ASSIGN_OR_RETURN(weights, Device<float>(selections * shape.tasks, "routing"));
  const size_t max_rows = static_cast<size_t>(shape.max_rows);
  ASSIGN_OR_RETURN(row_slot, Device<int32_t>(max_rows, "routing"));
  ASSIGN_OR_RETURN(row_scale, Device<float>(max_rows, "routing"));
  ASSIGN_OR_RETURN(rows, Device<char>(max_rows * d * value, "expert rows"));
  ASSIGN_OR_RETURN(expert_h, Device<float>(max_rows * width, "expert products"));
  ASSIGN_OR_RETURN(act, Device<char>(max_rows * shape.inner * value, "expert activations"));
  ASSIGN_OR_RETURN(expert_out, Device<float>(max_rows * d, "expert outputs"));
  if (shape.shared_inner > 0) {
    ASSIGN_OR_RETURN(shared_in, Device<char>(T * d * value, "shared expert rows"));
    ASSIGN_OR_RETURN(shared_h, Device<float>(T * shared_width, "shared expert products"));
    ASSIGN_OR_RETURN(shared_act, Device<char>(T * shape.shared_inner * value, "shared expert activations"));
    ASSIGN_OR_RETURN(shared_out, Device<float>(T * d, "shared expert outputs"));
  }
  if (shape.expanded_bytes > 0) {
    ASSIGN_OR_RETURN(expanded, Device<char>(shape.expanded_bytes, "expanding quantized experts"));
  }
  task_out.assign(shape.tasks, nullptr);
  for (int task = 1; task < shape.tasks; ++task) {
    ASSIGN_OR_RETURN(task_out[task], Device<float>(T * d, "task outputs"));
  }
  ASSIGN_OR_RETURN(dispatch.counts, Device<int32_t>(DispatchCountWords(selections, shape.num_experts), "dispatch"));
  for (int32_t** buffer : {&dispatch.priority_rank, &dispatch.kept_key, &dispatch.kept_rank, &dispatch.slot_row,
                           &dispatch.row_token, &dispatch.row_expert}) {
    ASSIGN_OR_RETURN(*buffer, Device<int32_t>(selections, "dispatch"));
  }
  ASSIGN_OR_RETURN(dispatch.routed_total, Device<int32_t>(E, "dispatch"));
  ASSIGN_OR_RETURN(dispatch.kept_total, Device<int32_t>(E, "dispatch"));
  ASSIGN_OR_RETURN(dispatch.counts_out, Device<int64_t>(3 * E + 1, "dispatch"));
  ASSIGN_OR_RETURN(counts_, PinnedBuffer::Allocate(shape.num_layers * (3 * E + 1) * sizeof(int64_t), "counts"));
  ASSIGN_OR_RETURN(routing_ids_, Device<int32_t>(shape.num_layers * selections, "routing output"));
  ASSIGN_OR_RETURN(routing_weights_, Device<float>(shape.num_layers * selections, "routing output"));
  ASSIGN_OR_RETURN(first_groups, GemmGroups::Create(shape.num_experts));
  ASSIGN_OR_RETURN(down_groups, GemmGroups::Create(shape.num_experts));
  host_logits.resize(T * shape.logit_columns);
  host_ids_.resize(selections);
  host_weights_.resize(selections);
  host_row_expert_.resize(selections);
  routing.expert.reserve(selections);
  routing.weight.reserve(selections * shape.tasks);
  steps.reserve(shape.num_layers);
  step_records_.reserve(shape.num_layers);
  graphs_.reserve(kMaxGraphs);
  return absl::OkStatus();
}

void CudaWorkspace::StartBatch(int tokens, bool graph) {
  num_tokens = tokens;
  tasks_ready = 1;
  in_graph = graph;
  graph_ran = false;
  current_ = 0;
  steps.clear();
  step_records_.clear();
  ClearRecords();
}

absl::StatusOr<int> CudaWorkspace::AddStep(const LayerStep& step) {
  if (static_cast<int>(steps.size()) == shape.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("a batch runs at most ", shape.num_layers, " layers (one per model layer)"));
  }
  steps.push_back(step);
  step_records_.push_back(&NextRecord(step.layer, num_tokens));
  return static_cast<int>(steps.size()) - 1;
}

int64_t* CudaWorkspace::counts_of(int step_index) const {
  return counts_.as<int64_t>() + static_cast<size_t>(step_index) * (3 * shape.num_experts + 1);
}

int32_t* CudaWorkspace::routing_ids_of(int step_index) const {
  return routing_ids_ + static_cast<size_t>(step_index) * shape.max_tokens * shape.slots;
}

float* CudaWorkspace::routing_weights_of(int step_index) const {
  return routing_weights_ + static_cast<size_t>(step_index) * shape.max_tokens * shape.slots;
}

void CudaWorkspace::CopyRouting() {
  const size_t S = shape.slots;
  const size_t selections = static_cast<size_t>(num_tokens) * S;
  for (size_t i = 0; i < steps.size(); ++i) {
    const LayerStep& step = steps[i];
    if (!step.expert_ids) continue;
    cudaMemcpy(host_ids_.data(), routing_ids_of(static_cast<int>(i)), selections * sizeof(int32_t),
               cudaMemcpyDeviceToHost);
    cudaMemcpy(host_weights_.data(), routing_weights_of(static_cast<int>(i)), selections * sizeof(float),
               cudaMemcpyDeviceToHost);
    for (int t = 0; t < num_tokens; ++t) {
      for (size_t s = 0; s < S; ++s) {
        step.expert_ids[t * step.row_stride + s] = host_ids_[t * S + s];
        step.expert_weights[t * step.row_stride + s] = host_weights_[t * S + s];
      }
    }
  }
}

absl::Status CudaWorkspace::UploadHostRouting(int step_index) {
  const int E = shape.num_experts;
  int64_t* counts = counts_of(step_index);
  std::copy(plan.offsets.begin(), plan.offsets.end(), counts);
  std::copy(plan.tokens_routed.begin(), plan.tokens_routed.end(), counts + E + 1);
  std::copy(plan.tokens_dropped.begin(), plan.tokens_dropped.end(), counts + 2 * E + 1);
  const size_t selections = routing.expert.size();
  auto upload = [this](void* to, const void* from, size_t bytes) {
    return CudaStatus(cudaMemcpyAsync(to, from, bytes, cudaMemcpyHostToDevice, stream), "uploading the routing");
  };
  RETURN_IF_ERROR(upload(expert, routing.expert.data(), selections * sizeof(int32_t)));
  RETURN_IF_ERROR(upload(weights, routing.weight.data(), routing.weight.size() * sizeof(float)));
  RETURN_IF_ERROR(upload(dispatch.slot_row, plan.slot_row.data(), selections * sizeof(int32_t)));
  return UploadPlan(plan);
}

absl::Status CudaWorkspace::UploadPlan(const DispatchPlan& dispatch_plan) {
  const int64_t rows = dispatch_plan.num_rows();
  for (int e = 0; e < dispatch_plan.num_experts; ++e) {
    std::fill(host_row_expert_.begin() + dispatch_plan.offsets[e],
              host_row_expert_.begin() + dispatch_plan.offsets[e + 1], e);
  }
  MOE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dispatch.row_token, dispatch_plan.row_token.data(), rows * sizeof(int32_t),
                                           cudaMemcpyHostToDevice, stream),
                           "uploading the plan");
  MOE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dispatch.row_expert, host_row_expert_.data(), rows * sizeof(int32_t),
                                           cudaMemcpyHostToDevice, stream),
                           "uploading the plan");
  // The copies read pageable memory reused by the next layer: let them land.
  MOE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream), "uploading the plan");
  return absl::OkStatus();
}

cudaGraphExec_t* CudaWorkspace::FindGraph() {
  for (Graph& graph : graphs_) {
    if (graph.tokens == num_tokens && SameSteps(graph.steps, steps)) return &graph.exec;
  }
  return nullptr;
}

void CudaWorkspace::RememberShape() {
  if (graphs_.size() < kMaxGraphs) graphs_.push_back({.tokens = num_tokens, .steps = steps, .exec = nullptr});
}

absl::Status CudaWorkspace::CaptureGraph(const std::function<absl::Status()>& enqueue, cudaGraphExec_t* slot) {
  MOE_CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "capturing a graph");
  const absl::Status enqueued = enqueue();
  cudaGraph_t graph = nullptr;
  const cudaError_t ended = cudaStreamEndCapture(stream, &graph);
  if (!enqueued.ok()) {
    if (graph) cudaGraphDestroy(graph);
    return enqueued;
  }
  MOE_CUDA_RETURN_IF_ERROR(ended, "capturing a graph");
  const cudaError_t instantiated = cudaGraphInstantiate(slot, graph, 0);
  cudaGraphDestroy(graph);
  MOE_CUDA_RETURN_IF_ERROR(instantiated, "instantiating a graph");
  return absl::OkStatus();
}

}  // namespace moe::cuda
