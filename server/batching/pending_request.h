// PendingRequest: one inference request as the batcher sees it, and the view
// of a batch's result through which it is answered.
//
// Ownership: the batcher owns a PendingRequest from Submit until it calls
// `done`, exactly once, on a batch thread. The input bytes are borrowed from
// the request message, which the front end keeps alive until `done` returns.
#ifndef MOE_SERVER_BATCHING_PENDING_REQUEST_H_
#define MOE_SERVER_BATCHING_PENDING_REQUEST_H_

#include <functional>
#include <optional>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "engine/api/dtype.h"
#include "engine/api/moe_model.h"

namespace moe {

// A request's slice of a batch's result: rows [first_token, first_token +
// num_tokens) of every output, and of the routing when it was computed.
struct ResultView {
  const MoeModel::RunResult* batch = nullptr;
  int first_token = 0;
  int num_tokens = 0;
  int slots = 0;  // routing slots per (token, layer)
};

struct PendingRequest {
  // Input rows [num_tokens, hidden] of `dtype`, little-endian, borrowed.
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int num_tokens = 0;
  // Run one MoE layer instead of the stack; batches never mix layers.
  std::optional<int> layer;
  bool return_routing = false;
  absl::Time enqueue_time;
  // Past this the request is failed with DEADLINE_EXCEEDED instead of run.
  absl::Time deadline = absl::InfiniteFuture();
  // Checked before the request is batched (the scheduler is woken by
  // BatchScheduler::NotifyCancelled); true drops it with CANCELLED.
  std::function<bool()> is_cancelled;
  // Called exactly once. On success `view` is valid only during the call.
  std::function<void(const absl::Status& status, const ResultView* view)> done;
};

}  // namespace moe

#endif  // MOE_SERVER_BATCHING_PENDING_REQUEST_H_
