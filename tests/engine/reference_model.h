// A reference MoE model for the engine's tests: an independent
// double-precision forward pass of one layer (RefLayer, RefFfn) written from
// the layer's definition (engine/api/moe_model.h), not from the engine's
// code, that a test feeds with its own routing (routing_reference.h); the
// grid of model shapes it is checked over (Grid); and the comparison of an
// engine's routing with the reference's (CompareRouting).
//
// With bf16 compute the reference sees what the engine documents a bf16
// computation to see: weights, the layer input and the experts' hidden
// activations rounded to bf16, everything else (biases, norms, the shared
// expert's gate, the sums) in double. Nothing here calls the engine's
// kernels, router or dispatch.
//
// Inline, pure functions: thread-safe.
#ifndef MOE_TESTS_ENGINE_REFERENCE_MODEL_H_
#define MOE_TESTS_ENGINE_REFERENCE_MODEL_H_

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <ostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/api/dtype.h"
#include "engine/api/model_spec.h"
#include "engine/api/tensor.h"
#include "tests/engine/routing_reference.h"
#include "tests/test_util.h"

namespace moe::testing {

// The values a bf16 computation sees: inputs and weights rounded to bf16.
inline std::vector<double> Values(const HostTensor& t, bool bf16) {
  std::vector<double> out;
  for (float v : t.ToFloats()) out.push_back(bf16 ? RoundToBf16(v) : v);
  return out;
}

// y = FFN(x) in double.
inline std::vector<double> RefFfn(const ModelSpec& spec, const FfnWeights& w, const std::vector<double>& x, bool bf16) {
  const int d = spec.hidden_size;
  const int inner = static_cast<int>(w.w1.dim(0));
  auto w1 = Values(w.w1, bf16), w2 = Values(w.w2, bf16);
  std::vector<double> w3 = w.w3.empty() ? std::vector<double>() : Values(w.w3, bf16);
  std::vector<double> b1 = w.b1.empty() ? std::vector<double>() : Values(w.b1, false);
  std::vector<double> b2 = w.b2.empty() ? std::vector<double>() : Values(w.b2, false);
  std::vector<double> b3 = w.b3.empty() ? std::vector<double>() : Values(w.b3, false);
  std::vector<double> h(inner), y(d, 0);
  for (int i = 0; i < inner; ++i) {
    double a = 0, u = 0;
    for (int j = 0; j < d; ++j) {
      a += w1[static_cast<size_t>(i) * d + j] * x[j];
      if (!w3.empty()) u += w3[static_cast<size_t>(i) * d + j] * x[j];
    }
    if (spec.expert_kind == ExpertKind::kClampedSwiglu) {  // gpt-oss
      const double limit = spec.swiglu_limit;
      const double g = std::min(a + b1[i], limit), up = std::clamp(u + b3[i], -limit, limit);
      h[i] = (up + 1) * g / (1 + std::exp(-double{spec.swiglu_alpha} * g));
    } else {
      h[i] = spec.expert_kind == ExpertKind::kGlu ? ReferenceActivation(spec.activation, a) * u
                                                  : ReferenceActivation(spec.activation, a + b1[i]);
    }
    if (bf16) h[i] = RoundToBf16(static_cast<float>(h[i]));
  }
  for (int j = 0; j < d; ++j) {
    for (int i = 0; i < inner; ++i) y[j] += w2[static_cast<size_t>(j) * inner + i] * h[i];
    if (!b2.empty()) y[j] += b2[j];
  }
  return y;
}

// One layer for one token `x` (width hidden_size) in double, given its routing:
// an expert (or -1) per slot and its weight.
inline std::vector<double> RefLayer(const ModelDefinition& m, int l, const float* x, const std::vector<int>& experts,
                                    const std::vector<double>& weights, bool bf16) {
  const ModelSpec& spec = m.spec;
  const LayerWeights& layer = m.layers[l];
  const int d = spec.hidden_size;
  const std::vector<double> n = ReferenceLayerInput(spec, layer, x, bf16);
  std::vector<double> nin = n;
  if (bf16)
    for (double& v : nin) v = RoundToBf16(static_cast<float>(v));
  std::vector<double> y(d, 0);
  if (spec.residual) y.assign(x, x + d);
  for (size_t s = 0; s < experts.size(); ++s) {
    if (experts[s] < 0) continue;
    if (spec.routing_weights_scale_input) {  // expert(w * x), summed unweighted
      const double w = bf16 ? RoundToBf16(static_cast<float>(weights[s])) : weights[s];
      std::vector<double> scaled(nin);
      for (double& v : scaled) v = bf16 ? RoundToBf16(static_cast<float>(v * w)) : v * w;
      auto e = RefFfn(spec, layer.experts[experts[s]], scaled, bf16);
      for (int i = 0; i < d; ++i) y[i] += e[i];
      continue;
    }
    auto e = RefFfn(spec, layer.experts[experts[s]], nin, bf16);
    for (int i = 0; i < d; ++i) y[i] += weights[s] * e[i];
  }
  if (layer.shared) {
    auto e = RefFfn(spec, *layer.shared, nin, bf16);
    double gate = 1;
    if (!layer.shared_gate.empty()) {
      auto g = Values(layer.shared_gate, false);
      double dot = 0;
      for (int i = 0; i < d; ++i) dot += g[i] * n[i];
      gate = 1 / (1 + std::exp(-dot));
    }
    for (int i = 0; i < d; ++i) y[i] += gate * e[i];
  }
  return y;
}

// A model shape of the grid: a spec and how many layers to generate.
struct Case {
  std::string label;
  ModelSpec spec;
  int layers;
};

inline void PrintTo(const Case& c, std::ostream* os) { *os << c.label; }

// Softmax top-k routing of E experts of width d -> inner -> d, pre-norm and
// residual, fp32 weights.
inline ModelSpec BaseSpec(int d, int inner, int E, int k) {
  ModelSpec spec;
  spec.name = "test";
  spec.hidden_size = d;
  spec.intermediate_size = inner;
  spec.router.num_experts = E;
  spec.router.top_k = k;
  spec.pre_norm = true;
  spec.residual = true;
  return spec;
}

// Shapes, expert kinds, activations, router families and dtypes.
inline std::vector<Case> Grid() {
  std::vector<Case> cases;
  // fp16 checkpoints compute in bf16, as bf16 ones do.
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    const std::string dt = dtype == DType::kF32 ? "fp32" : dtype == DType::kBF16 ? "bf16" : "fp16";
    ModelSpec a = BaseSpec(64, 96, 8, 2);
    a.weight_dtype = dtype;
    cases.push_back({"glu_silu_" + dt, a, 2});
    ModelSpec b = BaseSpec(48, 40, 16, 4);
    b.weight_dtype = dtype;
    b.expert_kind = ExpertKind::kMlp;
    b.activation = Activation::kGelu;
    b.residual = false;
    b.pre_norm = false;
    cases.push_back({"mlp_gelu_" + dt, b, 1});
    ModelSpec c = BaseSpec(32, 64, 8, 8);  // k = E
    c.weight_dtype = dtype;
    c.activation = Activation::kGeluTanh;
    c.shared_intermediate_size = 48;
    c.shared_expert_gated = true;
    cases.push_back({"glu_k_equals_e_shared_gated_" + dt, c, 1});
    ModelSpec ds = BaseSpec(64, 32, 16, 4);
    ds.weight_dtype = dtype;
    ds.router.kind = RouterKind::kSigmoidGroupTopK;
    ds.router.n_group = 4;
    ds.router.topk_group = 2;
    ds.router.norm_topk_prob = true;
    ds.router.routed_scaling_factor = 2.5f;
    ds.shared_intermediate_size = 64;
    cases.push_back({"deepseek_like_" + dt, ds, 2});
  }
  ModelSpec dense = BaseSpec(32, 32, 4, 1);
  dense.router.kind = RouterKind::kDenseSoftmax;
  dense.expert_kind = ExpertKind::kMlp;
  dense.activation = Activation::kRelu;
  cases.push_back({"dense_softmax_mlp_relu", dense, 1});
  ModelSpec hier = BaseSpec(32, 32, 16, 4);
  hier.router.kind = RouterKind::kHierarchical;
  hier.router.n_group = 4;
  hier.router.topk_group = 2;
  hier.router.top_k_per_group = 2;
  cases.push_back({"hierarchical", hier, 2});
  ModelSpec sw = BaseSpec(32, 48, 4, 1);
  sw.router.capacity_factor = 1.0f;
  sw.router.norm_topk_prob = false;
  cases.push_back({"switch_top1_capacity", sw, 1});
  ModelSpec ec = BaseSpec(32, 48, 4, 1);
  ec.router.kind = RouterKind::kExpertChoice;
  ec.router.capacity_factor = 2.0f;
  cases.push_back({"expert_choice", ec, 1});
  // The families and options the loop above leaves out.
  ModelSpec mixtral = BaseSpec(64, 64, 8, 2);
  mixtral.weight_dtype = DType::kBF16;
  mixtral.router.norm_topk_prob = true;
  mixtral.router.logits_in_compute_dtype = true;
  cases.push_back({"mixtral_like_bf16_logits", mixtral, 2});
  ModelSpec v2 = BaseSpec(32, 32, 16, 3);
  v2.weight_dtype = DType::kBF16;
  v2.router.kind = RouterKind::kSoftmaxGroupTopK;
  v2.router.n_group = 4;
  v2.router.topk_group = 2;
  v2.router.routed_scaling_factor = 2.0f;
  v2.shared_intermediate_size = 32;
  cases.push_back({"deepseek_v2_like_scaled_bf16", v2, 1});
  v2.weight_dtype = DType::kF32;
  v2.router.top_k = 4;
  v2.router.norm_topk_prob = true;  // renormalises instead of scaling
  cases.push_back({"deepseek_v2_like_renormalised", v2, 1});
  hier.weight_dtype = DType::kBF16;
  hier.router.norm_topk_prob = true;
  cases.push_back({"hierarchical_renormalised_bf16", hier, 1});
  ModelSpec gshard = BaseSpec(32, 48, 4, 2);
  gshard.router.capacity_factor = 0.75f;
  gshard.router.norm_topk_prob = true;
  cases.push_back({"top2_capacity", gshard, 1});
  ModelSpec mmoe = BaseSpec(32, 32, 6, 2);
  mmoe.router.num_tasks = 3;
  mmoe.router.norm_topk_prob = true;
  cases.push_back({"multi_gate_top2", mmoe, 1});
  return cases;
}

