#include "server/batching/batch_queue.h"

#include "absl/strings/str_cat.h"

namespace moe {

absl::StatusOr<std::unique_ptr<BatchQueue>> BatchQueue::Create(const Options& options) {
  if (options.max_batch_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_batch_tokens must be >= 1, got ", options.max_batch_tokens));
  }
  if (options.max_queue_delay < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("max_queue_delay must not be negative");
  }
  if (options.max_queue_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_queue_size must be >= 1, got ", options.max_queue_size));
  }
  return std::unique_ptr<BatchQueue>(new BatchQueue(options));
}

absl::Status BatchQueue::Add(std::unique_ptr<PendingRequest>& request) {
  if (queue_.size() >= static_cast<size_t>(options_.max_queue_size)) {
    return absl::UnavailableError(absl::StrCat("queue full: ", queue_.size(), " requests waiting (max_queue_size ",
                                               options_.max_queue_size, ")"));
  }
  queue_.push_back(std::move(request));
  return absl::OkStatus();
}

std::vector<std::unique_ptr<PendingRequest>> BatchQueue::TakeExpired(absl::Time now) {
  std::vector<std::unique_ptr<PendingRequest>> expired;
  for (auto it = queue_.begin(); it != queue_.end();) {
    PendingRequest& request = **it;
    if (request.deadline <= now || (request.is_cancelled && request.is_cancelled())) {
      expired.push_back(std::move(*it));
      it = queue_.erase(it);
    } else {
      ++it;
    }
  }
  return expired;
}

std::vector<std::unique_ptr<PendingRequest>> BatchQueue::TakeBatch(absl::Time now, bool flush) {
  std::vector<std::unique_ptr<PendingRequest>> batch;
  if (queue_.empty()) return batch;
  const std::optional<int> layer = queue_.front()->layer;
  int64_t tokens = 0;
  bool full = false;
  std::vector<size_t> members;
  for (size_t i = 0; i < queue_.size(); ++i) {
    const PendingRequest& request = *queue_[i];
    if (request.layer != layer) continue;
    if (tokens + request.num_tokens > options_.max_batch_tokens) {
      full = true;
      break;
    }
    tokens += request.num_tokens;
    members.push_back(i);
    if (tokens == options_.max_batch_tokens) {
      full = true;
      break;
    }
  }
  const bool waited = now - queue_.front()->enqueue_time >= options_.max_queue_delay;
  if (!(full || waited || flush)) return batch;
  for (size_t i : members) batch.push_back(std::move(queue_[i]));
  for (auto it = members.rbegin(); it != members.rend(); ++it)
    queue_.erase(queue_.begin() + static_cast<std::ptrdiff_t>(*it));
  return batch;
}

absl::Time BatchQueue::NextWakeTime() const {
  if (queue_.empty()) return absl::InfiniteFuture();
  absl::Time wake = queue_.front()->enqueue_time + options_.max_queue_delay;
  for (const auto& request : queue_) wake = std::min(wake, request->deadline);
  return wake;
}

}  // namespace moe
