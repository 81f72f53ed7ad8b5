#include "engine/api/model_builder.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>

#include "absl/strings/str_cat.h"
#include "engine/api/repository_model.h"
#include "engine/api/router.h"
#include "engine/api/status_macros.h"
#include "engine/loading/safetensors.h"
#include "google/protobuf/text_format.h"
#include "nlohmann/json.hpp"

namespace moe {
namespace fs = std::filesystem;
namespace {

// splitmix64 + Box-Muller: fixed across platforms and library versions,
// unlike <random>'s distributions.
class Gaussian {
 public:
  explicit Gaussian(uint64_t seed) : state_(seed) {}
  float Next() {
    const double u1 = (static_cast<double>(NextBits() >> 11) + 0.5) * 0x1.0p-53;
    const double u2 = static_cast<double>(NextBits() >> 11) * 0x1.0p-53;
    return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
  }

 private:
  uint64_t NextBits() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint64_t state_;
};

HostTensor RandomTensor(Gaussian& rng, std::vector<int64_t> shape, float scale, float offset, DType dtype) {
  int64_t count = 1;
  for (int64_t extent : shape) count *= extent;
  std::vector<float> values(static_cast<size_t>(count));
  for (float& v : values) v = offset + scale * rng.Next();
  return HostTensor::FromFloats(std::move(shape), values, dtype);
}

FfnWeights RandomFfn(Gaussian& rng, const ModelSpec& spec, int64_t inner) {
  const int64_t d = spec.hidden_size;
  const DType dt = spec.weight_dtype;
  FfnWeights ffn;
  ffn.w1 = RandomTensor(rng, {inner, d}, 1.0f / std::sqrt(static_cast<float>(d)), 0, dt);
  if (spec.expert_kind != ExpertKind::kMlp) {
    ffn.w3 = RandomTensor(rng, {inner, d}, 1.0f / std::sqrt(static_cast<float>(d)), 0, dt);
  }
  if (spec.expert_kind != ExpertKind::kGlu) {
    ffn.b1 = RandomTensor(rng, {inner}, 0.1f, 0, dt);
    ffn.b2 = RandomTensor(rng, {d}, 0.1f, 0, dt);
  }
  if (spec.expert_kind == ExpertKind::kClampedSwiglu) ffn.b3 = RandomTensor(rng, {inner}, 0.1f, 0, dt);
  ffn.w2 = RandomTensor(rng, {d, inner}, 1.0f / std::sqrt(static_cast<float>(inner)), 0, dt);
  return ffn;
}

void AddFfn(std::vector<NamedTensor>& out, const FfnWeights& ffn,
            const std::function<std::string(const std::string&)>& name) {
  out.push_back({name("w1.weight"), ffn.w1});
  out.push_back({name("w2.weight"), ffn.w2});
  if (!ffn.w3.empty()) out.push_back({name("w3.weight"), ffn.w3});
  if (!ffn.b1.empty()) out.push_back({name("w1.bias"), ffn.b1});
  if (!ffn.b2.empty()) out.push_back({name("w2.bias"), ffn.b2});
}

absl::Status WriteText(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
  out.close();
  if (!out) return absl::InternalError(absl::StrCat(path.string(), ": write failed"));
  return absl::OkStatus();
}

// gpt-oss's experts as published: gate_up_proj [E, d, 2I] with gate and up
// interleaved along the last axis, gate_up_proj_bias [E, 2I] alike,
// down_proj [E, I, d], down_proj_bias [E, d].
void AddGptOssExperts(std::vector<NamedTensor>& out, const LayerWeights& layer, const ModelSpec& spec,
                      const std::string& prefix) {
  const int64_t E = spec.router.num_experts, I = spec.intermediate_size, d = spec.hidden_size;
  std::vector<float> gate_up, gate_up_bias, down, down_bias;
  for (const FfnWeights& expert : layer.experts) {
    const std::vector<float> w1 = expert.w1.ToFloats(), w3 = expert.w3.ToFloats();
    const std::vector<float> b1 = expert.b1.ToFloats(), b3 = expert.b3.ToFloats();
    for (int64_t k = 0; k < d; ++k) {
      for (int64_t i = 0; i < I; ++i) {
        gate_up.push_back(w1[static_cast<size_t>(i * d + k)]);
        gate_up.push_back(w3[static_cast<size_t>(i * d + k)]);
      }
    }
    for (int64_t i = 0; i < I; ++i) {
      gate_up_bias.push_back(b1[static_cast<size_t>(i)]);
      gate_up_bias.push_back(b3[static_cast<size_t>(i)]);
    }
    const std::vector<float> w2 = Transposed(expert.w2).ToFloats(), b2 = expert.b2.ToFloats();
    down.insert(down.end(), w2.begin(), w2.end());
    down_bias.insert(down_bias.end(), b2.begin(), b2.end());
  }
  const DType dt = spec.weight_dtype;
  out.push_back({prefix + ".experts.gate_up_proj", HostTensor::FromFloats({E, d, 2 * I}, gate_up, dt)});
  out.push_back({prefix + ".experts.gate_up_proj_bias", HostTensor::FromFloats({E, 2 * I}, gate_up_bias, dt)});
  out.push_back({prefix + ".experts.down_proj", HostTensor::FromFloats({E, I, d}, down, dt)});
  out.push_back({prefix + ".experts.down_proj_bias", HostTensor::FromFloats({E, d}, down_bias, dt)});
}

}  // namespace

absl::Status QuantizeExperts(QuantFormat format, ModelDefinition* model, int64_t block_rows, int64_t block_columns) {
  auto quantize = [&](FfnWeights& ffn) -> absl::Status {
    for (auto [tensor, quantized] : {std::pair{&ffn.w1, &ffn.q1}, {&ffn.w3, &ffn.q3}, {&ffn.w2, &ffn.q2}}) {
      if (tensor->empty()) continue;  // an MLP's w3
      ASSIGN_OR_RETURN(*quantized, QuantizeMatrix(*tensor, format, block_rows, block_columns));
      *tensor = HostTensor();
    }
    return absl::OkStatus();
  };
  for (LayerWeights& layer : model->layers) {
    for (FfnWeights& expert : layer.experts) RETURN_IF_ERROR(quantize(expert));
    if (layer.shared) RETURN_IF_ERROR(quantize(*layer.shared));
  }
  model->spec.expert_format = format;
  return absl::OkStatus();
}

ModelDefinition GenerateRandomModel(const ModelSpec& spec, int num_layers, uint64_t seed) {
  Gaussian rng(seed);
  ModelDefinition model;
  model.spec = spec;
  const int64_t d = spec.hidden_size;
  const float gate_scale = 2.0f / std::sqrt(static_cast<float>(d));
  const RouterSpec& r = spec.router;
  for (int l = 0; l < num_layers; ++l) {
    LayerWeights layer;
    layer.name = absl::StrCat("layers.", l);
    if (r.kind == RouterKind::kHierarchical) {
      layer.router.push_back(RandomTensor(rng, {r.n_group, d}, gate_scale, 0, spec.weight_dtype));
      for (int g = 0; g < r.n_group; ++g) {
        layer.router.push_back(RandomTensor(rng, {r.num_experts / r.n_group, d}, gate_scale, 0, spec.weight_dtype));
      }
    } else {
      for (int task = 0; task < r.num_tasks; ++task) {
        layer.router.push_back(RandomTensor(rng, {r.num_experts, d}, gate_scale, 0, spec.weight_dtype));
      }
    }
    if (r.kind == RouterKind::kSigmoidGroupTopK) {
      layer.router_bias = RandomTensor(rng, {r.num_experts}, 0.05f, 0, DType::kF32);
    }
    for (int e = 0; e < r.num_experts; ++e) layer.experts.push_back(RandomFfn(rng, spec, spec.intermediate_size));
    if (spec.shared_intermediate_size > 0) {
      layer.shared = RandomFfn(rng, spec, spec.shared_intermediate_size);
      if (spec.shared_expert_gated) layer.shared_gate = RandomTensor(rng, {1, d}, gate_scale, 0, spec.weight_dtype);
    }
    if (spec.pre_norm) layer.norm = RandomTensor(rng, {d}, 0.1f, 1.0f, spec.weight_dtype);
    model.layers.push_back(std::move(layer));
  }
  return model;
}

ModelDefinition DemoModel() {
  ModelSpec spec;
  spec.name = "demo";
  spec.source_type = "demo";
  spec.hidden_size = 256;
  spec.intermediate_size = 512;
  spec.router.num_experts = 8;
  spec.router.top_k = 2;
  spec.router.norm_topk_prob = true;
  spec.pre_norm = true;
  spec.residual = true;
  spec.weight_dtype = DType::kBF16;
  return GenerateRandomModel(spec, 2, /*seed=*/20261123);
}

absl::Status WriteRepositoryModel(const ModelDefinition& model, const std::string& repo_dir, int64_t version,
                                  int max_batch_size) {
  const ModelSpec& spec = model.spec;
  if (spec.routing_weights_scale_input || spec.expert_kind == ExpertKind::kClampedSwiglu ||
      (!model.layers.empty() && !model.layers[0].router_logit_bias.empty())) {
    return absl::InvalidArgumentError(
        absl::StrCat(spec.name,
                     ": the repository format has no input-scaling routing weights, clamped SwiGLU experts or router "
                     "logit biases"));
  }
  const RouterSpec& r = spec.router;
  namespace names = repository_names;
  inference::ModelConfig config;
  config.set_name(spec.name);
  config.set_backend("moe");
  config.set_max_batch_size(max_batch_size);
  auto* input = config.add_input();
  input->set_name("hidden_states");
  input->set_data_type(inference::TYPE_FP32);
  input->add_dims(spec.hidden_size);
  for (int task = 0; task < r.num_tasks; ++task) {
    auto* output = config.add_output();
    output->set_name(r.num_tasks == 1 ? "output" : absl::StrCat("output_", task));
    output->set_data_type(inference::TYPE_FP32);
    output->add_dims(spec.hidden_size);
  }
  config.mutable_dynamic_batching();  // present: perf_analyzer reads it; server defaults apply
  inference::MoeConfig& m = *config.mutable_moe();
  m.set_hidden_size(spec.hidden_size);
  m.set_intermediate_size(spec.intermediate_size);
  m.set_num_experts(r.num_experts);
  m.set_num_layers(static_cast<int>(model.layers.size()));
  m.set_router(static_cast<inference::MoeConfig::Router>(static_cast<int>(r.kind)));
  m.set_top_k(r.top_k);
  m.set_norm_topk_prob(r.norm_topk_prob);
  m.set_routed_scaling_factor(r.routed_scaling_factor);
  m.set_n_group(r.n_group);
  m.set_topk_group(r.topk_group);
  m.set_top_k_per_group(r.top_k_per_group);
  m.set_capacity_factor(r.capacity_factor);
  m.set_logits_in_compute_dtype(r.logits_in_compute_dtype);
  m.set_num_tasks(r.num_tasks);
  m.set_expert(spec.expert_kind == ExpertKind::kMlp ? inference::MoeConfig::MLP : inference::MoeConfig::GLU);
  static const char* kActivations[] = {"silu", "gelu", "gelu_tanh", "relu"};
  m.set_activation(kActivations[static_cast<int>(spec.activation)]);
  m.set_shared_intermediate_size(spec.shared_intermediate_size);
  m.set_shared_expert_gated(spec.shared_expert_gated);
  m.set_pre_norm(spec.pre_norm);
  m.set_norm_eps(spec.norm_eps);
  m.set_residual(spec.residual);

  std::vector<NamedTensor> tensors;
  for (size_t li = 0; li < model.layers.size(); ++li) {
    const int l = static_cast<int>(li);
    const LayerWeights& layer = model.layers[li];
    if (r.kind == RouterKind::kHierarchical) {
      tensors.push_back({names::GroupRouter(l), layer.router[0]});
      for (int g = 0; g < r.n_group; ++g) tensors.push_back({names::InnerRouter(l, g), layer.router[g + 1]});
    } else {
      for (int task = 0; task < r.num_tasks; ++task)
        tensors.push_back({names::Router(l, task, r.num_tasks), layer.router[task]});
    }
    if (!layer.router_bias.empty()) tensors.push_back({names::RouterBias(l), layer.router_bias});
    for (int e = 0; e < r.num_experts; ++e) {
      AddFfn(tensors, layer.experts[e], [&](const std::string& mat) { return names::Expert(l, e, mat); });
    }
    if (layer.shared) AddFfn(tensors, *layer.shared, [&](const std::string& mat) { return names::Shared(l, mat); });
    if (!layer.shared_gate.empty()) tensors.push_back({names::SharedGate(l), layer.shared_gate});
    if (!layer.norm.empty()) tensors.push_back({names::Norm(l), layer.norm});
  }
  const fs::path model_dir = fs::path(repo_dir) / spec.name;
  std::error_code ec;
  fs::create_directories(model_dir / std::to_string(version), ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat(model_dir.string(), ": ", ec.message()));
  std::string text;
  google::protobuf::TextFormat::PrintToString(config, &text);
  if (auto status = WriteText(model_dir / "config.pbtxt", text); !status.ok()) return status;
  return WriteSafetensors((model_dir / std::to_string(version) / "model.safetensors").string(), tensors);
}

absl::Status WriteHuggingFaceCheckpoint(const ModelDefinition& model, const std::string& dir, bool fused_experts) {
  const ModelSpec& spec = model.spec;
  const RouterSpec& r = spec.router;
  const std::string& type = spec.source_type;
  const bool deepseek = type == "deepseek_v2" || type == "deepseek_v3" || type == "glm4_moe";
  const bool granite = type == "granitemoe";
  const bool llama4 = type == "llama4_text";
  const bool gpt_oss = type == "gpt_oss";
  nlohmann::json config = {{"model_type", type},
                           {"hidden_size", spec.hidden_size},
                           {"num_hidden_layers", static_cast<int>(model.layers.size())},
                           {"num_experts_per_tok", r.top_k},
                           {"rms_norm_eps", spec.norm_eps},
                           {"hidden_act", "silu"},
                           {"norm_topk_prob", r.norm_topk_prob}};
  if (type == "mixtral" || type == "olmoe" || granite) {
    config[type == "olmoe" ? "num_experts" : "num_local_experts"] = r.num_experts;
    config["intermediate_size"] = spec.intermediate_size;
    if (granite) config["residual_multiplier"] = r.routed_scaling_factor;
  } else if (type == "qwen2_moe" || type == "qwen3_moe") {
    config["num_experts"] = r.num_experts;
    config["moe_intermediate_size"] = spec.intermediate_size;
    if (type == "qwen2_moe") config["shared_expert_intermediate_size"] = spec.shared_intermediate_size;
  } else if (deepseek) {
    config["n_routed_experts"] = r.num_experts;
    config["moe_intermediate_size"] = spec.intermediate_size;
    config["n_shared_experts"] = spec.shared_intermediate_size / spec.intermediate_size;
    config["n_group"] = r.n_group;
    config["topk_group"] = r.topk_group;
    config["routed_scaling_factor"] = r.routed_scaling_factor;
    config["first_k_dense_replace"] = 0;
    if (type == "deepseek_v2") config["topk_method"] = "group_limited_greedy";
  } else if (gpt_oss) {
    if (spec.expert_kind != ExpertKind::kClampedSwiglu || r.kind != RouterKind::kSoftmaxTopK || !r.norm_topk_prob ||
        model.layers[0].router_logit_bias.empty()) {
      return absl::InvalidArgumentError(
          "gpt_oss: clamped SwiGLU experts, a renormalised softmax top-k router and router logit biases");
    }
    config["num_local_experts"] = r.num_experts;
    config["intermediate_size"] = spec.intermediate_size;
    config["swiglu_alpha"] = spec.swiglu_alpha;
    config["swiglu_limit"] = spec.swiglu_limit;
  } else if (llama4) {
    if (spec.shared_intermediate_size != spec.intermediate_size || !spec.routing_weights_scale_input ||
        r.kind != RouterKind::kSigmoidGroupTopK || r.n_group != 1 || !model.layers[0].router_bias.empty()) {
      return absl::InvalidArgumentError(
          "llama4_text: the shared expert has the routed experts' intermediate size, the router is a sigmoid top-k "
          "without groups or bias, and routing weights scale the expert input");
    }
    config["num_local_experts"] = r.num_experts;
    config["intermediate_size"] = spec.intermediate_size;
    config["interleave_moe_layer_step"] = 1;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("cannot write model_type '", type, "'"));
  }
  // Granite and Llama 4 publish fused experts only.
  fused_experts = fused_experts || granite || llama4;
  const std::string gate = type == "mixtral" ? "w1" : "gate_proj";
  const std::string up = type == "mixtral" ? "w3" : "up_proj";
  const std::string down = type == "mixtral" ? "w2" : "down_proj";
  std::string block = ".mlp";
  if (granite || (type == "mixtral" && !fused_experts)) block = ".block_sparse_moe";
  if (llama4) block = ".feed_forward";
  const std::string router = granite ? ".router.layer.weight" : (llama4 || gpt_oss) ? ".router.weight" : ".gate.weight";
  std::vector<NamedTensor> tensors;
  for (size_t l = 0; l < model.layers.size(); ++l) {
    const LayerWeights& layer = model.layers[l];
    const std::string base = absl::StrCat("model.layers.", l);
    const std::string prefix = base + block;
    tensors.push_back({prefix + router, layer.router[0]});
    if (!layer.router_bias.empty()) tensors.push_back({prefix + ".gate.e_score_correction_bias", layer.router_bias});
    if (gpt_oss) {
      tensors.push_back({prefix + ".router.bias", layer.router_logit_bias});
      AddGptOssExperts(tensors, layer, spec, prefix);
    } else if (fused_experts) {
      const int64_t E = r.num_experts, I = spec.intermediate_size, d = spec.hidden_size;
      std::vector<float> gate_up, downs;
      for (const FfnWeights& expert : layer.experts) {
        std::vector<float> both;
        for (const HostTensor* t : {&expert.w1, &expert.w3}) {
          auto v = t->ToFloats();
          both.insert(both.end(), v.begin(), v.end());
        }
        if (llama4) both = Transposed(HostTensor::FromFloats({2 * I, d}, both)).ToFloats();
        gate_up.insert(gate_up.end(), both.begin(), both.end());
        auto v = expert.w2.ToFloats();
        if (llama4) v = Transposed(expert.w2).ToFloats();
        downs.insert(downs.end(), v.begin(), v.end());
      }
      const std::vector<int64_t> gate_up_shape =
          llama4 ? std::vector<int64_t>{E, d, 2 * I} : std::vector<int64_t>{E, 2 * I, d};
      const std::vector<int64_t> down_shape = llama4 ? std::vector<int64_t>{E, I, d} : std::vector<int64_t>{E, d, I};
      tensors.push_back({prefix + (granite ? ".input_linear.weight" : ".experts.gate_up_proj"),
                         HostTensor::FromFloats(gate_up_shape, gate_up, spec.weight_dtype)});
      tensors.push_back({prefix + (granite ? ".output_linear.weight" : ".experts.down_proj"),
                         HostTensor::FromFloats(down_shape, downs, spec.weight_dtype)});
    } else {
      for (int e = 0; e < r.num_experts; ++e) {
        const std::string ep = absl::StrCat(prefix, ".experts.", e, ".");
        tensors.push_back({ep + gate + ".weight", layer.experts[e].w1});
        tensors.push_back({ep + up + ".weight", layer.experts[e].w3});
        tensors.push_back({ep + down + ".weight", layer.experts[e].w2});
      }
    }
    if (layer.shared) {
      const std::string sp = prefix + (type == "qwen2_moe" ? ".shared_expert."
                                       : llama4            ? ".shared_expert."
                                                           : ".shared_experts.");
      tensors.push_back({sp + "gate_proj.weight", layer.shared->w1});
      tensors.push_back({sp + "up_proj.weight", layer.shared->w3});
      tensors.push_back({sp + "down_proj.weight", layer.shared->w2});
    }
    if (!layer.shared_gate.empty()) tensors.push_back({prefix + ".shared_expert_gate.weight", layer.shared_gate});
    tensors.push_back({base + ".post_attention_layernorm.weight", layer.norm});
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat(dir, ": ", ec.message()));
  if (auto status = WriteText(fs::path(dir) / "config.json", config.dump(2)); !status.ok()) return status;
  return WriteSafetensors((fs::path(dir) / "model.safetensors").string(), tensors);
}

}  // namespace moe
