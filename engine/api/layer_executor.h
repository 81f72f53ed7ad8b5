// LayerExecutor: the seam between the model runner (engine/api/moe_model.h)
// and the hardware that runs MoE layers. An executor runs a whole layer,
// from the layer input to its output: RMSNorm, router, expert selection,
// dispatch, the experts, the shared experts and the combine, on its own
// device, so that a GPU keeps a batch on the device from the first layer to
// the last and a remote executor overlaps its calls with local work. The CPU
// executor (engine/cpu/cpu_executor.h) is the reference every other one is
// tested against (tests/engine/executor_conformance_test.cc).
//
// Lifecycle, as a kernel's: plan, then run.
//   1. The factory (engine/api/executor_factory.h) builds an executor from a
//      model's definition: weights packed, on the device, immutable after.
//   2. NewWorkspace(max_tokens) plans one caller's memory for batches of up
//      to max_tokens: every buffer is sized there, and a batch allocates
//      nothing.
//   3. A batch is Begin (the input), Enqueue per layer, Finish (the outputs).
//      Enqueue may return before the layer ran; Finish waits. Only after
//      Finish are the outputs, the routing and the layer records complete.
// An executor may hold only some of the routed experts (ExpertSet): a front
// end then routes the tokens itself, splits the plan by owner
// (engine/api/expert_set.h) and calls RunExperts on each owner's shard.
//
// Thread-safety: an executor is immutable after creation; its methods may be
// called concurrently, each caller with its own workspace. A workspace
// serves one batch at a time.
#ifndef MOE_ENGINE_API_LAYER_EXECUTOR_H_
#define MOE_ENGINE_API_LAYER_EXECUTOR_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/api/dispatch.h"
#include "engine/api/dtype.h"
#include "engine/api/expert_set.h"

namespace moe {

// Where a tensor's bytes live.
enum class Device { kHost, kCuda };
const char* DeviceName(Device device);

// A borrowed matrix [rows, cols] of `dtype`, row-major, on `device`.
struct TensorRef {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  Device device = Device::kHost;
  int64_t rows = 0, cols = 0;
};
struct MutableTensorRef {
  void* data = nullptr;
  DType dtype = DType::kF32;
  Device device = Device::kHost;
  int64_t rows = 0, cols = 0;
};

// What an executor can say about the time its experts took.
enum class ExpertTiming {
  // LayerRecord::expert_seconds holds each routed expert's share of the
  // layer's expert time (the CPU: core-seconds spent on it divided by the
  // threads that ran).
  kPerExpert,
  // Only the layer's expert time as a whole (LayerRecord::experts_seconds):
  // a grouped product or a remote call has no per-expert wall time, and
  // expert_seconds stays 0. Metrics then leave per-expert latency out.
  kLayerOnly,
};

// What one layer of a batch did, per routed expert. Sized at planning.
struct LayerRecord {
  int layer = 0;
  int num_tokens = 0;
  // [num_experts]: selections routed (kept + dropped) and dropped by
  // capacity; seconds as timing() says (0 for experts without rows).
  std::vector<int64_t> tokens_routed;
  std::vector<int64_t> tokens_dropped;
  std::vector<double> expert_seconds;
  // Wall seconds of the layer's experts (routed and shared) as a whole.
  double experts_seconds = 0;
};

// One caller's planned memory. Executors derive from it; callers hold it
// opaque and read only the records.
class ExecutorWorkspace {
 public:
  virtual ~ExecutorWorkspace() = default;
  // The largest batch this workspace was planned for.
  int max_tokens() const { return max_tokens_; }
  // One record per layer enqueued since Begin, in order; complete after Finish.
  std::span<const LayerRecord> records() const { return {records_.data(), static_cast<size_t>(records_used_)}; }

 protected:
  ExecutorWorkspace(int max_tokens, int num_layers, int num_experts);
  // Starts the records of a new batch.
  void ClearRecords() { records_used_ = 0; }
  // The next record, reset for `layer` (storage planned: no allocation).
  LayerRecord& NextRecord(int layer, int num_tokens);

 private:
  void Size(LayerRecord& record) const;

