// One caller's planned memory on the CUDA executor (engine/cuda/cuda_executor.h):
// every device and pinned buffer, the two streams (routed experts, shared
// experts), their cuBLAS handles and workspaces, the events, the host
// routing scratch and the batch's CUDA graphs, all made in Create for
// batches of up to max_tokens tokens. Private to engine/cuda/.
//
// Thread-safety: serves one batch at a time, on the device it was made on.
#ifndef MOE_ENGINE_CUDA_WORKSPACE_H_
#define MOE_ENGINE_CUDA_WORKSPACE_H_

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/api/dispatch.h"
#include "engine/api/layer_executor.h"
#include "engine/api/router.h"
#include "engine/cuda/device_memory.h"
#include "engine/cuda/kernels.h"

namespace moe::cuda {

struct WorkspaceShape {
  int max_tokens = 0;
  int num_layers = 0;
  int hidden = 0;
  int inner = 0;
  int shared_inner = 0;        // 0: no shared experts
  int first_width = 0;         // products of an expert's first half per row
  int shared_first_width = 0;  // the shared experts'
  int num_experts = 0;
  int slots = 0;  // routing slots per token
  // Rows (kept selections) a batch can have: max_tokens * slots, less for
  // expert-choice routing, whose experts take a bounded number of tokens.
  int64_t max_rows = 0;
  int tasks = 1;
  int logit_columns = 0;
  Storage storage = Storage::kBF16;
  // Bytes of quantized experts expanded at a time for the grouped path
  // ([DEVICE_QUANT_LAYOUT]); 0 for a model without them.
  size_t expanded_bytes = 0;
};

// The arrays of one cublasGemmGroupedBatchedEx call: one group per expert
// with rows (group size 1), C[g] (fp32, [n, m] row-major) = B[g] (n rows of
// k) times A[g]^T (m rows of k). The pointer arrays live in pinned memory
// and are copied to the device for the call. Sized for E groups at creation.
class GemmGroups {
 public:
  static absl::StatusOr<GemmGroups> Create(int max_groups);
  void Clear() { count_ = 0; }
  void Add(int m, int64_t n, int k, const void* a, const void* b, void* c);
  int count() const { return count_; }
  // Copies the pointer arrays to the device, on `stream`.
  absl::Status UploadPointers(cudaStream_t stream);

  const void* const* a_host() const { return host_.as<const void*>(); }
  const void* const* b_host() const { return host_.as<const void*>() + max_groups_; }
  void* const* c_host() const { return host_.as<void*>() + 2 * max_groups_; }
  const void* const* a_device() const { return device_.as<const void*>(); }
  const void* const* b_device() const { return device_.as<const void*>() + max_groups_; }
  void* const* c_device() const { return device_.as<void*>() + 2 * max_groups_; }

  std::vector<cublasOperation_t> trans_a, trans_b;
  std::vector<int> m, n, k, group_size;
  std::vector<float> alpha, beta;

 private:
  int max_groups_ = 0;
  int count_ = 0;
  PinnedBuffer host_;    // [3][max_groups] pointers: A, B, C
  DeviceBuffer device_;  // the same, on the device
};

class CudaWorkspace : public ExecutorWorkspace {
 public:
  static absl::StatusOr<std::unique_ptr<CudaWorkspace>> Create(const WorkspaceShape& shape);
  ~CudaWorkspace() override;

  // Starts a batch of `tokens`; `graph`: its layers are recorded and run at
  // Finish in a CUDA graph.
  void StartBatch(int tokens, bool graph);
  // Records a step of the batch and returns its index. INVALID_ARGUMENT
  // past one step per model layer.
  absl::StatusOr<int> AddStep(const LayerStep& step);
  LayerRecord& Record(int step_index) { return *step_records_[step_index]; }

  // The activations: the layer's input, and where its output goes.
  float* hidden() const { return activations_[current_]; }
  float* next() const { return activations_[1 - current_]; }
  void SwapActivations() { current_ = 1 - current_; }
  // After a graph of `layers` layers ran: its output is where the last
  // layer left it.
  void AfterGraph(int layers) { current_ = layers % 2; }

