#include "engine/api/dispatch.h"

#include <algorithm>
#include <cmath>

#include "engine/cpu/thread_team.h"

namespace moe {
namespace {

// Multiply-adds (token rows x (slots + 2) x hidden) from which Combine splits
// the tokens over the thread team.
constexpr int64_t kParallelCombineWork = int64_t{1} << 17;

}  // namespace

int64_t ExpertCapacity(const RouterSpec& spec, int num_tokens) {
  if (spec.capacity_factor <= 0 || spec.kind == RouterKind::kExpertChoice) return -1;
  const double per_expert =
      static_cast<double>(spec.capacity_factor) * num_tokens * RoutingSlots(spec) / spec.num_experts;
  return static_cast<int64_t>(std::ceil(per_expert));
}

void PlanDispatch(const Routing& routing, int num_experts, int64_t capacity, DispatchPlan* plan) {
  const int T = routing.num_tokens;
  const int S = routing.slots;
  plan->num_experts = num_experts;
  plan->tokens_routed.assign(num_experts, 0);
  plan->tokens_dropped.assign(num_experts, 0);
  plan->slot_row.assign(static_cast<size_t>(T) * S, -1);

  // Pass 1, in priority order (slot-major): count and decide what is kept.
  // slot_row temporarily holds 0 for kept selections.
  for (int s = 0; s < S; ++s) {
    for (int t = 0; t < T; ++t) {
      const size_t index = static_cast<size_t>(t) * S + s;
      const int32_t e = routing.expert[index];
      if (e < 0) continue;
      const int64_t kept = plan->tokens_routed[e] - plan->tokens_dropped[e];
      ++plan->tokens_routed[e];
      if (capacity >= 0 && kept >= capacity) {
        ++plan->tokens_dropped[e];
      } else {
        plan->slot_row[index] = 0;
      }
    }
  }
  plan->offsets.assign(num_experts + 1, 0);
  for (int e = 0; e < num_experts; ++e) {
    plan->offsets[e + 1] = plan->offsets[e] + plan->tokens_routed[e] - plan->tokens_dropped[e];
  }
  // Pass 2, in token order: place kept selections (a counting sort by expert).
  plan->row_token.resize(static_cast<size_t>(plan->num_rows()));
  std::vector<int64_t>& next = plan->cursor;
  next.assign(plan->offsets.begin(), plan->offsets.end() - 1);
  for (int t = 0; t < T; ++t) {
    for (int s = 0; s < S; ++s) {
      const size_t index = static_cast<size_t>(t) * S + s;
      if (plan->slot_row[index] < 0) continue;
      const int32_t e = routing.expert[index];
      const int64_t row = next[e]++;
      plan->row_token[row] = t;
      plan->slot_row[index] = static_cast<int32_t>(row);
    }
  }
}

void Combine(const Routing& routing, const DispatchPlan& plan, const float* expert_out, const float* residual,
             const float* shared, int hidden, int task, float* out) {
  const int T = routing.num_tokens;
  const int S = routing.slots;
  const float* weights = routing.task_weights(task);
  auto combine_tokens = [&](int first, int end) {
    for (int t = first; t < end; ++t) {
      const size_t at = static_cast<size_t>(t) * hidden;
      float* y = out + at;
      if (residual) {
        std::copy(residual + at, residual + at + hidden, y);
      } else {
        std::fill(y, y + hidden, 0.0f);
      }
      if (shared) {
        for (int i = 0; i < hidden; ++i) y[i] += shared[at + i];
      }
      for (int s = 0; s < S; ++s) {
        const size_t index = static_cast<size_t>(t) * S + s;
        const int32_t row = plan.slot_row[index];
        if (row < 0) continue;
        const float w = weights[index];
        const float* x = expert_out + static_cast<size_t>(row) * hidden;
        for (int i = 0; i < hidden; ++i) y[i] += w * x[i];
      }
    }
  };
  // Streaming the expert rows back costs 4% of a DeepSeek-like layer on one
  // thread (measured at 512 tokens); the team's workers are still awake from
  // the experts. Small batches stay on the caller.
  const int64_t work = static_cast<int64_t>(T) * (S + 2) * hidden;
  ThreadTeam& team = ThreadTeam::Shared();
  team.Run(work < kParallelCombineWork ? 1 : team.size(), [&](int member, int members) {
    const Share tokens = ShareOf(T, member, members);
    combine_tokens(static_cast<int>(tokens.first), static_cast<int>(tokens.end));
  });
}

}  // namespace moe