// Compares the routing the engine returned for one token (`slots` entries of
// expert ids and task-0 weights) with the reference's; returns "" when they
// agree, else what differs.
inline std::string CompareRouting(const ReferenceTokenRouting& expected, const int32_t* ids, const float* weights,
                                  int slots) {
  const std::vector<int> actual_ids(ids, ids + slots);
  std::vector<int> actual_set, expected_set;
  std::copy_if(actual_ids.begin(), actual_ids.end(), std::back_inserter(actual_set), [](int e) { return e >= 0; });
  std::copy_if(expected.expert.begin(), expected.expert.end(), std::back_inserter(expected_set),
               [](int e) { return e >= 0; });
  std::sort(actual_set.begin(), actual_set.end());
  std::sort(expected_set.begin(), expected_set.end());
  if (actual_set != expected_set) {
    return absl::StrCat("experts [", absl::StrJoin(actual_set, ","), "], expected [", absl::StrJoin(expected_set, ","),
                        "]");
  }
  // The slot order is documented (best first; expert order for multi-gate and
  // expert choice): checked unless a near-tie leaves it open.
  if (!expected.order_ambiguous && actual_ids != expected.expert) {
    return absl::StrCat("slots [", absl::StrJoin(actual_ids, ","), "], expected [", absl::StrJoin(expected.expert, ","),
                        "]");
  }
  for (int s = 0; s < slots; ++s) {
    double want = 0;
    for (size_t j = 0; j < expected.expert.size(); ++j) {
      if (ids[s] >= 0 && expected.expert[j] == ids[s]) want = expected.weight[0][j];
    }
    // fp32 logits and selection against double: observed up to 2.4e-6
    // relative over the grid; a bf16 logit one ulp off moves weights ~1e-4.
    if (std::fabs(weights[s] - want) > 2e-5 * std::max(std::fabs(want), 1e-2)) {
      return absl::StrCat("weight of expert ", ids[s], " is ", weights[s], ", expected ", want);
    }
  }
  return "";
}

}  // namespace moe::testing

#endif  // MOE_TESTS_ENGINE_REFERENCE_MODEL_H_
