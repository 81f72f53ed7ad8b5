#include "engine/api/model_spec.h"

#include "absl/strings/str_cat.h"
#include "engine/api/status_macros.h"

namespace moe {
namespace {

absl::Status CheckShape(const LayerWeights& layer, const std::string& what, const HostTensor& tensor,
                        const std::vector<int64_t>& expected) {
  if (tensor.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(layer.name, ": missing ", what));
  }
  if (tensor.shape() != expected) {
    return absl::InvalidArgumentError(absl::StrCat(layer.name, ": ", what, " has shape ", tensor.ShapeString(),
                                                   ", expected ", ShapeToString(expected)));
  }
  if (!IsFloatDType(tensor.dtype())) {
    return absl::InvalidArgumentError(absl::StrCat(layer.name, ": ", what, " is ",
                                                   std::string(DTypeName(tensor.dtype())),
                                                   ": only expert matrices may be quantized, with their scales"));
  }
  return absl::OkStatus();
}

// An FFN matrix: a tensor, or a quantized matrix of the model's format
// (checkpoints may leave some FFNs unquantized, never part of one: `ffn`).
absl::Status CheckMatrix(const ModelSpec& spec, const LayerWeights& layer, const std::string& what,
                         const FfnWeights& ffn, const HostTensor& tensor, const QuantizedMatrix& quantized,
                         const std::vector<int64_t>& expected) {
  if (quantized.empty() && !ffn.quantized()) return CheckShape(layer, what, tensor, expected);
  if (quantized.format != spec.expert_format) {
    return absl::InvalidArgumentError(
        absl::StrCat(layer.name, ": ", what, " is ", std::string(QuantFormatName(quantized.format)),
                     ", the model's experts ", std::string(QuantFormatName(spec.expert_format))));
  }
  if (quantized.rows != expected[0] || quantized.columns != expected[1]) {
    return absl::InvalidArgumentError(
        absl::StrCat(layer.name, ": ", what, " is ", quantized.Describe(), ", expected ", ShapeToString(expected)));
  }
  return absl::OkStatus();
}

absl::Status CheckFfn(const ModelSpec& spec, const LayerWeights& layer, const std::string& what, const FfnWeights& ffn,
                      int64_t inner) {
  const int64_t d = spec.hidden_size;
  RETURN_IF_ERROR(CheckMatrix(spec, layer, what + " w1", ffn, ffn.w1, ffn.q1, {inner, d}));
  RETURN_IF_ERROR(CheckMatrix(spec, layer, what + " w2", ffn, ffn.w2, ffn.q2, {d, inner}));
  if (spec.expert_kind == ExpertKind::kGlu) {
    RETURN_IF_ERROR(CheckMatrix(spec, layer, what + " w3", ffn, ffn.w3, ffn.q3, {inner, d}));
  } else if (spec.expert_kind == ExpertKind::kClampedSwiglu) {
    RETURN_IF_ERROR(CheckMatrix(spec, layer, what + " w3", ffn, ffn.w3, ffn.q3, {inner, d}));
    RETURN_IF_ERROR(CheckShape(layer, what + " b1", ffn.b1, {inner}));
    RETURN_IF_ERROR(CheckShape(layer, what + " b3", ffn.b3, {inner}));
    RETURN_IF_ERROR(CheckShape(layer, what + " b2", ffn.b2, {d}));
  } else {
    RETURN_IF_ERROR(CheckShape(layer, what + " b1", ffn.b1, {inner}));
    RETURN_IF_ERROR(CheckShape(layer, what + " b2", ffn.b2, {d}));
  }
  return absl::OkStatus();
}

absl::Status CheckRouterSpec(const ModelSpec& spec) {
  const RouterSpec& r = spec.router;
  auto invalid = [&](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat(spec.name, ": router: ", parts...));
  };
  if (r.num_experts < 1 || r.num_experts > 65536) {
    return invalid("num_experts ", r.num_experts, " out of range [1, 65536]");
  }
  if (r.num_tasks < 1 || r.num_tasks > 64) return invalid("num_tasks ", r.num_tasks, " out of range [1, 64]");
  if (r.capacity_factor < 0 || !(r.capacity_factor < 1e6f)) {
    return invalid("capacity_factor ", r.capacity_factor, " must be >= 0");
  }
  if (!(r.routed_scaling_factor > 0) || !(r.routed_scaling_factor < 1e6f)) {
    return invalid("routed_scaling_factor ", r.routed_scaling_factor, " must be > 0");
  }
  const bool grouped = r.kind == RouterKind::kSigmoidGroupTopK || r.kind == RouterKind::kSoftmaxGroupTopK ||
                       r.kind == RouterKind::kHierarchical;
  if (grouped) {
    if (r.n_group < 1 || r.num_experts % r.n_group != 0) {
      return invalid("n_group ", r.n_group, " must divide num_experts ", r.num_experts);
    }
    if (r.topk_group < 1 || r.topk_group > r.n_group) {
      return invalid("topk_group ", r.topk_group, " out of range [1, n_group=", r.n_group, "]");
    }
  }
  switch (r.kind) {
    case RouterKind::kSoftmaxTopK:
      if (r.top_k < 1 || r.top_k > r.num_experts) {
        return invalid("top_k ", r.top_k, " out of range [1, num_experts=", r.num_experts, "]");
      }
      break;
    case RouterKind::kSigmoidGroupTopK:
    case RouterKind::kSoftmaxGroupTopK: {
      const int group_size = r.num_experts / r.n_group;
      if (r.kind == RouterKind::kSigmoidGroupTopK && group_size < 2 && r.n_group > 1) {
        return invalid("sigmoid group routing needs at least 2 experts per group");
      }
      if (r.top_k < 1 || r.top_k > r.topk_group * group_size) {
        return invalid("top_k ", r.top_k, " exceeds the experts of topk_group groups (", r.topk_group * group_size,
                       ")");
      }
      break;
    }
    case RouterKind::kHierarchical: {
      const int group_size = r.num_experts / r.n_group;
      if (r.top_k_per_group < 1 || r.top_k_per_group > group_size) {
        return invalid("top_k_per_group ", r.top_k_per_group, " out of range [1, ", group_size, "]");
      }
      break;
    }
    case RouterKind::kDenseSoftmax:
      break;
    case RouterKind::kExpertChoice:
      if (!(r.capacity_factor > 0)) return invalid("expert_choice needs capacity_factor > 0");
      break;
  }
  if (r.num_tasks > 1 && r.kind == RouterKind::kHierarchical) {
    return invalid("multi-gate models use flat gates, not hierarchical ones");
  }
  if (r.num_tasks > 1 && r.kind == RouterKind::kExpertChoice) {
    return invalid("multi-gate models cannot use expert_choice routing");
  }
  return absl::OkStatus();
}

}  // namespace

