// MoeModel: a stack of MoE layers ready to run, on the LayerExecutor it was
// created with (engine/api/layer_executor.h). Each layer computes
//   n = pre_norm ? RMSNorm(h) : h
//   y = (residual ? h : 0) + sum_k w_k * expert_k(n) + [gate(n) *] shared(n)
// with routing from n; a request runs every layer in order, or one named layer.
// The model runs the layers and reports them to the observer; what a layer
// does, and where, is the executor's.
//
// Thread-safety: immutable after Create; Run may be called concurrently, each
// caller with its own Workspace. The observer, if any, must outlive the model.
#ifndef MOE_ENGINE_API_MOE_MODEL_H_
#define MOE_ENGINE_API_MOE_MODEL_H_

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/api/cpu_path.h"
#include "engine/api/layer_executor.h"
#include "engine/api/model_spec.h"
#include "engine/api/observer.h"

namespace moe {

class MoeModel {
 public:
  struct Options {
    // Compute in fp32 whatever the checkpoint dtype (default: bf16 and fp16
    // checkpoints compute in bf16 with fp32 accumulation, fp32 ones in fp32).
    bool force_fp32 = false;
    // Receives per-layer, per-expert counts and timings. Not owned; may be null.
    EngineObserver* observer = nullptr;
    // The executor kind to run on (engine/api/executor_factory.h; default "cpu").
    std::string executor = "cpu";
    // The CPU executor's kernel path (engine/api/cpu_path.h; default kAuto:
    // MOE_CPU_PATH if set, else the widest this CPU runs). Create fails when
    // this CPU does not run it.
    CpuPath cpu_path = CpuPath::kAuto;
    // Device executors: which device (default 0).
    int device_index = 0;
  };

  struct RunOptions {
    // Run only this MoE layer (0-based among the model's MoE layers); all if unset.
    std::optional<int> layer{};
    // Fill RunResult::expert_ids / expert_weights.
    bool return_routing = false;
  };

  struct RunResult {
    // One fp32 [T, hidden] output per task (one for all but multi-gate models).
    std::vector<std::vector<float>> outputs;
    // [T, layers run, slots] when requested: expert ids (-1 = unused slot or
    // dropped by capacity) and their weights (task 0).
    std::vector<int32_t> expert_ids;
    std::vector<float> expert_weights;
    int layers_run = 0;
  };

  // One caller's memory for batches of up to max_tokens(); opaque to callers.
  class Workspace {
   public:
    int max_tokens() const { return executor->max_tokens(); }

   private:
    friend class MoeModel;
    std::unique_ptr<ExecutorWorkspace> executor;
    std::vector<MutableTensorRef> outputs;
  };

  // The compute dtype Options and the checkpoint imply.
  static DType ComputeDType(const ModelSpec& spec, const Options& options);

  // Validates `model` and builds its executor with the factory (from
  // options.executor, cpu_path, device_index and ComputeDType). The definition
  // (and any file mapping it borrows from) may be released afterwards. A
  // model too large for memory is RESOURCE_EXHAUSTED.
  static absl::StatusOr<std::unique_ptr<MoeModel>> Create(const ModelDefinition& model, const Options& options);
  // The same on a given executor, built from `model` and holding every
  // expert; options.executor, cpu_path and device_index are not read.
  static absl::StatusOr<std::unique_ptr<MoeModel>> Create(const ModelDefinition& model,
                                                          std::unique_ptr<LayerExecutor> executor,
                                                          const Options& options);
  ~MoeModel();

  // Plans a workspace for batches of 1 to max_tokens tokens (nothing is
  // allocated per batch after this). RESOURCE_EXHAUSTED when memory is short.
  absl::StatusOr<std::unique_ptr<Workspace>> NewWorkspace(int max_tokens) const;

  // Runs `num_tokens` fp32 rows of width hidden_size (at most the
  // workspace's max_tokens()).
  absl::Status Run(const float* input, int num_tokens, const RunOptions& options, Workspace* workspace,
                   RunResult* result) const;

  const ModelSpec& spec() const { return spec_; }
  int num_layers() const { return static_cast<int>(layer_names_.size()); }
  int num_outputs() const { return spec_.router.num_tasks; }
  int routing_slots() const;
  DType compute_dtype() const { return executor_->compute_dtype(); }
  const std::vector<std::string>& layer_names() const { return layer_names_; }
  const LayerExecutor& executor() const { return *executor_; }

 private:
  MoeModel() = default;
  void Report(const ExecutorWorkspace& workspace) const;

  ModelSpec spec_;
  EngineObserver* observer_ = nullptr;
  std::vector<std::string> layer_names_;
  std::unique_ptr<LayerExecutor> executor_;
};

}  // namespace moe

#endif  // MOE_ENGINE_API_MOE_MODEL_H_
