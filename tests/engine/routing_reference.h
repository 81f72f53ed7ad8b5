// An independent routing reference for the MoE layer tests. From a layer's
// input it computes, in double precision, the router logits and the selection
// of every router family as DESIGN.md ("What a MoE model is here") and
// RouterSpec define them, laid out in the slots engine/api/router.h documents, so
// that a test can check the routing an MoeModel returns, and feed its own
// reference layer, without trusting the engine's router. It is written from
// those definitions, not from engine/routing/router.cc or engine/routing/dispatch.cc.
//
// The numerics it follows are the ones the engine documents:
//  - the pre-norm is HF's RMSNorm: normalise in fp32 and, with bf16 compute,
//    round the normalised value to bf16, multiply by the weight, round again;
//  - the router sees that normalised input (the raw fp32 input when there is
//    no pre-norm) and the stored values of the router weights; logits are
//    x Wg^T in double, rounded to bf16 when RouterSpec::logits_in_compute_dtype
//    and the compute dtype is bf16;
//  - ties go to the lower expert (or token) index; DeepSeek's renormalisation
//    divides by (sum + 1e-20);
//  - a capacity factor caps each expert at ceil(capacity_factor * T * slots /
//    E) selections, filled every token's first choice before any second
//    choice, tokens in order within a slot; expert choice takes
//    min(T, ceil(capacity_factor * T / E)) tokens per expert.
//
// Near-ties. The engine accumulates the logits in fp32 and selects in fp32,
// the reference works in double; where a decision (a top-k boundary, a group
// boundary, the order of two slots, an expert-choice boundary, the bf16
// rounding of a logit, or a capacity boundary that one of these can move) is
// closer than those differences can reach, either answer is right. Such a
// token is marked `ambiguous` (or only `order_ambiguous`) and the tests skip
// its comparison and count the skips. The decision depends only on the
// reference, so the same tokens are skipped on every CPU path. A bf16-rounded
// logit close to a rounding midpoint is not skipped but routed both ways
// (`alternatives`, up to three such logits a token), as the rounding is
// exact and either result must match exactly.
//
// Pure functions; thread-safe.
#ifndef MOE_TESTS_ENGINE_ROUTING_REFERENCE_H_
#define MOE_TESTS_ENGINE_ROUTING_REFERENCE_H_

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <set>
#include <utility>
#include <vector>

#include "engine/api/dtype.h"
#include "engine/api/model_spec.h"

