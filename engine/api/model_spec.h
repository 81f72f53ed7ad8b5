// What an MoE model is, independent of where it came from: the architecture
// (ModelSpec) and its weights (LayerWeights). Loaders fill a ModelDefinition;
// MoeModel::Create validates it and prepares it for execution. Plain data: not
// synchronised; immutable once built, then safe to share across threads.
#ifndef MOE_ENGINE_API_MODEL_SPEC_H_
#define MOE_ENGINE_API_MODEL_SPEC_H_

#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "engine/api/quantized.h"
#include "engine/api/tensor.h"

namespace moe {

// The gating functions of DESIGN.md.
enum class RouterKind {
  kSoftmaxTopK,       // softmax over experts, top-k (Mixtral, Qwen-MoE, OLMoE, Switch)
  kSigmoidGroupTopK,  // DeepSeek-V3: sigmoid + correction bias, group-limited top-k
  kSoftmaxGroupTopK,  // DeepSeek-V2: softmax, group score = max, group-limited top-k
  kDenseSoftmax,      // every expert, softmax weights
  kHierarchical,      // a gate over groups, then a gate inside each chosen group
  kExpertChoice,      // each expert takes its best `capacity` tokens
};

enum class ExpertKind {
  kGlu,  // act(x W1^T) * (x W3^T), then W2^T
  kMlp,  // act(x W1^T + b1) W2^T + b2
  // gpt-oss: g = min(x W1^T + b1, limit), u = clamp(x W3^T + b3, -limit,
  // limit), (u + 1) * g * sigmoid(alpha * g), then W2^T + b2 (ModelSpec's
  // swiglu_alpha and swiglu_limit; `activation` unused).
  kClampedSwiglu,
};

enum class Activation { kSilu, kGelu, kGeluTanh, kRelu };

struct RouterSpec {
  RouterKind kind = RouterKind::kSoftmaxTopK;
  // Routed experts per layer.
  int num_experts = 0;
  // Experts per token (top-k). Hierarchical: groups chosen x experts per group.
  int top_k = 1;
  // Renormalise the kept weights to sum 1.
  bool norm_topk_prob = false;
  // Multiplies the final weights (DeepSeek, GLM; Granite's
  // residual_multiplier on softmax top-k). 1 = none.
  float routed_scaling_factor = 1.0f;
  // Group-limited routers and hierarchical gating: number of expert groups and
  // how many of them a token may use.
  int n_group = 1;
  int topk_group = 1;
  // Hierarchical gating: experts chosen inside each chosen group.
  int top_k_per_group = 1;
  // 0 = dropless. Top-k routers: an expert takes at most
  // ceil(capacity_factor * T * top_k / E) tokens, the rest are dropped.
  // Expert choice: each expert takes ceil(capacity_factor * T / E) tokens.
  float capacity_factor = 0.0f;
  // Multi-gate (MMoE): gates over the same experts, one output per task.
  int num_tasks = 1;
  // Router logits rounded to the compute dtype, as Mixtral, Qwen-MoE and OLMoE
  // compute them (DeepSeek computes them in fp32).
  bool logits_in_compute_dtype = false;
};

struct ModelSpec {
  // Model name as served.
  std::string name;
  // Where it came from: "mixtral", ..., "repository", "demo".
  std::string source_type;
  int hidden_size = 0;
  // Routed experts' intermediate size.
  int intermediate_size = 0;
  // Shared experts as one FFN of this intermediate size; 0 = none.
  int shared_intermediate_size = 0;
  // Qwen2-MoE: the shared expert is scaled by sigmoid(x Wsg^T).
  bool shared_expert_gated = false;
  ExpertKind expert_kind = ExpertKind::kGlu;
  Activation activation = Activation::kSilu;
  RouterSpec router;
  // Llama 4: a routed expert sees its token times the routing weight,
  // expert(w * x), and the layer sums the experts' outputs unweighted; false:
  // it sums w * expert(x). Single-task top-k routers only.
  bool routing_weights_scale_input = false;
  // ExpertKind::kClampedSwiglu's constants (gpt-oss's config.json).
  float swiglu_alpha = 1.702f;
  float swiglu_limit = 7.0f;
  // RMSNorm before each MoE layer, and y = x + MoE(norm(x)).
  bool pre_norm = false;
  float norm_eps = 1e-6f;
  bool residual = false;
  // Storage dtype of the weights (of the routers and norms where the experts
  // are quantized).
  DType weight_dtype = DType::kF32;
  // The format of the experts' matrices (kNone: weight_dtype tensors).
  QuantFormat expert_format = QuantFormat::kNone;
  // Decoder layers of the checkpoint that are not MoE layers (e.g. DeepSeek's
  // first_k_dense_replace), reported and skipped.
  std::vector<std::string> skipped_layers;
};

// One FFN's weights, PyTorch linear layout ([out, in]). Its three matrices
// are either tensors (w1, w3, w2) or, in a quantized checkpoint, quantized
// matrices of the same shapes (q1, q3, q2; the w's then empty).
struct FfnWeights {
  HostTensor w1{};  // [I, d] gate (glu, clamped swiglu) or first linear (mlp)
  HostTensor w3{};  // [I, d] up (glu, clamped swiglu)
  HostTensor w2{};  // [d, I] down
  HostTensor b1{};  // [I] (mlp, clamped swiglu)
  HostTensor b2{};  // [d] (mlp, clamped swiglu)
  HostTensor b3{};  // [I] up bias (clamped swiglu only)
  QuantizedMatrix q1{}, q3{}, q2{};

  bool quantized() const { return !q1.empty(); }
  // w1, w3 and w2 as tensors of `dtype`: quantized ones dequantized by the
  // published rule (copies), others as they are. For executors without
  // quantized kernels and for references.
  FfnWeights Dequantized(DType dtype) const;
};

struct LayerWeights {
  // Name in the source (e.g. "model.layers.3"), for messages and metrics.
  std::string name;
  // Router weights [E, d], one per task. Hierarchical: [G, d] for the group
  // gate followed by G tensors [E/G, d] for the gates inside the groups.
  std::vector<HostTensor> router;
  // [E] selection bias (DeepSeek-V3 e_score_correction_bias); empty if none.
  HostTensor router_bias;
  // [E] added to the router logits before any selection (gpt-oss's router
  // is a linear layer with a bias); empty if none. Single-task routers only.
  HostTensor router_logit_bias;
  std::vector<FfnWeights> experts;
  std::optional<FfnWeights> shared;
  // [1, d] Qwen2-MoE shared-expert gate; empty if none.
  HostTensor shared_gate;
  // [d] RMSNorm weight; empty if no pre-norm.
  HostTensor norm;
};

struct ModelDefinition {
  ModelSpec spec;
  std::vector<LayerWeights> layers;
};

// Checks the spec's values and every tensor's shape against it. Messages name
// the layer and tensor.
absl::Status ValidateModel(const ModelDefinition& model);

// Parses "silu", "gelu", "gelu_tanh"/"gelu_pytorch_tanh", "relu".
absl::StatusOr<Activation> ParseActivation(const std::string& name);

}  // namespace moe

#endif  // MOE_ENGINE_API_MODEL_SPEC_H_
