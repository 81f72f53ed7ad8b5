// Dispatch: groups the (token, slot) selections of a Routing by expert into
// contiguous rows (a counting sort), applying the capacity limit; and Combine:
// the weighted sum of expert outputs back in token order.
//
// Not thread-safe: one DispatchPlan per batch worker. Reusing a plan reuses its
// storage, so steady-state batches allocate nothing.
#ifndef MOE_ENGINE_API_DISPATCH_H_
#define MOE_ENGINE_API_DISPATCH_H_

#include <cstdint>
#include <vector>

#include "engine/api/router.h"

namespace moe {

struct DispatchPlan {
  int num_experts = 0;
  // Rows of expert e are [offsets[e], offsets[e + 1]); within an expert, rows
  // are in token order. [E + 1]
  std::vector<int64_t> offsets;
  // Token of each row. [rows]
  std::vector<int32_t> row_token;
  // Row of each (token, slot); -1 for unused slots and dropped tokens. [T * slots]
  std::vector<int32_t> slot_row;
  // Per expert: selections (kept + dropped) and selections dropped by capacity.
  std::vector<int64_t> tokens_routed;
  std::vector<int64_t> tokens_dropped;
  // Scratch of PlanDispatch.
  std::vector<int64_t> cursor;

  int64_t num_rows() const { return offsets.empty() ? 0 : offsets.back(); }
  int64_t rows_of(int expert) const { return offsets[expert + 1] - offsets[expert]; }
};

// Tokens an expert may take for a batch of `num_tokens` under `spec`'s
// capacity factor; -1 when unlimited (dropless, or expert choice whose
// selection already holds the limit).
int64_t ExpertCapacity(const RouterSpec& spec, int num_tokens);

// Builds `plan` from `routing`. With capacity >= 0, an expert keeps at most
// `capacity` selections, taken in priority order: every token's first choice
// before any second choice (GShard), tokens in order within a slot; the rest
// are dropped (their slot_row is -1 and they contribute nothing).
void PlanDispatch(const Routing& routing, int num_experts, int64_t capacity, DispatchPlan* plan);

// The layer's output rows of width `hidden`: out[t] = residual[t] +
// shared[t] + the sum over slots s, in order, of weight[task][t, s] *
// expert_out[slot_row[t, s]], added in that order (a null residual or shared
// counts as zero). Deterministic: a token's row does not depend on the other
// tokens of the batch nor on the threads; large batches are split by token
// over ThreadTeam::Shared().
void Combine(const Routing& routing, const DispatchPlan& plan, const float* expert_out, const float* residual,
             const float* shared, int hidden, int task, float* out);

}  // namespace moe

#endif  // MOE_ENGINE_API_DISPATCH_H_
