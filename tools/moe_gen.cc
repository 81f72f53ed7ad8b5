// moe-gen: writes random-weight MoE models in either on-disk format, for tests
// and benchmarks.
//
//   moe-gen --format=repository --out=models --name=toy --experts=8 --top_k=2
//   moe-gen --format=hf --model_type=deepseek_v3 --out=ckpt --experts=16 ...
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "engine/api/hf_loader.h"
#include "engine/api/model_builder.h"

ABSL_FLAG(std::string, format, "repository", "repository (Triton layout) or hf (Hugging Face checkpoint)");
ABSL_FLAG(std::string, out, "", "repository directory (format=repository) or checkpoint directory (format=hf)");
ABSL_FLAG(std::string, name, "random", "model name (repository format)");
ABSL_FLAG(std::string, model_type, "mixtral", "Hugging Face model_type (format=hf)");
ABSL_FLAG(std::string, router, "softmax_topk",
          "softmax_topk | sigmoid_group_topk | softmax_group_topk | dense_softmax | hierarchical | expert_choice");
ABSL_FLAG(std::string, expert, "glu", "glu or mlp");
ABSL_FLAG(std::string, activation, "silu", "silu, gelu, gelu_tanh or relu");
ABSL_FLAG(std::string, dtype, "bf16", "fp32, bf16 or fp16 weights");
ABSL_FLAG(int, hidden, 256, "hidden size");
ABSL_FLAG(int, intermediate, 512, "expert intermediate size");
ABSL_FLAG(int, experts, 8, "routed experts per layer");
ABSL_FLAG(int, top_k, 2, "experts per token");
ABSL_FLAG(int, layers, 2, "MoE layers");
ABSL_FLAG(int, shared_intermediate, 0, "shared expert intermediate size (0 = none)");
ABSL_FLAG(int, n_group, 1, "expert groups (group-limited and hierarchical routers)");
ABSL_FLAG(int, topk_group, 1, "groups a token may use");
ABSL_FLAG(int, top_k_per_group, 1, "hierarchical: experts chosen per group");
ABSL_FLAG(int, tasks, 1, "multi-gate: number of tasks");
ABSL_FLAG(double, capacity_factor, 0, "0 = dropless");
ABSL_FLAG(double, routed_scaling_factor, 1, "weight multiplier (DeepSeek, GLM; Granite's residual_multiplier)");
ABSL_FLAG(bool, norm_topk_prob, true, "renormalise kept weights");
ABSL_FLAG(bool, pre_norm, true, "RMSNorm before each layer");
ABSL_FLAG(bool, residual, true, "y = x + MoE(x)");
ABSL_FLAG(bool, fused, false, "format=hf: fused 3-D expert tensors (granitemoe and llama4_text always)");
ABSL_FLAG(int64_t, version, 1, "repository version");
ABSL_FLAG(int, max_batch_size, 4096, "repository max_batch_size (tokens per batch)");
ABSL_FLAG(uint64_t, seed, 1, "weight generator seed");

