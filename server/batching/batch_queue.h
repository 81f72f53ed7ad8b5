// BatchQueue: the batching decisions of one model, with time passed in, so
// that they are tested without threads or sleeping.
//
// A batch is the longest FIFO run of compatible requests (same `layer`) from
// the head whose tokens fit max_batch_tokens. It is ready when it is full
// (the next compatible request does not fit), when its oldest request has
// waited max_queue_delay, or when the caller flushes (draining).
//
// Not thread-safe: the BatchScheduler guards it.
#ifndef MOE_SERVER_BATCHING_BATCH_QUEUE_H_
#define MOE_SERVER_BATCHING_BATCH_QUEUE_H_

#include <deque>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/batching/pending_request.h"

namespace moe {

class BatchQueue {
 public:
  struct Options {
    // Most tokens in one executed batch (a request's T counts in full). 4096.
    int64_t max_batch_tokens = 4096;
    // How long the oldest request may wait for others. 0: a batch starts as
    // soon as a batch thread is free, and grows from what arrives meanwhile.
    absl::Duration max_queue_delay = absl::ZeroDuration();
    // Requests queued at most; more are rejected with UNAVAILABLE. 1024.
    int max_queue_size = 1024;
  };

  static absl::StatusOr<std::unique_ptr<BatchQueue>> Create(const Options& options);

  // Queues `request`, or returns it unqueued with UNAVAILABLE when full.
  absl::Status Add(std::unique_ptr<PendingRequest>& request);

  // Removes the requests that are past their deadline or cancelled at `now`.
  std::vector<std::unique_ptr<PendingRequest>> TakeExpired(absl::Time now);

  // The next batch if one is ready at `now` (any batch when `flush`); empty otherwise.
  std::vector<std::unique_ptr<PendingRequest>> TakeBatch(absl::Time now, bool flush);

  // When the head batch becomes ready by delay, or the earliest deadline
  // passes, whichever is first; InfiniteFuture when empty.
  absl::Time NextWakeTime() const;

  size_t size() const { return queue_.size(); }
  bool empty() const { return queue_.empty(); }
  const Options& options() const { return options_; }

 private:
  explicit BatchQueue(const Options& options) : options_(options) {}
  Options options_;
  std::deque<std::unique_ptr<PendingRequest>> queue_;
};

}  // namespace moe

#endif  // MOE_SERVER_BATCHING_BATCH_QUEUE_H_