namespace moe::testing {

// The layer input as the router (and, once rounded to bf16 with bf16 compute,
// the experts) see it: HF's RMSNorm with the engine's documented roundings, or
// the input itself without a pre-norm. `x` is one token of width hidden_size.
inline std::vector<double> ReferenceLayerInput(const ModelSpec& spec, const LayerWeights& layer, const float* x,
                                               bool bf16) {
  const int d = spec.hidden_size;
  std::vector<double> out(x, x + d);
  if (!spec.pre_norm) return out;
  // The mean square in fp32 (accumulated in double, which only the last bit
  // can tell apart), its rsqrt in fp32, as HF computes the norm.
  double sum_squares = 0;
  for (int i = 0; i < d; ++i) sum_squares += static_cast<double>(x[i]) * x[i];
  const float variance = static_cast<float>(sum_squares / d);
  const float inverse_rms = 1.0f / std::sqrt(variance + spec.norm_eps);
  const std::vector<float> weight = layer.norm.ToFloats();
  for (int i = 0; i < d; ++i) {
    float v = x[i] * inverse_rms;
    if (bf16) v = RoundToBf16(v);
    v = weight[i] * v;
    if (bf16) v = RoundToBf16(v);
    out[i] = v;
  }
  return out;
}

// One token's reference routing.
struct ReferenceTokenRouting {
  // [slots] in the documented slot order; -1 = unused, or dropped by capacity.
  std::vector<int> expert;
  // [num_tasks][slots]; 0 where the slot is unused, dropped, or (multi-gate)
  // not chosen by that task's gate.
  std::vector<std::vector<double>> weight;
  // A near-tie: the engine may legitimately select (or keep) other experts.
  bool ambiguous = false;
  // A near-tie between two selected experts: only the slot order is in doubt.
  bool order_ambiguous = false;
  // Where a bf16-rounded logit of this token lies so close to a rounding
  // midpoint that the engine's fp32 logit may round to the neighbouring bf16
  // value: the routings from those roundings, each as right as this one.
  std::vector<ReferenceTokenRouting> alternatives;
  // The experts a near-tie of this token involves (capacity boundaries they
  // may move are marked ambiguous too).
  std::set<int> near_tie_experts;
};

// The reference routing of a batch.
struct ReferenceRouting {
  int slots = 0;
  std::vector<ReferenceTokenRouting> tokens;
};

namespace routing_reference_internal {

// Relative gap under which two compared scores count as a near-tie. An fp32
// router logit is typically within ~1e-6 of the double one (the worst case,
// ComputeLogits's bound, is ~5e-5 at the grid's sizes); softmax and sigmoid
// pass that on to the scores' relative gaps about doubled, so 1e-4 covers it
// and still skips few tokens. With logits rounded to bf16, engine and
// reference select from the same logits (TokenLogits::other_rounding lists
// where they might not), so only the fp32 arithmetic of the selection
// differs, well under 1e-6.
constexpr double kNearTieUnrounded = 1e-4;
constexpr double kNearTieRounded = 1e-6;
// A token with more logits close to a bf16 rounding midpoint is skipped
// rather than routed every way they could round.
constexpr size_t kMaxRoundingAlternatives = 3;

// One token's router logits.
struct TokenLogits {
  std::vector<double> value;  // [columns]
  // Logits rounded to bf16: (column, neighbouring bf16 value) for each logit
  // that lies close enough to a rounding midpoint that the engine's fp32
  // logit may round to that neighbour instead.
  std::vector<std::pair<int, double>> other_rounding;
};

// Decides whether two compared scores are too close to call.
struct NearTie {
  double relative;
  // With bf16-rounded logits an exact tie comes from equal logits, which the
  // engine has too, and both break it to the lower index.
  bool exact_ties_agree;