namespace {

absl::StatusOr<moe::RouterKind> ParseRouter(const std::string& name) {
  static const std::pair<const char*, moe::RouterKind> kRouters[] = {
      {"softmax_topk", moe::RouterKind::kSoftmaxTopK},
      {"sigmoid_group_topk", moe::RouterKind::kSigmoidGroupTopK},
      {"softmax_group_topk", moe::RouterKind::kSoftmaxGroupTopK},
      {"dense_softmax", moe::RouterKind::kDenseSoftmax},
      {"hierarchical", moe::RouterKind::kHierarchical},
      {"expert_choice", moe::RouterKind::kExpertChoice}};
  for (const auto& [text, kind] : kRouters) {
    if (name == text) return kind;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown router '", name, "'"));
}

absl::Status Main() {
  moe::ModelSpec spec;
  spec.name = absl::GetFlag(FLAGS_name);
  const std::string format = absl::GetFlag(FLAGS_format);
  const std::string dtype = absl::GetFlag(FLAGS_dtype);
  spec.weight_dtype = dtype == "fp32" ? moe::DType::kF32 : dtype == "fp16" ? moe::DType::kF16 : moe::DType::kBF16;
  spec.hidden_size = absl::GetFlag(FLAGS_hidden);
  spec.intermediate_size = absl::GetFlag(FLAGS_intermediate);
  spec.shared_intermediate_size = absl::GetFlag(FLAGS_shared_intermediate);
  spec.expert_kind = absl::GetFlag(FLAGS_expert) == "mlp" ? moe::ExpertKind::kMlp : moe::ExpertKind::kGlu;
  auto activation = moe::ParseActivation(absl::GetFlag(FLAGS_activation));
  if (!activation.ok()) return activation.status();
  spec.activation = *activation;
  spec.pre_norm = absl::GetFlag(FLAGS_pre_norm);
  spec.residual = absl::GetFlag(FLAGS_residual);
  moe::RouterSpec& r = spec.router;
  auto kind = ParseRouter(absl::GetFlag(FLAGS_router));
  if (!kind.ok()) return kind.status();
  r.kind = *kind;
  r.num_experts = absl::GetFlag(FLAGS_experts);
  r.top_k = absl::GetFlag(FLAGS_top_k);
  r.n_group = absl::GetFlag(FLAGS_n_group);
  r.topk_group = absl::GetFlag(FLAGS_topk_group);
  r.top_k_per_group = absl::GetFlag(FLAGS_top_k_per_group);
  r.num_tasks = absl::GetFlag(FLAGS_tasks);
  r.capacity_factor = static_cast<float>(absl::GetFlag(FLAGS_capacity_factor));
  r.routed_scaling_factor = static_cast<float>(absl::GetFlag(FLAGS_routed_scaling_factor));
  r.norm_topk_prob = absl::GetFlag(FLAGS_norm_topk_prob);
  if (r.kind == moe::RouterKind::kHierarchical) r.top_k = r.topk_group * r.top_k_per_group;
  if (format == "hf") {
    spec.source_type = absl::GetFlag(FLAGS_model_type);
    spec.pre_norm = spec.residual = true;
    const std::string& type = spec.source_type;
    if (type == "deepseek_v3" || type == "glm4_moe") r.kind = moe::RouterKind::kSigmoidGroupTopK;
    if (type == "deepseek_v2") r.kind = moe::RouterKind::kSoftmaxGroupTopK;
    spec.shared_expert_gated = type == "qwen2_moe" && spec.shared_intermediate_size > 0;
    if (type == "granitemoe") {
      r.kind = moe::RouterKind::kSoftmaxTopK;
      r.norm_topk_prob = true;
    }
    if (type == "gpt_oss") {
      r.kind = moe::RouterKind::kSoftmaxTopK;
      r.norm_topk_prob = true;
      spec.expert_kind = moe::ExpertKind::kClampedSwiglu;
    }
    if (type == "llama4_text") {  // sigmoid of the best logits scales the expert input; a shared expert
      r.kind = moe::RouterKind::kSigmoidGroupTopK;
      r.n_group = r.topk_group = 1;
      r.norm_topk_prob = false;
      spec.routing_weights_scale_input = true;
      spec.shared_intermediate_size = spec.intermediate_size;
    }
  }
  moe::ModelDefinition model = moe::GenerateRandomModel(spec, absl::GetFlag(FLAGS_layers), absl::GetFlag(FLAGS_seed));
  if (spec.source_type == "llama4_text") {
    for (moe::LayerWeights& layer : model.layers) layer.router_bias = {};  // Llama 4's router has none
  }
  if (spec.source_type == "gpt_oss") {  // gpt-oss's router is a linear layer with a bias
    for (moe::LayerWeights& layer : model.layers) {
      std::vector<float> bias(static_cast<size_t>(r.num_experts));
      for (size_t e = 0; e < bias.size(); ++e) bias[e] = 0.05f * static_cast<float>((e * 7) % 5) - 0.1f;
      layer.router_logit_bias = moe::HostTensor::FromFloats({r.num_experts}, bias, spec.weight_dtype);
    }
  }
  if (auto status = moe::ValidateModel(model); !status.ok()) return status;
  const std::string out = absl::GetFlag(FLAGS_out);
  if (out.empty()) return absl::InvalidArgumentError("--out is required");
  if (format == "hf") return moe::WriteHuggingFaceCheckpoint(model, out, absl::GetFlag(FLAGS_fused));
  if (format == "repository") {
    return moe::WriteRepositoryModel(model, out, absl::GetFlag(FLAGS_version), absl::GetFlag(FLAGS_max_batch_size));
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown --format '", format, "'"));
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("Writes random-weight MoE models (see --help).");
  absl::ParseCommandLine(argc, argv);
  absl::Status status = Main();
  if (!status.ok()) {
    std::cerr << "moe-gen: " << status << "\n";
    return 1;
  }
  return 0;
}
