// The per-thread logic of the CUDA executor's kernels, as plain functions
// that compile for the host and the device (__host__ __device__ under nvcc,
// ordinary inline functions otherwise), so that the CPU test suite checks
// them against the engine's own router, dispatch and combine
// (tests/engine/cuda_device_math_test.cc) on machines without a GPU.
//
// Each function does exactly what its CPU counterpart does, in the same
// order of floating-point operations, so that a GPU run differs from the CPU
// only where the device's exp/erf/tanh differ in the last bits:
//  - SelectToken: engine/routing/router.cc's softmax top-k and its two
//    group-limited families (DeepSeek-V3 sigmoid, DeepSeek-V2 softmax);
//  - CountChunk, ScanChunks, RankChunk, PlaceSelection: PlanDispatch
//    (engine/api/dispatch.h) as a stable counting sort split over chunks
//    of selections, with its capacity rule (slot-major priority);
//  - CombineElement: Combine's sum, in its order, without fused multiply-add.
// No state: every function is pure over its arguments.
#ifndef MOE_ENGINE_CUDA_DEVICE_MATH_H_
#define MOE_ENGINE_CUDA_DEVICE_MATH_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MOE_HD __host__ __device__
#else
#define MOE_HD
#endif

namespace moe::device_math {

// The most routed experts a device-selected layer may have (the local
// arrays of SelectToken); wider routers select on the host.
constexpr int kMaxExperts = 512;
constexpr int kMaskWords = kMaxExperts / 32;
// The most expert groups a device-selected group-limited router may have.
constexpr int kMaxGroups = 64;

MOE_HD inline uint32_t FloatBits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return bits;
#endif
}

MOE_HD inline float BitsFloat(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
#endif
}

// Round to nearest even bf16, NaN kept (engine/api/dtype.h's FloatToBf16).
MOE_HD inline uint16_t ToBf16Bits(float value) {
  uint32_t bits = FloatBits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}
MOE_HD inline float FromBf16Bits(uint16_t bits) { return BitsFloat(static_cast<uint32_t>(bits) << 16); }
MOE_HD inline float RoundBf16(float value) { return FromBf16Bits(ToBf16Bits(value)); }

MOE_HD inline float Exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}
MOE_HD inline float Erf(float x) {
#if defined(__CUDA_ARCH__)
  return erff(x);
#else
  return std::erf(x);
#endif
}
MOE_HD inline float Tanh(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  return std::tanh(x);
#endif
}
// a * b + c with the product rounded first (no fused multiply-add), as the
// CPU's portable code computes it.
MOE_HD inline float MulAdd(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(a, b), c);
#else
  volatile float product = a * b;  // keeps a contracting compiler from fusing
  return product + c;
#endif
}

// The activations of engine/api/model_spec.h, numbered as its enum.
enum class Act : int { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3 };

MOE_HD inline float Activate(Act act, float x) {
  switch (act) {
    case Act::kSilu:
      return x / (1.0f + Exp(-x));
    case Act::kGelu:
      return 0.5f * x * (1.0f + Erf(x * 0.70710678118654752f));
    case Act::kGeluTanh:
      return 0.5f * x * (1.0f + Tanh(0.79788456080286536f * (x + 0.044715f * x * x * x)));
    case Act::kRelu:
      return x > 0.0f ? x : 0.0f;
  }
  return x;
}

// gpt-oss's clamped SwiGLU of a gate and an up value with their biases
// added (engine/cpu/panel_kernels.h's ClampedSwigluTileRow, in its order):
// g = min(gate, limit), u = clamp(up, -limit, limit), (u + 1) * g * sigmoid(alpha * g).
MOE_HD inline float ClampedSwiglu(float gate, float up, float alpha, float limit) {
  const float g = gate < limit ? gate : limit;
  const float u = up < -limit ? -limit : (up > limit ? limit : up);
  return (u + 1.0f) * (g / (1.0f + Exp(-alpha * g)));
}