  // `better` ranks at or above `worse`.
  bool operator()(double better, double worse) const {
    const double gap = better - worse;
    if (gap == 0 && exact_ties_agree) return false;
    return gap <= relative * std::max({std::fabs(better), std::fabs(worse), 1e-300});
  }
};

inline std::vector<double> Softmax(const double* logits, int n) {
  const double max_logit = *std::max_element(logits, logits + n);
  std::vector<double> p(n);
  double sum = 0;
  for (int i = 0; i < n; ++i) sum += (p[i] = std::exp(logits[i] - max_logit));
  for (double& v : p) v /= sum;
  return p;
}

// `candidates` (indices into `score`) by descending score, ties to the lower index.
inline std::vector<int> RankDescending(const std::vector<double>& score, std::vector<int> candidates) {
  std::sort(candidates.begin(), candidates.end());
  std::stable_sort(candidates.begin(), candidates.end(), [&score](int a, int b) { return score[a] > score[b]; });
  return candidates;
}

inline std::vector<int> Range(int begin, int end) {
  std::vector<int> out(end - begin);
  std::iota(out.begin(), out.end(), begin);
  return out;
}

// Checks the decisions of keeping ranked[0, k) of `ranked`: the boundary
// between the k-th and the next, and, when `check_order`, the order of the
// kept ones. Near-ties mark `token` and return the entries involved.
inline std::vector<int> CheckKeep(const std::vector<double>& score, const std::vector<int>& ranked, int k,
                                  bool check_order, const NearTie& near, ReferenceTokenRouting* token) {
  std::vector<int> involved;
  const int n = static_cast<int>(ranked.size());
  if (k < n && near(score[ranked[k - 1]], score[ranked[k]])) {
    token->ambiguous = true;
    for (int j = k - 1; j >= 0 && near(score[ranked[j]], score[ranked[k]]); --j) involved.push_back(ranked[j]);
    for (int j = k; j < n && near(score[ranked[k - 1]], score[ranked[j]]); ++j) involved.push_back(ranked[j]);
  }
  if (check_order) {
    for (int j = 0; j + 1 < k; ++j) {
      if (near(score[ranked[j]], score[ranked[j + 1]])) {
        token->order_ambiguous = true;
        involved.push_back(ranked[j]);
        involved.push_back(ranked[j + 1]);
      }
    }
  }
  return involved;
}

// Logits of one token: rows of the router's gates (task-major, or the group
// gate's rows followed by each group's) dotted with `n` in double.
// `logit_bias` (one gate only; empty: none) is added before the rounding, as
// a linear layer with a bias computes it (gpt-oss).
inline TokenLogits ComputeLogits(const std::vector<std::vector<float>>& gates, const std::vector<double>& n,
                                 bool round_to_bf16, const std::vector<float>& logit_bias = {}) {
  const size_t d = n.size();
  TokenLogits out;
  for (const std::vector<float>& gate : gates) {
    for (size_t row = 0; row < gate.size() / d; ++row) {
      double dot = 0, magnitude = 0;
      for (size_t i = 0; i < d; ++i) {
        const double term = gate[row * d + i] * n[i];
        dot += term;
        magnitude += std::fabs(term);
      }
      if (!logit_bias.empty()) dot += logit_bias[row];
      if (round_to_bf16) {
        // A bound on the error of an fp32 dot product in any order of
        // summation, with or without fused multiply-adds.
        const double error = (d + 2) * std::ldexp(1.0, -24) * magnitude;
        const float low = RoundToBf16(static_cast<float>(dot - error));
        const float high = RoundToBf16(static_cast<float>(dot + error));
        const double rounded = RoundToBf16(static_cast<float>(dot));
        if (low != high) out.other_rounding.emplace_back(out.value.size(), rounded == low ? high : low);
        dot = rounded;
      }
      out.value.push_back(dot);
    }
  }
  return out;
}

// softmax_topk (and each gate of a multi-gate model): softmax, the top-k,
// renormalised when norm_topk_prob. Returns (experts, weights) best first;
// `check_order` when the slots keep that order.
inline void SelectSoftmaxTopK(const RouterSpec& r, const double* logits, int k, bool check_order, const NearTie& near,
                              ReferenceTokenRouting* token, std::vector<int>* experts, std::vector<double>* weights) {
  const int E = r.num_experts;
  const std::vector<double> p = Softmax(logits, E);
  const std::vector<int> ranked = RankDescending(p, Range(0, E));
  for (int e : CheckKeep(p, ranked, k, check_order, near, token)) token->near_tie_experts.insert(e);
  experts->assign(ranked.begin(), ranked.begin() + k);
  weights->clear();
  double sum = 0;
  for (int e : *experts) sum += p[e];
  for (int e : *experts) weights->push_back(r.norm_topk_prob ? p[e] / sum : p[e]);
}

// sigmoid_group_topk (DeepSeek-V3) and softmax_group_topk (DeepSeek-V2).
inline void SelectGroupLimited(const RouterSpec& r, const double* logits, const std::vector<float>& bias,
                               const NearTie& near, ReferenceTokenRouting* token, std::vector<int>* experts,
                               std::vector<double>* weights) {
  const int E = r.num_experts;
  const int group_size = E / r.n_group;
  const bool v3 = r.kind == RouterKind::kSigmoidGroupTopK;
  std::vector<double> score(E), choice(E);
  if (v3) {
    for (int e = 0; e < E; ++e) score[e] = 1 / (1 + std::exp(-logits[e]));
  } else {
    score = Softmax(logits, E);
  }
  for (int e = 0; e < E; ++e) choice[e] = score[e] + (v3 && !bias.empty() ? bias[e] : 0.0);
  std::vector<int> candidates = Range(0, E);
  if (r.n_group > 1) {
    // V3: a group's score is the sum of its two best biased scores; V2: its best.
    std::vector<double> group_score(r.n_group);
    for (int g = 0; g < r.n_group; ++g) {
      std::vector<double> member(choice.begin() + g * group_size, choice.begin() + (g + 1) * group_size);
      std::sort(member.rbegin(), member.rend());
      group_score[g] = v3 ? member[0] + member[1] : member[0];
    }
    const std::vector<int> groups = RankDescending(group_score, Range(0, r.n_group));
    for (int g : CheckKeep(group_score, groups, r.topk_group, /*check_order=*/false, near, token)) {
      for (int e = g * group_size; e < (g + 1) * group_size; ++e) token->near_tie_experts.insert(e);
    }
    candidates.clear();
    for (int j = 0; j < r.topk_group; ++j) {
      for (int e = groups[j] * group_size; e < (groups[j] + 1) * group_size; ++e) candidates.push_back(e);
    }
  }
  const std::vector<int> ranked = RankDescending(choice, candidates);
  for (int e : CheckKeep(choice, ranked, r.top_k, /*check_order=*/true, near, token)) {
    token->near_tie_experts.insert(e);
  }
  experts->assign(ranked.begin(), ranked.begin() + r.top_k);
  weights->clear();
  double sum = 0;
  for (int e : *experts) sum += score[e];  // the unbiased scores
  // V3 renormalises (optionally) and scales; V2's published code renormalises
  // when norm_topk_prob and top_k > 1, and scales otherwise, never both.
  const bool renormalise = v3 ? r.norm_topk_prob : r.norm_topk_prob && r.top_k > 1;
  const bool scale = v3 || !renormalise;
  for (int e : *experts) {
    double w = renormalise ? score[e] / (sum + 1e-20) : score[e];
    weights->push_back(scale ? w * r.routed_scaling_factor : w);
  }
}

// hierarchical: softmax over the group logits, the best topk_group groups
// (best first), in each a softmax over its own logits and its best
// top_k_per_group experts; weight = group probability x inner probability,
// renormalised over all the slots when norm_topk_prob.
inline void SelectHierarchical(const RouterSpec& r, const double* logits, const NearTie& near,
                               ReferenceTokenRouting* token, std::vector<int>* experts, std::vector<double>* weights) {
  const int G = r.n_group;
  const int group_size = r.num_experts / G;
  const std::vector<double> group_p = Softmax(logits, G);
  const std::vector<int> groups = RankDescending(group_p, Range(0, G));
  for (int g : CheckKeep(group_p, groups, r.topk_group, /*check_order=*/true, near, token)) {
    for (int e = g * group_size; e < (g + 1) * group_size; ++e) token->near_tie_experts.insert(e);
  }
  experts->clear();
  weights->clear();
  for (int j = 0; j < r.topk_group; ++j) {
    const int g = groups[j];
    const std::vector<double> inner = Softmax(logits + G + g * group_size, group_size);
    const std::vector<int> ranked = RankDescending(inner, Range(0, group_size));
    for (int i : CheckKeep(inner, ranked, r.top_k_per_group, /*check_order=*/true, near, token)) {
      token->near_tie_experts.insert(g * group_size + i);
    }
    for (int i = 0; i < r.top_k_per_group; ++i) {
      experts->push_back(g * group_size + ranked[i]);
      weights->push_back(group_p[g] * inner[ranked[i]]);
    }
  }
  if (r.norm_topk_prob) {
    const double sum = std::accumulate(weights->begin(), weights->end(), 0.0);
    for (double& w : *weights) w /= sum;
  }
}

// expert_choice: each expert takes the min(T, ceil(capacity_factor * T / E))
// tokens with the highest softmax probability for it (ties to the lower
// token); slot e of a token holds expert e when e took it.
inline void SelectExpertChoice(const RouterSpec& r, const std::vector<TokenLogits>& logits, const NearTie& near,
                               ReferenceRouting* out) {
  const int T = static_cast<int>(logits.size());
  const int E = r.num_experts;
  std::vector<std::vector<double>> p(T);
  bool any_near_rounding = false;
  for (int t = 0; t < T; ++t) {
    p[t] = Softmax(logits[t].value.data(), E);
    any_near_rounding = any_near_rounding || !logits[t].other_rounding.empty();
  }
  const int capacity = std::min(T, static_cast<int>(std::ceil(static_cast<double>(r.capacity_factor) * T / E)));
  for (int e = 0; e < E; ++e) {
    std::vector<double> column(T);
    for (int t = 0; t < T; ++t) column[t] = p[t][e];
    const std::vector<int> ranked = RankDescending(column, Range(0, T));
    ReferenceTokenRouting boundary;
    for (int t : CheckKeep(column, ranked, capacity, /*check_order=*/false, near, &boundary)) {
      out->tokens[t].ambiguous = true;
    }
    for (int j = 0; j < capacity; ++j) {
      out->tokens[ranked[j]].expert[e] = e;
      out->tokens[ranked[j]].weight[0][e] = column[ranked[j]];
    }
  }
  // A token whose rounded logits are in doubt moves in every column: rare
  // (and absent from the grid); the whole batch is skipped.
  if (any_near_rounding) {
    for (ReferenceTokenRouting& token : out->tokens) token.ambiguous = true;
  }
}

// Routes one token from its logits `row` (every family but expert choice,
// before any capacity) into `token`, whose slots are already sized.
inline void RouteToken(const RouterSpec& r, const double* row, const std::vector<float>& bias, const NearTie& near,
                       ReferenceTokenRouting* token) {
  const int E = r.num_experts;
  const bool multi_gate = r.num_tasks > 1;
  const int k = r.kind == RouterKind::kDenseSoftmax ? E : r.top_k;
  std::vector<int> experts;
  std::vector<double> weights;
  if (multi_gate) {
    // One gate per task (softmax, top-k or dense); the slots hold the union
    // of the tasks' experts in expert order, each task weighing its own.
    std::vector<std::vector<double>> task_weight(r.num_tasks, std::vector<double>(E, 0.0));
    std::vector<bool> used(E, false);
    for (int task = 0; task < r.num_tasks; ++task) {
      SelectSoftmaxTopK(r, row + static_cast<size_t>(task) * E, k, /*check_order=*/false, near, token, &experts,
                        &weights);
      for (size_t j = 0; j < experts.size(); ++j) {
        used[experts[j]] = true;
        task_weight[task][experts[j]] = weights[j];
      }
    }
    int slot = 0;
    for (int e = 0; e < E; ++e) {
      if (!used[e]) continue;
      token->expert[slot] = e;
      for (int task = 0; task < r.num_tasks; ++task) token->weight[task][slot] = task_weight[task][e];
      ++slot;
    }
    return;
  }
  switch (r.kind) {
    case RouterKind::kSoftmaxTopK:
      SelectSoftmaxTopK(r, row, r.top_k, /*check_order=*/true, near, token, &experts, &weights);
      for (double& w : weights) w *= r.routed_scaling_factor;  // Granite's residual_multiplier
      break;
    case RouterKind::kSigmoidGroupTopK:
    case RouterKind::kSoftmaxGroupTopK:
      SelectGroupLimited(r, row, bias, near, token, &experts, &weights);
      break;
    case RouterKind::kHierarchical:
      SelectHierarchical(r, row, near, token, &experts, &weights);
      break;
    case RouterKind::kDenseSoftmax:
      experts = Range(0, E);
      weights = Softmax(row, E);
      break;
    case RouterKind::kExpertChoice:
      break;  // a batch decision: SelectExpertChoice
  }
  for (size_t j = 0; j < experts.size(); ++j) {
    token->expert[j] = experts[j];
    token->weight[0][j] = weights[j];
  }
}

// A capacity factor on a top-k family: each expert keeps its first
// ceil(capacity_factor * T * slots / E) selections in priority order (slot
// by slot, tokens in order within a slot); the rest are dropped.
inline void ApplyCapacity(const RouterSpec& r, ReferenceRouting* out) {
  const int T = static_cast<int>(out->tokens.size());
  const int S = out->slots;
  const int E = r.num_experts;
  const int64_t capacity = static_cast<int64_t>(std::ceil(static_cast<double>(r.capacity_factor) * T * S / E));
  std::vector<int64_t> filled(E, 0);
  // rank[t][s]: how many selections of the same expert precede (t, s).
  std::vector<std::vector<int64_t>> rank(T, std::vector<int64_t>(S, -1));
  for (int s = 0; s < S; ++s) {
    for (int t = 0; t < T; ++t) {
      const int e = out->tokens[t].expert[s];
      if (e >= 0) rank[t][s] = filled[e]++;
    }
  }
  // A near-tie can add, remove or reorder one selection of each expert it
  // involves (a slot-order tie changes priority too), moving the ranks of that
  // expert's other selections by at most one per near-tie: the selections
  // whose rank is within that of the capacity are in doubt.
  std::vector<int64_t> shift(E, 0);
  for (ReferenceTokenRouting& token : out->tokens) {
    if (token.order_ambiguous) token.ambiguous = true;
    if (!token.ambiguous) continue;
    for (int e : token.near_tie_experts) ++shift[e];
  }
  for (int t = 0; t < T; ++t) {
    ReferenceTokenRouting& token = out->tokens[t];
    for (int s = 0; s < S; ++s) {
      const int e = token.expert[s];
      if (e < 0) continue;
      if (shift[e] > 0 && rank[t][s] >= capacity - shift[e] && rank[t][s] < capacity + shift[e]) {
        token.ambiguous = true;
      }
      if (rank[t][s] >= capacity) {
        token.expert[s] = -1;
        for (std::vector<double>& w : token.weight) w[s] = 0;
      }
    }
  }
}

}  // namespace routing_reference_internal

// The routing of `num_tokens` rows of `input` (width hidden_size) by layer
// `layer` of a model with `spec`, computing in bf16 when `bf16`.
inline ReferenceRouting ReferenceRoute(const ModelSpec& spec, const LayerWeights& layer, const float* input,
                                       int num_tokens, bool bf16) {
  namespace internal = routing_reference_internal;
  const RouterSpec& r = spec.router;
  const int E = r.num_experts;
  const int d = spec.hidden_size;
  const bool rounded = bf16 && r.logits_in_compute_dtype;
  const internal::NearTie near{rounded ? internal::kNearTieRounded : internal::kNearTieUnrounded, rounded};
  std::vector<std::vector<float>> gates;
  for (const HostTensor& gate : layer.router) gates.push_back(gate.ToFloats());
  const std::vector<float> bias = layer.router_bias.empty() ? std::vector<float>() : layer.router_bias.ToFloats();
  const std::vector<float> logit_bias =
      layer.router_logit_bias.empty() ? std::vector<float>() : layer.router_logit_bias.ToFloats();

  std::vector<internal::TokenLogits> logits;
  for (int t = 0; t < num_tokens; ++t) {
    logits.push_back(internal::ComputeLogits(
        gates, ReferenceLayerInput(spec, layer, input + static_cast<size_t>(t) * d, bf16), rounded, logit_bias));
  }

  ReferenceRouting out;
  const bool multi_gate = r.num_tasks > 1;
  const bool dense = r.kind == RouterKind::kDenseSoftmax;
  const int k = dense ? E : r.top_k;
  switch (r.kind) {
    case RouterKind::kDenseSoftmax:
    case RouterKind::kExpertChoice:
      out.slots = E;
      break;
    case RouterKind::kHierarchical:
      out.slots = r.topk_group * r.top_k_per_group;
      break;
    default:
      out.slots = r.top_k;
  }
  if (multi_gate) out.slots = std::min(E, r.num_tasks * k);
  out.tokens.resize(num_tokens);
  for (int t = 0; t < num_tokens; ++t) {
    out.tokens[t].expert.assign(out.slots, -1);
    out.tokens[t].weight.assign(r.num_tasks, std::vector<double>(out.slots, 0.0));
  }

  if (r.kind == RouterKind::kExpertChoice) {
    internal::SelectExpertChoice(r, logits, near, &out);
    return out;
  }
  for (int t = 0; t < num_tokens; ++t) {
    ReferenceTokenRouting& token = out.tokens[t];
    internal::RouteToken(r, logits[t].value.data(), bias, near, &token);
    const auto& other_rounding = logits[t].other_rounding;
    if (other_rounding.empty()) continue;
    if (r.capacity_factor > 0 || other_rounding.size() > internal::kMaxRoundingAlternatives) {
      // Under a capacity the other tokens' drops would depend on it too.
      token.ambiguous = true;
      for (int e = 0; e < E; ++e) token.near_tie_experts.insert(e);
      continue;
    }
    for (unsigned mask = 1; mask < (1u << other_rounding.size()); ++mask) {
      std::vector<double> row = logits[t].value;
      for (size_t i = 0; i < other_rounding.size(); ++i) {
        if (mask & (1u << i)) row[other_rounding[i].first] = other_rounding[i].second;
      }
      ReferenceTokenRouting alternative;
      alternative.expert.assign(out.slots, -1);
      alternative.weight.assign(r.num_tasks, std::vector<double>(out.slots, 0.0));
      internal::RouteToken(r, row.data(), bias, near, &alternative);
      token.ambiguous = token.ambiguous || alternative.ambiguous;
      token.alternatives.push_back(std::move(alternative));
    }
  }
  if (r.capacity_factor > 0) internal::ApplyCapacity(r, &out);
  return out;
}

}  // namespace moe::testing

#endif  // MOE_TESTS_ENGINE_ROUTING_REFERENCE_H_