  int max_tokens_;
  int num_experts_;
  std::vector<LayerRecord> records_;  // one per model layer
  int records_used_ = 0;
};

// One layer to enqueue.
struct LayerStep {
  // 0-based among the model's MoE layers.
  int layer = 0;
  // Compute every task's output (a multi-gate model's last layer); otherwise
  // only task 0's, which becomes the next layer's input.
  bool all_tasks = false;
  // When not null, the routing of token t goes to expert_ids[t * row_stride
  // + s] and expert_weights[t * row_stride + s] for its slots s (-1 and 0
  // for unused slots and selections dropped by capacity; task 0's weights).
  // Borrowed, host memory; written by the time Finish returns.
  int32_t* expert_ids = nullptr;
  float* expert_weights = nullptr;
  int64_t row_stride = 0;
};

// Rows a front end routed and grouped by expert, for the experts alone.
struct ExpertRows {
  int layer = 0;
  // The layer's normalised input, host fp32 [num_tokens, hidden]. Borrowed.
  const float* tokens = nullptr;
  int num_tokens = 0;
  // Rows grouped by expert (a whole plan or one owner's shard). Borrowed.
  const DispatchPlan* plan = nullptr;
  // Output, host fp32 [plan->num_rows(), hidden]: row r holds the output of
  // the expert owning r for token plan->row_token[r].
  float* expert_out = nullptr;
  // If not null, [num_experts] seconds per expert as timing() says (written).
  double* expert_seconds = nullptr;
  // If not null, the layer's shared experts applied to every token, host
  // fp32 [num_tokens, hidden], ungated; the layer must have them.
  float* shared_out = nullptr;
};

class LayerExecutor {
 public:
  virtual ~LayerExecutor() = default;

  // E.g. "cpu avx2 kernels, bf16 compute".
  virtual std::string Describe() const = 0;
  // kBF16 (bf16 products, fp32 accumulation) or kF32.
  virtual DType compute_dtype() const = 0;
  // Bytes of expert weights held.
  virtual size_t WeightBytes() const = 0;
  // The routed experts it holds and runs itself.
  virtual const ExpertSet& held() const = 0;
  // Whether a whole layer can run whatever it selects: every expert is held,
  // or hosted where the executor sends what it does not hold.
  virtual bool RunsEveryExpert() const = 0;
  virtual ExpertTiming timing() const = 0;

  // Plans a workspace for batches of 1 to max_tokens tokens.
  // RESOURCE_EXHAUSTED when its memory cannot be had.
  virtual absl::StatusOr<std::unique_ptr<ExecutorWorkspace>> NewWorkspace(int max_tokens) const = 0;

  // Starts a batch: `input` [tokens, hidden] becomes the activations.
  // INVALID_ARGUMENT for a dtype, device or shape the executor does not
  // take, or more tokens than the workspace was planned for.
  virtual absl::Status Begin(const TensorRef& input, ExecutorWorkspace& workspace) const = 0;
  // Enqueues one whole layer on the activations; layers run in the order
  // enqueued. FAILED_PRECONDITION when the batch selects an expert neither
  // held nor hosted elsewhere; UNAVAILABLE, naming the layer and expert,
  // when no host of an offloaded expert could run it.
  virtual absl::Status Enqueue(const LayerStep& step, ExecutorWorkspace& workspace) const = 0;
  // Waits for the batch and writes its outputs: outputs[task] [tokens,
  // hidden] for each task of the last layer enqueued (one unless that layer
  // computed all tasks). An error of an enqueued layer is returned here.
  virtual absl::Status Finish(std::span<const MutableTensorRef> outputs, ExecutorWorkspace& workspace) const = 0;

  // The experts alone, synchronously: every expert with rows in rows.plan
  // (FAILED_PRECONDITION when one is not held), and the shared experts when
  // rows.shared_out is set. Does not touch the workspace's batch.
  virtual absl::Status RunExperts(const ExpertRows& rows, ExecutorWorkspace& workspace) const = 0;
};

}  // namespace moe

#endif  // MOE_ENGINE_API_LAYER_EXECUTOR_H_