// ---- Selection ------------------------------------------------------------

// The router families selected on the device.
enum class Family : int { kSoftmaxTopK = 0, kSigmoidGroupTopK = 1, kSoftmaxGroupTopK = 2 };

struct SelectionParams {
  Family family = Family::kSoftmaxTopK;
  int num_experts = 0;
  int top_k = 1;
  int n_group = 1;
  int topk_group = 1;
  bool norm_topk_prob = false;
  float routed_scaling_factor = 1.0f;
  // Round each logit to bf16 first (RouterSpec::logits_in_compute_dtype
  // under bf16 compute).
  bool round_logits = false;
};

// One token's working memory, in the thread's local memory on the device.
struct SelectionScratch {
  float probs[kMaxExperts];
  float choice[kMaxExperts];
  float group_scores[kMaxGroups];
  uint32_t taken[kMaskWords];
};

MOE_HD inline void ClearMask(uint32_t* mask, int n) {
  for (int w = 0; w < (n + 31) / 32; ++w) mask[w] = 0;
}
MOE_HD inline bool InMask(const uint32_t* mask, int i) { return (mask[i >> 5] >> (i & 31)) & 1u; }
MOE_HD inline void AddToMask(uint32_t* mask, int i) { mask[i >> 5] |= 1u << (i & 31); }

// The best of scores[0, n) not in `taken`: the largest, ties to the lower
// index (std::partial_sort's order in the CPU's TopK). -1 when all are taken.
MOE_HD inline int BestUntaken(const float* scores, int n, const uint32_t* taken) {
  int best = -1;
  for (int i = 0; i < n; ++i) {
    if (InMask(taken, i)) continue;
    if (best < 0 || scores[i] > scores[best]) best = i;
  }
  return best;
}

// order[0, k) = the k best of scores[0, n), best first. Uses `taken`.
MOE_HD inline void TopK(const float* scores, int n, int k, uint32_t* taken, int* order) {
  ClearMask(taken, n);
  for (int j = 0; j < k; ++j) {
    order[j] = BestUntaken(scores, n, taken);
    AddToMask(taken, order[j]);
  }
}

// out[i] = softmax(values)[i]; out may be values.
MOE_HD inline void Softmax(const float* values, int n, float* out) {
  float max_value = -INFINITY;
  for (int i = 0; i < n; ++i) max_value = values[i] > max_value ? values[i] : max_value;
  float sum = 0;
  for (int i = 0; i < n; ++i) {
    out[i] = Exp(values[i] - max_value);
    sum += out[i];
  }
  for (int i = 0; i < n; ++i) out[i] /= sum;
}

MOE_HD inline void Renormalise(float* weights, int k, float epsilon) {
  float sum = 0;
  for (int j = 0; j < k; ++j) sum += weights[j];
  for (int j = 0; j < k; ++j) weights[j] /= (sum + epsilon);
}

// Masks (to -inf) the experts of the groups a group-limited router does not
// keep: group score = sum of the two best (sigmoid) or the best (softmax).
MOE_HD inline void LimitGroups(const SelectionParams& p, bool sigmoid, SelectionScratch& s) {
  const int group_size = p.num_experts / p.n_group;
  int order[2];
  for (int g = 0; g < p.n_group; ++g) {
    const float* member = s.choice + g * group_size;
    if (sigmoid) {
      TopK(member, group_size, 2, s.taken, order);
      s.group_scores[g] = member[order[0]] + member[order[1]];
    } else {
      float best = member[0];
      for (int i = 1; i < group_size; ++i) best = member[i] > best ? member[i] : best;
      s.group_scores[g] = best;
    }
  }
  uint32_t kept[kMaskWords];
  ClearMask(kept, p.n_group);
  ClearMask(s.taken, p.n_group);
  for (int j = 0; j < p.topk_group; ++j) {
    const int g = BestUntaken(s.group_scores, p.n_group, s.taken);
    AddToMask(s.taken, g);
    AddToMask(kept, g);
  }
  for (int e = 0; e < p.num_experts; ++e) {
    if (!InMask(kept, e / group_size)) s.choice[e] = -INFINITY;
  }
}

