// MoeModel: a stack of MoE layers ready to run. Each layer computes
//   n = pre_norm ? RMSNorm(h) : h
//   y = (residual ? h : 0) + sum_k w_k * expert_k(n) + [gate(n) *] shared(n)
// with routing from n; a request runs every layer in order, or one named layer.
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
#include "engine/api/dispatch.h"
#include "engine/api/expert_backend.h"
#include "engine/api/model_spec.h"
#include "engine/api/observer.h"
#include "engine/api/router.h"

namespace moe {

class MoeModel {
 public:
  struct Options {
    // Compute in fp32 whatever the checkpoint dtype (default: bf16 and fp16
    // checkpoints compute in bf16 with fp32 accumulation, fp32 ones in fp32).
    bool force_fp32 = false;
    // Receives per-layer, per-expert counts and timings. Not owned; may be null.
    EngineObserver* observer = nullptr;
    // The CPU kernels' path for the router and the experts
    // (engine/cpu_path.h; default kAuto: MOE_CPU_PATH if set, else the widest
    // this CPU runs). Create fails when this CPU does not run it.
    CpuPath cpu_path = CpuPath::kAuto;
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

  // Per-caller buffers, reused across calls; opaque to callers.
  class Workspace {
   private:
    friend class MoeModel;
    std::vector<float> hidden;      // [T, d] current activations
    std::vector<float> normed;      // [T, d]
    std::vector<float> logits;      // [T, columns]
    std::vector<float> expert_out;  // [rows, d]
    std::vector<float> shared_out;  // [T, d]
    std::vector<std::vector<float>> task_out;
    std::vector<uint32_t> router_scratch;
    std::vector<double> expert_seconds;
    Routing routing;
    DispatchPlan plan;
    std::unique_ptr<ExpertBackend::Scratch> backend_scratch;
    RunResult* result = nullptr;
    bool return_routing = false;
    int layer_position = 0;  // index of the layer among those run
  };

  // Validates `model` and packs its weights; the definition (and any file
  // mapping it borrows from) may be released afterwards. A model too large
  // for memory is RESOURCE_EXHAUSTED (no exception leaves Create).
  static absl::StatusOr<std::unique_ptr<MoeModel>> Create(const ModelDefinition& model, const Options& options);
  ~MoeModel();

  std::unique_ptr<Workspace> NewWorkspace() const;

  // Runs `num_tokens` fp32 rows of width hidden_size.
  absl::Status Run(const float* input, int num_tokens, const RunOptions& options, Workspace* workspace,
                   RunResult* result) const;

  const ModelSpec& spec() const { return spec_; }
  int num_layers() const { return static_cast<int>(layer_names_.size()); }
  int num_outputs() const { return spec_.router.num_tasks; }
  int routing_slots() const;
  DType compute_dtype() const { return compute_; }
  const std::vector<std::string>& layer_names() const { return layer_names_; }
  const ExpertBackend& backend() const { return *backend_; }

 private:
  struct Layer;
  MoeModel();
  absl::Status RunLayer(int index, Workspace& ws, int num_tokens, bool last) const;

  ModelSpec spec_;
  DType compute_ = DType::kBF16;
  EngineObserver* observer_ = nullptr;
  std::vector<Layer> layers_;
  std::vector<std::string> layer_names_;
  std::unique_ptr<ExpertBackend> backend_;
};

}  // namespace moe

#endif  // MOE_ENGINE_API_MOE_MODEL_H_