FfnWeights FfnWeights::Dequantized(DType dtype) const {
  FfnWeights out = *this;
  out.q1 = out.q3 = out.q2 = {};
  if (!q1.empty()) out.w1 = q1.Dequantized(dtype);
  if (!q3.empty()) out.w3 = q3.Dequantized(dtype);
  if (!q2.empty()) out.w2 = q2.Dequantized(dtype);
  return out;
}

absl::StatusOr<Activation> ParseActivation(const std::string& name) {
  if (name == "silu" || name == "swish") return Activation::kSilu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh" || name == "gelu_pytorch_tanh" || name == "gelu_new") {
    return Activation::kGeluTanh;
  }
  if (name == "relu") return Activation::kRelu;
  return absl::InvalidArgumentError(absl::StrCat("unsupported activation '", name, "'"));
}

absl::Status ValidateModel(const ModelDefinition& model) {
  const ModelSpec& spec = model.spec;
  auto invalid = [&](auto&&... parts) { return absl::InvalidArgumentError(absl::StrCat(spec.name, ": ", parts...)); };
  if (spec.hidden_size < 1 || spec.hidden_size > (1 << 16)) {
    return invalid("hidden_size ", spec.hidden_size, " out of range [1, 65536]");
  }
  if (spec.intermediate_size < 1 || spec.intermediate_size > (1 << 20)) {
    return invalid("intermediate_size ", spec.intermediate_size, " out of range");
  }
  if (spec.shared_intermediate_size < 0 || spec.shared_intermediate_size > (1 << 20)) {
    return invalid("shared intermediate size ", spec.shared_intermediate_size, " out of range");
  }
  if (!(spec.norm_eps >= 0) || spec.norm_eps > 1) return invalid("norm eps ", spec.norm_eps, " out of range");
  RETURN_IF_ERROR(CheckRouterSpec(spec));
  if (spec.expert_kind == ExpertKind::kClampedSwiglu && (!(spec.swiglu_limit > 0) || !(spec.swiglu_alpha > 0))) {
    return invalid("swiglu_alpha ", spec.swiglu_alpha, " and swiglu_limit ", spec.swiglu_limit, " must be > 0");
  }
  if (spec.routing_weights_scale_input &&
      (spec.router.num_tasks > 1 || spec.router.kind == RouterKind::kDenseSoftmax ||
       spec.router.kind == RouterKind::kHierarchical || spec.router.kind == RouterKind::kExpertChoice)) {
    return invalid("routing weights scale the expert input only with single-task top-k routers");
  }
  if (model.layers.empty()) return invalid("no MoE layers");
  if (spec.router.num_tasks > 1 && model.layers.size() != 1) {
    return invalid("multi-gate models have exactly one MoE layer, found ", model.layers.size());
  }
  const RouterSpec& r = spec.router;
  const int64_t d = spec.hidden_size;
  for (const LayerWeights& layer : model.layers) {
    if (r.kind == RouterKind::kHierarchical) {
      if (layer.router.size() != static_cast<size_t>(r.n_group) + 1) {
        return invalid(layer.name, ": hierarchical router needs 1 + n_group gate tensors, found ", layer.router.size());
      }
      RETURN_IF_ERROR(CheckShape(layer, "group gate", layer.router[0], {r.n_group, d}));
      for (int g = 0; g < r.n_group; ++g) {
        RETURN_IF_ERROR(
            CheckShape(layer, absl::StrCat("gate of group ", g), layer.router[g + 1], {r.num_experts / r.n_group, d}));
      }
    } else {
      if (layer.router.size() != static_cast<size_t>(r.num_tasks)) {
        return invalid(layer.name, ": expected ", r.num_tasks, " router tensors, found ", layer.router.size());
      }
      for (const HostTensor& gate : layer.router) {
        RETURN_IF_ERROR(CheckShape(layer, "router weight", gate, {r.num_experts, d}));
      }
    }
    if (!layer.router_logit_bias.empty()) {
      if (r.num_tasks > 1 || r.kind == RouterKind::kHierarchical) {
        return invalid(layer.name, ": a router logit bias needs a single flat gate");
      }
      RETURN_IF_ERROR(CheckShape(layer, "router bias", layer.router_logit_bias, {r.num_experts}));
    }
    if (r.kind == RouterKind::kSigmoidGroupTopK && !layer.router_bias.empty()) {
      RETURN_IF_ERROR(CheckShape(layer, "e_score_correction_bias", layer.router_bias, {r.num_experts}));
    }
    if (layer.experts.size() != static_cast<size_t>(r.num_experts)) {
      return invalid(layer.name, ": expected ", r.num_experts, " experts, found ", layer.experts.size());
    }
    for (size_t e = 0; e < layer.experts.size(); ++e) {
      RETURN_IF_ERROR(CheckFfn(spec, layer, absl::StrCat("expert ", e), layer.experts[e], spec.intermediate_size));
    }
    if (spec.shared_intermediate_size > 0) {
      if (!layer.shared) return invalid(layer.name, ": missing shared expert");
      RETURN_IF_ERROR(CheckFfn(spec, layer, "shared expert", *layer.shared, spec.shared_intermediate_size));
      if (spec.shared_expert_gated) {
        RETURN_IF_ERROR(CheckShape(layer, "shared_expert_gate", layer.shared_gate, {1, d}));
      }
    }
    if (spec.pre_norm) RETURN_IF_ERROR(CheckShape(layer, "norm weight", layer.norm, {d}));
  }
  return absl::OkStatus();
}

}  // namespace moe