// Selects one token's experts from its logits [num_experts]: logit_bias
// [E] (gpt-oss's router bias, added first) and bias [E] (the DeepSeek-V3
// correction) may be null. expert/weight: [top_k].
MOE_HD inline void SelectToken(const SelectionParams& p, const float* logits, const float* logit_bias,
                               const float* bias, SelectionScratch& s, int32_t* expert, float* weight) {
  const int E = p.num_experts;
  for (int e = 0; e < E; ++e) {
    const float logit = logit_bias ? logits[e] + logit_bias[e] : logits[e];
    s.probs[e] = p.round_logits ? RoundBf16(logit) : logit;
  }
  const bool sigmoid = p.family == Family::kSigmoidGroupTopK;
  if (sigmoid) {
    for (int e = 0; e < E; ++e) s.probs[e] = 1.0f / (1.0f + Exp(-s.probs[e]));
  } else {
    Softmax(s.probs, E, s.probs);
  }
  const bool grouped = p.family != Family::kSoftmaxTopK;
  for (int e = 0; e < E; ++e) s.choice[e] = s.probs[e] + (sigmoid && bias ? bias[e] : 0.0f);
  if (grouped && p.n_group > 1) LimitGroups(p, sigmoid, s);
  ClearMask(s.taken, E);
  for (int j = 0; j < p.top_k; ++j) {
    const int e = BestUntaken(s.choice, E, s.taken);
    AddToMask(s.taken, e);
    expert[j] = e;
    weight[j] = s.probs[e];
  }
  if (!grouped) {
    if (p.norm_topk_prob) Renormalise(weight, p.top_k, 0.0f);
    if (p.routed_scaling_factor != 1.0f) {  // Granite's residual_multiplier
      for (int j = 0; j < p.top_k; ++j) weight[j] *= p.routed_scaling_factor;
    }
  } else if (sigmoid) {
    if (p.norm_topk_prob) Renormalise(weight, p.top_k, 1e-20f);
    for (int j = 0; j < p.top_k; ++j) weight[j] *= p.routed_scaling_factor;
  } else if (p.norm_topk_prob && p.top_k > 1) {
    Renormalise(weight, p.top_k, 1e-20f);  // DeepSeek-V2: renormalise or scale, never both
  } else {
    for (int j = 0; j < p.top_k; ++j) weight[j] *= p.routed_scaling_factor;
  }
}

// ---- Dispatch ---------------------------------------------------------------
//
// A stable counting sort of the T * S selections by expert, in chunks of
// kChunk positions: CountChunk (one thread per chunk) counts each chunk's
// selections per expert, ScanChunks (one thread per expert) turns the
// counts into each chunk's first rank and the expert's total, RankChunk (one
// thread per chunk) gives every selection its rank among its expert's. Run
// over positions in slot-major order (every token's first choice before any
// second choice), the ranks say which selections an expert's capacity keeps;
// run over the kept ones in token order, they are the rows.

constexpr int kChunk = 64;

enum class Order : int { kTokenMajor = 0, kSlotMajor = 1 };

// The selection (t * S + s) at `position` of `order`.
MOE_HD inline int64_t SelectionAt(Order order, int64_t position, int T, int S) {
  if (order == Order::kTokenMajor) return position;
  return (position % T) * S + position / T;
}

// counts[chunk * E + e] = selections of chunk `chunk` with key e (keys < 0
// are skipped). counts of the chunk start at zero.
MOE_HD inline void CountChunk(int64_t chunk, const int32_t* key, Order order, int T, int S, int E, int32_t* counts) {
  const int64_t n = static_cast<int64_t>(T) * S;
  int32_t* mine = counts + chunk * E;
  for (int64_t p = chunk * kChunk; p < n && p < (chunk + 1) * kChunk; ++p) {
    const int32_t e = key[SelectionAt(order, p, T, S)];
    if (e >= 0) ++mine[e];
  }
}

