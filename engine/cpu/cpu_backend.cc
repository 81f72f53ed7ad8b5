#include "engine/cpu/cpu_backend.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cpu/panel_ffn.h"
#include "engine/api/status_macros.h"

namespace moe {
namespace {

class PanelScratch : public ExpertBackend::Scratch {
 public:
  PanelFfnRunner runner;
  std::vector<PanelFfnTask> tasks;
  std::vector<int> task_expert;
  std::vector<double> task_seconds;
};

// Experts on the panel kernels: one PanelFfnRunner call per layer.
class PanelExpertBackend : public ExpertBackend {
 public:
  static absl::StatusOr<std::unique_ptr<ExpertBackend>> Create(const ModelDefinition& model,
                                                               const CpuBackendOptions& options) {
    auto backend = std::unique_ptr<PanelExpertBackend>(new PanelExpertBackend());
    backend->compute_ = options.compute;
    auto path = ResolveCpuPath(options.path, options.compute);
    if (!path.ok()) return path.status();
    backend->path_ = *path;
    const PanelFfn::Options ffn_options{
        .kind = model.spec.expert_kind, .activation = model.spec.activation, .compute = options.compute, .path = *path};
    for (const LayerWeights& layer : model.layers) {
      Layer packed;
      for (const FfnWeights& expert : layer.experts) {
        ASSIGN_OR_RETURN(auto ffn, PanelFfn::Create(expert, ffn_options));
        packed.experts.push_back(std::move(ffn));
      }
      if (layer.shared) {
        ASSIGN_OR_RETURN(packed.shared, PanelFfn::Create(*layer.shared, ffn_options));
      }
      backend->layers_.push_back(std::move(packed));
    }
    return std::unique_ptr<ExpertBackend>(std::move(backend));
  }

  std::unique_ptr<Scratch> NewScratch() const override { return std::make_unique<PanelScratch>(); }

  absl::Status RunExperts(const Batch& batch, Scratch* scratch) const override {
    auto& s = static_cast<PanelScratch&>(*scratch);
    const DispatchPlan& plan = *batch.plan;
    const Layer& layer = layers_[batch.layer];
    const int64_t d = layer.experts.empty() ? 0 : layer.experts[0]->hidden();
    s.tasks.clear();
    s.task_expert.clear();
    for (int e = 0; e < plan.num_experts; ++e) {
      if (batch.expert_seconds) batch.expert_seconds[e] = 0;
      const int64_t rows = plan.rows_of(e);
      if (rows == 0) continue;
      s.tasks.push_back({.ffn = layer.experts[e].get(),
                         .rows = rows,
                         .row_token = plan.row_token.data() + plan.offsets[e],
                         .out = batch.expert_out + plan.offsets[e] * d});
      s.task_expert.push_back(e);
    }
    if (batch.shared_out) {
      if (!layer.shared) return absl::FailedPreconditionError("layer has no shared expert");
      s.tasks.push_back({.ffn = layer.shared.get(), .rows = batch.num_tokens, .out = batch.shared_out});
      s.task_expert.push_back(-1);
    }
    s.task_seconds.resize(s.tasks.size());
    s.runner.Run(batch.tokens, s.tasks.data(), s.tasks.size(), s.task_seconds.data());
    if (batch.expert_seconds) {
      for (size_t t = 0; t < s.tasks.size(); ++t) {
        if (s.task_expert[t] >= 0) batch.expert_seconds[s.task_expert[t]] = s.task_seconds[t];
      }
    }
    return absl::OkStatus();
  }

  std::string Describe() const override {
    return absl::StrCat("cpu ", CpuPathName(path_), " kernels, ", compute_ == DType::kBF16 ? "bf16" : "fp32",
                        " compute");
  }

  size_t WeightBytes() const override {
    size_t bytes = 0;
    for (const Layer& layer : layers_) {
      for (const auto& ffn : layer.experts) bytes += ffn->weight_bytes();
      if (layer.shared) bytes += layer.shared->weight_bytes();
    }
    return bytes;
  }

 private:
  struct Layer {
    std::vector<std::unique_ptr<PanelFfn>> experts;
    std::unique_ptr<PanelFfn> shared;
  };
  PanelExpertBackend() = default;

  DType compute_ = DType::kBF16;
  CpuPath path_ = CpuPath::kPortable;
  std::vector<Layer> layers_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ExpertBackend>> CreateCpuExpertBackend(const ModelDefinition& model,
                                                                      const CpuBackendOptions& options) {
  if (options.compute != DType::kF32 && options.compute != DType::kBF16) {
    return absl::InvalidArgumentError("the CPU backend computes in fp32 or bf16");
  }
  return PanelExpertBackend::Create(model, options);
}

}  // namespace moe
