#include "engine/api/router.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>

#include "engine/cpu/thread_team.h"

namespace moe {
namespace {

// Logits (tokens x columns) from which SelectExperts splits the tokens over
// the thread team.
constexpr int64_t kParallelSelectWork = int64_t{1} << 12;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

void Softmax(const float* logits, int n, float* out) {
  float max_logit = kNegInf;
  for (int i = 0; i < n; ++i) max_logit = std::max(max_logit, logits[i]);
  float sum = 0;
  for (int i = 0; i < n; ++i) {
    out[i] = std::exp(logits[i] - max_logit);
    sum += out[i];
  }
  for (int i = 0; i < n; ++i) out[i] /= sum;
}

// Writes the indices of the k largest of `scores[0, n)` to `order[0, k)`, best
// first, ties to the lower index. `order` must hold n entries.
void TopK(const float* scores, int n, int k, int* order) {
  std::iota(order, order + n, 0);
  std::partial_sort(order, order + k, order + n,
                    [scores](int a, int b) { return scores[a] > scores[b] || (scores[a] == scores[b] && a < b); });
}

void Renormalise(float* weights, int k, float epsilon) {
  float sum = 0;
  for (int j = 0; j < k; ++j) sum += weights[j];
  for (int j = 0; j < k; ++j) weights[j] /= (sum + epsilon);
}

// Per-token scratch of one thread, sized for the widest row of logits.
struct Scratch {
  std::vector<float> probs, choice, group_scores;
  std::vector<int> order, group_order;
  std::vector<char> flags;  // group kept / expert used
  void Fit(int columns) {
    const size_t n = static_cast<size_t>(columns);
    if (probs.size() >= n) return;
    probs.resize(n);
    choice.resize(n);
    group_scores.resize(n);
    order.resize(n);
    group_order.resize(n);
    flags.resize(n);
  }
};

// Plain top-k over softmax probabilities (Mixtral, Qwen-MoE, OLMoE, Granite,
// Switch), times routed_scaling_factor.
void SelectSoftmaxTopK(const RouterSpec& spec, const float* logits, Scratch& s, int32_t* expert, float* weight) {
  Softmax(logits, spec.num_experts, s.probs.data());
  TopK(s.probs.data(), spec.num_experts, spec.top_k, s.order.data());
  for (int j = 0; j < spec.top_k; ++j) {
    expert[j] = s.order[j];
    weight[j] = s.probs[s.order[j]];
  }
  if (spec.norm_topk_prob) Renormalise(weight, spec.top_k, 0.0f);
  if (spec.routed_scaling_factor != 1.0f) {  // Granite's residual_multiplier
    for (int j = 0; j < spec.top_k; ++j) weight[j] *= spec.routed_scaling_factor;
  }
}

// Group-limited top-k: DeepSeek-V3 (sigmoid, selection on score + bias, group
// score = sum of its two best) and DeepSeek-V2 (softmax, group score = max).
void SelectGroupLimited(const RouterSpec& spec, const float* logits, const float* bias, Scratch& s, int32_t* expert,
                        float* weight) {
  const int E = spec.num_experts;
  const int group_size = E / spec.n_group;
  const bool sigmoid = spec.kind == RouterKind::kSigmoidGroupTopK;
  if (sigmoid) {
    for (int e = 0; e < E; ++e) s.probs[e] = 1.0f / (1.0f + std::exp(-logits[e]));
  } else {
    Softmax(logits, E, s.probs.data());
  }
  for (int e = 0; e < E; ++e) s.choice[e] = s.probs[e] + (sigmoid && bias ? bias[e] : 0.0f);
  if (spec.n_group > 1) {
    for (int g = 0; g < spec.n_group; ++g) {
      const float* member = s.choice.data() + g * group_size;
      if (sigmoid) {
        TopK(member, group_size, 2, s.order.data());
        s.group_scores[g] = member[s.order[0]] + member[s.order[1]];
      } else {
        s.group_scores[g] = *std::max_element(member, member + group_size);
      }
    }
    TopK(s.group_scores.data(), spec.n_group, spec.topk_group, s.group_order.data());
    std::fill(s.flags.begin(), s.flags.begin() + spec.n_group, 0);
    for (int j = 0; j < spec.topk_group; ++j) s.flags[s.group_order[j]] = 1;
    for (int e = 0; e < E; ++e) {
      if (!s.flags[e / group_size]) s.choice[e] = kNegInf;
    }
  }
  TopK(s.choice.data(), E, spec.top_k, s.order.data());
  for (int j = 0; j < spec.top_k; ++j) {
    expert[j] = s.order[j];
    weight[j] = s.probs[s.order[j]];  // unbiased score
  }
  if (sigmoid) {
    if (spec.norm_topk_prob) Renormalise(weight, spec.top_k, 1e-20f);
    for (int j = 0; j < spec.top_k; ++j) weight[j] *= spec.routed_scaling_factor;
  } else if (spec.norm_topk_prob && spec.top_k > 1) {
    // DeepSeek-V2's reference code either renormalises or scales, never both.
    Renormalise(weight, spec.top_k, 1e-20f);
  } else {
    for (int j = 0; j < spec.top_k; ++j) weight[j] *= spec.routed_scaling_factor;
  }
}

// A gate over groups, then a gate inside each chosen group; weight = product.
void SelectHierarchical(const RouterSpec& spec, const float* logits, Scratch& s, int32_t* expert, float* weight) {
  const int G = spec.n_group;
  const int group_size = spec.num_experts / G;
  Softmax(logits, G, s.group_scores.data());
  TopK(s.group_scores.data(), G, spec.topk_group, s.group_order.data());
  int slot = 0;
  for (int j = 0; j < spec.topk_group; ++j) {
    const int g = s.group_order[j];
    Softmax(logits + G + g * group_size, group_size, s.probs.data());
    TopK(s.probs.data(), group_size, spec.top_k_per_group, s.order.data());
    for (int i = 0; i < spec.top_k_per_group; ++i, ++slot) {
      expert[slot] = g * group_size + s.order[i];
      weight[slot] = s.group_scores[g] * s.probs[s.order[i]];
    }
  }
  if (spec.norm_topk_prob) Renormalise(weight, slot, 0.0f);
}

// Multi-gate: each task's gate selects its own experts; a token's slots are
// the union (in expert order) and each task weighs only what it selected.
void SelectMultiGate(const RouterSpec& spec, const float* logits, int num_tokens, Scratch& s,
                     std::vector<float>& task_weight, Routing* routing) {
  const int E = spec.num_experts;
  const int S = routing->slots;
  const bool dense = spec.kind == RouterKind::kDenseSoftmax;
  const int k = dense ? E : spec.top_k;
  for (int t = 0; t < num_tokens; ++t) {
    std::fill(task_weight.begin(), task_weight.end(), 0.0f);
    char* used = s.flags.data();
    std::fill(used, used + E, 0);
    for (int task = 0; task < spec.num_tasks; ++task) {
      const float* row = logits + (static_cast<size_t>(t) * spec.num_tasks + task) * E;
      Softmax(row, E, s.probs.data());
      TopK(s.probs.data(), E, k, s.order.data());
      float* w = task_weight.data() + static_cast<size_t>(task) * E;
      float sum = 0;
      for (int j = 0; j < k; ++j) sum += s.probs[s.order[j]];
      for (int j = 0; j < k; ++j) {
        const int e = s.order[j];
        used[e] = 1;
        w[e] = spec.norm_topk_prob ? s.probs[e] / sum : s.probs[e];
      }
    }
    int slot = 0;
    for (int e = 0; e < E && slot < S; ++e) {
      if (!used[e]) continue;
      const size_t index = static_cast<size_t>(t) * S + slot;
      routing->expert[index] = e;
      for (int task = 0; task < spec.num_tasks; ++task) {
        routing->weight[static_cast<size_t>(task) * num_tokens * S + index] =
            task_weight[static_cast<size_t>(task) * E + e];
      }
      ++slot;
    }
  }
}

// Expert choice: each expert takes the ceil(capacity_factor * T / E) tokens
// with the highest probability for it; a token may get 0..E experts.
void SelectExpertChoice(const RouterSpec& spec, const float* logits, int num_tokens, std::vector<float>& probs,
                        Scratch& s, Routing* routing) {
  const int E = spec.num_experts;
  for (int t = 0; t < num_tokens; ++t) {
    Softmax(logits + static_cast<size_t>(t) * E, E, probs.data() + static_cast<size_t>(t) * E);
  }
  const int capacity = std::min<int>(num_tokens, static_cast<int>(std::ceil(spec.capacity_factor * num_tokens / E)));
  std::vector<float>& column = s.choice;
  std::vector<int>& order = s.order;
  for (int e = 0; e < E; ++e) {
    for (int t = 0; t < num_tokens; ++t) column[t] = probs[static_cast<size_t>(t) * E + e];
    TopK(column.data(), num_tokens, capacity, order.data());
    for (int j = 0; j < capacity; ++j) {
      const size_t index = static_cast<size_t>(order[j]) * E + e;  // slot e of that token
      routing->expert[index] = e;
      routing->weight[index] = column[order[j]];
    }
  }
}

}  // namespace

struct SelectionScratch::Buffers {
  std::vector<Scratch> members;    // one per thread of the team
  std::vector<float> task_weight;  // multi-gate: [tasks * E]
  std::vector<float> probs;        // expert choice: [T * E]
};

SelectionScratch::SelectionScratch() : buffers_(std::make_unique<Buffers>()) {}
SelectionScratch::~SelectionScratch() = default;

void SelectionScratch::Plan(const RouterSpec& spec, int max_tokens) {
  Buffers& b = *buffers_;
  const size_t threads = static_cast<size_t>(ThreadTeam::Shared().size());
  if (b.members.size() < threads) b.members.resize(threads);
  // Multi-gate and expert choice run on member 0 with rows as long as the
  // batch; the others see one row of logits at a time.
  for (Scratch& s : b.members) s.Fit(RouterLogitColumns(spec));
  b.members[0].Fit(std::max(RouterLogitColumns(spec), max_tokens));
  const size_t E = static_cast<size_t>(spec.num_experts);
  if (b.task_weight.size() < spec.num_tasks * E) b.task_weight.resize(spec.num_tasks * E);
  if (spec.kind == RouterKind::kExpertChoice && b.probs.size() < max_tokens * E) b.probs.resize(max_tokens * E);
}

int RouterLogitColumns(const RouterSpec& spec) {
  if (spec.kind == RouterKind::kHierarchical) return spec.n_group + spec.num_experts;
  return spec.num_tasks * spec.num_experts;
}

int RoutingSlots(const RouterSpec& spec) {
  switch (spec.kind) {
    case RouterKind::kDenseSoftmax:
    case RouterKind::kExpertChoice:
      return spec.num_experts;
    case RouterKind::kHierarchical:
      return spec.topk_group * spec.top_k_per_group;
    default:
      return spec.num_tasks > 1 ? std::min(spec.num_experts, spec.num_tasks * spec.top_k) : spec.top_k;
  }
}

void SelectExperts(const RouterSpec& spec, const float* logits, int num_tokens, const float* correction_bias,
                   Routing* routing, SelectionScratch* scratch) {
  const int S = RoutingSlots(spec);
  const int columns = RouterLogitColumns(spec);
  routing->num_tokens = num_tokens;
  routing->slots = S;
  routing->num_tasks = spec.num_tasks;
  routing->expert.assign(static_cast<size_t>(num_tokens) * S, -1);
  routing->weight.assign(static_cast<size_t>(spec.num_tasks) * num_tokens * S, 0.0f);
  std::optional<SelectionScratch> own;
  if (scratch == nullptr) scratch = &own.emplace();
  scratch->Plan(spec, num_tokens);
  SelectionScratch::Buffers& buffers = *scratch->buffers_;
  if (spec.num_tasks > 1) {
    SelectMultiGate(spec, logits, num_tokens, buffers.members[0], buffers.task_weight, routing);
    return;
  }
  if (spec.kind == RouterKind::kExpertChoice) {
    SelectExpertChoice(spec, logits, num_tokens, buffers.probs, buffers.members[0], routing);
    return;
  }
  // Tokens are independent: large batches are shared by the thread team
  // (some 1 us a token with 64 experts, 1 to 2% of a DeepSeek-like layer),
  // a token at a time, without waiting for a worker still waking.
  const int64_t work = int64_t{num_tokens} * columns;
  ThreadTeam& team = ThreadTeam::Shared();
  std::atomic<int> next_token{0};
  team.RunSkippingLate(work < kParallelSelectWork ? 1 : team.size(), [&](int member, int) {
    Scratch& s = buffers.members[member];
    for (int t = next_token.fetch_add(1); t < num_tokens; t = next_token.fetch_add(1)) {
      const float* row = logits + static_cast<size_t>(t) * columns;
      int32_t* expert = routing->expert.data() + static_cast<size_t>(t) * S;
      float* weight = routing->weight.data() + static_cast<size_t>(t) * S;
      switch (spec.kind) {
        case RouterKind::kSoftmaxTopK:
          SelectSoftmaxTopK(spec, row, s, expert, weight);
          break;
        case RouterKind::kSigmoidGroupTopK:
        case RouterKind::kSoftmaxGroupTopK:
          SelectGroupLimited(spec, row, correction_bias, s, expert, weight);
          break;
        case RouterKind::kHierarchical:
          SelectHierarchical(spec, row, s, expert, weight);
          break;
        case RouterKind::kDenseSoftmax:
          Softmax(row, spec.num_experts, weight);
          std::iota(expert, expert + spec.num_experts, 0);
          break;
        case RouterKind::kExpertChoice:
          break;  // handled above
      }
    }
  });
}

}  // namespace moe