// Turns expert e's counts over `chunks` into exclusive prefix sums; total[e]
// = the expert's selections.
MOE_HD inline void ScanChunks(int e, int64_t chunks, int E, int32_t* counts, int32_t* total) {
  int32_t running = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const int32_t count = counts[c * E + e];
    counts[c * E + e] = running;
    running += count;
  }
  total[e] = running;
}

// rank[selection] = its rank among its key's selections in `order` (counts
// as ScanChunks left them; this chunk's are advanced). Keys < 0 get rank -1.
MOE_HD inline void RankChunk(int64_t chunk, const int32_t* key, Order order, int T, int S, int E, int32_t* counts,
                             int32_t* rank) {
  const int64_t n = static_cast<int64_t>(T) * S;
  int32_t* next = counts + chunk * E;
  for (int64_t p = chunk * kChunk; p < n && p < (chunk + 1) * kChunk; ++p) {
    const int64_t selection = SelectionAt(order, p, T, S);
    const int32_t e = key[selection];
    rank[selection] = e >= 0 ? next[e]++ : -1;
  }
}

// The key of the placement pass: the expert when the capacity keeps the
// selection (capacity < 0: no limit; priority_rank: its rank in slot-major
// order), else -1.
MOE_HD inline int32_t KeptKey(int32_t expert, int64_t capacity, int32_t priority_rank) {
  if (expert < 0) return -1;
  return (capacity < 0 || priority_rank < capacity) ? expert : -1;
}

// Expert offsets [E + 1], and per expert the selections routed (kept +
// dropped) and dropped, from the two passes' totals (routed_total: the
// priority pass's, or the kept totals when dropless).
MOE_HD inline void FinishCounts(int E, const int32_t* routed_total, const int32_t* kept_total, int64_t* offsets,
                                int64_t* routed, int64_t* dropped) {
  offsets[0] = 0;
  for (int e = 0; e < E; ++e) {
    offsets[e + 1] = offsets[e] + kept_total[e];
    routed[e] = routed_total[e];
    dropped[e] = routed_total[e] - kept_total[e];
  }
}

// Places selection `selection` (kept: its rank among the expert's kept
// selections in token order) at its row.
MOE_HD inline void PlaceSelection(int64_t selection, int S, const int32_t* kept_key, const int32_t* kept_rank,
                                  const int64_t* offsets, int32_t* slot_row, int32_t* row_token, int32_t* row_expert) {
  const int32_t e = kept_key[selection];
  if (e < 0) {
    slot_row[selection] = -1;
    return;
  }
  const int64_t row = offsets[e] + kept_rank[selection];
  slot_row[selection] = static_cast<int32_t>(row);
  row_token[row] = static_cast<int32_t>(selection / S);
  row_expert[row] = e;
}

// ---- Combine ----------------------------------------------------------------

// Element i of token t's output: residual + shared + the weighted expert
// rows in slot order (Combine's order; null residual/shared count as 0,
// null weights as 1: experts whose input the weights scaled).
MOE_HD inline float CombineElement(int t, int64_t i, int S, int hidden, const int32_t* slot_row, const float* weights,
                                   const float* expert_out, const float* residual, const float* shared) {
  const int64_t at = static_cast<int64_t>(t) * hidden + i;
  float y = residual ? residual[at] : 0.0f;
  if (shared) y += shared[at];
  for (int s = 0; s < S; ++s) {
    const int64_t index = static_cast<int64_t>(t) * S + s;
    const int32_t row = slot_row[index];
    if (row < 0) continue;
    y = MulAdd(weights ? weights[index] : 1.0f, expert_out[static_cast<int64_t>(row) * hidden + i], y);
  }
  return y;
}

}  // namespace moe::device_math

#endif  // MOE_ENGINE_CUDA_DEVICE_MATH_H_
