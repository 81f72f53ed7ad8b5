#include "engine/cpu_backend.h"

#include <chrono>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cpu_linear.h"
#include "engine/panel_ffn.h"
#include "engine/status_macros.h"

namespace moe {
namespace {

// One FFN as two or three packed linears.
struct PackedFfn {
  std::unique_ptr<CpuLinear> first;  // glu: act(x W1^T); mlp: act(x W1^T + b1)
  std::unique_ptr<CpuLinear> up;     // glu only: (x W3^T) * first
  std::unique_ptr<CpuLinear> down;   // W2^T (+ b2)
};

struct PackedLayer {
  std::vector<PackedFfn> experts;
  std::optional<PackedFfn> shared;
};

class CpuScratch : public ExpertBackend::Scratch {
 public:
  std::vector<std::byte> x;       // gathered rows, compute dtype
  std::vector<float> first;       // [rows, I] fp32
  std::vector<std::byte> middle;  // [rows, I] compute dtype
  std::vector<float> out;         // [rows, d] fp32
  std::vector<std::byte> scratchpad;

  template <typename T>
  static T* Fit(std::vector<T>& buffer, size_t count) {
    if (buffer.size() < count) buffer.resize(count);
    return buffer.data();
  }
};

class CpuExpertBackend : public ExpertBackend {
 public:
  static absl::StatusOr<std::unique_ptr<ExpertBackend>> Create(const ModelDefinition& model,
                                                               const CpuBackendOptions& options) {
    auto backend = std::unique_ptr<CpuExpertBackend>(new CpuExpertBackend());
    backend->spec_ = model.spec;
    backend->compute_ = options.compute;
    if (options.compute != DType::kF32 && options.compute != DType::kBF16) {
      return absl::InvalidArgumentError("the CPU backend computes in fp32 or bf16");
    }
    for (const LayerWeights& layer : model.layers) {
      PackedLayer packed;
      for (const FfnWeights& expert : layer.experts) {
        ASSIGN_OR_RETURN(PackedFfn ffn, backend->Pack(expert));
        packed.experts.push_back(std::move(ffn));
      }
      if (layer.shared) {
        ASSIGN_OR_RETURN(PackedFfn ffn, backend->Pack(*layer.shared));
        packed.shared = std::move(ffn);
      }
      backend->layers_.push_back(std::move(packed));
    }
    backend->implementation_ = backend->cache_.last_implementation();
    return std::unique_ptr<ExpertBackend>(std::move(backend));
  }

  std::unique_ptr<Scratch> NewScratch() const override { return std::make_unique<CpuScratch>(); }

  absl::Status RunExperts(const Batch& batch, Scratch* scratch) const override {
    auto& s = static_cast<CpuScratch&>(*scratch);
    const DispatchPlan& plan = *batch.plan;
    const int d = spec_.hidden_size;
    const size_t elem = DTypeSize(compute_);
    const PackedLayer& layer = layers_[batch.layer];
    for (int e = 0; e < plan.num_experts; ++e) {
      const int64_t rows = plan.rows_of(e);
      if (rows == 0) {
        if (batch.expert_seconds) batch.expert_seconds[e] = 0;
        continue;
      }
      const auto start = std::chrono::steady_clock::now();
      const int64_t padded = RowBucket(rows);
      std::byte* x = CpuScratch::Fit(s.x, static_cast<size_t>(padded) * d * elem);
      for (int64_t r = 0; r < rows; ++r) {
        const float* token = batch.tokens + static_cast<size_t>(plan.row_token[plan.offsets[e] + r]) * d;
        ConvertFromFloat(compute_, token, d, x + static_cast<size_t>(r) * d * elem);
      }
      // Padding rows are computed and ignored; zero them so they stay finite.
      std::memset(x + static_cast<size_t>(rows) * d * elem, 0, static_cast<size_t>(padded - rows) * d * elem);
      float* out = batch.expert_out + static_cast<size_t>(plan.offsets[e]) * d;
      RunFfn(layer.experts[e], x, rows, out, s);
      if (batch.expert_seconds) {
        batch.expert_seconds[e] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      }
    }
    if (batch.shared_out) return RunShared(batch.layer, batch.tokens, batch.num_tokens, batch.shared_out, s);
    return absl::OkStatus();
  }

  std::string Describe() const override {
    return absl::StrCat("cpu oneDNN (", implementation_, "), ", compute_ == DType::kBF16 ? "bf16" : "fp32", " compute");
  }

  size_t WeightBytes() const override {
    size_t bytes = 0;
    auto add = [&bytes](const PackedFfn& ffn) {
      bytes += ffn.first->weight_bytes() + ffn.down->weight_bytes();
      if (ffn.up) bytes += ffn.up->weight_bytes();
    };
    for (const PackedLayer& layer : layers_) {
      for (const PackedFfn& ffn : layer.experts) add(ffn);
      if (layer.shared) add(*layer.shared);
    }
    return bytes;
  }