  // Per step: offsets [E + 1], routed [E], dropped [E] (pinned host).
  int64_t* counts_of(int step_index) const;
  // Per step: the routing a LayerStep asked for (device, [T * slots]).
  int32_t* routing_ids_of(int step_index) const;
  float* routing_weights_of(int step_index) const;
  // Writes each step's routing to where its LayerStep asked (after a sync).
  void CopyRouting();
  // Uploads `routing` and `plan` (host routing) for step `step_index`.
  absl::Status UploadHostRouting(int step_index);
  // Uploads a front end's plan (RunExperts): row tokens and experts.
  absl::Status UploadPlan(const DispatchPlan& plan);

  // Where the graph of this batch's shape (tokens and steps) goes: null
  // for a shape not seen before, else its slot (null until captured).
  cudaGraphExec_t* FindGraph();
  // Records this batch's shape as seen (nothing when the workspace holds as
  // many as it may).
  void RememberShape();
  // Captures `enqueue` on `stream` into `slot` (FindGraph's).
  absl::Status CaptureGraph(const std::function<absl::Status()>& enqueue, cudaGraphExec_t* slot);

  const WorkspaceShape shape;
  int device = 0;
  int num_tokens = 0;
  int tasks_ready = 1;
  bool in_graph = false;   // this batch runs in a graph at Finish
  bool graph_ran = false;  // it did
  std::vector<LayerStep> steps;

  cudaStream_t stream = nullptr, side = nullptr;
  cublasHandle_t blas = nullptr, side_blas = nullptr;
  cudaEvent_t shared_ready = nullptr, shared_done = nullptr, graph_start = nullptr, graph_stop = nullptr;
  cudaEvent_t run_start = nullptr, run_stop = nullptr;  // RunExperts, apart from the batch's
  std::vector<cudaEvent_t> expert_start, expert_stop;   // per step

  // Device buffers (see Create for sizes).
  float* normed = nullptr;
  float* logits = nullptr;
  int32_t* expert = nullptr;
  float* weights = nullptr;
  int32_t* row_slot = nullptr;
  float* row_scale = nullptr;  // Llama 4's expert input scale per row
  void* rows = nullptr;
  float* expert_h = nullptr;
  void* act = nullptr;
  float* expert_out = nullptr;
  void* shared_in = nullptr;
  float* shared_h = nullptr;
  void* shared_act = nullptr;
  float* shared_out = nullptr;
  void* expanded = nullptr;      // quantized experts expanded to storage, a chunk at a time
  std::vector<float*> task_out;  // [tasks]; [0] unused
  DispatchBuffers dispatch;
  GemmGroups first_groups, down_groups;

  // Host routing (the families selected on the host).
  std::vector<float> host_logits;
  Routing routing;
  DispatchPlan plan;
  SelectionScratch selection;

 private:
  explicit CudaWorkspace(const WorkspaceShape& shape);
  absl::Status Allocate();
  template <typename T>
  absl::StatusOr<T*> Device(size_t count, const char* what);
  absl::Status MakeStreams();

  struct Graph {
    int tokens = 0;
    std::vector<LayerStep> steps;
    cudaGraphExec_t exec = nullptr;
  };

  float* activations_[2] = {nullptr, nullptr};
  int current_ = 0;
  std::vector<DeviceBuffer> buffers_;
  DeviceBuffer blas_workspace_[2];
  PinnedBuffer counts_;
  int32_t* routing_ids_ = nullptr;
  float* routing_weights_ = nullptr;
  std::vector<int32_t> host_ids_;
  std::vector<float> host_weights_;
  std::vector<int32_t> host_row_expert_;
  std::vector<LayerRecord*> step_records_;
  std::vector<Graph> graphs_;
};

}  // namespace moe::cuda

#endif  // MOE_ENGINE_CUDA_WORKSPACE_H_
