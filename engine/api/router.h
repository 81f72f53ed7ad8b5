// Expert selection: from router logits to the experts and weights of each token.
//
// The router's linear map (x Wg^T) is computed by the caller; these functions
// only select, so every family can be tested with exact inputs. Pure functions:
// thread-safe (large batches are split by token over ThreadTeam::Shared()).
// Ties go to the lower expert (or token) index.
#ifndef MOE_ENGINE_API_ROUTER_H_
#define MOE_ENGINE_API_ROUTER_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "engine/api/model_spec.h"

namespace moe {

// The experts each token was routed to. Token t's selections are the `slots`
// entries starting at t * slots; unused entries have expert -1 and weight 0.
// Slots are in selection order (best first), except for multi-gate and
// expert-choice routing, where they are in expert order.
struct Routing {
  int num_tokens = 0;
  int slots = 0;
  int num_tasks = 1;
  std::vector<int32_t> expert;  // [T * slots]
  std::vector<float> weight;    // [num_tasks][T * slots]

  const float* task_weights(int task) const { return weight.data() + static_cast<size_t>(task) * num_tokens * slots; }
};

// Number of logit columns the router's linear map produces per token:
// num_tasks * E, or n_group + E for hierarchical gating (group logits first).
int RouterLogitColumns(const RouterSpec& spec);

// Slots per token for `spec` (top_k, E for dense and expert choice, ...).
int RoutingSlots(const RouterSpec& spec);

// Working memory of SelectExperts. Planned for a router and the largest
// batch (and reused: a routing reserved as large), selection allocates
// nothing. Not thread-safe: one per caller.
class SelectionScratch {
 public:
  SelectionScratch();
  ~SelectionScratch();
  // Grows it to fit `spec` and batches of up to `max_tokens`.
  void Plan(const RouterSpec& spec, int max_tokens);

 private:
  friend void SelectExperts(const RouterSpec&, const float*, int, const float*, Routing*, SelectionScratch*);
  struct Buffers;
  std::unique_ptr<Buffers> buffers_;
};

// Selects experts from `logits` [num_tokens, RouterLogitColumns(spec)].
// `correction_bias` [E] may be null (only sigmoid_group_topk reads it).
// Reuses `routing`'s storage, and `scratch`'s when given (null: scratch of
// its own, allocated for the call).
void SelectExperts(const RouterSpec& spec, const float* logits, int num_tokens, const float* correction_bias,
                   Routing* routing, SelectionScratch* scratch = nullptr);

}  // namespace moe

#endif  // MOE_ENGINE_API_ROUTER_H_