 private:
  CpuExpertBackend() = default;

  absl::Status RunShared(int layer, const float* tokens, int num_tokens, float* out, CpuScratch& s) const {
    const auto& shared = layers_[layer].shared;
    if (!shared) return absl::FailedPreconditionError("layer has no shared expert");
    const int d = spec_.hidden_size;
    const size_t elem = DTypeSize(compute_);
    const int64_t padded = RowBucket(num_tokens);
    std::byte* x = CpuScratch::Fit(s.x, static_cast<size_t>(padded) * d * elem);
    ConvertFromFloat(compute_, tokens, static_cast<size_t>(num_tokens) * d, x);
    std::memset(x + static_cast<size_t>(num_tokens) * d * elem, 0, static_cast<size_t>(padded - num_tokens) * d * elem);
    RunFfn(*shared, x, num_tokens, out, s);
    return absl::OkStatus();
  }

  absl::StatusOr<PackedFfn> Pack(const FfnWeights& weights) {
    PackedFfn ffn;
    const bool glu = spec_.expert_kind == ExpertKind::kGlu;
    CpuLinear::Options first{.compute = compute_,
                             .output = glu ? DType::kF32 : compute_,
                             .epilogue = CpuLinear::Epilogue::kActivation,
                             .activation = spec_.activation};
    ASSIGN_OR_RETURN(ffn.first, CpuLinear::Create(weights.w1, glu ? nullptr : &weights.b1, first, &cache_));
    if (glu) {
      CpuLinear::Options up{.compute = compute_, .output = compute_, .epilogue = CpuLinear::Epilogue::kMultiply};
      ASSIGN_OR_RETURN(ffn.up, CpuLinear::Create(weights.w3, nullptr, up, &cache_));
    }
    CpuLinear::Options down{.compute = compute_, .output = DType::kF32};
    ASSIGN_OR_RETURN(ffn.down, CpuLinear::Create(weights.w2, glu ? nullptr : &weights.b2, down, &cache_));
    return ffn;
  }

  // out [rows, d] = FFN(x), x holding RowBucket(rows) rows in the compute dtype.
  void RunFfn(const PackedFfn& ffn, const std::byte* x, int64_t rows, float* out, CpuScratch& s) const {
    const int64_t padded = RowBucket(rows);
    const int64_t inner = ffn.first->out_features();
    const int d = spec_.hidden_size;
    size_t pad_bytes = std::max(ffn.first->scratchpad_bytes(), ffn.down->scratchpad_bytes());
    if (ffn.up) pad_bytes = std::max(pad_bytes, ffn.up->scratchpad_bytes());
    std::byte* pad = CpuScratch::Fit(s.scratchpad, pad_bytes);
    std::byte* middle = CpuScratch::Fit(s.middle, static_cast<size_t>(padded) * inner * DTypeSize(compute_));
    if (ffn.up) {
      float* gate = CpuScratch::Fit(s.first, static_cast<size_t>(padded) * inner);
      ffn.first->Run(x, rows, gate, nullptr, pad);
      ffn.up->Run(x, rows, middle, gate, pad);
    } else {
      ffn.first->Run(x, rows, middle, nullptr, pad);
    }
    // The down projection writes padded rows: land them in scratch when the
    // caller's buffer holds only `rows`.
    if (padded == rows) {
      ffn.down->Run(middle, rows, out, nullptr, pad);
    } else {
      float* staged = CpuScratch::Fit(s.out, static_cast<size_t>(padded) * d);
      ffn.down->Run(middle, rows, staged, nullptr, pad);
      std::memcpy(out, staged, static_cast<size_t>(rows) * d * sizeof(float));
    }
  }

  ModelSpec spec_;
  DType compute_ = DType::kBF16;
  CpuMatmulCache cache_;
  std::vector<PackedLayer> layers_;
  std::string implementation_;
};

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
    const PanelFfn::Options ffn_options{
        .kind = model.spec.expert_kind, .activation = model.spec.activation, .compute = options.compute};
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
    return absl::StrCat("cpu panel kernels (AVX-512", compute_ == DType::kBF16 ? " BF16" : "", "), ",
                        compute_ == DType::kBF16 ? "bf16" : "fp32", " compute");
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
  std::vector<Layer> layers_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ExpertBackend>> CreateCpuExpertBackend(const ModelDefinition& model,
                                                                      const CpuBackendOptions& options) {
  if (options.compute != DType::kF32 && options.compute != DType::kBF16) {
    return absl::InvalidArgumentError("the CPU backend computes in fp32 or bf16");
  }
  const bool panel = options.kernels == CpuKernels::kPanel ||
                     (options.kernels == CpuKernels::kAuto && PanelFfnSupported(options.compute));
  if (panel) return PanelExpertBackend::Create(model, options);
  return CpuExpertBackend::Create(model, options);
}

}  // namespace moe
